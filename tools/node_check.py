"""The node check's verdict: did every stage of a short run pass on this node, and roughly how long would one round of
the paper preset take here?

    bash run_rounds.sh configs/node-check.env                     # minutes on the GPU node: round 0 + 1 round
    python tools/node_check.py --out runs/node-check --paper llama3-8b

First one line per stage of the run folder, in run order (round_0: train, eval, alpaca_eval, judge_rm; round_t:
generate, score, score_offline, pairs, train, eval, alpaca_eval, judge_rm):
    passed  round_1/generate  35.2 s                                   its output is finished (seconds: done marker)
    failed  round_1/train  (see round_1/logs/train.log: LAST LINE)     its log exists, its output is not finished
    -       round_1/score_offline                                      never started
(a stage's output is report.OUTPUTS[stage] in round_t/; its log round_t/logs/STAGE.log, or STAGE.shardI.log for
data-parallel workers, as run_rounds.sh names them).
Then a ROUGH forecast of one round of the paper preset on this node: the throughputs the check measured (01's and
02's tokens_per_second in their done markers, 04's trained tokens per second of train_runtime), scaled from the check
model to the paper's model by parameter count (counted from the safetensors headers; no torch) and multiplied up to the
paper's work per round (PAPER_WORK). The assumptions are printed with it. Exit status 1 when a stage failed.
"""
import glob
import json
import math
import os
import struct
import sys
from typing import Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import report  # noqa: E402
from dice import DiceError, cli, data, protocol  # noqa: E402

ROUND0_STAGES = ["train", "eval", "alpaca_eval", "judge_rm"]
ROUND_STAGES = ["generate", "score", "score_offline", "pairs", "train", "eval", "alpaca_eval", "judge_rm"]
# One DICE round of the paper (Chen et al., ICLR 2025, Sec. 5 / App. B): 10k prompts x 16 samples of ~450 new tokens;
# scoring those 160k sequences of ~600 tokens (prompt + response) through 2 models; 300 DPO steps x 32 pairs of
# ~1,200 tokens (prompt + chosen, prompt + rejected), each token costing ~3 forward passes for forward + backward and
# 1 for the reference forward of the policy pi_{t-1}.
PAPER_WORK = dict(prompts=10_000, samples=16, new_tokens=450, sequence_tokens=600, steps=300, pairs_per_step=32,
                  pair_tokens=1_200, train_passes=4)
PAPER_PARAMS = {"llama3-8b": 8.03e9, "zephyr-7b": 7.24e9}  # Llama-3-8B, Mistral-7B


# ----------------------------------------------------------------------------- parsing: logs, safetensors

def last_line(path):
    """The last non-blank line of a log, <= 200 chars (text mode ends lines at a progress bar's carriage returns)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1][:200] if lines else "(empty log)"


def shard_markers(round_dir):
    """Done markers of 01's data-parallel shard files (round_t/shards/responses.I-of-N.jsonl), when there are any."""
    paths = sorted(glob.glob(os.path.join(round_dir, "shards", "responses.*-of-*.jsonl")))
    return [m for m in map(protocol.read_marker, paths) if m is not None]


def stage_status(out, t, stage):
    """(status, seconds, detail) of round_t/STAGE: "passed" when its output is finished (seconds from its done marker;
    sharded generation: the slowest shard + the merge), "failed" when its log exists (logs/STAGE.log or
    logs/STAGE.shardI.log) but the output is not finished (detail: the newest log and its last line), else "-"."""
    round_dir = os.path.join(out, f"round_{t}")
    output = os.path.join(round_dir, report.OUTPUTS[stage])
    if report.finished(output):
        seconds = protocol.read_marker(output).get("seconds")
        shards = shard_markers(round_dir) if stage == "generate" else []
        if shards:
            seconds = max(m.get("seconds") or 0 for m in shards) + (seconds or 0)
        return "passed", seconds, None
    logs = glob.glob(os.path.join(round_dir, "logs", f"{stage}.log"))
    logs += glob.glob(os.path.join(round_dir, "logs", f"{stage}.shard*.log"))
    if logs:
        newest = max(logs, key=os.path.getmtime)
        return "failed", None, f"{os.path.relpath(newest, out)}: {last_line(newest)}"
    return "-", None, None


def rounds_of(out):
    return sorted(int(name[len("round_"):]) for name in os.listdir(out)
                  if name.startswith("round_") and name[len("round_"):].isdigit()
                  and os.path.isdir(os.path.join(out, name)))


