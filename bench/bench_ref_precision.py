"""Benchmark: 02's bf16 reference log-probs, reused by 04, against the reference the training step itself computes.

    OMP_NUM_THREADS=1 nice python bench/bench_ref_precision.py   # SmolLM2-135M-Instruct, 64 pairs, 3 precisions, CPU
    OMP_NUM_THREADS=1 nice python bench/bench_ref_precision.py --pairs 8 --precisions bf16   # a quick look

The paper presets score in bf16 (SCORE_DTYPE=bfloat16: 02 loads the models in bf16 and runs under bf16 autocast) and
04 reuses the scoring policy's log-probs as DPO's reference: no reference forward. The official run computes the
reference inside the training step, where at step 1 policy and reference are one computation (ratio 0, loss ln 2).
This bench measures how far reuse moves step 1, against the training forward's own bf16 noise.

Workload: SmolLM2-135M-Instruct (tools/smollm2.py) as policy = reference; the first --pairs pairs of
../shared/data/gpt4_prefs_small.jsonl that 04 trains whole (prompt + longer response <= --max_length tokens: 04
recomputes a truncated pair's reference itself, so such pairs would not test reuse). 02_score.main --pairs scores them
with --dtype bfloat16 (the presets') and float32. Then, in each training precision (--precisions):
  bf16       bf16 parameters, fp32 buffers, no autocast: deepspeed.initialize's bf16 cast (DeepSpeed 0.19 casts the
             parameters only, keeping the rotary inv_freq in fp32), done before TRL's trainer is built (so TRL's
             precompute runs on the bf16 weights too);
  bf16_all   model.to(torch.bfloat16): the rotary inv_freq in bf16 too, as ZeRO-3's zero.Init gives it (the paper's
             configs/accelerate/deepspeed_zero3.yaml, zero3_init_flag: true, builds the model's tensors in bf16;
             checked with DeepSpeed 0.19.8: the same inv_freq values);
  autocast   fp32 weights under bf16 autocast: 04's --bf16 True on one process without DeepSpeed;
  deepspeed  DeepSpeed itself, as the launcher configures it: one process of the paper's ZeRO-3 bf16,
                 accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes 1 \\
                     bench/bench_ref_precision.py --precisions deepspeed
             (TRL's precompute then runs through its own DeepSpeed inference engine of the model, and transformers'
             Trainer casts the batch's float tensors, the reference log-probs included, to bf16 before TRL reads
             them: the rows show what TRL read);
three runs of 04_train_dpo.main, in process, each ONE optimizer step over all pairs (--max_steps 1,
--gradient_accumulation_steps = pairs / batch), so every forward sees the starting weights:
  precompute  --reuse_ref_logps False: TRL's own precompute computes the reference in the training precision, one
              pair per forward as training does;
  reuse       the pairs carry 02's bf16 log-probs (ref_chosen_logps/ref_rejected_logps, as 03 writes them), 1 pair
              per micro-batch as in the paper (chosen + rejected in one forward);
  batch 4     the reuse run with 4 pairs per micro-batch: the same training forward, another batch composition and
              padding, i.e. the noise any separately computed reference has.
The policy's log-probs are read off its own training forward (a forward hook: the per-token log-probs of TRL's fused
head summed per row, TRL's `per_token_logps.sum(dim=1)`, rows [chosen...; rejected...]) and each micro-batch's loss
from TRL's compute_loss, the reference as TRL read it from the batch. The only TRL code repeated here is the sigmoid
loss, for references TRL never saw (02's fp32 values, the batch-4 forward); `check` rows show that it gives TRL's own
per-pair losses and that the reuse and precompute runs ran the same training forward.
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Literal
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data", "gpt4_prefs_small.jsonl")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
from dice import cli, data, models, protocol, scoring, trl_internals  # noqa: E402

train = cli.load_script("04_train_dpo")


def first_pairs(n, max_length, tokenizer):
    """The first n shared pairs whose prompt + longer response fits max_length, and each one's (chosen ids, rejected
    ids) as 02 (= TRL) tokenizes them: the key that finds a pair in a training batch."""
    rows, keys = [], []
    for _, row in data.read_jsonl(SHARED):
        seqs, _, _ = scoring.tokenize_row(tokenizer, row, "pairs", None, "keep_start")
        if max(len(ids) for ids, _ in seqs) <= max_length:
            rows.append({k: row[k] for k in ("prompt", "chosen", "rejected")})
            keys.append(tuple(tuple(ids) for ids, _ in seqs))
        if len(rows) == n:
            break
    return rows, keys


def score_02(model, rows, dtype, max_length, tmp):
    """02_score.py --pairs with policy = reference = model, in its own process without the launcher's variables, as
    run_rounds.sh runs it (under a DeepSpeed launcher 02 would load its models by zero.Init in bf16, whatever --dtype
    says): [(chosen, rejected)] log-probs, the policy's (which 03 hands to 04 as ref_chosen/rejected_logps)."""
    src, out = f"{tmp}/pairs.jsonl", f"{tmp}/scored_{dtype}.jsonl"
    protocol.write_jsonl(src, rows)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "TORCHELASTIC_")) and k not in
           ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
            "MASTER_PORT")}
    cmd = [sys.executable, f"{ROOT}/02_score.py", "--policy", model, "--reference", model, "--pairs", src, "--out", out,
           "--dtype", dtype, "--max_length", str(max_length)]
    run = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if run.returncode:
        sys.exit(f"02_score.py failed:\n{run.stdout[-3000:]}")
    return [(r["policy_chosen_logps"], r["policy_rejected_logps"]) for _, r in data.read_jsonl(out)]


