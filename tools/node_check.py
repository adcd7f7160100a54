"""The node check's verdict: did a paper preset in miniature (configs/node-check.env) pass every stage and every code
path of that preset on this node, and roughly how long would one round of the preset take here?

    NODE_CHECK_PRESET=zephyr-7b bash run_rounds.sh configs/node-check.env     # minutes; ends with this tool
    python tools/node_check.py --out runs/node-check --preset zephyr-7b       # the same verdict again

1. One line per stage of the run folder, in run order (round_0: train, eval, alpaca_eval, judge_rm, where started;
   round_t: generate, score, score_offline, pairs, train, eval, alpaca_eval, judge_rm):
       passed  round_1/generate  35.2 s                                  its output is finished (seconds: done marker)
       failed  round_1/train  (see round_1/logs/train.log: LAST LINE)    its log exists, its output is not finished
       -       round_1/score_offline                                     never started
   (a stage's output is report.OUTPUTS[stage] in round_t/; its log round_t/logs/STAGE.log, or STAGE.shardI.log).
2. The kill-and-resume check: round 1's training command exactly as logged (the `$ ` line of round_1/logs/train.log,
   `accelerate launch ...` on several GPUs) is rerun into OUT/node_check/resume/model (that folder is the check's
   own, started anew) with --save_steps 1, its process group is killed once the first checkpoint is complete, and
   the same command is run again: it must resume from that checkpoint (04 prints "resuming from ..." and records
   resumed_from in its done marker) and finish. Its log: OUT/node_check/resume/train.log.
3. passed/failed/- per code path of the paper presets (PATHS), read from the done markers, logs and checkpoints.
4. A ROUGH forecast of one round of the preset on this node: the throughputs the check measured (01's and 02's
   tokens_per_second in their done markers, 04's trained tokens per second of train_runtime) scaled from the check
   model to the preset's model by parameter count (counted from the safetensors headers; no torch) and multiplied up
   to the preset's work per round (preset_work: its K, steps and pairs per step from configs/PRESET.env).
Exit status 1 when a stage or a code path failed.
"""
import contextlib
import glob
import json
import math
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from typing import Literal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import report  # noqa: E402
from dice import DiceError, cli, data, protocol  # noqa: E402

ROUND0_STAGES = ["train", "eval", "alpaca_eval", "judge_rm"]
ROUND_STAGES = ["generate", "score", "score_offline", "pairs", "train", "eval", "alpaca_eval", "judge_rm"]
PATHS = ["vLLM generation shards", "scoring with accelerate", "bf16", "ZeRO-3 training", "evaluation during training",
         "checkpoint saved", "training killed and resumed under ZeRO-3", "trained model loaded back by vLLM",
         "AlpacaEval generation"]
CANNOT = ("not checked on a small model: the 7-8B models' GPU memory and throughput (the forecast below only scales "
          "by parameter count), nor quality")
# One DICE round of a paper preset (Chen et al., ICLR 2025, Sec. 5 / App. B): the authors' 10k UltraFeedback prompts
# (data/UF-10k-subset/prompt.json) x K samples of ~450 new tokens; those sequences (~600 tokens, prompt + response)
# scored through 2 models; MAX_STEPS DPO steps x GLOBAL_BATCH pairs of ~1,200 tokens (prompt + chosen, prompt +
# rejected). The token lengths are estimates, not measured.
PROMPTS_PER_ROUND = 10_000
LENGTHS = dict(new_tokens=450, sequence_tokens=600, pair_tokens=1_200)
PRESET_PARAMS = {"llama3-8b": 8.03e9, "zephyr-7b": 7.24e9}  # Llama-3-8B, Mistral-7B


# ----------------------------------------------------------------------------- parsing: logs, markers, safetensors

def last_line(path):
    """The last non-blank line of a log, <= 200 chars (text mode ends lines at a progress bar's carriage returns)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1][:200] if lines else "(empty log)"


def logged_command(path):
    """The argv of the last command a log records (its last `$ ` line, as run_rounds.sh writes it), or None."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as f:
        commands = [line[2:] for line in f if line.startswith("$ ")]
    return shlex.split(commands[-1]) if commands else None


def shard_markers(round_dir):
    """Done markers of 01's data-parallel shard files (round_t/shards/responses.I-of-N.jsonl), when there are any."""
    paths = sorted(glob.glob(os.path.join(round_dir, "shards", "responses.*-of-*.jsonl")))
    return [m for m in map(protocol.read_marker, paths) if m is not None]


