"""Stage 3 of DICE: length-regularized best-vs-worst preference pairs, mixed with offline pairs (experience replay).

The paper (Chen et al., ICLR 2025, arXiv 2406.09760), Sec. 3.1-3.2: each response y of prompt x has the DPO implicit
reward r(x, y) = log pi(y|x) - log pi_ref(y|x) (02_score.py; beta is a constant factor and is left out, as in the
paper's code). The length-regularized reward shaping (Eq. 6 of the paper) ranks responses by

    r_LC(x, y) = r(x, y) - alpha * |y|            |y| = length of the response in characters (Python len)

and the pair of a prompt is (argmax r_LC, argmin r_LC) over its valid responses. alpha is chosen automatically as in
the paper's code: scan alpha = i/1000 for i = 0, 1, ..., 999; at each alpha build the pairs and take the mean of
len(chosen) - len(rejected) over them; stop at the first alpha whose |mean| is strictly larger than the smallest |mean|
seen before it; use the (first) alpha with the smallest |mean|. Experience replay (Sec. 3.2) then mixes the generated
pairs with offline pairs: with N_off offline and N_gen generated pairs, n_gen = min(int(N_off * (1 - gamma)), N_gen)
generated pairs are sampled, and n_off = int(gamma * n_gen / (1 - gamma)) offline pairs from prompts that are not among
the sampled generated ones.

Exact rules, all decided here and tested in tests/test_build_pairs.py:
  - usable response: valid (02's flag) and a finite reward (and finite policy log-prob when the row has them); NaN,
    inf or null rewards of valid responses are counted (`n_responses_nonfinite`) and never ranked.
  - prompts with fewer than --min_valid usable responses are dropped (paper: 8 of 16); K may differ between rows.
  - among equal maxima the chosen response is the one with the lowest index (numpy argmax); the same for the rejected
    response among equal minima (argmin).
  - a pair is dropped when its chosen and rejected shaped rewards are equal (a tie: every usable response has the
    same shaped reward), else when its two texts are identical. Both are counted, at every alpha of the scan, and the
    scan's mean is over the pairs kept at that alpha (an alpha that keeps no pair counts as |mean| = infinity).
  - duplicate prompts (same data.prompt_id) keep their first row; the others are counted and dropped.
  - chosen_reward/rejected_reward are the unshaped implicit rewards r (02's `rewards`); ref_chosen_logps /
    ref_rejected_logps are 02's `policy_logps` of the two responses (the next round's reference model is this very
    policy, so stage 4 needs no reference forward); null when the scores file has no `policy_logps`, and null when
    02's `completion_starts` of the two differ (a token merged across the prompt/response boundary in one of them:
    TRL splits the pair at the earlier start, so stage 4 computes these itself; counted as n_pairs_split_mismatch).
  - replay sampling uses numpy.random.default_rng(--seed); the final rows (generated + offline) are shuffled with the
    same generator, so the file order is random but reproducible. Offline prompts are compared by data.prompt_id.

Input (02_score.py --responses): scores.jsonl, one row per prompt: `prompt` (string or messages list), `responses` (K
strings), `rewards` (K numbers, policy - reference), `valid` (K booleans), optional `policy_logps` (K numbers),
`completion_starts` (K ints) and `prompt_id`; other fields (`finish_reasons`, `num_tokens`, `reference_logps`) must
have K entries when present and are otherwise ignored.
Offline input (--offline): a .jsonl/.json/.parquet file, a save_to_disk folder or a hub id (--split); rows `prompt`,
`chosen`, `rejected` as strings (this project, the official DICE preference.json) or as TRL's conversational messages
(or full conversations whose last turn is the answer, as HuggingFaceH4/ultrafeedback_binarized), normalized by
data.read_pair; optionally 02_score.py --pairs' `policy_chosen_logps`, `policy_rejected_logps` (-> ref_chosen_logps,
ref_rejected_logps), `chosen_reward`, `rejected_reward`.
Output, in --out_dir:
  pairs.jsonl   `prompt_id`, `prompt`, `chosen`, `rejected`, `chosen_reward`, `rejected_reward`, `source`
                ("generated" or "offline"), `ref_chosen_logps`, `ref_rejected_logps`
  stats.json    alpha, the sweep, length gap before/after shaping, length and reward summaries, every count, seed, args
  alpha_sweep.png, reward_hist.png (chosen vs rejected), length_hist.png (before vs after shaping)
  pairs.jsonl.done.json  protocol.stage's done marker (arguments, input fingerprints, alpha, counts); stats.json and the
                plots are written before pairs.jsonl is published (an --overwrite redo removes the old marker first:
                a redo that dies midway leaves nothing that counts as finished). A rerun with the same arguments and
                inputs is "done already"; other arguments or inputs are refused unless --overwrite.
Speed (bench/bench_build_pairs.py: whole process and core, against the official code's approach): the table of
prompts x K is built once and each alpha of the scan is a few numpy operations over it; the plots are drawn by a
second process that imports matplotlib while this one reads the scores.

Smoke (K = 4 synthetic responses per prompt, written by the benchmark; seconds):
    python bench/bench_build_pairs.py --prompts 200 --k 4 --write_scores /tmp/scores.jsonl
    python 03_build_pairs.py --scores /tmp/scores.jsonl --out_dir /tmp/pairs --min_valid 2 \\
        --offline data/demo/preferences.jsonl --gamma 0.5
Full run (the paper: K = 16, at least 8 valid, replay gamma 0.5 with the offline preference set):
    python 03_build_pairs.py --scores runs/round_1/scores.jsonl --out_dir runs/round_1/pairs \\
        --offline runs/round_1/offline_scored.jsonl --gamma 0.5 --min_valid 8 --alpha auto --seed 0
"""
import contextlib
import gc
import math
import multiprocessing
import os
import time
from itertools import chain