def step_one(model, rows, keys, ref, precision, batch, max_length, tmp, name):
    """One run of 04_train_dpo.main: one optimizer step over all rows, `batch` pairs per micro-batch; `ref` = the
    log-probs the pairs carry, or None (TRL's precompute). Returns per pair [policy chosen, policy rejected, reference
    chosen, reference rejected (as TRL read them), TRL's loss of its micro-batch], and the step-1 loss 04 logged."""
    import torch

    base, seen = trl_internals.dice_dpo_trainer(), {}

    class Watched(base):
        def __init__(self, *args, model, **kwargs):
            if precision == "bf16":  # DeepSpeed 0.19's bf16: the parameters in bf16, fp32 buffers, no autocast
                for p in model.parameters():
                    p.data = p.data.to(torch.bfloat16)
            elif precision == "bf16_all":  # ZeRO-3's zero.Init: the rotary inv_freq in bf16 too
                model.to(torch.bfloat16)
            super().__init__(*args, model=model, **kwargs)  # TRL's precompute, where there is one, runs here
            self.model.register_forward_hook(self.keep, with_kwargs=True)  # so: training forwards only

        def keep(self, module, args, kwargs, out):
            self.last = kwargs["input_ids"], kwargs["attention_mask"], out.log_probs.detach().sum(dim=1)

        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            ids, mask, logps = self.last
            n = len(ids) // 2
            for i in range(n):
                key = tuple(tuple(ids[j][mask[j].bool()].tolist()) for j in (i, n + i))
                seen[key] = [logps[i].item(), logps[n + i].item(), inputs["ref_chosen_logps"][i].item(),
                             inputs["ref_rejected_logps"][i].item(), loss.item()]
            return loss

    path, out = f"{tmp}/{name}.jsonl", f"{tmp}/{name}"
    protocol.write_jsonl(path, [{**r, **(dict(zip(trl_internals.REF_COLUMNS, ref[i])) if ref else {})}
                                for i, r in enumerate(rows)])
    bf16 = {"bf16": False, "bf16_all": False, "autocast": True, "deepspeed": "auto"}[precision]
    options = {"use_cpu": True} if bf16 and not torch.cuda.is_available() else {}
    with mock.patch.object(trl_internals, "dice_dpo_trainer", lambda: Watched):
        train.main(model=model, pairs=path, out=out, max_steps=1, per_device_train_batch_size=batch,
                   gradient_accumulation_steps=len(rows) // batch, max_length=max_length, eval_size=0,
                   logging_steps=1, bf16=bf16, reuse_ref_logps=ref is not None, **options)
    logged = [r["loss"] for _, r in data.read_jsonl(f"{out}/metrics.jsonl") if "loss" in r][0]
    return [seen[k] for k in keys], logged  # a KeyError: TRL tokenized a pair otherwise than 02


def dpo_loss(policy, ref, beta):
    """TRL 1.16's sigmoid loss per pair, its ops in its order on float32 (the collator's dtype for the references)."""
    import torch
    import torch.nn.functional as F

    p, r = torch.tensor(policy, dtype=torch.float32), torch.tensor(ref, dtype=torch.float32)
    return (-F.logsigmoid(beta * ((p[:, 0] - r[:, 0]) - (p[:, 1] - r[:, 1])))).tolist()


def diffs(a, b):
    """mean and max |a - b| over every sequence and over every pair's margin (chosen - rejected: what the loss sees)."""
    seq = [abs(x[k] - y[k]) for x, y in zip(a, b) for k in (0, 1)]
    margin = [abs((x[0] - x[1]) - (y[0] - y[1])) for x, y in zip(a, b)]
    return sum(seq) / len(seq), max(seq), sum(margin) / len(margin), max(margin)


