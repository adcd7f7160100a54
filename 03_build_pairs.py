"""Stage 3 of DICE (Chen et al., ICLR 2025, arXiv 2406.09760, Sec. 3.1-3.2): length-regularized best-vs-worst pairs.

Every response y of prompt x has 02's implicit reward r(x, y) = log pi_{t-1}(y|x) - log pi_{t-2}(y|x) (beta left out,
as in the paper's code). Eq. 6 shapes it by the length |y| of the response in characters (Python len):

    r_LC(x, y) = r(x, y) - alpha * |y|        the pair of x: chosen = argmax r_LC, rejected = argmin r_LC

Rules: usable = valid (02) with a finite reward (and log-prob); prompts with fewer than --min_valid usable responses are
dropped (paper: 8 of 16), repeated prompts after their first row too; among equal maxima (minima) the lowest index
wins; a pair whose shaped rewards tie or whose texts are identical is dropped. --alpha auto, the paper's scan: alpha =
i/1000, i = 0..999, each giving the mean |chosen| - |rejected| over its kept pairs; stop at the first alpha whose |mean|
exceeds the smallest one seen before; use the first alpha with that smallest |mean|. Experience replay (Sec. 3.2), N_off
offline and N_gen generated pairs: n_gen = min(int(N_off * (1 - gamma)), N_gen) generated pairs, then n_off =
int(gamma * n_gen / (1 - gamma)) offline pairs of other prompts, both at random, then one shuffle of all, with
numpy.random.default_rng(--seed). chosen/rejected_reward are r; ref_chosen/rejected_logps are log pi_{t-1} of the two
responses (pi_{t-1} is the next round's reference), so 04 needs no reference forward.

Smoke (seconds; 200 synthetic prompts x K = 4 written by the benchmark):
    python bench/bench_build_pairs.py --prompts 200 --k 4 --write_scores runs/smoke/round_1/scores.jsonl && \\
    python 03_build_pairs.py --scores runs/smoke/round_1/scores.jsonl --out_dir runs/smoke/round_1/pairs --min_valid 2
Full run (round 1 of runs/llama3 as run_rounds.sh lays it out; the paper: K = 16, at least 8 valid, gamma 0.5):
    python 03_build_pairs.py --scores runs/llama3/round_1/scores.jsonl --out_dir runs/llama3/round_1/pairs \\
        --offline runs/llama3/round_1/offline_scored.jsonl --gamma 0.5 --min_valid 8 --alpha auto --seed 0
"""
import math
import os
import time
from typing import Literal

import numpy as np

from dice import DiceError, cli, data, pairs_io, protocol
from dice.plots import pair_figures

ALPHA_GRID = np.arange(1000) / 1000  # 0, 0.001, ..., 0.999: each value is i/1000 exactly rounded, never a running sum


# ----------------------------------------------------------------------------- the rule (Eq. 6), over prompts x K

def select(table, alpha):
    """Best-vs-worst pairs of every prompt at one alpha: (chosen index, rejected index, tie mask, identical mask).
    `table`: pairs_io.make_table's prompts x K arrays; every row has a usable response (--min_valid >= 2)."""
    shaped = table["rewards"] - alpha * table["lengths"]  # Eq. 6: r_LC = r - alpha * |y|
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


def gap_at(table, alpha):
    """The length gap of the pairs kept at `alpha`."""
    chosen, rejected, tie, identical = select(table, alpha)
    return mean_len_diff(table, chosen, rejected, ~tie & ~identical)


def sweep_alpha(table):
    """The paper's scan: (best alpha, [(alpha, mean length gap or None), ...] up to and including the stop)."""
    sweep, best, best_abs = [], 0.0, math.inf
    for alpha in ALPHA_GRID:
        d = gap_at(table, alpha)
        sweep.append((float(alpha), d))
        a = math.inf if d is None else abs(d)  # an alpha that keeps no pair counts as |mean| = infinity
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
    if gamma == 0:
        return np.arange(len(gen_keys)), np.arange(0)
    take_gen, take_off = replay_counts(len(off_keys), len(gen_keys), gamma)
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


# ----------------------------------------------------------------------------- main

