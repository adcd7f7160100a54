"""Reading inputs in every shape users hold, with errors that name the file and line.

A data source is a .jsonl file (read here, so that an error names file:line), a .json file of JSON lines (the official
DICE data files; read the same way), a .json list of objects, a .parquet file, a folder saved with datasets'
`save_to_disk`, or a hub dataset id with a split, ORG/NAME or ORG/NAME@REVISION (a branch, tag or commit) (the last
three read by `datasets`). Prompts are strings (one user turn) or chat messages; preference pairs come as strings, in
TRL's conversational format or as full conversations.
"""
import hashlib
import json
import os

from dice import DiceError


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
    """Yield (where, row) for every row of a data source (see the module docstring); `where` names file:line, or the
    row of a dataset, for error messages. JSON lines are read here; everything else by `datasets`."""
    source = str(source)
    lower = source.lower()
    try:
        if lower.endswith(".jsonl") or (lower.endswith(".json") and _first_char(source) != "["):
            yield from ((f"{source}:{i}", row) for i, row in read_jsonl(source))
        elif lower.endswith(".json"):  # a list: json.load (datasets' JSON reader rounds floats to 12 digits)
            yield from _read_json_list(source)
        elif lower.endswith(".parquet") or os.path.isdir(source):
            yield from ((f"{source}: row {i}", row) for i, row in enumerate(_load_dataset(source, split)))
        elif os.path.isfile(source) or source.startswith((".", "/", "~")):
            raise DiceError(f"cannot read {source}: expected a .jsonl, .json or .parquet file, a dataset folder "
                            "or a hub dataset id")
        else:
            yield from ((f"{source}[{split}]: row {i}", row) for i, row in enumerate(_load_dataset(source, split)))
    except UnicodeDecodeError as e:
        raise DiceError(f"cannot read {source}: not UTF-8 text (byte {e.start})") from None


def _first_char(path):
    """The first non-blank character of a file: "[" for a JSON list, "{" for JSON lines."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    return line.strip()[0]
    except OSError as e:
        raise DiceError(f"cannot read {path}: {e.strerror}") from None
    return ""


def _read_json_list(source):
    try:
        with open(source, encoding="utf-8") as f:
            rows = json.load(f)
    except OSError as e:
        raise DiceError(f"cannot read {source}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DiceError(f"{source}:{e.lineno}: bad JSON ({e.msg})") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DiceError(f"{source}: item {i}: expected a JSON object, got {type(row).__name__}")
        yield f"{source}: item {i}", row


def split_of(source, split):
    """The split that names `source`'s rows: None for a file (a file has no splits, so --split is not part of its
    output's identity), `split` for a dataset folder or a hub id, where it is required."""
    if source is None or str(source).lower().endswith((".jsonl", ".json", ".parquet")):
        return None
    if not split:
        raise DiceError(f"--split is required with a dataset folder or hub dataset id ({source})")
    return split


def _load_dataset(source, split):
    """A .parquet file, a save_to_disk folder (its `split` when it holds several) or a hub dataset."""
    import datasets

    datasets.disable_progress_bars()  # a stage prints its own progress; stderr is for one-line errors
    try:
        if os.path.isfile(source):
            return datasets.load_dataset("parquet", data_files=source, split="train")
        if os.path.isdir(source):
            data = datasets.load_from_disk(source)
            return data[split] if isinstance(data, datasets.DatasetDict) else data
        from dice.models import split_revision  # here: dice.models imports this module

        name, revision = split_revision(source)
        return datasets.load_dataset(name, split=split, **({"revision": revision} if revision else {}))
    except Exception as e:  # FileNotFoundError, ConnectionError, ValueError (bad split), KeyError, ArrowInvalid ...
        raise DiceError(f"cannot load dataset {source} (split {split}): {str(e).strip().splitlines()[0]}") from None


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
      - TRL's conversational format: prompt as messages, chosen/rejected as one assistant turn;
      - full conversations whose last turn is the answer (HuggingFaceH4/ultrafeedback_binarized): without a `prompt`
        field the prompt is the turns chosen and rejected share (TRL's `extract_prompt`); with one, the turns before
        each answer must be that prompt.
    Anything else is a DiceError naming `where` (file:line)."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DiceError(f"{where}: missing field '{key}' (a pair needs prompt, chosen and rejected)")
    if row.get("prompt") is None and all(isinstance(row[k], list) and row[k] for k in ("chosen", "rejected")):
        from trl.data_utils import extract_prompt  # imported only here: TRL takes seconds to import

        row = extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})
        if len(row["chosen"]) != 1 or len(row["rejected"]) != 1:
            raise DiceError(f"{where}: 'chosen' and 'rejected' hold different conversations before their last turn")
        row["prompt"] = row["prompt"] or None  # two lone answers: no prompt at all
    if row.get("prompt") is None:
        raise DiceError(f"{where}: missing field 'prompt' (a pair needs prompt, chosen and rejected)")
    prompt, answers = to_messages(row["prompt"], f"{where}: 'prompt'"), []
    for key in ("chosen", "rejected"):
        value = row[key]
        if isinstance(value, str):
            answers.append(value)
            continue
        turns = to_messages(value, f"{where}: '{key}'") if isinstance(value, list) and value else None
        if not turns or turns[-1]["role"] != "assistant":
            raise DiceError(f"{where}: '{key}' must be a string or messages ending with an assistant turn")
        if len(turns) > 1 and turns[:-1] != prompt:
            raise DiceError(f"{where}: 'prompt' differs from the conversation before the answer in '{key}'")
        answers.append(turns[-1]["content"])
    if len(prompt) == 1 and prompt[0]["role"] == "user":  # one user turn: the same prompt as its plain text
        prompt = prompt[0]["content"]
    return {"prompt": prompt, "chosen": answers[0], "rejected": answers[1]}


def prompt_id(prompt):
    """Stable id of a prompt: sha256 of its text (or of its messages as canonical JSON), 16 hex digits."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------- the prompt of an input row

PROMPT_FIELDS = ("prompt", "instruction", "messages")  # looked for in this order when no field is named


def find_field(rows, source, field=None):
    """The field holding the prompt: `field` when named, else the first of PROMPT_FIELDS in the first row.
    rows: (where, row) pairs of data.read_rows."""
    if not rows:
        raise DiceError(f"{source}: no prompts")
    first = rows[0][1]
    field = field or next((f for f in PROMPT_FIELDS if f in first), None)
    if field is None:
        raise DiceError(f"{rows[0][0]}: no prompt field (looked for {', '.join(PROMPT_FIELDS)}; "
                        f"found {', '.join(map(str, first)) or 'nothing'}); pass --prompt_field")
    return field


def get_prompt(row, field, where):
    """The prompt of one row (a non-empty string or a messages list without trailing assistant turns)."""
    if field not in row:
        raise DiceError(f"{where}: missing field {field!r}")
    prompt = row[field]
    if isinstance(prompt, list):
        while prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
            prompt = prompt[:-1]
    to_messages(prompt, f"{where}: field {field!r}")  # raises on an empty or malformed prompt
    return prompt