def finished(out, t, stage):
    """The done marker of round_t/STAGE's output when it is finished, else None."""
    return protocol.finished_marker(os.path.join(out, f"round_{t}", report.OUTPUTS[stage]))


def stage_status(out, t, stage):
    """(status, seconds, detail) of round_t/STAGE: "passed" when its output is finished (seconds from its done marker;
    sharded generation: the slowest shard + the merge), "failed" when its log exists (logs/STAGE.log or
    logs/STAGE.shardI.log) but the output is not finished (detail: the newest log and its last line), else "-"."""
    round_dir = os.path.join(out, f"round_{t}")
    marker = finished(out, t, stage)
    if marker is not None:
        seconds = marker.get("seconds")
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
    """[(status, "round_t/stage", seconds, detail)] for every stage of every round of the run, in run order (round 0's
    training only where it started: a run from a DPO model has none)."""
    lines = []
    for t in rounds_of(out):
        for stage in ROUND0_STAGES if t == 0 else ROUND_STAGES:
            status, seconds, detail = stage_status(out, t, stage)
            if (t, stage, status) != (0, "train", "-"):
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
    """The check model's folder: a model trained by the run (round_t/model), else the model round 1 generated with."""
    candidates = [os.path.join(out, f"round_{t}", "model") for t in reversed(rounds_of(out))]
    for t in rounds_of(out):
        marker = protocol.read_marker(os.path.join(out, f"round_{t}", "responses.jsonl")) or {}
        candidates.append(str(marker.get("inputs", {}).get("model", {}).get("path", "")))
    return next((c for c in candidates if c and glob.glob(os.path.join(c, "*.safetensors"))), None)


def train_throughput(model_dir):
    """(trained tokens per second, forward passes per token) of one finished 04 run: TRL's num_tokens (real tokens of
    prompt + chosen and prompt + rejected, counted up to the last logged step and extended to global_step) over
    train_runtime; 3 passes for forward + backward plus the share of pairs whose reference forward 04 ran itself
    (none when the pairs carry reference log-probs; 1 when it held a reference model). None when the marker or
    metrics.jsonl lack the figures."""
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
    passes = sum(r * p for r, p in train) / sum(r for r, _ in train) if train else None
    return dict(generate=mean(gen), score=mean(score), train=mean([r for r, _ in train]), train_passes=passes)


# ----------------------------------------------------------------------------- the kill-and-resume check

def with_flags(argv, **values):
    """04's command `argv` with each --NAME's value replaced (`--NAME V` or `--NAME=V`), or appended when absent."""
    argv = list(argv)
    start = next(i for i, arg in enumerate(argv) if arg.endswith("04_train_dpo.py")) + 1
    for name, value in values.items():
        flag, value = f"--{name}", str(value)
        at = next((i for i in range(start, len(argv)) if argv[i] == flag or argv[i].startswith(flag + "=")), None)
        if at is None:
            argv += [flag, value]
        elif argv[at] == flag:
            argv[at + 1] = value
        else:
            argv[at] = f"{flag}={value}"
    return argv


def complete_checkpoints(work):
    """Steps of the complete checkpoints in 04's work folder (the Trainer writes trainer_state.json last), sorted."""
    return sorted(int(os.path.basename(os.path.dirname(p)).split("-")[1])
                  for p in glob.glob(os.path.join(work, "checkpoint-*", "trainer_state.json")))


def processes():
    """{pid: (parent pid, state)} of every process, from /proc/PID/stat."""
    table = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            table[int(entry)] = (int(ppid), state)
    return table


def kill_tree(proc):
    """SIGKILL `proc` (the launcher) and every process it started, however deep, and wait until they are gone: torchrun
    starts each training process in a session of its own, so killing the launcher's process group is not enough."""
    table, tree, todo = processes(), [], [proc.pid]
    while todo:
        tree.append(todo.pop())
        todo += [pid for pid, (ppid, _) in table.items() if ppid == tree[-1]]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60  # killed children are reaped a moment later (a zombie counts as gone)
    while time.time() < deadline and any(processes().get(pid, (0, "Z"))[1] != "Z" for pid in tree[1:]):
        time.sleep(0.1)


