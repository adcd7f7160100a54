"""A judge without an API key: score AlpacaEval outputs with a local reward model, for the per-round report.

The paper measures DICE with AlpacaEval 2 (GPT-4 Turbo judge, length-controlled win rate). Where no API judge is at
hand, a reward model that transformers loads as sequence classification (e.g. Skywork-Reward-V2, ArmoRM: the kind
sail-sg/oat and RLHFlow use as oracles) gives a judge-free stand-in: every round's outputs are scored, and
tools/report.py reports per round the win rate against pi_0 and against the previous round (ties count half), the
mean reward and the mean length, so length gains are visible beside win gains.

    python tools/judge_rm.py --model RM --outputs round_1/alpaca_eval/model_outputs.json \
        --out round_1/alpaca_eval/rm_scores.jsonl
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 8 tools/judge_rm.py ...

Input: an alpaca_eval model_outputs.json (01_generate.py --format alpaca_eval): [{"instruction", "output",
"generator"}, ...]. The text scored is the reward model's own chat template over [user: instruction, assistant:
output]. Output (JSONL, same order): {"instruction", "output", "generator", "reward", "chars"}, plus OUT.done.json
(protocol.stage: a rerun with the same model and outputs is done already). Several processes split the rows and the main
process writes one file; under configs/accelerate/zero3_scoring.yaml the reward model is sharded with DeepSpeed ZeRO-3
(as 02_score.py shards its models, dice/scoring.py), for reward models that do not fit one GPU.
"""
import json
import os
import sys
from typing import Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dice import DiceError, cli, data, models, protocol, scoring  # noqa: E402


def read_outputs(path):
    """An alpaca_eval model_outputs file: a JSON list (or JSON lines) of {instruction, output, generator}."""
    rows = []
    for where, row in data.read_rows(path):
        for key in ("instruction", "output"):
            if not isinstance(row.get(key), str):
                raise DiceError(f"{where}: '{key}' must be a string")
        rows.append({"instruction": row["instruction"], "output": row["output"], "generator": row.get("generator")})
    if not rows:
        raise DiceError(f"{path}: no outputs")
    return rows


def win_rate(rewards, baseline):
    """Share of instructions whose reward beats the baseline's for the same instruction, ties counted half."""
    if len(rewards) != len(baseline) or not rewards:
        raise ValueError(f"win_rate needs two equally long, non-empty lists, got {len(rewards)} and {len(baseline)}")
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, baseline)) / len(rewards)


def aligned(rows, baseline_rows):
    """(rewards, baseline rewards) matched by instruction; the two files must hold the same instructions."""
    base = {r["instruction"]: r["reward"] for r in baseline_rows}
    if set(base) != {r["instruction"] for r in rows}:
        raise DiceError("the two rounds' AlpacaEval outputs hold different instructions")
    return [r["reward"] for r in rows], [base[r["instruction"]] for r in rows]


