"""Plumbing shared by the four DICE stage scripts (what nanoGPT's model.py is to train.py and sample.py).

Nothing here is DICE itself: it is the part every stage needs identically, kept in one place so the stages
cannot drift apart:
  - one-line user errors (`DiceError`) and the fire entry point that prints them (`cli`),
  - argument checks for fire, which ignores type hints (`convert`, built on `as_int`, `as_float`, `as_bool`, ...),
  - THE stage protocol (`stage`): done already / refused / locked / resumed, the done marker, atomic publishing,
  - JSONL reading with file:line errors and atomic writes,
  - THE prompt formatting: a prompt becomes a user message and is rendered with the tokenizer's chat template
    (`add_generation_prompt=True`) exactly as TRL's DPOTrainer renders a conversational row,
  - model/tokenizer loading that is safe by default (safetensors only, no remote code unless asked).
"""
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time


class DiceError(Exception):
    """A problem with the user's input or environment: printed as one line, exit status 2, no traceback."""


def cli(main):
    """Run `main` as a fire CLI; a DiceError becomes `error: <message>` on stderr and exit status 2."""
    import fire

    try:
        fire.Fire(main)
    except AlreadyDone as e:
        if int(os.environ.get("RANK", "0")) == 0:  # one line, also when several processes run the stage
            print(e)
    except DiceError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- argument checks (fire ignores hints)