import numpy as np

from dice import DiceError, cli, data, protocol

ALPHA_GRID = np.arange(1000) / 1000  # 0, 0.001, ..., 0.999: each value is i/1000 exactly rounded, never a running sum


# ----------------------------------------------------------------------------- arguments

def resolve_args(values):
    """fire's values -> the checked arguments, with alpha_mode (auto, fixed or off) and gamma's default."""
    if not values["scores"] or not values["out_dir"]:
        raise DiceError("--scores and --out_dir are required")
    args = cli.legacy_convert(values, {"scores": str, "out_dir": str, "offline": str, "split": str, "min_valid": (int, 2),
                                   "length_control": bool, "seed": (int, 0), "plots": bool, "overwrite": bool})
    alpha = args["alpha"]
    if alpha == "auto":
        args["alpha_mode"] = "auto" if args["length_control"] else "off"
    else:
        try:
            alpha = args["alpha"] = cli.as_float("alpha", alpha, minimum=0.0)
        except DiceError:
            raise DiceError(f"--alpha must be auto or a number >= 0, got {alpha!r}") from None
        if not args["length_control"] and alpha != 0:
            raise DiceError(f"--alpha {alpha} contradicts --length_control false (which means alpha = 0)")
        args["alpha_mode"] = "fixed" if args["length_control"] else "off"
    gamma = cli.as_float("gamma", (0.5 if args["offline"] else 0.0) if args["gamma"] is None else args["gamma"], 0.0)
    if gamma >= 1:
        raise DiceError(f"--gamma must be < 1 (the share of offline pairs), got {gamma}")
    if gamma > 0 and not args["offline"]:
        raise DiceError(f"--gamma {gamma} needs --offline (the offline preference pairs to replay)")
    args["split"] = data.split_of(args["offline"], args["split"])
    order = ("scores", "out_dir", "offline", "split", "gamma", "min_valid", "alpha", "alpha_mode", "length_control",
             "seed", "plots", "overwrite")
    return {k: gamma if k == "gamma" else args[k] for k in order}


