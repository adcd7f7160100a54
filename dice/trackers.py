"""Experiment trackers for tools/report.py --report_to: each round's figures logged at step = round. A tracker that is
not installed, not logged in or failing is a note printed beside the report, never a failed report."""
import glob
import math
import os

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
    """--report_to as transformers takes it ("none", "tensorboard", "tensorboard,wandb", or a list)."""
    items = report_to if isinstance(report_to, (list, tuple)) else str(report_to or "none").split(",")
    return [str(name).strip().lower() for name in items if str(name).strip().lower() not in ("", "none")]


def report_to_trackers(names, out, run_name, steps):
    """Log `steps` to each named tracker; one line per tracker: where it went, or a note why not."""
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
