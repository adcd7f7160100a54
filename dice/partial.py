"""01's partial file OUT.partial: rows are appended as batches finish, so a killed run resumes after its last complete
row; protocol.stage's `st.work` decides whether the file belongs to a run with the same settings."""
import json
import os

from dice import DiceError


def resume(st, partial, work, overwrite):
    """The rows a killed run with the same settings left in `partial` (the first prompts of `work`), else none."""
    rows = read_partial(partial) if st.work(partial) else []
    if [r.get("prompt_id") for r in rows] != [w["prompt_id"] for w in work[: len(rows)]]:
        if not overwrite:
            raise DiceError(f"{partial} does not match this prompt set in order; pass --overwrite to start again")
        rows = []
    if rows:
        print(f"resume: {len(rows)} prompts already in {partial}, {len(work) - len(rows)} to go")
    else:
        open(partial, "w").close()
    return rows


def read_partial(path):
    """Complete rows of a partial output; a torn last line (a kill mid-write) is cut off the file."""
    with open(path, "rb") as f:
        data = f.read()
    rows, good_end = [], 0
    for line in data.split(b"\n")[:-1]:  # the piece after the last newline is unfinished
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # only a line being written when the run died can be bad: keep what precedes it
        good_end += len(line) + 1
    if good_end != len(data):
        print(f"resume: discarding {len(data) - good_end} bytes of a torn line at the end of {path}")
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return rows


def append_rows(path, rows):
    """Append finished rows and sync them to disk: what a resume may rely on."""
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
