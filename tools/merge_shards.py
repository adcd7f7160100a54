"""Join the shard files of 01_generate.py into the responses.jsonl one process would have written (run_rounds.sh).

    python tools/merge_shards.py --prompts PROMPTS [--limit N] [--split S] --out runs/zephyr/round_1/responses.jsonl \
        runs/zephyr/round_1/shards/responses.0-of-8.jsonl ... runs/zephyr/round_1/shards/responses.7-of-8.jsonl

The shards must be finished (their done markers match them) and hold exactly the prompts that 01_generate.py's
load_prompts gives unsharded, each once; otherwise a one-line error and nothing is written.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dice import DiceError, cli, data, protocol  # noqa: E402


def expected_prompt_ids(prompts, limit=None, split="train", prompt_field=None):
    """prompt_ids in unsharded order, by 01_generate.py's own prompt loading."""
    items, _ = cli.load_script("01_generate").load_prompts(prompts, prompt_field, split, limit)
    return [item["prompt_id"] for item in items]


def merge(shards, order):
    """Rows of the finished shard files in `order` (prompt_ids); a DiceError unless they cover it exactly."""
    for s in shards:
        marker, name = protocol.read_marker(s), os.path.basename(protocol.done_marker(s))
        if marker is None:
            raise DiceError(f"shard {s} is not finished (no readable {name})")
        if not os.path.isfile(s) or protocol.finished_marker(s) is None:
            raise DiceError(f"shard {s} is not finished ({name} does not match the file)")
    by_id = {}
    for s in shards:
        for i, row in data.read_jsonl(s):
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


def main(*shards, prompts: str, out: str, limit: int = None, split: str = "train", prompt_field: str = None,
         overwrite: bool = False):
    """Merge SHARDS (01_generate.py's finished shard files) into --out in the unsharded order of --prompts.

    Args:
        shards: the shard files, in any order
        prompts: the prompts 01_generate.py read (the same --prompts, --limit, --split and --prompt_field)
        out: the merged responses.jsonl
        limit: 01_generate.py's --limit (>= 1)
        split: 01_generate.py's --split
        prompt_field: 01_generate.py's --prompt_field
        overwrite: redo an output made from other shards or arguments
    """
    args = vars(cli.flags(main, locals()))
    shards = {f"shard{i}": str(s) for i, s in enumerate(args.pop("shards"))}
    if not shards or not args["prompts"] or not args["out"]:
        raise DiceError("usage: merge_shards.py --prompts PROMPTS --out FILE [--limit N] SHARD...")
    print("merge_shards.py " + json.dumps({**args, "shards": list(shards.values())}))
    with protocol.stage("merge_shards", args["out"], {**args, **shards}, inputs={"prompts": args["prompts"], **shards},
                        overwrite=args["overwrite"]) as st:
        order = expected_prompt_ids(args["prompts"], args["limit"], args["split"], args["prompt_field"])
        rows = merge(list(shards.values()), order)
        protocol.write_jsonl(st.tmp, rows)
        st.record["counts"] = {"shards": len(shards), "rows": len(rows)}
    print(f"merged {len(shards)} shards into {args['out']}: {len(rows)} rows")


if __name__ == "__main__":
    cli.run(main)
