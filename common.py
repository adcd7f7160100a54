"""Plumbing shared by the four DICE stage scripts (what nanoGPT's model.py is to train.py and sample.py).

Nothing here is DICE itself: it is the part every stage needs identically, kept in one place so the stages
cannot drift apart:
  - one-line user errors (`DiceError`) and the fire entry point that prints them (`cli`),
  - argument checks for fire, which ignores type hints (`as_int`, `as_float`, `as_bool`, `as_choice`),
  - JSONL reading with file:line errors, atomic writes, the never-overwrite rule and done markers,
  - THE prompt formatting: a prompt becomes a user message and is rendered with the tokenizer's chat template
    (`add_generation_prompt=True`) exactly as TRL's DPOTrainer renders a conversational row,
  - model/tokenizer loading that is safe by default (safetensors only, no remote code unless asked).
"""
import contextlib
import hashlib
import json
import math
import os
import sys


class DiceError(Exception):
    """A problem with the user's input or environment: printed as one line, exit status 2, no traceback."""


def cli(main):
    """Run `main` as a fire CLI; a DiceError becomes `error: <message>` on stderr and exit status 2."""
    import fire

    try:
        fire.Fire(main)
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
    """The file that says `path` is finished: written after it, it records the settings that produced it."""
    return str(path).rstrip("/") + ".done.json"


def refuse_overwrite(path, overwrite):
    """Never silently replace a finished output: refuse unless --overwrite."""
    if os.path.exists(path) and not overwrite:
        raise DiceError(f"{path} already exists; pass --overwrite to replace it")


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


def check_pair(row, where):
    """A preference pair: `prompt` (string or messages) and `chosen`/`rejected` strings; returns the prompt messages.
    Anything else is a DiceError naming `where` (file:line)."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise DiceError(f"{where}: missing field '{key}' (a pair needs prompt, chosen and rejected)")
    for key in ("chosen", "rejected"):
        if not isinstance(row[key], str):
            raise DiceError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
    return to_messages(row["prompt"], where)


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


def chat_prompt_text(tokenizer, prompt):
    """The same prompt as text (for logs and for engines that take strings)."""
    return tokenizer.apply_chat_template(to_messages(prompt), add_generation_prompt=True, tokenize=False)


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


def load_tokenizer(path, trust_remote_code=False):
    from transformers import AutoTokenizer

    path = check_model_path(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise DiceError(f"cannot load tokenizer from {path}: {str(e).splitlines()[0]}") from None


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
