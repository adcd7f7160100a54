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
  - duplicate prompts (same common.prompt_id) keep their first row; the others are counted and dropped.
  - chosen_reward/rejected_reward are the unshaped implicit rewards r (02's `rewards`); ref_chosen_logps /
    ref_rejected_logps are 02's `policy_logps` of the two responses (the next round's reference model is this very
    policy, so stage 4 needs no reference forward); null when the scores file has no `policy_logps`, and null when
    02's `completion_starts` of the two differ (a token merged across the prompt/response boundary in one of them:
    TRL splits the pair at the earlier start, so stage 4 computes these itself; counted as n_pairs_split_mismatch).
  - replay sampling uses numpy.random.default_rng(--seed); the final rows (generated + offline) are shuffled with the
    same generator, so the file order is random but reproducible. Offline prompts are compared by common.prompt_id.

Input (02_score.py --responses): scores.jsonl, one row per prompt: `prompt` (string or messages list), `responses` (K
strings), `rewards` (K numbers, policy - reference), `valid` (K booleans), optional `policy_logps` (K numbers),
`completion_starts` (K ints) and `prompt_id`; other fields (`finish_reasons`, `num_tokens`, `reference_logps`) must
have K entries when present and are otherwise ignored.
Offline input (--offline): rows `prompt`, `chosen`, `rejected`, optionally 02_score.py --pairs' `policy_chosen_logps`,
`policy_rejected_logps` (-> ref_chosen_logps, ref_rejected_logps), `chosen_reward`, `rejected_reward`.
Output, in --out_dir, each file written atomically:
  pairs.jsonl   `prompt_id`, `prompt`, `chosen`, `rejected`, `chosen_reward`, `rejected_reward`, `source`
                ("generated" or "offline"), `ref_chosen_logps`, `ref_rejected_logps`
  stats.json    alpha, the sweep, length gap before/after shaping, length and reward summaries, every count, seed, args
  alpha_sweep.png, reward_hist.png (chosen vs rejected), length_hist.png (before vs after shaping)
  pairs.jsonl.done.json  written last: the resolved arguments and counts (the stage's done marker)

Smoke (K = 4 responses per prompt):
    python 03_build_pairs.py --scores scores.jsonl --out_dir pairs --min_valid 2
Full run (the paper: K = 16, at least 8 valid, replay gamma 0.5 with the offline preference set):
    python 03_build_pairs.py --scores round_1/scores.jsonl --out_dir round_1/pairs \\
        --offline round_1/scored_prefs.jsonl --gamma 0.5 --min_valid 8 --alpha auto --seed 0
"""
import math
import os
import time

import numpy as np

import common
from common import DiceError

ALPHA_GRID = np.arange(1000) / 1000  # 0, 0.001, ..., 0.999: each value is i/1000 exactly rounded, never a running sum


# ----------------------------------------------------------------------------- reading

def _finite_or_nan(value, where):
    """A JSON number (or null) as a float; null, NaN and inf become NaN. Anything else is a DiceError."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DiceError(f"{where}: expected a number, got {value!r}")
    value = float(value)
    return value if math.isfinite(value) else math.nan


def _numbers(values, where):
    """A list of JSON numbers (or nulls) as a float array with NaN for null, NaN and inf; else a DiceError."""
    if not all(type(v) is float or type(v) is int for v in values):  # the fast path is plain numbers
        values = [_finite_or_nan(v, f"{where}[{j}]") for j, v in enumerate(values)]
    try:
        array = np.array(values, dtype=np.float64)
    except OverflowError:
        raise DiceError(f"{where}: a number is too large") from None
    array[~np.isfinite(array)] = np.nan
    return array


def read_scores(path):
    """Read 02's scores.jsonl -> (records, counts). A record: prompt_id, key (common.prompt_id), prompt, responses,
    rewards (float array, NaN = not finite), usable (bool array), policy_logps (float array or None).
    Bad rows are DiceErrors naming path:line; a repeated prompt keeps its first row."""
    records, seen = [], set()
    counts = dict(n_rows=0, n_duplicate_prompts=0, n_responses=0, n_responses_invalid=0, n_responses_nonfinite=0)
    for line, row in common.read_jsonl(path):
        where = f"{path}:{line}"
        counts["n_rows"] += 1
        for field in ("prompt", "responses", "rewards", "valid"):
            if field not in row:
                raise DiceError(f"{where}: missing field '{field}' (expected 02_score.py output)")
        common.to_messages(row["prompt"], where)
        responses = row["responses"]
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise DiceError(f"{where}: 'responses' must be a list of strings")
        k = len(responses)
        for field in ("rewards", "valid", "policy_logps", "reference_logps", "finish_reasons", "num_tokens",
                      "completion_starts"):
            if field in row and (not isinstance(row[field], list) or len(row[field]) != k):
                n = len(row[field]) if isinstance(row[field], list) else "not a list"
                raise DiceError(f"{where}: '{field}' has {n} values but 'responses' has {k}")
        if not all(isinstance(v, bool) for v in row["valid"]):
            raise DiceError(f"{where}: 'valid' must be a list of true/false")
        valid = np.array(row["valid"], dtype=bool)
        rewards = _numbers(row["rewards"], f"{where}: rewards")
        finite = np.isfinite(rewards)
        logps = row.get("policy_logps")
        if logps is not None:
            logps = _numbers(logps, f"{where}: policy_logps")
            finite &= np.isfinite(logps)
        starts = row.get("completion_starts")
        if starts is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in starts):
            raise DiceError(f"{where}: 'completion_starts' must be a list of ints")
        counts["n_responses"] += k
        counts["n_responses_invalid"] += int((~valid).sum())
        counts["n_responses_nonfinite"] += int((valid & ~finite).sum())
        key = common.prompt_id(row["prompt"])
        if key in seen:
            counts["n_duplicate_prompts"] += 1
            continue
        seen.add(key)
        records.append(dict(prompt_id=row.get("prompt_id", key), key=key, prompt=row["prompt"], responses=responses,
                            rewards=rewards, usable=valid & finite, policy_logps=logps,
                            completion_starts=starts))
    if counts["n_rows"] == 0:
        raise DiceError(f"{path}: no rows")
    return records, counts