def as_int(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DiceError(f"--{name} must be an integer, got {value!r}")
    try:
        value = int(value)
    except ValueError:
        raise DiceError(f"--{name} must be an integer, got {value!r}") from None
    if minimum is not None and value < minimum:
        raise DiceError(f"--{name} must be >= {minimum}, got {value}")
    return value


def as_float(name, value, minimum=None, maximum=None):
    if isinstance(value, bool):
        raise DiceError(f"--{name} must be a number, got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise DiceError(f"--{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise DiceError(f"--{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise DiceError(f"--{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise DiceError(f"--{name} must be <= {maximum}, got {value}")
    return value


def as_bool(name, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no"):
        return False
    if value in (0, 1):
        return bool(value)
    raise DiceError(f"--{name} must be true or false, got {value!r}")


def as_choice(name, value, choices):
    if value not in choices:
        raise DiceError(f"--{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def as_int_list(name, value):
    """None, an int, '1,2', (1, 2) or [1, 2] -> list of ints (fire turns '1,2' into a tuple)."""
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = str(value).split(",")
    return [as_int(name, v) for v in items if str(v).strip() != ""]


def convert(values, rules):
    """Check and convert the arguments fire parsed, in one call: {name: rule} where a rule is a type (int, float,
    bool, str, list = comma-separated ints), (int, minimum), (float, minimum, maximum) or a tuple of allowed strings.
    None stays None (an optional argument) except for bool. Returns a new dict; a bad value is a DiceError."""
    out = dict(values)
    for name, rule in rules.items():
        value = values.get(name)
        if isinstance(rule, tuple) and rule and not isinstance(rule[0], type):
            out[name] = as_choice(name, value, rule)
            continue
        kind, *bounds = rule if isinstance(rule, tuple) else (rule,)
        if value is None and kind is not bool:
            continue
        if kind is int:
            out[name] = as_int(name, value, *bounds)
        elif kind is float:
            out[name] = as_float(name, value, *bounds)
        elif kind is bool:
            out[name] = as_bool(name, value)
        elif kind is list:
            out[name] = as_int_list(name, value)
        else:
            out[name] = str(value)
    return out


def refuse_overwrite(path, overwrite):
    """Never silently replace a finished output (for the tools; the stages use `stage`)."""
    if os.path.exists(path) and not overwrite:
        raise DiceError(f"{path} already exists; pass --overwrite to replace it")


# ----------------------------------------------------------------------------- files

def read_jsonl(path):
    """Yield (line_number, row) for every non-blank line; a bad line is a DiceError naming path:line."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DiceError(f"cannot read {path}: {e.strerror}") from None
    with f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DiceError(f"{path}:{i}: bad JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DiceError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            yield i, row


def read_rows(source, split="train"):
    """Yield (where, row) for every row of a data source as users hold it: a .jsonl file (and a .json file of JSON
    lines, as the official DICE data), a .json list of objects, a .parquet file, a folder saved with datasets'
    `save_to_disk`, or a hub dataset id (`split`). `where` names file:line (or row i) for error messages."""
    source = str(source)
    lower = source.lower()
    try:
        if lower.endswith(".jsonl"):
            yield from ((f"{source}:{i}", row) for i, row in read_jsonl(source))
        elif lower.endswith(".json"):
            yield from _read_json(source)
        elif lower.endswith(".parquet"):
            import pyarrow.parquet

            try:
                rows = pyarrow.parquet.read_table(source).to_pylist()
            except Exception as e:  # OSError, ArrowInvalid
                raise DiceError(f"cannot read {source}: {str(e).splitlines()[0]}") from None
            yield from ((f"{source}: row {i}", row) for i, row in enumerate(rows))
        elif os.path.isfile(source) or (source.startswith((".", "/", "~")) and not os.path.isdir(source)):
            raise DiceError(f"cannot read {source}: expected a .jsonl, .json or .parquet file, a dataset folder "
                            "or a hub dataset id")
        else:
            yield from ((f"{source}[{split}]: row {i}", row) for i, row in enumerate(_load_dataset(source, split)))
    except UnicodeDecodeError as e:
        raise DiceError(f"cannot read {source}: not UTF-8 text (byte {e.start})") from None


def split_of(source, split):
    """The split that names `source`'s rows: None for a file (a file has no splits, so --split is not part of its
    output's identity), `split` for a dataset folder or a hub id, where it is required."""
    if source is None or str(source).lower().endswith((".jsonl", ".json", ".parquet")):
        return None
    if not split:
        raise DiceError(f"--split is required with a dataset folder or hub dataset id ({source})")
    return split


def _read_json(source):
    try:
        with open(source, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise DiceError(f"cannot read {source}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines saved as .json (the official DICE data files)
            yield from ((f"{source}:{i}", row) for i, row in read_jsonl(source))
            return
        raise DiceError(f"{source}:{e.lineno}: bad JSON ({e.msg})") from None
    if isinstance(data, dict):  # one JSON object in a .json file: a JSON-lines file of one row
        data = [data]
    if not isinstance(data, list):
        raise DiceError(f"{source}: expected a JSON list of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DiceError(f"{source}: item {i}: expected a JSON object, got {type(row).__name__}")
        yield f"{source}: item {i}", row


def _load_dataset(source, split):
    import datasets

    try:
        if os.path.isdir(source):
            data = datasets.load_from_disk(source)
            return data[split] if isinstance(data, datasets.DatasetDict) else data
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # FileNotFoundError, ConnectionError, ValueError (bad split), KeyError, ...
        raise DiceError(f"cannot load dataset {source} (split {split}): {str(e).splitlines()[0]}") from None


def load_script(name):
    """Import a stage script (e.g. "02_score") as a module: its name starts with a digit, so `import` cannot."""
    import importlib.util

    name = name.removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def done_marker(path):
    """The file that says `path` is finished: written by `stage` just before `path` is published."""
    return str(path).rstrip("/") + ".done.json"


# ----------------------------------------------------------------------------- the stage protocol (all four stages)

class AlreadyDone(Exception):
    """Raised by `stage` when the output is finished with the same arguments and inputs: `cli` prints it, exit 0."""


def fingerprint(path):
    """What identifies an input or output by content: sha256 of a file; of a folder, its file names and sizes plus the
    content of every file up to 16 MiB (config, tokenizer, records: not the weights, which would take minutes);
    anything else (a hub id) is its own name. 16 hex digits."""
    h = hashlib.sha256()
    path = str(path)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    elif os.path.isdir(path):
        for folder, dirs, files in sorted(os.walk(path)):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(folder, name)
                size = os.path.getsize(full)
                h.update(f"{os.path.relpath(full, path)}\0{size}\0".encode())
                if size <= 16 << 20:
                    with open(full, "rb") as f:
                        h.update(f.read())
    else:
        h.update(("name:" + path).encode())
    return h.hexdigest()[:16]


def _comparable(args, inputs, ignore):
    """The arguments a rerun must repeat: all but the input paths (compared by content), --out and `ignore`."""
    skip = set(inputs) | {"out", "overwrite"} | set(ignore)
    return json.loads(json.dumps({k: v for k, v in args.items() if k not in skip}, default=str))


def _differences(before, now):
    keys = sorted(set(before) | set(now), key=str)
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


class Stage:
    """One run of a stage script on one output. See `stage`."""

    def __init__(self, name, out, args, inputs, overwrite, seed, ignore, main_process):
        self.name, self.out, self.seed, self.main = name, str(out).rstrip("/"), seed, main_process
        self.args, self.inputs, self.overwrite = args, {k: v for k, v in inputs.items() if v is not None}, overwrite
        self.ignore, self.marker, self.tmp = tuple(ignore), done_marker(self.out), self.out + ".tmp"
        self.record, self.works, self.started, self._lock = {}, [], time.time(), None

    # -- the start: who holds the output, is it done already, may it be replaced
    def begin(self):
        if self.main:
            self._acquire()
        self.input_fingerprints = {k: fingerprint(v) for k, v in self.inputs.items()}
        self.settings = {"args": _comparable(self.args, self.inputs, self.ignore), "inputs": self.input_fingerprints}
        finished = self._finished()
        if finished is not None:
            changed = _differences(finished.get("settings", {}).get("args", {}), self.settings["args"])
            changed += [f"input --{k} changed" for k in sorted(set(finished.get("inputs", {})) | set(self.inputs))
                        if finished.get("inputs", {}).get(k, {}).get("fingerprint") != self.input_fingerprints.get(k)]
            if not changed:
                raise AlreadyDone(f"{self.out}: done already (same arguments and inputs; see {self.marker})")
            if not self.overwrite:
                raise DiceError(f"{self.out} was made with other arguments or inputs ({'; '.join(changed)}); "
                                "pass --overwrite to redo it")
        elif os.path.lexists(self.out) and not self.overwrite:
            raise DiceError(f"{self.out} already exists but is not a finished output of this stage (no matching "
                            f"{os.path.basename(self.marker)}); pass --overwrite to replace it")
        if self.main:
            _remove(self.tmp)  # left by a run that was killed: never resumed, always rebuilt

    def _finished(self):
        """The done marker of a finished output (its fingerprint matches the output), else None."""
        try:
            with open(self.marker, encoding="utf-8") as f:
                marker = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(marker, dict) or not os.path.lexists(self.out):
            return None
        return marker if marker.get("output", {}).get("fingerprint") == fingerprint(self.out) else None

    def _acquire(self):
        import fcntl

        path = self.out + ".lock"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        f = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise DiceError(f"{self.out} is being written right now by {holder}; wait for it or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} ({' '.join(sys.argv)[:200]})\n")
        f.flush()
        self._lock = f

    def release(self):
        if self._lock is not None:
            os.remove(self._lock.name)  # removed while still held: no second process can slip in between
            self._lock.close()
            self._lock = None

    def writing_beside(self):
        """Call before writing files beside the output (03's stats.json and plots). When this run replaces an output
        (--overwrite; an unchanged one was done already in `begin`), the old one stops counting as finished now (its
        done marker goes), so a run killed from here on never leaves new side files beside an output whose marker
        still vouches for it: the next run must redo it."""
        if self.main and self.overwrite:
            _remove(self.marker)

    # -- resumable work (01's partial file, 04's checkpoints)
    def work(self, path, keep=False):
        """Register `path` (a file or folder a killed run leaves behind) and say whether to resume it: True when it
        exists and was started with the same arguments and inputs; absent, it is started now (False); started with
        other settings, it is discarded with --overwrite, else refused. Removed when the stage finishes (with its
        settings file PATH.args.json) unless `keep`."""
        path, record = str(path).rstrip("/"), str(path).rstrip("/") + ".args.json"
        if not keep:
            self.works.append(path)
        if not os.path.lexists(path):
            if self.main:
                write_json(record, self.settings)
            return False
        try:
            with open(record, encoding="utf-8") as f:
                before = json.load(f)
        except (OSError, ValueError):
            before = None
        if before == self.settings:
            return True
        changed = "its settings file is missing" if before is None else "; ".join(
            _differences(before.get("args", {}), self.settings["args"])
            + [f"input --{k} changed" for k in self.inputs
               if before.get("inputs", {}).get(k) != self.input_fingerprints[k]])
        if not self.overwrite:
            raise DiceError(f"{path} holds an unfinished run with other settings ({changed}); rerun with the same "
                            "settings to resume it, or pass --overwrite to start again")
        if self.main:
            _remove(path)
            write_json(record, self.settings)
        return False

    # -- the end: marker first, then the output renamed into place
    def finish(self):
        if not os.path.lexists(self.tmp):
            raise DiceError(f"internal error: {self.name} wrote no output at {self.tmp}")
        marker = {
            "stage": self.name, "args": self.args, "settings": self.settings,
            "inputs": {k: {"path": str(v), "fingerprint": self.input_fingerprints[k]} for k, v in self.inputs.items()},
            "output": {"path": self.out, "fingerprint": fingerprint(self.tmp)}, "seed": self.seed,
            "versions": package_versions("torch", "transformers", "trl", "accelerate", "datasets", "numpy"),
            **self.record,
            "seconds": round(time.time() - self.started, 1),
        }
        write_json(self.marker, marker)
        if os.path.isdir(self.out) and not os.path.islink(self.out):
            _remove(self.out + ".old")
            os.replace(self.out, self.out + ".old")
        os.replace(self.tmp, self.out)
        _remove(self.out + ".old")
        for path in self.works:
            _remove(path)
            _remove(path + ".args.json")


@contextlib.contextmanager
def stage(name, out, args, inputs=None, overwrite=False, seed=None, ignore=(), main_process=True):
    """The one protocol of every stage: decide, lock, run, record, publish.

    - `out` finished (its done marker OUT.done.json matches it) with the same arguments and the same inputs (`inputs`:
      {argument: path}, compared by content, see `fingerprint`): AlreadyDone ("done already", exit 0).
    - made with other arguments or inputs, or present without a marker: refused with one line unless `overwrite`.
    - another process writing `out` right now (it holds OUT.lock): refused with one line naming it.
    - else the body runs and writes the complete output to `st.tmp` (a file or a folder); `st.record` takes the counts
      and anything else for the marker; `st.work(path)` registers resumable work. On success the marker (stage,
      arguments, input fingerprints, output fingerprint, seed, counts, versions, seconds) is written, then `st.tmp` is
      renamed onto `out`. On an error nothing is published. `main_process`: False in the other processes of a
      multi-process run, which decide the same but never lock, delete or write.
    """
    st = Stage(name, out, args, inputs or {}, overwrite, seed, ignore, main_process)
    try:
        st.begin()
        try:
            yield st
        except BaseException:
            if main_process:
                _remove(st.tmp)  # nothing half-written is left behind
            raise
        if main_process:
            st.finish()
    finally:
        st.release()


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Write to `path.tmp.PID` and rename onto `path` only when the block finishes without an error."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def write_jsonl(path, rows):
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- prompts (identical in every stage)

def to_messages(prompt, where="prompt"):
    """A prompt as chat messages: a string becomes one user turn; a messages list is checked and kept."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DiceError(f"{where}: empty prompt")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise DiceError(f"{where}: a prompt must be a non-empty string or a list of {{role, content}} messages")


def read_pair(row, where):
    """A preference pair in any shape users hold -> {"prompt", "chosen", "rejected"}: prompt a string (one user turn)
    or a messages list, chosen/rejected strings. Accepted shapes:
      - strings: prompt, chosen, rejected (this project's files, the official DICE preference.json);
      - TRL's conversational format: prompt as messages, chosen/rejected as one assistant turn ([{"role":
        "assistant", "content": ...}]);
      - full conversations whose last turn is the answer (HuggingFaceH4/ultrafeedback_binarized; trl-lib's implicit
        prompt): the prompt is the turns before it, the same in chosen and rejected (a `prompt` field is then
        optional and must agree when it is the text of the single user turn).
    Anything else is a DiceError naming `where` (file:line)."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DiceError(f"{where}: missing field '{key}' (a pair needs prompt, chosen and rejected)")
    answers, history = [], []
    for key in ("chosen", "rejected"):
        value = row[key]
        if isinstance(value, str):
            answers.append(value)
            history.append(None)
            continue
        turns = to_messages(value, f"{where}: '{key}'") if isinstance(value, list) and value else None
        if not turns or turns[-1]["role"] != "assistant":
            raise DiceError(f"{where}: '{key}' must be a string or messages ending with an assistant turn")
        answers.append(turns[-1]["content"])
        history.append(turns[:-1])
    if history[0] != history[1] and None not in history:
        raise DiceError(f"{where}: 'chosen' and 'rejected' hold different conversations before their last turn")
    context = history[0] if history[0] is not None else history[1]
    if "prompt" in row and row["prompt"] is not None:
        prompt = to_messages(row["prompt"], f"{where}: 'prompt'")
        if context and context != prompt:
            raise DiceError(f"{where}: 'prompt' differs from the conversation before the answer in 'chosen'")
    elif context:
        prompt = context
    else:
        raise DiceError(f"{where}: missing field 'prompt' (a pair needs prompt, chosen and rejected)")
    if len(prompt) == 1 and prompt[0]["role"] == "user":  # one user turn: the same prompt as its plain text
        prompt = prompt[0]["content"]
    return {"prompt": prompt, "chosen": answers[0], "rejected": answers[1]}


def prompt_id(prompt):
    """Stable id of a prompt: sha256 of its text (or of its messages as canonical JSON), 16 hex digits."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def chat_prompt_ids(tokenizer, prompt):
    """Token ids of the prompt as TRL's DPOTrainer builds them for a conversational row:
    apply_chat_template(messages, add_generation_prompt=True, tokenize=True); no special tokens added again."""
    out = tokenizer.apply_chat_template(to_messages(prompt), add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def package_versions(*names):
    """Python and the installed versions of `names` (those not installed are left out), for done markers."""
    import importlib.metadata as md

    found = {"python": sys.version.split()[0]}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


# ----------------------------------------------------------------------------- models

def check_model_path(path):
    """A local folder must exist; a bare `name` or `org/name` that is not a folder is passed on as a hub id."""
    path = str(path)
    if os.path.isdir(path):
        return path
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.exists(path):
        raise DiceError(f"model not found: {path} is not a model folder")
    return path


def load_tokenizer(path, trust_remote_code=False, chat_template=None):
    """The tokenizer of a model; `chat_template` (a jinja file, as transformers' `chat_template`) replaces its own
    template, so every stage and TRL's tokenization inside stage 4 render prompts and responses with it."""
    from transformers import AutoTokenizer

    path = check_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise DiceError(f"cannot load tokenizer from {path}: {str(e).splitlines()[0]}") from None
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
        unknown = unknown_special_tokens(tokenizer, tokenizer.chat_template)
        if unknown and (chat_template, tuple(unknown)) not in _WARNED and int(os.environ.get("RANK", "0")) == 0:
            _WARNED.add((chat_template, tuple(unknown)))
            print(f"warning: {chat_template} names {', '.join(unknown)}, which the tokenizer of {path} does not know "
                  "as special tokens: they are tokenized as plain text", file=sys.stderr)
    return tokenizer


_WARNED = set()  # one warning per template and process, not one per tokenizer loaded


def read_chat_template(path):
    """The text of a jinja chat template file (a one-line error when it cannot be read or is not valid jinja)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DiceError(f"cannot read chat template {path}: {getattr(e, 'strerror', None) or e}") from None
    import jinja2

    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise DiceError(f"{path}:{e.lineno}: bad chat template ({e.message})") from None
    return text


def unknown_special_tokens(tokenizer, template):
    """Strings of the template that look like special tokens (<|...|>, <s>, </s>) but are not special to `tokenizer`."""
    import re

    special = set(tokenizer.all_special_tokens) | {
        t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    found = dict.fromkeys(re.findall(r"<\|[A-Za-z0-9_]+\|>|</?s>", template))
    return [t for t in found if t not in special]


def load_model(path, dtype="float32", trust_remote_code=False, device=None):
    import torch
    from transformers import AutoModelForCausalLM

    path = check_model_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except OSError as e:
        raise DiceError(f"cannot load model from {path}: {str(e).splitlines()[0]}") from None
    if device is not None:
        model.to(device)
    return model.eval()
