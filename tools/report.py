"""The report of a DICE run: OUT/report.md + plots and the short table run_rounds.sh prints, from the stages' files.

    python tools/report.py --out runs/demo        # run_rounds.sh calls it at the end; safe to run mid-run too
    python tools/report.py --out runs/llama3-8b --paper llama3-8b --sft princeton-nlp/Llama-3-Base-8B-SFT \
        --report_to tensorboard --run_name llama3-8b-report

The judge-free figures of round t (round 0 = the DPO model trained from the SFT model, when run_rounds.sh trained it):
  - generation (OUT/round_t/responses.jsonl, 01): mean generated length (tokens and characters), truncation rate
    (share of samples with finish reason "length"), and from scores.jsonl (02) the share of valid samples;
  - pairs (OUT/round_t/pairs/stats.json, 03): alpha, mean chosen/rejected length after shaping, the mean length gap
    len(chosen) - len(rejected) before (alpha = 0) and after the length-regularized shaping (Eq. 6), pairs
    generated/offline, prompts dropped by reason (too few valid samples, ties, identical texts);
  - training (OUT/round_t/model/metrics.jsonl, 04): first and last logged DPO loss and reward accuracy;
  - evaluation (OUT/round_t/eval_prefs.jsonl, 02 --pairs on EVAL_PREFS): the implicit-reward accuracy of
    (pi_t, pi_{t-1}), i.e. the share of held-out pairs with beta*log(pi_t/pi_{t-1})(chosen) > (rejected).
AlpacaEval 2 (README "Evaluation"), per round: the judge's leaderboard.csv (in alpaca_eval/ANNOTATOR/ or alpaca_eval/),
judge_note.txt, rm_scores.jsonl (tools/judge_rm.py); with the judge, the installed alpaca_eval version. The hub models
and datasets the stages loaded, with the commit each resolved to (their done markers' inputs.NAME.revision). Only
outputs whose done marker matches them are read.
"""
import glob
import json
import math
import os
import re
import sys
from typing import Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import judge_rm  # noqa: E402
from dice import DiceError, cli, data, protocol, report_text, trackers  # noqa: E402
from dice.plots import report_figures  # noqa: E402
from dice.report_text import PAPER_ANNOTATOR, judge_command  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The output of each stage in OUT/round_t (its done marker is OUTPUT.done.json beside it).
OUTPUTS = {"generate": "responses.jsonl", "score": "scores.jsonl", "score_offline": "offline_scored.jsonl",
           "pairs": os.path.join("pairs", "pairs.jsonl"), "train": "model", "eval": "eval_prefs.jsonl",
           "alpaca_eval": os.path.join("alpaca_eval", "model_outputs.json"),
           "judge_rm": os.path.join("alpaca_eval", "rm_scores.jsonl")}


def finished(path):
    """True when `path` is a finished stage output: its done marker records the fingerprint it has now."""
    return protocol.finished_marker(path) is not None


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def generation_stats(path):
    """Mean tokens/characters per sample and the share cut by max_new_tokens, from 01's responses.jsonl."""
    tokens, chars, truncated, prompts = [], [], 0, 0
    for _, row in data.read_jsonl(path):
        prompts += 1
        tokens += list(row.get("num_tokens") or [])
        chars += [len(r) for r in row["responses"]]
        truncated += sum(f == "length" for f in row.get("finish_reasons") or [])
    return dict(gen_prompts=prompts, gen_samples=len(chars), gen_mean_tokens=_mean(tokens), gen_mean_chars=_mean(chars),
                truncation_rate=truncated / len(chars) if chars else None)


def score_stats(path):
    valid, rewards = [], []
    for _, row in data.read_jsonl(path):
        valid += [bool(v) for v in row["valid"]]
        rewards += [r for r, v in zip(row["rewards"], row["valid"]) if v]
    return dict(valid_rate=sum(valid) / len(valid) if valid else None, mean_reward=_mean(rewards))


def pair_stats(path):
    with open(path) as f:
        s = json.load(f)
    c = s.get("counts", {})
    return dict(alpha=s.get("alpha"), chosen_len=(s.get("chosen_len") or {}).get("mean"),
                rejected_len=(s.get("rejected_len") or {}).get("mean"),
                gap_before=s.get("mean_len_diff_before"), gap_after=s.get("mean_len_diff_after"),
                pairs_generated=c.get("n_pairs_generated"), pairs_offline=c.get("n_pairs_offline"),
                dropped_min_valid=c.get("n_dropped_min_valid"), dropped_tie=c.get("n_dropped_tie"),
                dropped_identical=c.get("n_dropped_identical"))


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


