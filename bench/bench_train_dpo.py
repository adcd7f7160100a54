"""Benchmark of 04_train_dpo.py: reusing the scored reference log-probs vs TRL's reference forward at every step.

    python bench/bench_train_dpo.py                 # SmolLM2-135M-Instruct, 12 short GPT-4-judged pairs, CPU fp32
    python bench/bench_train_dpo.py --steps 6 --batch 2 --repeats 1

Same model, data, seed and settings (batch 2, 6 steps, fp32, TRL's defaults otherwise: gradient checkpointing on) in
three runs of the real CLI, each in its own process:
  default     --reuse_ref_logps=False --precompute_ref_log_probs=False: TRL's default, a reference model held in memory
              and run at every step;
  precompute  --reuse_ref_logps=False: TRL's precompute, every reference log-prob computed before training;
  reuse       the rows carry ref_chosen_logps/ref_rejected_logps (as 03's pairs.jsonl does, from 02_score.py): no
              reference model, no reference forward.
The reference log-probs the reuse run reads are computed beforehand by TRL's own precompute (standing in for
02_score.py, whose scoring the DICE round has already paid for); that setup is not part of any figure.
Figures per run: the trainer's train_runtime, the preparation before training (tokenization, plus the precompute where
there is one), the wall time of the whole command, and its peak resident memory (ru_maxrss of the child process via
os.wait4). Goal: reuse <= 0.85x default's train_runtime, no precompute phase, lower peak memory. One run each on a
shared machine is noisy: rerun with --repeats to see the spread.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data", "gpt4_prefs_small.jsonl")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
from dice import cli  # noqa: E402


def short_pairs(n):
    """The n pairs of the shared GPT-4-judged sample with the fewest characters (deterministic)."""
    with open(SHARED, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows.sort(key=lambda r: (len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]), r["prompt"]))
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows[:n]]


def reference_logps(model_path, rows):
    """TRL 1.16's own precompute of the reference (= starting policy) log-probs of the rows, in row order."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, report_to="none", bf16=False, precompute_ref_log_probs=True, max_length=4096)
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_path), args=config, train_dataset=data,
                             processing_class=AutoTokenizer.from_pretrained(model_path))
        assert len(trainer.train_dataset) == len(rows)
        return list(trainer.train_dataset["ref_chosen_logps"]), list(trainer.train_dataset["ref_rejected_logps"])


def run(name, model, pairs, out, steps, batch, extra):
    cmd = [sys.executable, os.path.join(ROOT, "04_train_dpo.py"), "--model", model, "--pairs", pairs, "--out", out,
           "--max_steps", str(steps), "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
           "--eval_size", "0", "--warmup_steps", "0", "--logging_steps", "1", "--save_steps", "100000",
           "--bf16", "False", "--seed", "42", *extra]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{name} run failed:\n{log[-3000:]}")
    with open(out + ".done.json", encoding="utf-8") as f:  # protocol.stage's done marker: 04's record
        record = json.load(f)
    return {"name": name, "train_runtime": record["train_runtime"], "prepare": record["prepare_seconds"],
            "wall": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "reference": record["reference_logps"],
            "ref_model": record["reference_model_in_memory"], "train_loss": record["train_loss"]}


def main(steps: int = 6, batch: int = 2, pairs: int = 12, repeats: int = 1):
    """Time 04_train_dpo.py with reused reference log-probs against TRL's reference forward and TRL's precompute.

    Args:
        steps: optimizer steps per run (>= 1)
        batch: pairs per step (>= 1)
        pairs: the shortest N shared GPT-4-judged pairs trained on (>= 1)
        repeats: runs of each arm (>= 1)
    """
    args = cli.flags(main, locals())
    steps, batch, repeats = args.steps, args.batch, args.repeats
    import smollm2

    if not os.path.exists(SHARED):
        sys.exit(f"{SHARED} is absent: this benchmark reads the shared GPT-4-judged pairs")
    model = smollm2.build()
    rows = short_pairs(args.pairs)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        chosen, rejected = reference_logps(model, rows)
        setup = time.time() - t0
        plain, scored = os.path.join(tmp, "pairs.jsonl"), os.path.join(tmp, "pairs_scored.jsonl")
        with open(plain, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(scored, "w", encoding="utf-8") as f:
            for r, c, j in zip(rows, chosen, rejected):
                f.write(json.dumps({**r, "ref_chosen_logps": c, "ref_rejected_logps": j}) + "\n")
        arms = [("default (reference forward each step)", plain, ["--reuse_ref_logps", "False",
                                                                 "--precompute_ref_log_probs", "False"]),
                ("TRL precompute", plain, ["--reuse_ref_logps", "False"]),
                ("reuse scored log-probs", scored, [])]
        results = []
        for k in range(repeats):
            for i, (name, path, extra) in enumerate(arms):
                results.append(run(name, model, path, os.path.join(tmp, f"out{k}_{i}"), steps, batch, extra))
                print(json.dumps(results[-1]), flush=True)

    base = [r["train_runtime"] for r in results if r["name"].startswith("default")]
    base = sum(base) / len(base)
    print(f"\nSmolLM2-135M-Instruct, {len(rows)} pairs, batch {batch}, {steps} steps, fp32, CPU "
          f"({os.cpu_count()} cores, shared: noisy); reference log-probs for the reuse run computed beforehand in "
          f"{setup:.1f} s (02_score.py's job in a DICE round)\n")
    print("| run | train_runtime (s) | vs default | before training (s) | whole command (s) | peak RSS (MiB) | "
          "reference model in memory | reference log-probs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ref = r["reference"] if isinstance(r["reference"], str) else \
            f"{r['reference']['train']['supplied']} supplied, {r['reference']['train']['computed']} computed"
        print(f"| {r['name']} | {r['train_runtime']:.1f} | {r['train_runtime'] / base:.2f}x | {r['prepare']:.1f} | "
              f"{r['wall']:.1f} | {r['peak_rss_mib']:.0f} | {'yes' if r['ref_model'] else 'no'} | {ref} |")


if __name__ == "__main__":
    cli.run(main)
