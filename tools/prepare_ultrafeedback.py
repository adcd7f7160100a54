"""UltraFeedback files for the paper presets: the held-out evaluation pairs, and an approximation of the authors' data.

    python tools/prepare_ultrafeedback.py --out data/ultrafeedback      # needs the HF hub (or a local copy: --source)

The paper (Chen et al., ICLR 2025, Sec. 5) samples 10k prompts from UltraFeedback for the DICE rounds and replays the
UltraFeedback preference pairs of those prompts (gamma = 0.5). The authors' own subset IS published, in the official
repository (sail-sg/dice: data/UF-10k-subset/prompt.json and preference.json), and the paper presets read it from
there (DICE_REPO). What they take from this tool is eval_preferences.jsonl, the held-out pairs of the report, from
UltraFeedback's test split. prompts.jsonl and preferences.jsonl are an approximation of the authors' subset (another
random 10k), for runs without the official files. This writes, from HuggingFaceH4/ultrafeedback_binarized:
  prompts.jsonl           `prompt`: --num_prompts prompts drawn at random (seeded) from the train_prefs split
  preferences.jsonl       `prompt`, `chosen`, `rejected`: the binarized pairs of those same prompts (the replay buffer)
  eval_preferences.jsonl  `prompt`, `chosen`, `rejected`: --num_eval pairs of the test_prefs split (held out)
chosen/rejected are the text of the last assistant turn of the dataset's `chosen`/`rejected` conversations. The subset
is reproducible from --seed (it is not the authors' subset). Rows whose prompt is
empty or whose chosen and rejected texts are identical are skipped and counted.
--source may be a hub id or a local folder saved with `datasets.save_to_disk` (a DatasetDict with both splits).
"""
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dice import DiceError, cli, protocol  # noqa: E402


def last_assistant(messages, where):
    if isinstance(messages, str):
        return messages
    turns = [m.get("content") for m in messages or [] if isinstance(m, dict) and m.get("role") == "assistant"]
    if not turns or not isinstance(turns[-1], str):
        raise DiceError(f"{where}: no assistant turn")
    return turns[-1]


def to_pairs(rows, split):
    """(pairs, skipped): prompt/chosen/rejected strings from binarized rows."""
    pairs, skipped = [], 0
    for i, row in enumerate(rows):
        prompt = row.get("prompt")
        chosen = last_assistant(row.get("chosen"), f"{split} row {i}: chosen")
        rejected = last_assistant(row.get("rejected"), f"{split} row {i}: rejected")
        if not isinstance(prompt, str) or not prompt.strip() or chosen == rejected:
            skipped += 1
            continue
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs, skipped


def main(out: str = "data/ultrafeedback", source: str = "HuggingFaceH4/ultrafeedback_binarized",
         num_prompts: int = 10000, num_eval: int = 1000, seed: int = 0, train_split: str = "train_prefs",
         eval_split: str = "test_prefs", overwrite: bool = False):
    """Write prompts.jsonl, preferences.jsonl and eval_preferences.jsonl for the paper presets.

    Args:
        out: output folder
        source: hub id, or a local save_to_disk folder
        num_prompts: prompts for the DICE rounds (paper: 10k) (>= 1)
        num_eval: held-out pairs for the judge-free evaluation; 0 = none (>= 0)
        seed: seed of the random subsets (>= 0)
        train_split: the split the prompts and offline pairs come from
        eval_split: the split of the held-out pairs
        overwrite: replace the files when they exist
    """
    a = cli.flags(main, locals())
    out, source, num_prompts, num_eval, seed = a.out, a.source, a.num_prompts, a.num_eval, a.seed
    import datasets

    names = ["prompts.jsonl", "preferences.jsonl"] + (["eval_preferences.jsonl"] if num_eval else [])
    for name in names:
        protocol.refuse_overwrite(os.path.join(out, name), a.overwrite)
    print(f"prepare_ultrafeedback: source={source} out={out} num_prompts={num_prompts} num_eval={num_eval} seed={seed}")
    data = datasets.load_from_disk(source) if os.path.isdir(str(source)) else datasets.load_dataset(str(source))
    for split in (train_split,) + ((eval_split,) if num_eval else ()):
        if split not in data:
            raise DiceError(f"{source}: no split {split!r} (has {', '.join(data)})")
    rng = random.Random(seed)
    train, skipped = to_pairs(data[train_split], train_split)
    by_prompt = {}
    for pair in train:  # one pair per prompt (the first)
        by_prompt.setdefault(pair["prompt"], pair)
    prompts = sorted(by_prompt)
    if len(prompts) < num_prompts:
        raise DiceError(f"{train_split} has {len(prompts)} distinct usable prompts, "
                        f"fewer than --num_prompts {num_prompts}")
    chosen = rng.sample(prompts, num_prompts)
    protocol.write_jsonl(os.path.join(out, "prompts.jsonl"), [{"prompt": p} for p in chosen])
    protocol.write_jsonl(os.path.join(out, "preferences.jsonl"), [by_prompt[p] for p in chosen])
    counts = dict(prompts=len(chosen), preferences=len(chosen), train_rows_skipped=skipped)
    if num_eval:
        held, eval_skipped = to_pairs(data[eval_split], eval_split)
        in_rounds = set(chosen)
        held = [p for p in held if p["prompt"] not in in_rounds]
        if len(held) < num_eval:
            raise DiceError(f"{eval_split} has {len(held)} usable pairs, fewer than --num_eval {num_eval}")
        protocol.write_jsonl(os.path.join(out, "eval_preferences.jsonl"), rng.sample(held, num_eval))
        counts.update(eval_preferences=num_eval, eval_rows_skipped=eval_skipped)
    print(f"wrote {', '.join(names)} in {out}: {counts}")


if __name__ == "__main__":
    cli.run(main)
