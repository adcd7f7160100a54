"""Join the shard files of 01_generate.py into the responses.jsonl one process would have written (run_rounds.sh).

    python tools/merge_shards.py --prompts PROMPTS [--limit N] [--split S] --out round_1/responses.jsonl S0 S1 ...

The expected rows are the prompts 01_generate.py generates for unsharded: its own load_prompts (deduplicated, --limit,
sorted by prompt_id). Every shard must be finished (its done marker exists) and the shards' union must be exactly that
prompt set: none missing, none extra, none in two shards; otherwise a one-line error and nothing is written. The merged
rows follow the unsharded order; OUT is written atomically, then OUT.done.json (the shards and counts).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from common import DiceError  # noqa: E402


def expected_prompt_ids(prompts, limit=None, split="train", prompt_field=None):
    """prompt_ids in unsharded order, by 01_generate.py's own prompt loading."""
    items, _ = common.load_script("01_generate").load_prompts(prompts, prompt_field, split, limit)
    return [item["prompt_id"] for item in items]


def merge(shards, order):
    """Rows of the finished shard files in `order` (prompt_ids); a DiceError unless they cover it exactly."""
    for s in shards:
        if not os.path.isfile(common.done_marker(s)):
            raise DiceError(f"shard {s} is not finished (no {os.path.basename(common.done_marker(s))})")
    by_id = {}
    for s in shards:
        for i, row in common.read_jsonl(s):
            pid = row.get("prompt_id")
            if pid in by_id:
                raise DiceError(f"{s}:{i}: prompt_id {pid} is also in {by_id[pid][0]}")
            by_id[pid] = (s, row)
    missing = [p for p in order if p not in by_id]
    extra = sorted(set(by_id) - set(order))
    if missing or extra:
        raise DiceError(f"the shards do not cover the unsharded prompt set: {len(missing)} missing, {len(extra)} "
                        f"unexpected (e.g. prompt_id {(missing or extra)[0]})")
    return [by_id[p][1] for p in order]


def main(*shards, prompts: str = None, out: str = None, limit: int = None, split: str = "train",
         prompt_field: str = None):
    """Merge SHARDS (01's finished shard files) into --out, checked against the unsharded prompt set of --prompts."""
    if not shards or not prompts or not out:
        raise DiceError("usage: merge_shards.py --prompts PROMPTS --out FILE [--limit N] SHARD...")
    limit = None if limit is None else common.as_int("limit", limit, minimum=1)
    shards = [str(s) for s in shards]
    order = expected_prompt_ids(str(prompts), limit, str(split), prompt_field)
    rows = merge(shards, order)
    common.write_jsonl(out, rows)
    common.write_json(common.done_marker(out), {"shards": shards, "rows": len(rows), "prompts": str(prompts),
                                                "limit": limit, "split": split})
    print(f"merged {len(shards)} shards into {out}: {len(rows)} rows")


if __name__ == "__main__":
    common.cli(main)