# ----------------------------------------------------------------------------- reading

def _number(value, where):
    """A JSON number as a float, NaN for null; anything else is a DiceError."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DiceError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise DiceError(f"{where}: a number is too large") from None


def _numbers(values, where):
    """A list of JSON numbers (or nulls) as floats, NaN for null (make_table marks non-finite values unusable)."""
    if set(map(type, values)) <= {float}:  # the fast path: 02 writes floats
        return values
    return [_number(v, f"{where}[{j}]") for j, v in enumerate(values)]


def read_scores(path):
    """Read 02's scores.jsonl -> one record per row, in file order, repeated prompts included (usable_prompts drops
    them): prompt_id, key (data.prompt_id), prompt, responses, rewards and policy_logps (floats, NaN for null;
    policy_logps None when absent), valid, completion_starts (None when absent). A bad row is a DiceError naming
    path:line."""
    records = []
    for line, row in data.read_jsonl(path):
        where = f"{path}:{line}"
        for field in ("prompt", "responses", "rewards", "valid"):
            if field not in row:
                raise DiceError(f"{where}: missing field '{field}' (expected 02_score.py output)")
        data.to_messages(row["prompt"], where)
        responses = row["responses"]
        if not isinstance(responses, list) or not set(map(type, responses)) <= {str}:
            raise DiceError(f"{where}: 'responses' must be a list of strings")
        k = len(responses)
        for field in ("rewards", "valid", "policy_logps", "reference_logps", "finish_reasons", "num_tokens",
                      "completion_starts"):
            if field in row and (not isinstance(row[field], list) or len(row[field]) != k):
                n = len(row[field]) if isinstance(row[field], list) else "not a list"
                raise DiceError(f"{where}: '{field}' has {n} values but 'responses' has {k}")
        if not set(map(type, row["valid"])) <= {bool}:
            raise DiceError(f"{where}: 'valid' must be a list of true/false")
        logps, starts = row.get("policy_logps"), row.get("completion_starts")
        if starts is not None and not set(map(type, starts)) <= {int}:
            raise DiceError(f"{where}: 'completion_starts' must be a list of ints")
        key = data.prompt_id(row["prompt"])
        records.append(dict(prompt_id=row.get("prompt_id", key), key=key, prompt=row["prompt"], responses=responses,
                            rewards=_numbers(row["rewards"], f"{where}: rewards"), valid=row["valid"],
                            policy_logps=None if logps is None else _numbers(logps, f"{where}: policy_logps"),
                            completion_starts=starts))
    if not records:
        raise DiceError(f"{path}: no rows")
    return records


def read_offline(path, split="train"):
    """Offline preference pairs as output rows, in any shape users hold them (data.read_rows: .jsonl, .json,
    .parquet, a save_to_disk folder or a hub id with `split`; data.read_pair: strings, TRL's conversational
    messages or full conversations), with 02_score.py --pairs' optional `policy_chosen_logps`,
    `policy_rejected_logps` (-> ref_chosen_logps, ref_rejected_logps), `chosen_reward`, `rejected_reward`."""
    rows = []
    for where, row in data.read_rows(path, split):
        pair = data.read_pair(row, where)
        extra = {}
        for src, dst in (("policy_chosen_logps", "ref_chosen_logps"), ("policy_rejected_logps", "ref_rejected_logps"),
                         ("chosen_reward", "chosen_reward"), ("rejected_reward", "rejected_reward")):
            value = row.get(src)
            if value is not None and not math.isfinite(_number(value, f"{where}: {src}")):
                raise DiceError(f"{where}: '{src}' is not finite ({value!r})")
            extra[dst] = None if value is None else float(value)
        rows.append(dict(prompt_id=data.prompt_id(pair["prompt"]), prompt=pair["prompt"], chosen=pair["chosen"],
                         rejected=pair["rejected"], chosen_reward=extra["chosen_reward"],
                         rejected_reward=extra["rejected_reward"], source="offline",
                         ref_chosen_logps=extra["ref_chosen_logps"], ref_rejected_logps=extra["ref_rejected_logps"]))
    if not rows:
        raise DiceError(f"{path}: no offline pairs")
    return rows


# ----------------------------------------------------------------------------- the rule, vectorised over prompts x K

def make_table(records):
    """Pad the records into (prompts x K) arrays, built at once for all rows: rewards and policy_logps (NaN where
    absent), lengths (characters), valid, usable (valid with a finite reward and, where the row has them, a finite
    log-prob), text ids (equal ids = identical texts within a row), and k (responses per row). Padding is unusable."""
    ks = np.array([len(r["responses"]) for r in records], dtype=np.int64)
    n, k = len(records), int(ks.max(initial=0))
    cells = np.arange(k) < ks[:, None]  # the cells holding a response; mask assignment fills them row by row

    def padded(values, fill, dtype):
        table = np.full((n, k), fill, dtype=dtype)
        table[cells] = np.array(list(values), dtype=dtype)
        return table

    rewards = padded(chain.from_iterable(r["rewards"] for r in records), math.nan, np.float64)
    logps = padded(chain.from_iterable(r.get("policy_logps") or [math.nan] * len(r["responses"]) for r in records),
                   math.nan, np.float64)
    lengths = padded(map(len, chain.from_iterable(r["responses"] for r in records)), 0, np.int64)
    valid = padded(chain.from_iterable(r["valid"] for r in records), False, bool)
    has_logps = np.array([r.get("policy_logps") is not None for r in records], dtype=bool)
    usable = valid & np.isfinite(rewards) & (np.isfinite(logps) | ~has_logps[:, None])
    # identical texts have equal lengths: only rows with two equal lengths need their texts compared
    text_id = np.tile(np.arange(k), (n, 1))
    ordered = np.sort(lengths, axis=1)
    for i in np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1)):
        first = {}
        text_id[i, :ks[i]] = [first.setdefault(t, j) for j, t in enumerate(records[i]["responses"])]
    return dict(rewards=rewards, policy_logps=logps, lengths=lengths, valid=valid, usable=usable, text_id=text_id,
                k=ks)


def usable_prompts(records, min_valid):
    """The prompts to pair: the first row of each prompt, with at least min_valid usable responses.
    Returns (records, table, counts), the counts over every row read."""
    table = make_table(records)
    first, seen = np.zeros(len(records), dtype=bool), set()
    for i, r in enumerate(records):
        first[i] = r["key"] not in seen
        seen.add(r["key"])
    enough = table["usable"].sum(axis=1) >= min_valid
    counts = dict(n_rows=len(records), n_duplicate_prompts=int((~first).sum()), n_responses=int(table["k"].sum()),
                  n_responses_invalid=int(table["k"].sum() - table["valid"].sum()),
                  n_responses_nonfinite=int((table["valid"] & ~table["usable"]).sum()),
                  n_prompts_in=int(first.sum()), n_dropped_min_valid=int((first & ~enough).sum()),
                  n_dropped_tie=0, n_dropped_identical=0, n_pairs_built=0)
    keep = first & enough
    return [r for r, ok in zip(records, keep) if ok], {name: a[keep] for name, a in table.items()}, counts


def select(table, alpha):
    """Best-vs-worst pairs of every row at one alpha: (chosen index, rejected index, tie mask, identical mask).
    Every row needs a usable response (usable_prompts keeps rows with at least --min_valid >= 2)."""
    shaped = table["rewards"] - alpha * table["lengths"]
    hi = np.where(table["usable"], shaped, -np.inf)
    lo = np.where(table["usable"], shaped, np.inf)
    chosen, rejected = hi.argmax(axis=1), lo.argmin(axis=1)  # the first index among equal maxima / minima
    rows = np.arange(len(chosen))
    tie = hi[rows, chosen] == lo[rows, rejected]
    identical = ~tie & (table["text_id"][rows, chosen] == table["text_id"][rows, rejected])
    return chosen, rejected, tie, identical


def mean_len_diff(table, chosen, rejected, keep):
    """Mean of len(chosen) - len(rejected) over kept pairs (an exact integer sum divided once); None if none kept."""
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        return None
    diff = table["lengths"][rows, chosen[rows]] - table["lengths"][rows, rejected[rows]]
    return int(diff.sum()) / len(rows)


def sweep_alpha(table, grid=ALPHA_GRID):
    """The paper's scan: returns (best alpha, [(alpha, mean len diff or None), ...] up to and including the stop)."""
    sweep, best, best_abs = [], 0.0, math.inf
    for alpha in grid:
        chosen, rejected, tie, identical = select(table, alpha)
        d = mean_len_diff(table, chosen, rejected, ~tie & ~identical)
        sweep.append((float(alpha), d))
        a = math.inf if d is None else abs(d)
        if a > best_abs:
            break
        if a < best_abs:
            best, best_abs = float(alpha), a
    return best, sweep