def read_offline(path):
    """Offline preference pairs (`prompt`, `chosen`, `rejected`, optional 02 --pairs fields) as output rows."""
    rows = []
    for line, row in common.read_jsonl(path):
        where = f"{path}:{line}"
        common.check_pair(row, where)
        extra = {}
        for src, dst in (("policy_chosen_logps", "ref_chosen_logps"), ("policy_rejected_logps", "ref_rejected_logps"),
                         ("chosen_reward", "chosen_reward"), ("rejected_reward", "rejected_reward")):
            value = row.get(src)
            if value is not None and math.isnan(_finite_or_nan(value, f"{where}: {src}")):
                raise DiceError(f"{where}: '{src}' is not finite ({value!r})")
            extra[dst] = None if value is None else float(value)
        rows.append(dict(prompt_id=common.prompt_id(row["prompt"]), prompt=row["prompt"], chosen=row["chosen"],
                         rejected=row["rejected"], chosen_reward=extra["chosen_reward"],
                         rejected_reward=extra["rejected_reward"], source="offline",
                         ref_chosen_logps=extra["ref_chosen_logps"], ref_rejected_logps=extra["ref_rejected_logps"]))
    if not rows:
        raise DiceError(f"{path}: no offline pairs")
    return rows


# ----------------------------------------------------------------------------- the rule, vectorised over prompts x K

