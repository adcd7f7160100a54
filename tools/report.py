"""The judge-free report of a DICE run: OUT/report.md + plots, built from the files the stages left behind.

    python tools/report.py --out runs/demo        # run_rounds.sh calls it at the end; safe to run mid-run too

Per round t (round 0 = the DPO model trained from the SFT model, when run_rounds.sh trained it):
  - generation (OUT/round_t/responses.jsonl, 01): mean generated length (tokens and characters), truncation rate
    (share of samples with finish reason "length"), and from scores.jsonl (02) the share of valid samples;
  - pairs (OUT/round_t/pairs/stats.json, 03): alpha, mean chosen/rejected length after shaping, the mean length gap
    len(chosen) - len(rejected) before (alpha = 0) and after the length-regularized shaping (Eq. 6), pairs
    generated/offline, prompts dropped by reason (too few valid samples, ties, identical texts);
  - training (OUT/round_t/model/metrics.jsonl, 04): first and last logged DPO loss and reward accuracy;
  - evaluation (OUT/round_t/eval_prefs.jsonl, 02 --pairs on EVAL_PREFS): the implicit-reward accuracy of
    (pi_t, pi_{t-1}), i.e. the share of held-out pairs with beta*log(pi_t/pi_{t-1})(chosen) > (rejected).
Only files whose stage finished (OUT/round_t/stages/STAGE.done.json) are read, so a report made mid-run never reads a
partial file; missing values print as "-". The report holds no timings, so two runs with the same settings produce the
same report.md. The short table it prints is what run_rounds.sh shows at the end of a run.
"""
import glob
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
from common import DiceError  # noqa: E402


def _done(round_dir, stage):
    return os.path.isfile(os.path.join(round_dir, "stages", f"{stage}.done.json"))


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def generation_stats(path):
    """Mean tokens/characters per sample and the share cut by max_new_tokens, from 01's responses.jsonl."""
    tokens, chars, truncated, n, prompts = [], [], 0, 0, 0
    for _, row in common.read_jsonl(path):
        prompts += 1
        tokens += list(row.get("num_tokens") or [])
        chars += [len(r) for r in row["responses"]]
        truncated += sum(f == "length" for f in row.get("finish_reasons") or [])
        n += len(row["responses"])
    return dict(gen_prompts=prompts, gen_samples=n, gen_mean_tokens=_mean(tokens), gen_mean_chars=_mean(chars),
                truncation_rate=truncated / n if n else None)


def score_stats(path):
    valid, rewards = [], []
    for _, row in common.read_jsonl(path):
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
    logs = [row for _, row in common.read_jsonl(path) if "loss" in row and "train_runtime" not in row]
    acc = [row for row in logs if "rewards/accuracies" in row]
    return dict(loss_first=logs[0]["loss"] if logs else None, loss_last=logs[-1]["loss"] if logs else None,
                reward_acc_last=acc[-1]["rewards/accuracies"] if acc else None,
                train_steps=logs[-1].get("step") if logs else None,
                curve=[(row.get("step"), row["loss"]) for row in logs])


def eval_stats(path):
    """Implicit-reward accuracy on held-out pairs: chosen_reward > rejected_reward (a tie counts as wrong)."""
    wins, margins = [], []
    for _, row in common.read_jsonl(path):
        c, r = row.get("chosen_reward"), row.get("rejected_reward")
        if c is None or r is None or not (math.isfinite(c) and math.isfinite(r)):
            continue
        wins.append(c > r)
        margins.append(c - r)
    return dict(eval_accuracy=sum(wins) / len(wins) if wins else None, eval_pairs=len(wins),
                eval_margin=_mean(margins))


def collect(out):
    """One dict per round directory OUT/round_N, from the files of the stages that finished."""
    rounds = []
    for d in glob.glob(os.path.join(out, "round_*")):
        m = re.fullmatch(r"round_(\d+)", os.path.basename(d))
        if m and os.path.isdir(d):
            rounds.append((int(m.group(1)), d))
    rows = []
    for t, d in sorted(rounds):
        row = dict(round=t)
        if _done(d, "generate"):
            row.update(generation_stats(os.path.join(d, "responses.jsonl")))
        if _done(d, "score"):
            row.update(score_stats(os.path.join(d, "scores.jsonl")))
        if _done(d, "pairs"):
            row.update(pair_stats(os.path.join(d, "pairs", "stats.json")))
        if _done(d, "train") and os.path.isfile(os.path.join(d, "model", "metrics.jsonl")):
            row.update(train_stats(os.path.join(d, "model", "metrics.jsonl")))
        if _done(d, "eval"):
            row.update(eval_stats(os.path.join(d, "eval_prefs.jsonl")))
        row["stages_done"] = sorted(os.path.basename(p)[: -len(".done.json")]
                                    for p in glob.glob(os.path.join(d, "stages", "*.done.json")))
        rows.append(row)
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
        with common.atomic_open(os.path.join(out, name), "wb") as f:
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


def render(out, rows, plots):
    lines = ["# DICE run report", "", "Judge-free figures per round, from the files each finished stage wrote (see "
             "tools/report.py for the definitions). Round 0 is the DPO model trained from the SFT model (when this run "
             "trained it).", ""]
    lines += ["## Summary", "", markdown_table([h for h, _, _ in SHORT], [short_cells(r) for r in rows]), ""]
    lines += ["## All figures", "", markdown_table([h for h, _, _ in FULL],
                                                   [[cell(r, k, s) for _, k, s in FULL] for r in rows]), ""]
    lines += ["- gap = mean len(chosen) - len(rejected) in characters over the generated pairs, before (alpha = 0) "
              "and after the length-regularized shaping r - alpha*|y|;",
              "- truncated = share of samples stopped by max_new_tokens; valid = share 02 counts as valid;",
              "- reward acc = the trainer's rewards/accuracies at the last logged step (training pairs);",
              "- eval accuracy = share of held-out pairs (EVAL_PREFS) where the implicit reward of (pi_t, pi_t-1) "
              "ranks chosen above rejected.", ""]
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


def main(
    out: str = None,  # the run folder of run_rounds.sh (OUT), holding round_0/, round_1/, ...
    plots: bool = True,  # write report_*.png beside report.md
):
    """Write OUT/report.md (+ plots) and print the short per-round table."""
    if not out:
        raise DiceError("--out (the run folder) is required")
    out = str(out)
    plots = common.as_bool("plots", plots)
    if not os.path.isdir(out):
        raise DiceError(f"run folder not found: {out}")
    rows = collect(out)
    if not rows:
        raise DiceError(f"no round_N folders in {out}: nothing to report")
    written = save_plots(out, rows) if plots else []
    with common.atomic_open(os.path.join(out, "report.md")) as f:
        f.write(render(out, rows, written))
    print(text_table([h for h, _, _ in SHORT], [short_cells(r) for r in rows]))
    print(f"wrote {os.path.join(out, 'report.md')} ({len(rows)} rounds{', ' + ', '.join(written) if written else ''})")


if __name__ == "__main__":
    common.cli(main)