def kill_and_resume(out, t=1, poll=0.05):
    """Round t's training command as logged, into OUT/node_check/resume/model with --save_steps 1: killed (its whole
    process group, SIGKILL) once its first checkpoint is complete, then run again, which must resume from the
    newest complete checkpoint and finish. Returns (status, detail): passed, failed or "-" (nothing to rerun)."""
    argv = logged_command(os.path.join(out, f"round_{t}", "logs", "train.log"))
    if stage_status(out, t, "train")[0] != "passed" or not argv or not any(a.endswith("04_train_dpo.py") for a in argv):
        return "-", f"round_{t}/train did not pass"
    folder = os.path.join(out, "node_check", "resume")
    shutil.rmtree(folder, ignore_errors=True)  # the check's own folder: every check starts it anew
    os.makedirs(folder)
    model = os.path.join(folder, "model")
    argv = with_flags(argv, out=model, save_steps=1)
    log_path, where = os.path.join(folder, "train.log"), os.path.relpath(os.path.join(folder, "train.log"), out)
    with open(log_path, "a", encoding="utf-8") as log:
        def start():
            log.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n$ {shlex.join(argv)}\n")
            log.flush()
            return subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        print(f"resume check: round_{t}'s training into {os.path.relpath(model, out)}, killed at its first checkpoint",
              flush=True)
        first = start()
        while not complete_checkpoints(model + ".work") and first.poll() is None:
            time.sleep(poll)
        if first.poll() is not None:
            kill_tree(first)
            return "failed", (f"the run ended (status {first.returncode}) before it could be killed at a checkpoint "
                              f"(see {where}: {last_line(log_path)})")
        kill_tree(first)
        killed_at = os.path.join(model + ".work", f"checkpoint-{complete_checkpoints(model + '.work')[-1]}")
        second = start()
        second.wait()
    marker = protocol.finished_marker(model)
    if second.returncode != 0 or marker is None:
        return "failed", f"the rerun exited with status {second.returncode} (see {where}: {last_line(log_path)})"
    with open(log_path, encoding="utf-8", errors="replace") as f:
        said = f"resuming from {killed_at}" in f.read()
    if not said or os.path.realpath(str(marker.get("resumed_from"))) != os.path.realpath(killed_at):
        return "failed", (f"the rerun did not resume from {os.path.basename(killed_at)} (resumed_from: "
                          f"{marker.get('resumed_from')}; see {where})")
    return "passed", (f"killed after {os.path.basename(killed_at)}, resumed from it to step "
                      f"{marker.get('global_step')} ({launch(argv)})")


# ----------------------------------------------------------------------------- the code paths

def launch(argv):
    """How a logged command was launched: `accelerate launch` with its config file's DeepSpeed ZeRO stage, or python."""
    if argv[:2] != ["accelerate", "launch"]:
        return "python, one process (no DeepSpeed)"
    config = argv[argv.index("--config_file") + 1] if "--config_file" in argv else None
    path = os.path.join(ROOT, config) if config else ""
    text = open(path, encoding="utf-8").read() if os.path.isfile(path) else ""
    stage = re.search(r"^\s*zero_stage:\s*(\d)", text, re.M)
    processes = argv[argv.index("--num_processes") + 1] if "--num_processes" in argv else "?"
    return f"accelerate launch, {processes} processes, " + (f"ZeRO-{stage.group(1)}" if stage else "no DeepSpeed")


