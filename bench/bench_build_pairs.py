"""Benchmark of stage 3 (03_build_pairs.py) against the paper's official approach, same input, one run, two ways:

  - whole process: `python 03_build_pairs.py --scores scores.jsonl ...` with its defaults (alpha scan, the three
    plots) against the official script's approach as a process of its own (read the K per-sample score files, scan
    alpha, write the pairs, its two histograms, stats.txt, the LLaMA-Factory copy and the sweep), each started by
    subprocess and timed from start to exit, interpreter and imports included;
  - core only: the alpha scan plus the pairs at the chosen alpha, from data already in memory (their per-sample
    DataFrames; our records as pairs_io.read_scores returns them).

    nice python bench/bench_build_pairs.py                                  # 10k prompts x 16 responses
    nice python bench/bench_build_pairs.py --prompts 1000 --whole_process false   # a quick look, core only
    python bench/bench_build_pairs.py --prompts 200 --k 4 --write_scores /tmp/scores.jsonl   # input for a smoke run

Input: synthetic, seeded: N prompts x K responses of 50..2000 characters (distinct texts), implicit rewards
0.012 * length + N(0, 3) (longer responses score higher, as DPO rewards tend to), 5% of the responses invalid. The
alpha scan therefore runs a realistic dozen or so steps. The same data is written as our scores.jsonl and as the
official layout (one JSONL per sample index j: prompt, response, score; null for an invalid response).

The baseline mirrors the official DICE code, sail-sg/dice `scripts/data_script/generate_lc_paired_set.py`
(`optimize_alpha` -> per alpha: `deepcopy` of the K per-sample DataFrames, `add_lc_score`, `process_dataframes`: an
outer `pd.merge` of the K frames on the prompt, NaN-aware counts, row-wise `apply` of `np.argsort`, row-wise lookups of
the chosen/rejected texts and scores), then `create_lc_paired_set` at the chosen alpha. It is re-implemented here from
that description in our own code, with the same operations and alpha grid (np.arange(0, 1, 0.001)).

Both sides must choose the same alpha, scan the same steps and pick the same (chosen, rejected) texts for every prompt,
in memory and in the files the processes write; the script fails otherwise. The machine's load is printed before and
after; it prints a markdown table.
"""
import functools
import glob
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from copy import deepcopy

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dice import DiceError, cli, data, pairs_io, protocol  # noqa: E402

bp = cli.load_script("03_build_pairs")


# ----------------------------------------------------------------------------- synthetic input

def synthetic(n_prompts, k, seed):
    """Records as pairs_io.read_scores returns them."""
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
        records.append(dict(prompt_id=data.prompt_id(prompt), key=data.prompt_id(prompt), prompt=prompt,
                            responses=responses, rewards=rewards[p].tolist(), valid=valid[p].tolist(),
                            policy_logps=(-lengths[p] / 3.0).tolist(), completion_starts=None))
    return records


def save_scores(records, path):
    """Our input: 02_score.py's scores.jsonl."""
    protocol.write_jsonl(path, (dict(prompt_id=r["prompt_id"], prompt=r["prompt"], responses=r["responses"],
                                   rewards=r["rewards"], valid=r["valid"], policy_logps=r["policy_logps"])
                              for r in records))


def save_official_scores(records, folder):
    """The official input: one JSONL per sample index j with prompt, response, score (null = invalid)."""
    for j in range(len(records[0]["responses"])):
        protocol.write_jsonl(os.path.join(folder, f"score_{j:02d}.jsonl"), (
            dict(prompt=r["prompt"], response=r["responses"][j], score=r["rewards"][j] if r["valid"][j] else None)
            for r in records))


# ----------------------------------------------------------------------------- ours

def ours(records, min_valid):
    """03's rule from in-memory records: filter, table, the alpha scan, the pairs at the chosen alpha."""
    records, table, _ = pairs_io.usable_prompts(records, min_valid)
    alpha, sweep = bp.sweep_alpha(table)
    chosen, rejected, tie, identical = bp.select(table, alpha)
    pairs = {records[i]["prompt"]: (records[i]["responses"][chosen[i]], records[i]["responses"][rejected[i]])
             for i in np.flatnonzero(~tie & ~identical)}
    return alpha, len(sweep), pairs


# ----------------------------------------------------------------------------- the official approach (pandas)