def read_leaderboard(path, name):
    """alpaca_eval's leaderboard.csv (first column the model name) -> the row of `name` as floats (None if absent)."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row[""] == name:
                number = lambda key: float(row[key]) if row.get(key) not in (None, "") else None  # noqa: E731
                return {"lc_win_rate": number("length_controlled_winrate"), "lc_standard_error":
                        number("lc_standard_error"), "win_rate": number("win_rate"),
                        "standard_error": number("standard_error"), "avg_length": number("avg_length"),
                        "n_total": number("n_total")}
    return None


def score(model, tokenizer, rows, device, batch_size, forwards=0):
    """Reward of each row, in row order: the reward model's first logit after its chat template, batched by length;
    at least `forwards` forwards (ZeRO-3 lockstep: once the rows are done, dummy ones of one pad token)."""
    import torch

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["instruction"]},
                                            {"role": "assistant", "content": r["output"]}], tokenize=True)
             for r in rows]
    texts = [list(t["input_ids"] if hasattr(t, "keys") else t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    pad = getattr(model, "module", model).config.pad_token_id  # a DeepSpeed engine's own .config is its config
    rewards = [None] * len(texts)
    for start in range(0, max(len(order), forwards * batch_size), batch_size):
        batch = order[start:start + batch_size]
        seqs = [texts[i] for i in batch] or [[pad]]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu().tolist()
        for i, value in zip(batch, logits):
            rewards[i] = value
    return rewards


def main(model: str, outputs: str, out: str, batch_size: int = None,
         dtype: Literal["auto", "float32", "bfloat16"] = "auto", overwrite: bool = False,
         trust_remote_code: bool = False):
    """Score AlpacaEval outputs with a local reward model (sequence classification, first logit = reward).

    Args:
        model: the reward model, a local folder or a hub id, NAME@REVISION pins a revision (safetensors only).
        outputs: an alpaca_eval model_outputs.json (01_generate.py --format alpaca_eval).
        out: output JSONL: instruction, output, generator, reward, chars per row.
        batch_size: rows per forward (default 8 on GPUs, 1 on CPUs) (>= 1)
        dtype: auto (bf16 on GPUs, fp32 on CPUs), float32 or bfloat16.
        overwrite: redo an output made with other arguments or inputs.
        trust_remote_code: allow custom model code (some reward models need it; off by default).
    """
    args = vars(cli.flags(main, locals()))
    models.check_model_path(args["model"])  # a missing model is named before the outputs are read
    import torch
    from accelerate.utils import gather_object
    from transformers import AutoModelForSequenceClassification

    cuda = torch.cuda.is_available()
    dtype = args["dtype"] if args["dtype"] != "auto" else ("bfloat16" if cuda else "float32")
    state = scoring.start_processes(dtype)  # one process, N (one writes), or N sharing a ZeRO-3 sharded model
    state.print("judge_rm " + json.dumps(args))
    with protocol.stage("judge_rm", args["out"], args, inputs={"model": args["model"], "outputs": args["outputs"]},
                      overwrite=args["overwrite"], ignore=("batch_size",), main_process=state.is_main_process) as st:
        rows = read_outputs(args["outputs"])
        tokenizer = models.load_tokenizer(args["model"], args["trust_remote_code"])
        name, revision = models.split_revision(args["model"])  # NAME@REVISION pins a hub revision
        try:
            rm = AutoModelForSequenceClassification.from_pretrained(
                name, revision=revision, dtype=getattr(torch, dtype), use_safetensors=True,
                trust_remote_code=args["trust_remote_code"]).to(state.device).eval()
        except OSError as e:
            raise DiceError(f"cannot load reward model from {args['model']}: {str(e).splitlines()[0]}") from None
        if rm.config.pad_token_id is None:
            rm.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
                else tokenizer.eos_token_id
        rm, = scoring.shard([rm], state)
        batch_size = args["batch_size"] or (8 if state.device.type == "cuda" else 1)
        mine = list(range(state.process_index, len(rows), state.num_processes))
        busiest = -(-len(rows) // state.num_processes)  # process 0's rows, the most: ceil(rows / N)
        forwards = -(-busiest // batch_size) if scoring.zero3(state) else 0  # ZeRO-3: all run as many as process 0
        rewards = score(rm, tokenizer, [rows[i] for i in mine], state.device, batch_size, forwards)
        results = dict(gather_object(list(zip(mine, rewards))) if state.num_processes > 1 else zip(mine, rewards))
        scored = [{**r, "reward": results[i], "chars": len(r["output"])} for i, r in enumerate(rows)]
        if state.is_main_process:
            protocol.write_jsonl(st.tmp, scored)
        st.record["counts"] = {"rows": len(scored)}
        st.record["mean_reward"] = sum(r["reward"] for r in scored) / len(scored)
    state.print(f"wrote {args['out']}: {len(scored)} outputs scored, mean reward {st.record['mean_reward']:.4f}")
    scoring.finish(state)


if __name__ == "__main__":
    cli.run(main)
