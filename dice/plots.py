"""The figures: 03's three (the alpha scan, rewards and lengths of its pairs), tools/report.py's per-round ones and
04's loss.png. matplotlib's Agg backend, imported only when a figure is drawn; every PNG is written atomically."""
import math
import os

from dice import protocol


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path, **kw):
    with protocol.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, **kw)
    plt.close(fig)


def pair_figures(out_dir, sweep, alpha, before, after):
    """03's alpha_sweep.png (the scan's mean length gap per alpha), reward_hist.png (chosen vs rejected implicit
    rewards) and length_hist.png (chosen vs rejected lengths before and after shaping) in out_dir; `before` and
    `after` are pairs_io.pair_columns at alpha 0 and at `alpha`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    scanned = [(a, d) for a, d in sweep if d is not None]
    ax.plot([a for a, _ in scanned], [d for _, d in scanned], marker=".")
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(alpha, color="red", ls="--", label=f"alpha = {alpha:g}")
    ax.set(xlabel="alpha", ylabel="mean len(chosen) - len(rejected) [chars]", title="length-control sweep")
    ax.legend()
    _save(plt, fig, os.path.join(out_dir, "alpha_sweep.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist([after["chosen_reward"], after["rejected_reward"]], bins=50, label=["chosen", "rejected"], histtype="step")
    ax.set(xlabel="implicit reward log pi - log pi_ref (unscaled)", ylabel="pairs",
           title=f"generated pairs, alpha {alpha:g}")
    ax.legend()
    _save(plt, fig, os.path.join(out_dir, "reward_hist.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, title, pairs in zip(axes, ["before shaping (alpha 0)", f"after (alpha {alpha:g})"], [before, after]):
        ax.hist([pairs["chosen_len"], pairs["rejected_len"]], bins=50, label=["chosen", "rejected"], histtype="step")
        ax.set(xlabel="length [chars]", title=title)
        ax.legend()
    axes[0].set_ylabel("pairs")
    _save(plt, fig, os.path.join(out_dir, "length_hist.png"))


def report_figures(out, rows):
    """tools/report.py's report_lengths.png (length gap before/after shaping, chosen/rejected length),
    report_training.png (loss curves) and report_eval.png (held-out implicit-reward accuracy) in the run folder `out`,
    from its per-round rows. Returns the names written."""
    plt, written = _pyplot(), []

    def save(fig, name):
        _save(plt, fig, os.path.join(out, name), bbox_inches="tight")
        written.append(name)

    paired = [r for r in rows if r.get("gap_before") is not None]
    if paired:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
        ts = [r["round"] for r in paired]
        a.plot(ts, [r["gap_before"] for r in paired], "o-", label="before shaping (alpha = 0)")
        a.plot(ts, [r["gap_after"] for r in paired], "o-", label="after shaping")
        a.axhline(0, color="gray", lw=0.5)
        a.set(xlabel="round", ylabel="mean len(chosen) - len(rejected), chars", title="length gap of generated pairs",
              xticks=ts)
        a.legend()
        b.plot(ts, [r["chosen_len"] for r in paired], "o-", label="chosen")
        b.plot(ts, [r["rejected_len"] for r in paired], "o-", label="rejected")
        gen = [r for r in paired if r.get("gen_mean_chars") is not None]
        b.plot([r["round"] for r in gen], [r["gen_mean_chars"] for r in gen], "o--", label="all samples")
        b.set(xlabel="round", ylabel="mean length, chars", title="response length", xticks=ts)
        b.legend()
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
        ax.set(xlabel="round", ylabel="accuracy", ylim=(0, 1), title="implicit-reward accuracy of (pi_t, pi_t-1)",
               xticks=[r["round"] for r in evaluated])
        save(fig, "report_eval.png")
    return written


def loss_figure(log_history, path):
    """04's loss.png: train/eval loss, reward accuracy and reward margin against the step."""
    plt = _pyplot()
    panels = [("loss", "DPO loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, (key, title) in zip(axes, panels):
        for prefix, label in (("", "train"), ("eval_", "eval")):
            points = [(e["step"], e[prefix + key]) for e in log_history if prefix + key in e]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
        ax.set(title=title, xlabel="step")
        ax.legend()
    fig.tight_layout()
    _save(plt, fig, path)
