"""Benchmark of stage 3 (03_build_pairs.py): our numpy pair builder vs the paper's official approach, same input, one run.

    nice python bench/bench_build_pairs.py                       # 10k prompts x 16 responses (the issue's size)
    nice python bench/bench_build_pairs.py --prompts 1000 --e2e false   # a quick look

Input: synthetic, seeded: N prompts x K responses of 50..2000 characters (distinct texts), implicit rewards
0.012 * length + N(0, 3) (longer responses score higher, as DPO rewards tend to), 5% of the responses invalid. The
alpha scan therefore runs a realistic dozen or so steps.

The baseline mirrors the official DICE code, sail-sg/dice `scripts/data_script/generate_lc_paired_set.py`
(`optimize_alpha` -> per alpha: `deepcopy` of the K per-sample DataFrames, `add_lc_score`, `process_dataframes`: an
outer `pd.merge` of the K frames on the prompt, NaN-aware counts, row-wise `apply` of `np.argsort`, row-wise lookups of
the chosen/rejected texts and scores), then `create_lc_paired_set` at the chosen alpha (its pair table; no file
writing). It is re-implemented here from that description in our own code, with the same operations and alpha grid
(np.arange(0, 1, 0.001)), so the two can be timed on the same in-memory input. Invalid responses are NaN scores there.

Timed on both sides: the alpha scan plus the final pairs at the chosen alpha, from data already in memory (their
per-sample DataFrames; our records as read_scores returns them). `--e2e true` also times our whole CLI stage
(`main`: read scores.jsonl, scan, write pairs.jsonl/stats.json/plots). Both must choose the same alpha and the same
(chosen, rejected) texts for every prompt; the script fails otherwise. It prints a markdown table.
"""
import functools
import math
import os
import sys
import tempfile
import time
from copy import deepcopy

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

bp = common.load_script("03_build_pairs")


# ----------------------------------------------------------------------------- synthetic input

def synthetic(n_prompts, k, seed):
    """Records as 03's read_scores returns them (rewards, usable and policy_logps as numpy arrays)."""
    rng = np.random.default_rng(seed)
    base = "".join(rng.choice(list("abcdefghij klmnopqrst uvwxyz.,"), size=4096))
    lengths = rng.integers(50, 2001, size=(n_prompts, k))
    rewards = 0.012 * lengths + rng.normal(0, 3, size=(n_prompts, k))
    valid = rng.random((n_prompts, k)) >= 0.05
    offsets = rng.integers(0, 2048, size=(n_prompts, k))
    records = []
    for p in range(n_prompts):
        prompt = f"Synthetic instruction number {p}: write something."
        responses = [f"{p}.{j} " + base[offsets[p, j]:offsets[p, j] + lengths[p, j]] for j in range(k)]
        records.append(dict(prompt_id=common.prompt_id(prompt), key=common.prompt_id(prompt), prompt=prompt,
                            responses=responses, rewards=rewards[p], usable=valid[p], policy_logps=-lengths[p] / 3.0))
    return records


# ----------------------------------------------------------------------------- ours

def ours(records, min_valid):
    """03's rule from in-memory records: filter, table, the alpha scan, the pairs at the chosen alpha."""
    records = [r for r in records if r["usable"].sum() >= min_valid]
    table = bp.make_table(records)
    alpha, sweep = bp.sweep_alpha(table)
    chosen, rejected, tie, identical = bp.select(table, alpha)
    pairs = {}
    for i in np.flatnonzero(~tie & ~identical):
        rec, c, r = records[i], chosen[i], rejected[i]
        pairs[rec["prompt"]] = (rec["responses"][c], rec["responses"][r], float(rec["rewards"][c]),
                                float(rec["rewards"][r]))
    return alpha, len(sweep), pairs


# ----------------------------------------------------------------------------- the official approach (pandas)

def per_sample_frames(records):
    """The official input layout: one DataFrame per sample index j with columns prompt, response, score (NaN = none)."""
    import pandas as pd

    k = max(len(r["responses"]) for r in records)
    return [pd.DataFrame(dict(prompt=[r["prompt"] for r in records],
                              response=[r["responses"][j] for r in records],
                              score=[r["rewards"][j] if r["usable"][j] else math.nan for r in records]))
            for j in range(k)]


def official_shaped(frame, alpha):
    """Mirrors add_lc_score: a length column, then score -= alpha * length (in place on the frame)."""
    frame["resp_len"] = frame["response"].apply(len)
    frame["score"] = frame["score"] - alpha * frame["resp_len"]
    return frame