def path_lines(out, resume, t=1):
    """[(status, path, detail)] for PATHS: passed, failed or "-" (not taken on this node, or not reached), from round
    t's done markers, logs and checkpoints, and `resume`, the kill-and-resume check's (status, detail)."""
    round_dir, model = os.path.join(out, f"round_{t}"), os.path.join(out, f"round_{t}", "model")
    score, train, answers = (finished(out, t, stage) for stage in ("score", "train", "alpaca_eval"))

    def unreached(stage):  # a stage whose output is not finished: failed (its log's last line) or never started
        status, _, detail = stage_status(out, t, stage)
        return status, detail or f"round_{t}/{stage} never started"

    def generation():
        if finished(out, t, "generate") is None:
            return unreached("generate")
        shards = shard_markers(round_dir)
        engines = sorted({str(m.get("engine")) for m in shards or [finished(out, t, "generate")]})
        if engines != ["vllm"]:
            return "failed", f"engine {', '.join(engines)}, not vllm"
        return ("passed", f"{len(shards)} vLLM shards, merged") if shards else \
            ("-", "one vLLM worker (1 GPU): no shards")

    def scoring():
        if score is None:
            return unreached("score")
        processes = score.get("args", {}).get("num_processes") or 1
        return ("passed", f"{processes} processes") if processes > 1 else ("-", "one process (1 GPU)")

    def bf16():
        found = ([("02 scoring", score.get("args", {}).get("dtype") == "bfloat16")] if score else []) + \
                ([("04 training", train.get("bf16") is True)] if train else [])
        if not found:
            return unreached("score")
        bad = [name for name, ok in found if not ok]
        return ("failed", f"not bf16: {', '.join(bad)}") if bad else ("passed", " and ".join(n for n, _ in found))

    def zero3():
        if train is None:
            return unreached("train")
        how = launch(logged_command(os.path.join(round_dir, "logs", "train.log")) or [])
        return ("passed" if "ZeRO-3" in how else "-" if how.startswith("python") else "failed"), how

    def evaluation():
        if train is None:
            return unreached("train")
        if not train.get("args", {}).get("eval_size"):
            return "-", "EVAL_SIZE=0: no pairs held out"
        metrics = os.path.join(model, "metrics.jsonl")
        steps = [row["step"] for _, row in data.read_jsonl(metrics) if "eval_loss" in row] \
            if os.path.isfile(metrics) else []
        return (("passed", f"{len(steps)} evaluations, at steps {', '.join(map(str, steps))}") if steps
                else ("failed", f"pairs held out, but round_{t}/model/metrics.jsonl logs no evaluation"))

    def checkpoint():
        if train is None:
            return unreached("train")
        kept = complete_checkpoints(model + ".work")
        if not kept:
            return "-", "none kept (TRAIN_ARGS --keep_checkpoints true keeps them)"
        zero = glob.glob(os.path.join(model + ".work", f"checkpoint-{kept[-1]}", "global_step*"))
        return "passed", f"checkpoint-{kept[-1]}" + (" with DeepSpeed's global_step*/" if zero else "")

    def loaded_back():
        if answers is None:
            return unreached("alpaca_eval")
        loaded = answers.get("args", {}).get("model", "")
        if os.path.realpath(loaded) != os.path.realpath(model):
            return "failed", f"round_{t}/alpaca_eval loaded {loaded}, not round_{t}/model"
        engine = answers.get("engine")
        return ("passed", f"round_{t}/model") if engine == "vllm" else ("failed", f"engine {engine}, not vllm")

    def alpaca_eval():
        rounds = [(f"round_{r}", stage_status(out, r, "alpaca_eval")[0]) for r in rounds_of(out)]
        failed, done = ([name for name, s in rounds if s == status] for status in ("failed", "passed"))
        return ("failed", ", ".join(failed)) if failed else ("passed", ", ".join(done)) if done \
            else ("-", "ALPACA_EVAL not set")

    checks = [generation, scoring, bf16, zero3, evaluation, checkpoint, lambda: resume, loaded_back, alpaca_eval]
    return [(status, name, detail) for name, (status, detail) in zip(PATHS, (check() for check in checks))]


# ----------------------------------------------------------------------------- arithmetic: the forecast

def preset_work(preset):
    """One round of configs/PRESET.env: PROMPTS_PER_ROUND prompts x its K (NUM_SAMPLES), its MAX_STEPS x GLOBAL_BATCH
    pairs (read from its KEY="${KEY:-value}" lines), and the estimated LENGTHS."""
    with open(os.path.join(ROOT, "configs", f"{preset}.env"), encoding="utf-8") as f:
        settings = dict(re.findall(r'^([A-Z0-9_]+)="\$\{\1:-([^"$`]*)\}"', f.read(), re.M))
    return dict(prompts=PROMPTS_PER_ROUND, samples=int(settings["NUM_SAMPLES"]), steps=int(settings["MAX_STEPS"]),
                pairs_per_step=int(settings["GLOBAL_BATCH"]), **LENGTHS)


def forecast(rates, check_params, preset_params, work):
    """Seconds per preset round for each stage (None where the rate was not measured): the preset's tokens divided by
    the check's tokens/s scaled by check_params / preset_params (throughput taken inversely proportional to size).
    Training in trained tokens: 04 runs the same forward passes per token in the preset's round as in the check's
    (its pairs carry the reference log-probs in both), so they cancel."""
    scale = check_params / preset_params
    sequences = work["prompts"] * work["samples"]
    seconds = {}
    if rates.get("generate"):
        seconds["generate"] = sequences * work["new_tokens"] / (rates["generate"] * scale)
    if rates.get("score"):
        seconds["score"] = sequences * work["sequence_tokens"] / (rates["score"] * scale)
    if rates.get("train"):
        seconds["train"] = work["steps"] * work["pairs_per_step"] * work["pair_tokens"] / (rates["train"] * scale)
    return seconds