def choose_alpha(table, args):
    """alpha and its sweep: the paper's scan (auto), else the fixed value or 0 (off) beside alpha 0."""
    if args["alpha_mode"] == "auto":
        return sweep_alpha(table)
    alpha = 0.0 if args["alpha_mode"] == "off" else args["alpha"]
    return alpha, [(a, mean_len_diff(table, c, r, ~t & ~i)) for a in sorted({0.0, alpha})
                   for c, r, t, i in [select(table, a)]]


def generated_pairs(records, table, chosen, rejected, keep, counts):
    """The output rows of the kept pairs. The scoring policy's log-probs become the next round's reference log-probs,
    except where the two responses start at different tokens: TRL splits such a pair at the earlier start, so 02's
    per-response log-probs are not the ones stage 4 would compute (left null for stage 4; counted)."""
    rows = np.flatnonzero(keep)
    c, r = chosen[rows], rejected[rows]
    values = [table[name][rows, idx].tolist() for name in ("rewards", "policy_logps") for idx in (c, r)]
    out, counts["n_pairs_split_mismatch"] = [], 0
    for i, ci, ri, rew_c, rew_r, logp_c, logp_r in zip(rows.tolist(), c.tolist(), r.tolist(), *values):
        rec = records[i]
        starts, with_logps = rec["completion_starts"], rec["policy_logps"] is not None
        if starts is not None and starts[ci] != starts[ri]:
            counts["n_pairs_split_mismatch"] += 1
            with_logps = False
        out.append(dict(prompt_id=rec["prompt_id"], prompt=rec["prompt"], chosen=rec["responses"][ci],
                        rejected=rec["responses"][ri], chosen_reward=rew_c, rejected_reward=rew_r, source="generated",
                        ref_chosen_logps=logp_c if with_logps else None,
                        ref_rejected_logps=logp_r if with_logps else None))
    return out