def stage_lines(out):
    """[(status, "round_t/stage", seconds, detail)] for every stage of every round of the run, in run order."""
    lines = []
    for t in rounds_of(out):
        for stage in ROUND0_STAGES if t == 0 else ROUND_STAGES:
            status, seconds, detail = stage_status(out, t, stage)
            lines.append((status, f"round_{t}/{stage}", seconds, detail))
    return lines


def count_parameters(folder):
    """Parameters of a model folder from its safetensors headers (8-byte little-endian header size, then a JSON
    header {name: {"dtype", "shape", "data_offsets"}, "__metadata__": ...}): the sum of the shapes' products.
    None when the folder holds no *.safetensors file."""
    total, files = 0, sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    for path in files:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total if files else None


def check_model(out):
    """The check model's folder: round_0/model when round 0 trained it, else the model round 1 generated with."""
    candidates = [os.path.join(out, "round_0", "model")]
    for t in rounds_of(out):
        marker = protocol.read_marker(os.path.join(out, f"round_{t}", "responses.jsonl")) or {}
        candidates.append(str(marker.get("inputs", {}).get("model", {}).get("path", "")))
    return next((c for c in candidates if c and glob.glob(os.path.join(c, "*.safetensors"))), None)


def train_throughput(model_dir):
    """(trained tokens per second, forward passes per token) of one finished 04 run: TRL's num_tokens (real tokens of
    prompt + chosen and prompt + rejected, counted up to the last logged step and extended to global_step) over
    train_runtime; 3 passes for forward + backward plus the share of pairs whose reference forward 04 ran itself
    (1 when it held a reference model). None when the marker or metrics.jsonl lack the figures."""
    marker = protocol.read_marker(model_dir) or {}
    path = os.path.join(model_dir, "metrics.jsonl")
    logged = [row for _, row in data.read_jsonl(path) if "num_tokens" in row] if os.path.isfile(path) else []
    if not logged or not marker.get("train_runtime") or not marker.get("global_step") or not logged[-1].get("step"):
        return None
    tokens = logged[-1]["num_tokens"] * marker["global_step"] / logged[-1]["step"]
    reference = marker.get("reference_logps")
    if isinstance(reference, dict):
        computed = sum(split.get("computed", 0) for split in reference.values())
        supplied = sum(split.get("supplied", 0) for split in reference.values())
        share = computed / (computed + supplied) if computed + supplied else 0.0
    else:
        share = 1.0  # "reference model forward at every step"
    return tokens / marker["train_runtime"], 3 + share


def measured(out):
    """What the check measured, each a mean over the rounds that have it (None if none): generation new tokens/s
    (01; shards run at once, so their rates add up), scoring tokens/s through both models (02 on responses), training
    tokens/s (04) with its forward passes per token (weighted by the rates)."""
    gen, score, train = [], [], []
    for t in rounds_of(out):
        round_dir = os.path.join(out, f"round_{t}")
        markers = shard_markers(round_dir) or [protocol.read_marker(os.path.join(round_dir, "responses.jsonl")) or {}]
        rates = [m.get("tokens_per_second") for m in markers]
        if all(rates):
            gen.append(sum(rates))
        rate = (protocol.read_marker(os.path.join(round_dir, "scores.jsonl")) or {}).get("tokens_per_second")
        if rate:
            score.append(rate)
        if report.finished(os.path.join(round_dir, "model")):
            found = train_throughput(os.path.join(round_dir, "model"))
            if found:
                train.append(found)
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    passes = sum(r * p for r, p in train) / sum(r for r, _ in train) if train else None  # so rate x passes adds up
    return dict(generate=mean(gen), score=mean(score), train=mean([r for r, _ in train]), train_passes=passes)


# ----------------------------------------------------------------------------- arithmetic: the forecast

def forecast(rates, check_params, paper_params, work=PAPER_WORK):
    """Seconds per paper round for each stage (None where the rate was not measured): the paper's tokens divided by
    the check's tokens/s scaled by check_params / paper_params (throughput taken inversely proportional to size);
    training counted in forward passes (work's train_passes per token, the check's rates["train_passes"])."""
    scale = check_params / paper_params
    sequences = work["prompts"] * work["samples"]
    seconds = {}
    if rates.get("generate"):
        seconds["generate"] = sequences * work["new_tokens"] / (rates["generate"] * scale)
    if rates.get("score"):
        seconds["score"] = sequences * work["sequence_tokens"] / (rates["score"] * scale)
    if rates.get("train"):
        passes = work["steps"] * work["pairs_per_step"] * work["pair_tokens"] * work["train_passes"]
        seconds["train"] = passes / (rates["train"] * rates["train_passes"] * scale)
    return seconds


def duration(seconds):
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172800 else f"{seconds / 86400:,.0f} days"