def official_best_vs_worst(frames, min_scores):
    """Mirrors process_dataframes: outer-merge the K frames on the prompt, keep rows with >= min_scores scores,
    argsort every row's scores (NaN last), chosen = the last non-NaN position, rejected = the first."""
    import pandas as pd

    renamed = [f.rename(columns={"score": f"score_{j}", "response": f"responses_{j}", "resp_len": f"resp_len_{j}"})
               for j, f in enumerate(frames)]
    df = functools.reduce(lambda left, right: pd.merge(left, right, on="prompt", how="outer"), renamed)
    scores = df[[c for c in df.columns if "score" in c]]
    df["num_scores"] = scores.count(axis=1)
    df = df[df["num_scores"] >= min_scores]
    scores = scores.loc[df.index]
    scores["#nan"] = scores.isnull().sum(axis=1)
    scores["argsort"] = scores.apply(lambda row: list(row[:-1]), axis=1).apply(np.argsort)
    scores["argsort"] = scores.apply(lambda row: row["argsort"][: -row["#nan"]] if row["#nan"] > 0 else row["argsort"],
                                     axis=1)
    df["idx_chosen"] = scores["argsort"].apply(lambda order: order[-1].item())
    df["idx_rejected"] = scores["argsort"].apply(lambda order: order[0].item())
    df["all_responses"] = df[[c for c in df.columns if "responses" in c]].apply(list, axis=1)
    df["chosen"] = df.apply(lambda row: row["all_responses"][row["idx_chosen"]], axis=1)
    df["rejected"] = df.apply(lambda row: row["all_responses"][row["idx_rejected"]], axis=1)
    df["all_scores"] = df[[c for c in df.columns if "score" in c]].apply(list, axis=1)
    df["chosen_score"] = df.apply(lambda row: row["all_scores"][row["idx_chosen"]], axis=1)
    df["rejected_score"] = df.apply(lambda row: row["all_scores"][row["idx_rejected"]], axis=1)
    return df[["prompt", "chosen", "rejected", "chosen_score", "rejected_score"]]


def official(frames, min_scores):
    """Mirrors optimize_alpha (per alpha: deepcopy, shape, merge, mean length gap, the stopping rule) and then
    create_lc_paired_set's pair table at the chosen alpha."""
    results = []
    for a in np.arange(0.0, 1.0, 0.001):
        shaped = [official_shaped(f, alpha=a) for f in deepcopy(frames)]
        out = official_best_vs_worst(shaped, min_scores)
        gap = (out["chosen"].apply(len) - out["rejected"].apply(len)).mean()
        results.append((a, gap.item()))
        if np.abs(gap) > np.min([np.abs(g) for _, g in results]):
            break
    alpha = results[int(np.argmin([np.abs(g) for _, g in results]))][0]
    out = official_best_vs_worst([official_shaped(f, alpha=alpha) for f in deepcopy(frames)], min_scores)
    return alpha, len(results), {p: (c, r) for p, c, r in zip(out["prompt"], out["chosen"], out["rejected"])}


# ----------------------------------------------------------------------------- main

def main(
    prompts: int = 10000,  # synthetic prompts
    k: int = 16,  # responses per prompt
    min_valid: int = 8,  # 03's --min_valid (the paper's n_least_score 8)
    seed: int = 0,  # seed of the synthetic data
    repeats: int = 3,  # timed runs of ours (the best is reported; the baseline runs once)
    e2e: bool = True,  # also time our whole CLI stage on the same data written as scores.jsonl
):
    prompts, k = common.as_int("prompts", prompts, 2), common.as_int("k", k, 2)
    min_valid, repeats = common.as_int("min_valid", min_valid, 2), common.as_int("repeats", repeats, 1)
    seed, e2e = common.as_int("seed", seed, 0), common.as_bool("e2e", e2e)
    print(f"bench_build_pairs: prompts={prompts} k={k} min_valid={min_valid} seed={seed} repeats={repeats} e2e={e2e}")
    records = synthetic(prompts, k, seed)
    frames = per_sample_frames(records)

    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        alpha, steps, pairs = ours(records, min_valid)
        times.append(time.perf_counter() - t)
    t_ours = min(times)
    print(f"ours: alpha {alpha:g} after {steps} scan steps, {len(pairs)} pairs, best of {repeats}: {t_ours:.3f} s")

    t = time.perf_counter()
    off_alpha, off_steps, off_pairs = official(frames, min_valid)
    t_off = time.perf_counter() - t
    print(f"official approach: alpha {off_alpha:g} after {off_steps} scan steps, {len(off_pairs)} pairs: {t_off:.2f} s")
    same = (math.isclose(alpha, off_alpha, abs_tol=1e-12) and steps == off_steps
            and {p: v[:2] for p, v in pairs.items()} == off_pairs)
    if not same:
        raise common.DiceError("ours and the official approach disagree (alpha, scan steps or pairs)")
    print("same alpha, same scan steps, same (chosen, rejected) for every prompt: yes")

    t_e2e = None
    if e2e:
        with tempfile.TemporaryDirectory() as tmp:
            scores = os.path.join(tmp, "scores.jsonl")
            common.write_jsonl(scores, (dict(prompt_id=r["prompt_id"], prompt=r["prompt"], responses=r["responses"],
                                             rewards=r["rewards"].tolist(), valid=r["usable"].tolist(),
                                             policy_logps=r["policy_logps"].tolist())
                                        for r in records))
            t = time.perf_counter()
            bp.main(scores=scores, out_dir=os.path.join(tmp, "out"), min_valid=min_valid)
            t_e2e = time.perf_counter() - t

    print()
    print("| stage 3 input | alpha (scan steps) | official approach (pandas) | ours (numpy) | speed-up |")
    print("|---|---|---|---|---|")
    print(f"| {prompts} prompts x {k} responses | {alpha:g} ({steps}) | {t_off:.2f} s | {t_ours:.3f} s | "
          f"{t_off / t_ours:.0f}x |")
    if t_e2e is not None:
        print(f"| same, our whole CLI stage (read JSONL, write pairs, stats, plots) | {alpha:g} ({steps}) | "
              f"- | {t_e2e:.2f} s | {t_off / t_e2e:.0f}x |")


if __name__ == "__main__":
    common.cli(main)