def replay_counts(n_off, n_gen, gamma):
    """The paper's mix sizes: (generated pairs to take, offline pairs to take)."""
    if gamma == 0:
        return n_gen, 0
    take_gen = min(int(n_off * (1 - gamma)), n_gen)
    return take_gen, int(gamma * take_gen / (1 - gamma))


def replay(gen_keys, off_keys, gamma, rng):
    """Indices of the generated and offline pairs to keep: n_gen generated ones at random, then n_off offline ones at
    random among those whose prompt is not a kept generated prompt. Errors when too few offline pairs remain."""
    take_gen, take_off = replay_counts(len(off_keys), len(gen_keys), gamma)
    if gamma == 0:
        return np.arange(len(gen_keys)), np.arange(0)
    if take_gen == 0:
        raise DiceError(f"replay keeps no generated pair: int({len(off_keys)} offline pairs * (1 - gamma {gamma})) = "
                        f"{int(len(off_keys) * (1 - gamma))}; give more offline pairs or a smaller --gamma")
    gen_idx = np.sort(rng.choice(len(gen_keys), size=take_gen, replace=False))
    taken = {gen_keys[i] for i in gen_idx}
    eligible = np.array([j for j, key in enumerate(off_keys) if key not in taken], dtype=np.int64)
    if len(eligible) < take_off:
        raise DiceError(f"too few offline pairs: gamma {gamma} needs {take_off} offline pairs from prompts outside the "
                        f"{take_gen} sampled generated ones, but only {len(eligible)} of {len(off_keys)} qualify")
    off_idx = np.sort(eligible[rng.choice(len(eligible), size=take_off, replace=False)])
    return gen_idx, off_idx