def main(
    scores: str,
    out_dir: str,
    offline: str = None,
    split: str = "train",
    gamma: float = None,
    min_valid: int = 8,
    alpha: float | Literal["auto"] = "auto",
    length_control: bool = True,
    seed: int = 0,
    plots: bool = True,
    overwrite: bool = False,
):
    """Build DICE's length-regularized best-vs-worst preference pairs, mixed with offline pairs (Sec. 3.1-3.2, Eq. 6).

    Args:
        scores: 02_score.py's scores.jsonl (K responses per prompt with their implicit rewards).
        out_dir: output folder: pairs.jsonl (and its done marker), stats.json and the plots.
        offline: offline preference pairs to replay: a .jsonl/.json/.parquet file, a dataset folder or a hub id;
            strings or TRL's conversational messages (+ 02_score.py --pairs fields).
        split: the split of --offline when it is a dataset folder or a hub id.
        gamma: share of offline pairs in the mix (paper 0.5; default 0.5 with --offline, else 0) (>= 0, < 1)
        min_valid: drop prompts with fewer usable responses (paper: 8 of 16) (>= 2)
        alpha: length penalty per character: auto (the paper's scan) or a number (>= 0)
        length_control: false means alpha = 0 (plain best-vs-worst).
        seed: seed of the replay sampling and of the output shuffle (>= 0)
        plots: write alpha_sweep.png, reward_hist.png and length_hist.png.
        overwrite: redo an output made with other arguments or inputs.
    """
    started, a = time.time(), cli.flags(main, locals())
    if not a.length_control and a.alpha not in ("auto", 0):
        raise DiceError(f"--alpha {a.alpha} contradicts --length_control false (which means alpha = 0)")
    mode = ("fixed" if a.alpha != "auto" else "auto") if a.length_control else "off"
    gamma = (0.5 if a.offline else 0.0) if a.gamma is None else a.gamma
    if gamma > 0 and not a.offline:
        raise DiceError(f"--gamma {gamma} needs --offline (the offline preference pairs to replay)")
    # the arguments as stats.json and the done marker record them (a rerun of an older output stays done already)
    args = dict(scores=a.scores, out_dir=a.out_dir, offline=a.offline, split=data.split_of(a.offline, a.split),
                gamma=gamma, min_valid=a.min_valid, alpha=a.alpha, alpha_mode=mode, length_control=a.length_control,
                seed=a.seed, plots=a.plots, overwrite=a.overwrite)
    print("03_build_pairs: " + ", ".join(f"{k}={v}" for k, v in args.items()))
    out, offline = os.path.join(a.out_dir, "pairs.jsonl"), a.offline if gamma > 0 else None
    with protocol.stage("03_build_pairs", out, args, inputs={"scores": a.scores, "offline": offline},
                        overwrite=a.overwrite, seed=a.seed, ignore=("out_dir", "offline")) as st:
        # read: K responses per prompt with their implicit rewards r(x, y), the usable ones; the offline pairs
        records, table, counts = pairs_io.usable_prompts(pairs_io.read_scores(a.scores), a.min_valid)
        offline_rows = pairs_io.read_offline(offline, args["split"]) if offline else []
        if not records:
            raise pairs_io.nothing_left(counts, a.min_valid, table["lengths"].shape[1])

        # Eq. 6 at the scanned (auto), fixed or zero (off) alpha: chosen = argmax, rejected = argmin of r - alpha*|y|
        if mode == "auto":
            alpha, sweep = sweep_alpha(table)
        else:
            alpha = a.alpha if mode == "fixed" else 0.0
            sweep = [(x, gap_at(table, x)) for x in sorted({0.0, alpha})]
        chosen, rejected, tie, identical = select(table, alpha)
        keep = ~tie & ~identical
        counts.update(n_dropped_tie=int(tie.sum()), n_dropped_identical=int(identical.sum()),
                      n_pairs_built=int(keep.sum()))
        if not keep.any():
            raise pairs_io.nothing_left(counts, a.min_valid, table["lengths"].shape[1])

        # experience replay (Sec. 3.2): n_gen generated pairs, n_off offline pairs of other prompts, one seeded shuffle
        rng = np.random.default_rng(a.seed)
        gen_idx, off_idx = replay([records[i]["key"] for i in np.flatnonzero(keep)],
                                  [r["prompt_id"] for r in offline_rows], gamma, rng)
        order = rng.permutation(len(gen_idx) + len(off_idx))
        generated = pairs_io.generated_rows(records, table, chosen, rejected, keep, counts)
        rows = [generated[i] for i in gen_idx] + [offline_rows[i] for i in off_idx]
        rows = [rows[i] for i in order]
        counts.update(n_offline_in=len(offline_rows), n_pairs_generated=len(gen_idx), n_pairs_offline=len(off_idx),
                      n_pairs=len(rows), n_pairs_with_ref_logps=sum(r["ref_chosen_logps"] is not None for r in rows))

        # write stats.json and the plots (over all generated pairs, before replay), then pairs.jsonl with its marker
        st.writing_beside()  # with --overwrite, the old pairs stop counting as finished before new stats/plots appear
        after = pairs_io.pair_columns(table, chosen, rejected, keep)
        stats = pairs_io.make_stats(args, alpha, sweep, after, counts, time.time() - started)
        protocol.write_json(os.path.join(a.out_dir, "stats.json"), stats)
        if a.plots:
            c0, r0, tie0, identical0 = select(table, 0.0)
            pair_figures(a.out_dir, sweep, alpha, pairs_io.pair_columns(table, c0, r0, ~tie0 & ~identical0), after)
        protocol.write_jsonl(st.tmp, rows)
        st.record.update(alpha=alpha, counts=counts, reference_logps_policy={  # for 04: whose log-probs these are
            name: pairs_io.reference_policy(path, st.input_fingerprints.get(name), rows, source)
            for name, path, source in (("scores", a.scores, "generated"), ("offline", offline, "offline"))})
    pairs_io.print_summary(args, stats, out)


if __name__ == "__main__":
    cli.run(main)