def main(pairs: int = 64, max_length: int = 512,
         precisions: list[Literal["bf16", "bf16_all", "autocast", "deepspeed"]] = ("bf16", "autocast", "bf16_all"),
         beta: float = 0.1):
    """Step 1 of DPO with 02's bf16 reference log-probs reused vs the reference computed in the training precision.

    Args:
        pairs: the first N shared pairs that fit --max_length (a multiple of 4: batch 4 runs too) (>= 4)
        max_length: 02's and 04's max_length (tokens) (>= 2)
        precisions: bf16 (bf16 parameters), bf16_all (model.to(bfloat16)), autocast, deepspeed (under its launcher).
        beta: DPO beta (the paper's 0.1) (> 0)
    """
    args = cli.flags(main, locals())
    if args.pairs % 4:
        sys.exit(f"--pairs must be a multiple of 4, got {args.pairs}")
    if ("deepspeed" in args.precisions) != (os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"):
        sys.exit("--precisions deepspeed, alone, runs under accelerate launch with a DeepSpeed config (docstring)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.exit("one process only: every pair's log-probs are read off this process's forwards")
    if not os.path.exists(SHARED):
        sys.exit(f"skip: {SHARED} is absent")
    import torch

    import smollm2

    os.environ.update(TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    model, started, ln2 = smollm2.build(), time.time(), math.log(2)
    rows, keys = first_pairs(args.pairs, args.max_length, models.load_tokenizer(model, False, None))
    if len(rows) < args.pairs:
        sys.exit(f"only {len(rows)} pairs of {SHARED} fit --max_length {args.max_length}")
    table, losses, checks = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        s02 = {dtype: score_02(model, rows, dtype, args.max_length, tmp) for dtype in ("bfloat16", "float32")}
        for precision in args.precisions:
            pre, pre_logged = step_one(model, rows, keys, None, precision, 1, args.max_length, tmp, f"{precision}_pre")
            reuse, reuse_logged = step_one(model, rows, keys, s02["bfloat16"], precision, 1, args.max_length, tmp,
                                           f"{precision}_reuse")
            b4, _ = step_one(model, rows, keys, s02["bfloat16"], precision, 4, args.max_length, tmp, f"{precision}_b4")
            forward = [r[:2] for r in pre]  # the training forward's log-probs, 1 pair per micro-batch
            for what, ref in (("02 bf16, reused (as TRL read it)", [r[2:4] for r in reuse]),
                              ("02 fp32", s02["float32"]),
                              ("TRL precompute in the training precision", [r[2:4] for r in pre]),
                              ("training forward, batch 4 (noise)", [r[:2] for r in b4])):
                table.append((precision, what, *diffs(ref, forward)))
            for what, per_pair, logged in (("reuse 02 bf16 (TRL's loss)", [r[4] for r in reuse], reuse_logged),
                                           ("TRL precompute (TRL's loss)", [r[4] for r in pre], pre_logged),
                                           ("02 fp32 as reference", dpo_loss(forward, s02["float32"], args.beta), None),
                                           ("batch-4 forward as reference", dpo_loss(forward, [r[:2] for r in b4],
                                                                                    args.beta), None)):
                dev = [abs(x - ln2) for x in per_pair]
                losses.append((precision, what, logged, sum(per_pair) / len(per_pair), sum(dev) / len(dev), max(dev)))
            checks.append((precision, diffs([r[:2] for r in reuse], forward)[1],
                           max(abs(x - r[4]) for x, r in zip(dpo_loss(forward, [r[2:4] for r in reuse], args.beta),
                                                              reuse))))
    print(f"\nSmolLM2-135M-Instruct ({model}), {len(rows)} pairs of {os.path.basename(SHARED)} (max_length "
          f"{args.max_length}), beta {args.beta}, torch {torch.__version__}, CPU ({os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, load {os.getloadavg()[0]:.1f}), {time.time() - started:.0f} s\n")
    print("| training precision | reference log-probs vs the training forward's (step 1, 1 pair per micro-batch) | "
          "mean abs diff per sequence | max | mean abs diff of the margin (chosen - rejected) | max |")
    print("|---|---|---|---|---|---|")
    for precision, what, *v in table:
        print(f"| {precision} | {what} | " + " | ".join(f"{x:.4f}" for x in v) + " |")
    print("\n| training precision | reference | step-1 loss logged by 04 | mean per-pair loss | mean abs(loss - ln 2) "
          "| max abs(loss - ln 2) |\n|---|---|---|---|---|---|")
    for precision, what, logged, *v in losses:
        print(f"| {precision} | {what} | {'-' if logged is None else f'{logged:.4f}'} | "
              + " | ".join(f"{x:.5f}" for x in v) + " |")
    for precision, same_forward, loss_formula in checks:
        print(f"check ({precision}): reuse vs precompute run, max abs diff of the training forward's log-probs "
              f"{same_forward:.2e}; TRL's per-pair loss vs dpo_loss here {loss_formula:.2e}")
    print(json.dumps({"table": table, "losses": losses, "checks": checks}))


if __name__ == "__main__":
    cli.run(main)