def nothing_left(counts, min_valid, k):
    """The error when no pair is left, with the counts that say why."""
    return DiceError(f"no pairs left: {counts['n_prompts_in']} prompts, {counts['n_dropped_min_valid']} with fewer "
                     f"than --min_valid {min_valid} usable responses (K = {k}), {counts['n_dropped_tie']} ties, "
                     f"{counts['n_dropped_identical']} identical texts; nothing written")


# ----------------------------------------------------------------------------- reporting

def summary(values):
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return None
    q = np.percentile(v, [0, 25, 50, 75, 100])
    return dict(mean=float(v.mean()), std=float(v.std()), min=float(q[0]), p25=float(q[1]), median=float(q[2]),
                p75=float(q[3]), max=float(q[4]))


def pair_columns(table, chosen, rejected, keep):
    """(lengths of chosen, of rejected, rewards of chosen, of rejected) over the kept pairs."""
    rows = np.flatnonzero(keep)
    return (table["lengths"][rows, chosen[rows]], table["lengths"][rows, rejected[rows]],
            table["rewards"][rows, chosen[rows]], table["rewards"][rows, rejected[rows]])


def make_stats(args, alpha, sweep, table, picked, picked0, counts, seconds):
    """stats.json: alpha and the sweep, the length gap before (alpha 0) and after shaping, summaries, counts, args."""
    len_c, len_r, rew_c, rew_r = pair_columns(table, *picked)
    return dict(
        alpha=alpha, alpha_mode=args["alpha_mode"], alpha_steps=len(sweep) if args["alpha_mode"] == "auto" else 0,
        sweep=[[a, d] for a, d in sweep], mean_len_diff_before=mean_len_diff(table, *picked0),
        mean_len_diff_after=mean_len_diff(table, *picked), chosen_len=summary(len_c), rejected_len=summary(len_r),
        chosen_reward=summary(rew_c), rejected_reward=summary(rew_r), gamma=args["gamma"], seed=args["seed"],
        counts=counts, args=args, seconds=round(seconds, 3))