def alpaca_eval_stats(round_dir, annotator):
    """AlpacaEval of one round's model (OUT/round_t/alpaca_eval): the generator name of its finished
    model_outputs.json, that name's row of the judge's leaderboard.csv, the judge's note, and the reward-model scores
    (rm_scores.jsonl rows, for the win rates across rounds). A missing or failed judge is a note, never an error."""
    folder, row, notes = os.path.join(round_dir, "alpaca_eval"), {}, []
    if os.path.isfile(os.path.join(folder, "judge_note.txt")):
        with open(os.path.join(folder, "judge_note.txt"), encoding="utf-8") as f:
            notes += [line.strip() for line in f if line.strip()][:1]
    if finished(os.path.join(folder, "model_outputs.json")):
        row["ae_generator"] = judge_rm.read_outputs(os.path.join(folder, "model_outputs.json"))[0]["generator"]
        # the instructions answered, the judge's reference as run_rounds.sh defaults it (the AE2 baseline file holds
        # both); 01 was given the path relative to the repository
        given = (protocol.read_marker(os.path.join(folder, "model_outputs.json")).get("inputs", {}).get("prompts")
                 or {}).get("path")
        if given:
            row["ae_reference"] = os.path.join(ROOT, given) if os.path.exists(os.path.join(ROOT, given)) else given
        # alpaca_eval writes OUTPUT_PATH/ANNOTATOR/leaderboard.csv for a named annotator, OUTPUT_PATH/ for a path
        boards = [os.path.join(folder, annotator, "leaderboard.csv")] if "/" not in annotator else []
        boards = [b for b in boards + [os.path.join(folder, "leaderboard.csv")] if os.path.isfile(b)]
        found = judge_rm.read_leaderboard(boards[0], row["ae_generator"]) if boards else {}
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


# The figures each finished stage gives: (stage, its file in OUT/round_t, the reader)
STATS = [("generate", "responses.jsonl", generation_stats), ("score", "scores.jsonl", score_stats),
         ("pairs", os.path.join("pairs", "stats.json"), pair_stats),
         ("train", os.path.join("model", "metrics.jsonl"), train_stats), ("eval", "eval_prefs.jsonl", eval_stats)]


def hub_inputs(markers):
    """[(hub id as given, commit, stage, input name)] of the done markers {stage: marker}: the hub models and datasets
    the stages loaded, each at the commit its revision resolved to (dice/protocol.py)."""
    return [(entry.get("path"), entry["revision"], stage, name) for stage, marker in markers.items()
            for name, entry in (marker.get("inputs") or {}).items()
            if isinstance(entry, dict) and entry.get("revision")]


def collect(out, annotator=PAPER_ANNOTATOR):
    """One dict per round directory OUT/round_N, from the files of the stages that finished."""
    rounds = sorted((int(d.rsplit("_", 1)[1]), d) for d in glob.glob(os.path.join(out, "round_*"))
                    if re.fullmatch(r"round_\d+", os.path.basename(d)) and os.path.isdir(d))
    rows = []
    for t, d in rounds:
        row = dict(round=t)
        markers = {stage: protocol.finished_marker(os.path.join(d, name)) for stage, name in OUTPUTS.items()}
        done = [stage for stage, marker in markers.items() if marker is not None]
        for stage, name, stats in STATS:
            if stage in done and os.path.isfile(os.path.join(d, name)):
                row.update(stats(os.path.join(d, name)))
        row.update(alpaca_eval_stats(d, annotator), stages_done=done,
                   hub_inputs=hub_inputs({stage: markers[stage] for stage in done}))
        rows.append(row)
    rm_win_rates(rows)
    return rows


def main(out: str, plots: bool = True, paper: Literal["llama3-8b", "zephyr-7b"] = None,
         annotator: str = PAPER_ANNOTATOR, sft: str = None, report_to: str = "none", run_name: str = None):
    """Write OUT/report.md (+ plots) and print the short per-round table.

    Args:
        out: the run folder of run_rounds.sh (OUT), holding round_0/, round_1/, ...
        plots: write report_*.png beside report.md.
        paper: show the paper's AlpacaEval 2 numbers of that preset beside the run's.
        annotator: alpaca_eval's --annotators_config of the judge (where its leaderboard.csv is; the command shown).
        sft: the SFT model the run started from (named in the report; a PyPI-wheel copy is flagged as such).
        report_to: trackers for the per-round figures, comma-separated: tensorboard, wandb, trackio (default none).
        run_name: the trackers' run name (default: the run folder's name + "-report").
    """
    args = cli.flags(main, locals())
    if not os.path.isdir(args.out):
        raise DiceError(f"run folder not found: {args.out}")
    rows = collect(args.out, args.annotator)
    if not rows:
        raise DiceError(f"no round_N folders in {args.out}: nothing to report")
    written = report_figures(args.out, rows) if args.plots else []
    with protocol.atomic_open(os.path.join(args.out, "report.md")) as f:
        f.write(report_text.render(args.out, rows, written, args.paper, args.annotator, args.sft))
    print(report_text.short_table(rows))
    for r in (r for r in rows if r["round"] in report_text.not_judged(rows)):
        print(f"round {r['round']} not judged yet: "
              f"{judge_command(args.out, r['round'], args.annotator, r.get('ae_reference'))}")
    run_name = args.run_name or os.path.basename(os.path.abspath(args.out)) + "-report"
    steps = trackers.tracked_figures(rows)
    for line in trackers.report_to_trackers(trackers.tracker_names(args.report_to), args.out, run_name, steps):
        print(line)
    print(f"wrote {os.path.join(args.out, 'report.md')} ({len(rows)} rounds"
          f"{', ' + ', '.join(written) if written else ''})")


if __name__ == "__main__":
    cli.run(main)