def make_table(records):
    """Pad the records into (prompts x K) arrays: rewards, lengths (characters), usable mask and text ids (equal ids
    = identical texts within a row). Padding (rows with fewer than K responses) is unusable."""
    n, k = len(records), max((len(r["responses"]) for r in records), default=0)
    rewards = np.zeros((n, k))
    lengths = np.zeros((n, k), dtype=np.int64)
    usable = np.zeros((n, k), dtype=bool)
    text_id = np.full((n, k), -1, dtype=np.int64)
    for i, rec in enumerate(records):
        m = len(rec["responses"])
        first = {}
        rewards[i, :m] = rec["rewards"]  # NaN where not usable: never read, np.where in select masks it
        usable[i, :m] = rec["usable"]
        lengths[i, :m] = [len(t) for t in rec["responses"]]
        text_id[i, :m] = [first.setdefault(t, j) for j, t in enumerate(rec["responses"])]
    return dict(rewards=rewards, lengths=lengths, usable=usable, text_id=text_id)


def select(table, alpha):
    """Best-vs-worst pairs of every row at one alpha: (chosen index, rejected index, tie mask, identical mask).
    Every row needs a usable response (main drops rows with fewer than --min_valid >= 2 first)."""
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


# ----------------------------------------------------------------------------- reporting

def summary(values):
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return None
    q = np.percentile(v, [0, 25, 50, 75, 100])
    return dict(mean=float(v.mean()), std=float(v.std()), min=float(q[0]), p25=float(q[1]), median=float(q[2]),
                p75=float(q[3]), max=float(q[4]))