def speed(tokens_per_second):
    return f"{tokens_per_second:,.0f}" if tokens_per_second >= 100 else f"{tokens_per_second:.3g}"


def forecast_lines(rates, check_params, model_dir, paper, work=PAPER_WORK):
    """The printed forecast: one line per stage, the total, and the assumptions."""
    paper_params = PAPER_PARAMS[paper]
    lines = [f"rough forecast of one {paper} round on this node (ROUGH: see the assumptions below)"]
    if not check_params:
        return lines + ["  no check model with *.safetensors found: pass --model FOLDER to count its parameters"]
    sequences = work["prompts"] * work["samples"]
    train_tokens = work["steps"] * work["pairs_per_step"] * work["pair_tokens"]
    what = {
        "generate": (f"{sequences * work['new_tokens'] / 1e6:.1f} M new tokens ({work['prompts']:,} prompts x "
                     f"{work['samples']} samples x ~{work['new_tokens']})", rates.get("generate")),
        "score": (f"{sequences * work['sequence_tokens'] / 1e6:.1f} M tokens ({sequences:,} sequences x "
                  f"~{work['sequence_tokens']}, through 2 models)", rates.get("score")),
        "train": (f"{train_tokens / 1e6:.1f} M tokens ({work['steps']} steps x {work['pairs_per_step']} pairs x "
                  f"~{work['pair_tokens']:,}) x {work['train_passes']} forward passes", rates.get("train")),
    }
    seconds = forecast(rates, check_params, paper_params, work)
    scale = check_params / paper_params
    for stage, (amount, rate) in what.items():
        if stage in seconds:
            lines.append(f"  {stage:<9} {amount}: check {speed(rate)} tokens/s -> {speed(rate * scale)} tokens/s at "
                         f"{paper_params / 1e9:.2f} B -> {duration(seconds[stage])}")
        else:
            lines.append(f"  {stage:<9} {amount}: not measured (no finished {stage} stage with its throughput)")
    if seconds:
        lines.append(f"  total     ~{duration(sum(seconds.values()))} per round"
                     + ("" if len(seconds) == 3 else f" (of the {len(seconds)} measured stages)"))
    lines += [
        "assumptions:",
        f"  - throughput falls in proportion to parameters: check model {check_params:,} parameters (safetensors of "
        f"{model_dir}), {paper} {paper_params / 1e9:.2f} B; same GPUs and processes as the check;",
        "  - a small check model is limited by overheads rather than compute, so its scaled speed is low and the "
        "forecast errs long; vLLM's batching and the KV cache of long answers are not modelled;",
        f"  - the paper's round: {work['prompts']:,} prompts x {work['samples']} samples x ~{work['new_tokens']} new "
        f"tokens; {sequences:,} sequences of ~{work['sequence_tokens']} tokens scored by 2 models; {work['steps']} "
        f"steps x {work['pairs_per_step']} pairs of ~{work['pair_tokens']:,} tokens, ~3 forward passes per token for "
        "forward + backward + 1 for the reference forward of the policy"
        + (f" (the check's training ran {rates['train_passes']:.2f} per token)" if rates.get("train_passes") else "")
        + ";",
        "  - model loading, vLLM start-up, checkpoint saving and the evaluation stages are not counted.",
    ]
    return lines


def main(out: str, paper: Literal["llama3-8b", "zephyr-7b"] = "llama3-8b", model: str = None):
    """Print the stage lines and the rough forecast of a node check's run folder.

    Args:
        out: the run folder of the check (run_rounds.sh's OUT), holding round_0/, round_1/, ...
        paper: the preset to forecast: llama3-8b or zephyr-7b.
        model: the check model's folder, to count its parameters (default: round_0/model, else the model 01 used).
    """
    args = vars(cli.flags(main, locals()))
    out = args["out"]
    if not os.path.isdir(out) or not rounds_of(out):
        raise DiceError(f"no round_N folders in {out}: not a run folder of run_rounds.sh")
    lines = stage_lines(out)
    width = max(len(name) for _, name, _, _ in lines)
    for status, name, seconds, detail in lines:
        text = f"{status:<6}  {name:<{width}}"
        if seconds is not None:
            text += f"  {seconds:.1f} s"
        if detail:
            text = f"{status:<6}  {name}  (see {detail})"
        print(text.rstrip())
    model_dir = args["model"] or check_model(out)
    check_params = count_parameters(model_dir) if model_dir else None
    print("\n".join(forecast_lines(measured(out), check_params, model_dir, args["paper"])))
    if any(status == "failed" for status, _, _, _ in lines):
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