def per_sample_frames(records):
    """The official input layout: one DataFrame per sample index j with columns prompt, response, score (NaN = none)."""
    import pandas as pd

    k = max(len(r["responses"]) for r in records)
    return [pd.DataFrame(dict(prompt=[r["prompt"] for r in records],
                              response=[r["responses"][j] for r in records],
                              score=[r["rewards"][j] if r["valid"][j] else math.nan for r in records]))
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


def official_scan(frames, min_scores):
    """Mirrors optimize_alpha: per alpha a deepcopy, the shaping, the merge, the mean length gap, the stopping rule."""
    results = []
    for a in np.arange(0.0, 1.0, 0.001):
        shaped = [official_shaped(f, alpha=a) for f in deepcopy(frames)]
        out = official_best_vs_worst(shaped, min_scores)
        gap = (out["chosen"].apply(len) - out["rejected"].apply(len)).mean()
        results.append((a, gap.item()))
        if np.abs(gap) > np.min([np.abs(g) for _, g in results]):
            break
    return results[int(np.argmin([np.abs(g) for _, g in results]))][0], results


def official(frames, min_scores):
    """The core: the scan, then create_lc_paired_set's pair table at the chosen alpha (no files)."""
    alpha, results = official_scan(frames, min_scores)
    out = official_best_vs_worst([official_shaped(f, alpha=alpha) for f in deepcopy(frames)], min_scores)
    return alpha, len(results), {p: (c, r) for p, c, r in zip(out["prompt"], out["chosen"], out["rejected"])}


def official_process(source_dir, save_dir, min_scores):
    """The official script's main as one process: read the per-sample score files, scan, then create_lc_paired_set
    (pairs at the chosen alpha, the chosen/rejected score histograms, stats.txt, the pairs as JSONL and as the
    LLaMA-Factory JSON) and the sweep's JSON."""
    import matplotlib.pyplot as plt
    import pandas as pd

    paths = sorted(glob.glob(os.path.join(source_dir, "score_*.jsonl")))
    frames = [pd.read_json(p, lines=True)[["prompt", "response", "score"]].drop_duplicates(subset="prompt")
              for p in paths]
    alpha, results = official_scan(frames, min_scores)
    out = official_best_vs_worst([official_shaped(f, alpha=alpha) for f in frames], min_scores)
    save_path = os.path.join(save_dir, f"lc_alpha_{alpha}.json")
    for label in ("chosen", "rejected"):
        out[f"{label}_score"].hist(bins=100)
        plt.savefig(save_path.replace(".json", f"-{label}-hist.png"))
        plt.close("all")
    with open(os.path.join(save_dir, "stats.txt"), "w") as f:
        gap = (out["chosen"].apply(len) - out["rejected"].apply(len)).mean()
        f.write(f"alpha: \t{alpha:.4f}, avg_len_diff: \t{gap:.3f}\nsize of preference dataset: {len(out)}\n")
        for column in ("chosen", "rejected"):
            f.write(f"{column} len stats: \n{out[column].apply(len).describe()}\n\n")
            f.write(f"{column} score stats: \n{out[column + '_score'].describe()}\n\n")
    out.to_json(save_path, lines=True, orient="records")
    out["output"] = out[["chosen", "rejected"]].apply(list, axis=1)
    with open(save_path.replace(".json", "-llamafactory.json"), "w") as f:
        json.dump(out[["prompt", "output"]].rename(columns={"prompt": "instruction"}).to_dict("records"), f, indent=4)
    with open(os.path.join(save_dir, "intermediate-results-sweep-alpha.json"), "w") as f:
        json.dump(results, f, indent=4)


# ----------------------------------------------------------------------------- whole processes

def timed(cmd):
    """Seconds from start to exit of `cmd` (a subprocess; it must succeed)."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise DiceError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")
    return seconds


def pairs_in(path):
    """{prompt: (chosen, rejected)} of a JSONL of pairs (ours or the official one)."""
    return {row["prompt"]: (row["chosen"], row["rejected"]) for _, row in data.read_jsonl(path)}


def whole_processes(records, min_valid, repeats, official_repeats, tmp):
    """Time `python 03_build_pairs.py` (defaults, plots included) and the official approach as processes, interleaved;
    returns ({name: [seconds, ...]}, our pairs, the official pairs)."""
    scores, official_in = os.path.join(tmp, "scores.jsonl"), os.path.join(tmp, "official_in")
    save_scores(records, scores)
    os.makedirs(official_in)
    save_official_scores(records, official_in)
    times = {"ours": [], "official": []}
    for r in range(max(repeats, official_repeats)):
        if r < repeats:
            out = os.path.join(tmp, f"ours_{r}")
            times["ours"].append(timed([sys.executable, "03_build_pairs.py", "--scores", scores, "--out_dir", out,
                                        "--min_valid", str(min_valid)]))
        if r < official_repeats:
            out = os.path.join(tmp, f"official_{r}")
            os.makedirs(out)
            times["official"].append(timed([sys.executable, os.path.abspath(__file__), "--official_run", official_in,
                                            "--official_out", out, "--min_valid", str(min_valid)]))
    ours_pairs = pairs_in(os.path.join(tmp, "ours_0", "pairs.jsonl"))
    official_pairs = pairs_in(glob.glob(os.path.join(tmp, "official_0", "lc_alpha_*[0-9].json"))[0])
    return times, ours_pairs, official_pairs


def load():
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


# ----------------------------------------------------------------------------- main

def main(
    prompts: int = 10000,
    k: int = 16,
    min_valid: int = 8,
    seed: int = 0,
    repeats: int = 5,
    official_repeats: int = 1,
    whole_process: bool = True,
    write_scores: str = None,
    official_run: str = None,
    official_out: str = None,
):
    """Time 03's pair building against the official approach, as whole processes and in memory.

    Args:
        prompts: synthetic prompts (>= 2)
        k: responses per prompt (>= 2)
        min_valid: 03's --min_valid (the paper's n_least_score 8) (>= 2)
        seed: seed of the synthetic data (>= 0)
        repeats: timed runs of ours, per measure (the best is reported, all are printed) (>= 1)
        official_repeats: timed runs of the official approach, per measure (>= 1)
        whole_process: also time both as whole processes (subprocesses reading and writing files).
        write_scores: only write the synthetic data as a scores.jsonl to this path (input for a smoke run).
        official_run: internal: run the official approach as a process on this folder of per-sample score files.
        official_out: internal: the folder that official run writes into.
    """
    a = vars(cli.flags(main, locals()))
    if a["official_run"]:
        return official_process(a["official_run"], a["official_out"], a["min_valid"])
    records = synthetic(a["prompts"], a["k"], a["seed"])
    if a["write_scores"]:
        save_scores(records, a["write_scores"])
        print(f"wrote {a['write_scores']}: {a['prompts']} prompts x {a['k']} responses")
        return
    print("bench_build_pairs: " + " ".join(f"{name}={a[name]}" for name in
                                           ("prompts", "k", "min_valid", "seed", "repeats", "official_repeats",
                                            "whole_process")))
    print(f"before: {load()}")
    rows = []
    if a["whole_process"]:
        with tempfile.TemporaryDirectory() as tmp:
            times, ours_pairs, official_pairs = whole_processes(records, a["min_valid"], a["repeats"],
                                                                a["official_repeats"], tmp)
        if ours_pairs != official_pairs:
            raise DiceError("the pairs files of ours and the official approach differ")
        print(f"whole process: ours {', '.join(f'{t:.2f}' for t in times['ours'])} s; official "
              f"{', '.join(f'{t:.2f}' for t in times['official'])} s; same {len(ours_pairs)} pairs in the files: yes")
        rows.append(("whole process: `python 03_build_pairs.py` with its defaults (plots included) vs the official "
                     "script's approach, both reading and writing files", min(times["official"]), min(times["ours"])))

    frames = per_sample_frames(records)
    times = {"ours": [], "official": []}
    for r in range(max(a["repeats"], a["official_repeats"])):
        if r < a["repeats"]:
            t = time.perf_counter()
            alpha, steps, pairs = ours(records, a["min_valid"])
            times["ours"].append(time.perf_counter() - t)
        if r < a["official_repeats"]:
            t = time.perf_counter()
            off_alpha, off_steps, off_pairs = official(frames, a["min_valid"])
            times["official"].append(time.perf_counter() - t)
    if not (math.isclose(alpha, off_alpha, abs_tol=1e-12) and steps == off_steps and pairs == off_pairs):
        raise DiceError("ours and the official approach disagree in memory (alpha, scan steps or pairs)")
    if a["whole_process"] and pairs != ours_pairs:
        raise DiceError("03_build_pairs.py wrote other pairs than its core returns")
    print(f"core only: ours {', '.join(f'{t:.3f}' for t in times['ours'])} s; official "
          f"{', '.join(f'{t:.2f}' for t in times['official'])} s; alpha {alpha:g} after {steps} scan steps on both "
          f"sides, same (chosen, rejected) for all {len(pairs)} prompts: yes")
    rows.append(("core only: alpha scan + pairs at the chosen alpha, from data in memory",
                 min(times["official"]), min(times["ours"])))
    print(f"after: {load()}")

    print()
    print(f"{a['prompts']} prompts x {a['k']} responses, alpha {alpha:g} ({steps} scan steps); best of "
          f"{a['repeats']} (ours) and {a['official_repeats']} (official)")
    print()
    print("| measure | official approach (pandas) | ours (numpy) | speed-up |")
    print("|---|---|---|---|")
    for name, t_off, t_ours in rows:
        print(f"| {name} | {t_off:.2f} s | {t_ours:.3f} s | {t_off / t_ours:.0f}x |")


if __name__ == "__main__":
    cli.run(main)