def save_plots(out_dir, sweep, alpha, rewards, lengths_before, lengths_after):
    """alpha_sweep.png, reward_hist.png, length_hist.png (matplotlib's Agg backend, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        with common.atomic_open(os.path.join(out_dir, name), "wb") as f:
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
    ax.set(xlabel="implicit reward log pi - log pi_ref (unscaled)", ylabel="pairs", title=f"generated pairs, alpha {alpha:g}")
    ax.legend()
    save(fig, "reward_hist.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (title, (c, r)) in zip(axes, [("before shaping (alpha 0)", lengths_before), (f"after (alpha {alpha:g})", lengths_after)]):
        ax.hist([c, r], bins=50, label=["chosen", "rejected"], histtype="step")
        ax.set(xlabel="length [chars]", title=title)
        ax.legend()
    axes[0].set_ylabel("pairs")
    save(fig, "length_hist.png")


# ----------------------------------------------------------------------------- main

def main(
    scores: str = None,  # 02_score.py output (scores.jsonl)
    out_dir: str = None,  # output folder: pairs.jsonl, stats.json, plots
    offline: str = None,  # offline preference pairs for experience replay (prompt, chosen, rejected [+ 02 --pairs fields])
    gamma: float = None,  # share of offline pairs in the mix (paper 0.5; default 0.5 with --offline, 0 = generated only)
    min_valid: int = 8,  # drop prompts with fewer usable responses (paper: 8 of 16)
    alpha: str = "auto",  # length penalty per character: "auto" (the paper's scan) or a number
    length_control: bool = True,  # false means alpha = 0 (plain best-vs-worst)
    seed: int = 0,  # seed of the replay sampling and of the output shuffle
    plots: bool = True,  # write the three PNG plots
    overwrite: bool = False,  # replace an existing DIR/pairs.jsonl
):
    """Build DICE's length-regularized preference pairs (see the module docstring)."""
    t0 = time.time()
    if not scores or not out_dir:
        raise DiceError("--scores and --out_dir are required")
    scores, out_dir = str(scores), str(out_dir)
    min_valid = common.as_int("min_valid", min_valid, minimum=2)
    length_control = common.as_bool("length_control", length_control)
    seed = common.as_int("seed", seed, minimum=0)
    plots = common.as_bool("plots", plots)
    overwrite = common.as_bool("overwrite", overwrite)
    if alpha == "auto":
        alpha_mode = "auto" if length_control else "off"
    else:
        try:
            alpha = common.as_float("alpha", alpha, minimum=0.0)
        except DiceError:
            raise DiceError(f"--alpha must be auto or a number >= 0, got {alpha!r}") from None
        if not length_control and alpha != 0:
            raise DiceError(f"--alpha {alpha} contradicts --length_control false (which means alpha = 0)")
        alpha_mode = "fixed" if length_control else "off"
    if gamma is None:
        gamma = 0.5 if offline else 0.0
    gamma = common.as_float("gamma", gamma, minimum=0.0)
    if gamma >= 1:
        raise DiceError(f"--gamma must be < 1 (the share of offline pairs), got {gamma}")
    if gamma > 0 and not offline:
        raise DiceError(f"--gamma {gamma} needs --offline (the offline preference pairs to replay)")
    args = dict(scores=scores, out_dir=out_dir, offline=offline, gamma=gamma, min_valid=min_valid, alpha=alpha,
                alpha_mode=alpha_mode, length_control=length_control, seed=seed, plots=plots, overwrite=overwrite)
    print("03_build_pairs: " + ", ".join(f"{k}={v}" for k, v in args.items()))
    pairs_path = os.path.join(out_dir, "pairs.jsonl")
    common.refuse_overwrite(pairs_path, overwrite)

    # read and filter: usable responses, at least min_valid of them
    records, counts = read_scores(scores)
    off_rows = read_offline(offline) if offline and gamma > 0 else []
    n_usable = np.array([r["usable"].sum() for r in records], dtype=np.int64)
    enough = n_usable >= min_valid
    counts["n_prompts_in"] = len(records)
    counts["n_dropped_min_valid"] = int((~enough).sum())
    counts.update(n_dropped_tie=0, n_dropped_identical=0, n_pairs_built=0)
    k_max = max(len(r["responses"]) for r in records)

    def nothing_left():
        return DiceError(f"no pairs left: {counts['n_prompts_in']} prompts, {counts['n_dropped_min_valid']} with fewer "
                         f"than --min_valid {min_valid} usable responses (K = {k_max}), {counts['n_dropped_tie']} ties, "
                         f"{counts['n_dropped_identical']} identical texts; nothing written")

    records = [r for r, ok in zip(records, enough) if ok]
    if not records:
        raise nothing_left()
    table = make_table(records)

    # alpha: the paper's scan, a fixed value, or 0
    if alpha_mode == "auto":
        alpha, sweep = sweep_alpha(table)
    else:
        alpha = 0.0 if alpha_mode == "off" else alpha
        sweep = []
        for a in sorted({0.0, alpha}):
            c, r, t, i = select(table, a)
            sweep.append((a, mean_len_diff(table, c, r, ~t & ~i)))
    chosen0, rejected0, tie0, identical0 = select(table, 0.0)
    chosen, rejected, tie, identical = select(table, alpha)
    keep = ~tie & ~identical
    counts["n_dropped_tie"], counts["n_dropped_identical"] = int(tie.sum()), int(identical.sum())
    counts["n_pairs_built"] = int(keep.sum())
    if counts["n_pairs_built"] == 0:
        raise nothing_left()

    # generated pairs (scoring policy's log-probs become the next round's reference log-probs)
    gen_rows = []
    counts["n_pairs_split_mismatch"] = 0
    for i in np.flatnonzero(keep):
        rec, c, r = records[i], int(chosen[i]), int(rejected[i])
        logps, starts = rec["policy_logps"], rec["completion_starts"]
        if starts is not None and starts[c] != starts[r]:
            # TRL splits a pair at the earlier of the two starts, so 02's per-response log-probs are not the ones
            # stage 4 would compute for this pair: leave them to stage 4 (null)
            counts["n_pairs_split_mismatch"] += 1
            logps = None
        gen_rows.append(dict(prompt_id=rec["prompt_id"], prompt=rec["prompt"], chosen=rec["responses"][c],
                             rejected=rec["responses"][r], chosen_reward=float(rec["rewards"][c]),
                             rejected_reward=float(rec["rewards"][r]), source="generated",
                             ref_chosen_logps=None if logps is None else float(logps[c]),
                             ref_rejected_logps=None if logps is None else float(logps[r])))
    gen_keys = [records[i]["key"] for i in np.flatnonzero(keep)]

    # experience replay, then one seeded shuffle of the mix
    rng = np.random.default_rng(seed)
    gen_idx, off_idx = replay(gen_keys, [r["prompt_id"] for r in off_rows], gamma, rng)
    rows = [gen_rows[i] for i in gen_idx] + [off_rows[i] for i in off_idx]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    counts.update(n_offline_in=len(off_rows), n_pairs_generated=len(gen_idx), n_pairs_offline=len(off_idx),
                  n_pairs=len(rows), n_pairs_with_ref_logps=sum(r["ref_chosen_logps"] is not None for r in rows))

    # stats over the generated pairs at the chosen alpha (all of them, before replay sampling)
    kept = np.flatnonzero(keep)
    kept0 = np.flatnonzero(~tie0 & ~identical0)
    lens = table["lengths"]
    len_c, len_r = lens[kept, chosen[kept]], lens[kept, rejected[kept]]
    rew_c, rew_r = table["rewards"][kept, chosen[kept]], table["rewards"][kept, rejected[kept]]
    stats = dict(
        alpha=alpha, alpha_mode=alpha_mode, alpha_steps=len(sweep) if alpha_mode == "auto" else 0,
        sweep=[[a, d] for a, d in sweep],
        mean_len_diff_before=mean_len_diff(table, chosen0, rejected0, ~tie0 & ~identical0),
        mean_len_diff_after=mean_len_diff(table, chosen, rejected, keep),
        chosen_len=summary(len_c), rejected_len=summary(len_r), chosen_reward=summary(rew_c),
        rejected_reward=summary(rew_r), gamma=gamma, seed=seed, counts=counts, args=args,
        seconds=round(time.time() - t0, 3),
    )

    # write: plots, stats, pairs, then the done marker (a rerun refuses only once pairs.jsonl exists)
    os.makedirs(out_dir, exist_ok=True)
    marker = common.done_marker(pairs_path)
    if os.path.exists(marker):
        os.remove(marker)
    if plots:
        save_plots(out_dir, sweep, alpha, (rew_c, rew_r),
                   (lens[kept0, chosen0[kept0]], lens[kept0, rejected0[kept0]]), (len_c, len_r))
    common.write_json(os.path.join(out_dir, "stats.json"), stats)
    common.write_jsonl(pairs_path, rows)
    common.write_json(marker, dict(args=args, alpha=alpha, counts=counts))

    fmt = lambda d: "n/a" if d is None else f"{d:+.1f}"  # noqa: E731
    c = counts
    print(f"alpha {alpha:g} ({alpha_mode}{f', {len(sweep)} steps scanned' if alpha_mode == 'auto' else ''}): "
          f"mean len(chosen) - len(rejected) {fmt(stats['mean_len_diff_before'])} -> "
          f"{fmt(stats['mean_len_diff_after'])} chars")
    print(f"chosen: {len_c.mean():.0f} chars, reward {rew_c.mean():+.3f} | rejected: {len_r.mean():.0f} chars, "
          f"reward {rew_r.mean():+.3f} (means)")
    print(f"prompts {c['n_prompts_in']} (+{c['n_duplicate_prompts']} duplicate rows dropped): {c['n_pairs_built']} "
          f"pairs, dropped {c['n_dropped_min_valid']} with < {min_valid} usable responses, {c['n_dropped_tie']} ties, "
          f"{c['n_dropped_identical']} identical texts; responses {c['n_responses']}: {c['n_responses_invalid']} "
          f"invalid, {c['n_responses_nonfinite']} valid but non-finite")
    print(f"wrote {pairs_path}: {c['n_pairs']} pairs = {c['n_pairs_generated']} generated + {c['n_pairs_offline']} "
          f"offline (gamma {gamma:g}, seed {seed}); stats.json{', plots' if plots else ''} in {out_dir}")
    return None


if __name__ == "__main__":
    common.cli(main)