def save_plots(out_dir, sweep, alpha, rewards, lengths_before, lengths_after):
    """alpha_sweep.png, reward_hist.png, length_hist.png (matplotlib's Agg backend, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        with protocol.atomic_open(os.path.join(out_dir, name), "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [a for a, d in sweep if d is not None]
    ax.plot(xs, [d for a, d in sweep if d is not None], marker=".")
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(alpha, color="red", ls="--", label=f"alpha = {alpha:g}")
    ax.set(xlabel="alpha", ylabel="mean len(chosen) - len(rejected) [chars]", title="length-control sweep")
    ax.legend()
    save(fig, "alpha_sweep.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist([rewards[0], rewards[1]], bins=50, label=["chosen", "rejected"], histtype="step")
    ax.set(xlabel="implicit reward log pi - log pi_ref (unscaled)", ylabel="pairs",
           title=f"generated pairs, alpha {alpha:g}")
    ax.legend()
    save(fig, "reward_hist.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = [("before shaping (alpha 0)", lengths_before), (f"after (alpha {alpha:g})", lengths_after)]
    for ax, (title, (c, r)) in zip(axes, panels):
        ax.hist([c, r], bins=50, label=["chosen", "rejected"], histtype="step")
        ax.set(xlabel="length [chars]", title=title)
        ax.legend()
    axes[0].set_ylabel("pairs")
    save(fig, "length_hist.png")


def _plot_when_told(conn):
    """The plot process: import matplotlib at once, then draw what the main process sends (nothing on EOF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    try:
        args = conn.recv()
    except EOFError:
        return
    save_plots(*args)


@contextlib.contextmanager
def plot_process(enabled):
    """Yield `draw(*args)`, which hands save_plots(*args) to a second process started now: matplotlib's import (about
    half a second) overlaps the reading of the scores and the drawing overlaps the writing. The block's end waits for
    the plots; a failed plot process is an error (nothing is published)."""
    if not enabled:
        yield lambda *args: None
        return
    context = multiprocessing.get_context("fork")
    conn, child_end = context.Pipe()
    worker = context.Process(target=_plot_when_told, args=(child_end,), daemon=True)
    worker.start()
    child_end.close()

    def draw(*args):
        with contextlib.suppress(OSError):  # a plot process that is gone already is reported by its exit status
            conn.send(args)

    try:
        yield draw
        conn.close()
        worker.join()
        if worker.exitcode != 0:
            raise DiceError(f"the plot process failed (exit status {worker.exitcode}; its error is printed above)")
    finally:
        conn.close()
        if worker.is_alive():
            worker.kill()
        worker.join()


def print_summary(args, stats, out):
    c, fmt = stats["counts"], lambda d: "n/a" if d is None else f"{d:+.1f}"
    scanned = f", {len(stats['sweep'])} steps scanned" if args["alpha_mode"] == "auto" else ""
    print(f"alpha {stats['alpha']:g} ({args['alpha_mode']}{scanned}): mean len(chosen) - len(rejected) "
          f"{fmt(stats['mean_len_diff_before'])} -> {fmt(stats['mean_len_diff_after'])} chars")
    print(f"chosen: {stats['chosen_len']['mean']:.0f} chars, reward {stats['chosen_reward']['mean']:+.3f} | rejected: "
          f"{stats['rejected_len']['mean']:.0f} chars, reward {stats['rejected_reward']['mean']:+.3f} (means)")
    print(f"prompts {c['n_prompts_in']} (+{c['n_duplicate_prompts']} duplicate rows dropped): {c['n_pairs_built']} "
          f"pairs, dropped {c['n_dropped_min_valid']} with < {args['min_valid']} usable responses, "
          f"{c['n_dropped_tie']} ties, {c['n_dropped_identical']} identical texts; responses {c['n_responses']}: "
          f"{c['n_responses_invalid']} invalid, {c['n_responses_nonfinite']} valid but non-finite")
    print(f"wrote {out}: {c['n_pairs']} pairs = {c['n_pairs_generated']} generated + {c['n_pairs_offline']} offline "
          f"(gamma {args['gamma']:g}, seed {args['seed']}); stats.json{', plots' if args['plots'] else ''} in "
          f"{args['out_dir']}")


# ----------------------------------------------------------------------------- main

def main(
    scores: str = None,
    out_dir: str = None,
    offline: str = None,
    split: str = "train",
    gamma: float = None,
    min_valid: int = 8,
    alpha: str = "auto",
    length_control: bool = True,
    seed: int = 0,
    plots: bool = True,
    overwrite: bool = False,
):
    """Build DICE's length-regularized best-vs-worst preference pairs, mixed with offline pairs (Sec. 3.1-3.2, Eq. 6).

    Args:
        scores: 02_score.py's output (scores.jsonl: K responses per prompt with their implicit rewards).
        out_dir: output folder: pairs.jsonl (and its done marker), stats.json and the plots.
        offline: offline preference pairs to replay: a .jsonl/.json/.parquet file, a dataset folder or a hub id;
            strings or TRL's conversational messages (+ 02_score.py --pairs fields).
        split: the split of --offline when it is a dataset folder or a hub id.
        gamma: share of offline pairs in the mix (paper 0.5; default 0.5 with --offline, else 0 = generated only).
        min_valid: drop prompts with fewer usable responses (paper: 8 of 16).
        alpha: length penalty per character: auto (the paper's scan) or a number >= 0.
        length_control: false means alpha = 0 (plain best-vs-worst).
        seed: seed of the replay sampling and of the output shuffle.
        plots: write alpha_sweep.png, reward_hist.png and length_hist.png.
        overwrite: redo an output made with other arguments or inputs.
    """
    started, args = time.time(), resolve_args(dict(locals()))
    print("03_build_pairs: " + ", ".join(f"{k}={v}" for k, v in args.items()))
    out, gamma, seed = os.path.join(args["out_dir"], "pairs.jsonl"), args["gamma"], args["seed"]
    inputs = {"scores": args["scores"], "offline": args["offline"] if gamma > 0 else None}
    with protocol.stage("03_build_pairs", out, args, inputs=inputs, overwrite=args["overwrite"], seed=seed,
                      ignore=("out_dir", "offline")) as st, plot_process(args["plots"]) as draw:
        # read: K responses per prompt with their implicit rewards r(x, y); the offline pairs to replay
        records, table, counts = usable_prompts(read_scores(args["scores"]), args["min_valid"])
        offline_rows = read_offline(args["offline"], args["split"]) if gamma > 0 else []
        k = table["lengths"].shape[1]
        if not records:
            raise nothing_left(counts, args["min_valid"], k)

        # Eq. 6: r_LC(x, y) = r(x, y) - alpha * |y|, alpha from the paper's scan; the pair is (argmax, argmin) of r_LC
        alpha, sweep = choose_alpha(table, args)
        chosen, rejected, tie, identical = select(table, alpha)
        keep = ~tie & ~identical
        counts.update(n_dropped_tie=int(tie.sum()), n_dropped_identical=int(identical.sum()),
                      n_pairs_built=int(keep.sum()))
        if not keep.any():
            raise nothing_left(counts, args["min_valid"], k)

        # experience replay (Sec. 3.2): n_gen generated pairs, n_off offline pairs of other prompts, one seeded shuffle
        rng = np.random.default_rng(seed)
        gen_idx, off_idx = replay([records[i]["key"] for i in np.flatnonzero(keep)],
                                  [r["prompt_id"] for r in offline_rows], gamma, rng)
        order = rng.permutation(len(gen_idx) + len(off_idx))

        # the plots, drawn by the plot process while the rows are built and written; the length gap before shaping
        st.writing_beside()  # with --overwrite, the old pairs stop counting as finished before new stats/plots appear
        c0, r0, tie0, identical0 = select(table, 0.0)
        picked, picked0 = (chosen, rejected, keep), (c0, r0, ~tie0 & ~identical0)
        len_c, len_r, rew_c, rew_r = pair_columns(table, *picked)
        draw(args["out_dir"], sweep, alpha, (rew_c, rew_r), pair_columns(table, *picked0)[:2], (len_c, len_r))
        generated = generated_pairs(records, table, chosen, rejected, keep, counts)
        rows = [generated[i] for i in gen_idx] + [offline_rows[i] for i in off_idx]
        rows = [rows[i] for i in order]
        counts.update(n_offline_in=len(offline_rows), n_pairs_generated=len(gen_idx), n_pairs_offline=len(off_idx),
                      n_pairs=len(rows), n_pairs_with_ref_logps=sum(r["ref_chosen_logps"] is not None for r in rows))

        # write stats.json (over all generated pairs, before replay) and pairs.jsonl, published once the plots are in
        stats = make_stats(args, alpha, sweep, table, picked, picked0, counts, time.time() - started)
        protocol.write_json(os.path.join(args["out_dir"], "stats.json"), stats)
        protocol.write_jsonl(st.tmp, rows)
        st.record.update(alpha=alpha, counts=counts)
    print_summary(args, stats, out)


if __name__ == "__main__":
    gc.disable()  # almost no reference cycles are made here; the collector would walk the rows read (~6% of the run)
    cli.run(main)