def duration(seconds):
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172800 else f"{seconds / 86400:,.0f} days"


def speed(tokens_per_second):
    return f"{tokens_per_second:,.0f}" if tokens_per_second >= 100 else f"{tokens_per_second:.3g}"


def forecast_lines(rates, check_params, model_dir, preset):
    """The printed forecast: one line per stage, the total, and the assumptions."""
    preset_params, work = PRESET_PARAMS[preset], preset_work(preset)
    lines = [f"rough forecast of one {preset} round on this node (a ROUGH ESTIMATE scaled by parameter count; see "
             "the assumptions below)"]
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
                  f"~{work['pair_tokens']:,})", rates.get("train")),
    }
    seconds = forecast(rates, check_params, preset_params, work)
    scale = check_params / preset_params
    for stage, (amount, rate) in what.items():
        if stage in seconds:
            lines.append(f"  {stage:<9} {amount}: check {speed(rate)} tokens/s -> {speed(rate * scale)} tokens/s at "
                         f"{preset_params / 1e9:.2f} B -> {duration(seconds[stage])}")
        else:
            lines.append(f"  {stage:<9} {amount}: not measured (no finished {stage} stage with its throughput)")
    if seconds:
        lines.append(f"  total     ~{duration(sum(seconds.values()))} per round"
                     + ("" if len(seconds) == 3 else f" (of the {len(seconds)} measured stages)"))
    passes = (f"04 ran {rates['train_passes']:.2f} forward passes per trained token in the check (3 = forward + "
              "backward; more where it ran reference forwards itself) and runs as many in the preset's round"
              if rates.get("train_passes") else "04's passes per token: not measured")
    return lines + [
        "assumptions:",
        f"  - throughput falls in proportion to parameters: check model {check_params:,} parameters (safetensors of "
        f"{model_dir}), {preset} {preset_params / 1e9:.2f} B; same GPUs and processes as the check;",
        "  - a small check model is limited by overheads rather than compute, so its scaled speed is low and the "
        "forecast errs long; vLLM's batching and the KV cache of long answers are not modelled;",
        f"  - the preset's round (configs/{preset}.env): {work['prompts']:,} prompts x {work['samples']} samples x "
        f"~{work['new_tokens']} new tokens; {sequences:,} sequences of ~{work['sequence_tokens']} tokens scored by 2 "
        f"models; {work['steps']} steps x {work['pairs_per_step']} pairs of ~{work['pair_tokens']:,} tokens (the "
        f"token lengths are estimates); {passes};",
        "  - the check's training time includes its evaluations and checkpoint saves; model loading, vLLM start-up "
        "and the preset's evaluation stages are not counted.",
    ]


def main(out: str, preset: Literal["llama3-8b", "zephyr-7b"] = "llama3-8b", model: str = None,
         resume_check: bool = True):
    """Print the stage lines, the code paths' verdicts and the rough forecast of a node check's run folder.

    Args:
        out: the run folder of the check (run_rounds.sh's OUT), holding round_0/, round_1/, ...
        preset: the paper preset the check is the miniature of, and whose round is forecast: llama3-8b or zephyr-7b.
        model: the check model's folder, to count its parameters (default: round_t/model, else the model 01 used).
        resume_check: kill round 1's training at its first checkpoint and rerun it (false: read the folder only).
    """
    args = cli.flags(main, locals())
    out = os.path.abspath(args.out)
    if not os.path.isdir(out) or not rounds_of(out):
        raise DiceError(f"no round_N folders in {args.out}: not a run folder of run_rounds.sh")
    lines = stage_lines(out)
    width = max(len(name) for _, name, _, _ in lines)
    for status, name, seconds, detail in lines:
        text = f"{status:<6}  {name:<{width}}" + (f"  {seconds:.1f} s" if seconds is not None else "")
        print(f"{status:<6}  {name}  (see {detail})" if detail else text.rstrip())
    resume = kill_and_resume(out) if args.resume_check else ("-", "not run (--resume_check false)")
    paths = path_lines(out, resume)
    print(f"\ncode paths of the {args.preset} preset:")
    width = max(len(name) for name in PATHS)
    for status, name, detail in paths:
        print(f"{status:<6}  {name:<{width}}  {detail}")
    print(CANNOT + "\n")
    model_dir = args.model or check_model(out)
    check_params = count_parameters(model_dir) if model_dir else None
    print("\n".join(forecast_lines(measured(out), check_params, model_dir, args.preset)))
    if any(status == "failed" for status, *_ in lines + paths):
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
