"""Benchmark of 02_score.py: tokens/s on the same tokens, one run, side by side, SmolLM2-135M-Instruct.

    python bench/bench_score.py                                             # fp32, 12 prompts, 2 rounds (~4 min)
    python bench/bench_score.py --prompts 48 --dtypes float32,bfloat16 --rounds 2   # the README table (~20 min)

Same tokens for every method: the first --prompts prompts of ../shared/data/gpt4_prefs_small.jsonl, each with K=2
responses (its chosen and rejected answers, as 01 would have sampled them), scored by a policy and a reference (both
SmolLM2-135M-Instruct: the cost does not depend on the weights). tokens/s = real tokens (prompt + response, both
models, no padding, no dummy) / wall seconds, so every overhead shows up as a lower rate. Same dtype everywhere
(float32, or bfloat16: bf16 weights; 02 also runs under bf16 autocast).
  - 02 end to end: `02_score.main(...)` (load both models once, tokenize, batch by length, score, write).
  - paper code's approach (sail-sg/dice generate_dpo_scores.py through LLaMA-Factory): one response file per sample
    index, models reloaded for every file and model, batch 1, each response paired with the dummy rejected response
    "dummy response" (pad_to_multiple_of 8), full logits, log_softmax + gather.
  - 02 loop: 02's scoring path alone (its length-sorted batches of --batch_tokens 4096, TRL's fused head, sums) on
    models already loaded, with 02's default budget (on CPUs one sequence per forward, no padding; on GPUs 16384
    padded tokens); "4096-token batches" is the same path with --batch_tokens 4096 (length-sorted padded batches).
  - raw forward (the limit): model(input_ids) on each sequence alone: no padding, no log-probs, no bookkeeping.
    All methods alternate for --rounds rounds in one process (02 loop and raw forward on the same loaded models); each
    figure is the method's best round (the one least disturbed by other load on the machine). 02 end to end includes
    its fixed costs (loading two tokenizers and two models, checking the file: ~1.7 s here), which do not grow with
    the file; "02 loop / paper" is the per-token speed-up without them.
Goals (the issue): 02 >= 2x the paper code's approach on CPU (>= 4x on a GPU); 02 loop >= 0.9x the raw forward.
Prints one markdown table row per dtype (tokens/s). On a shared machine the figures are noisy: compare the ratios of
one run, never figures of different runs.
"""
import os
import sys
import tempfile
import time
from typing import Literal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]

from dice import cli, data, models, protocol, scoring, trl_internals  # noqa: E402

score = cli.load_script("02_score")


def load_rows(prompts):
    path = os.path.join(os.path.dirname(ROOT), "shared", "data", "gpt4_prefs_small.jsonl")
    if not os.path.exists(path):
        sys.exit(f"skip: {path} is absent")
    rows = []
    for _, row in zip(range(prompts), data.read_jsonl(path)):
        r = row[1]
        rows.append({"prompt_id": data.prompt_id(r["prompt"]), "prompt": r["prompt"],
                     "responses": [r["chosen"], r["rejected"]], "finish_reasons": ["stop", "stop"],
                     "num_tokens": [0, 0], "generator": "gpt4_prefs_small"})
    return rows


def sequences(tokenizer, rows):
    """(prompt+response ids, response start) of every response, as 02 builds them."""
    out = []
    for row in rows:
        seqs, _, _ = scoring.tokenize_row(tokenizer, row, "responses", 4096, "keep_start")
        out.extend(seqs)
    return out


def run_02(model, rows, dtype, workdir):
    src = os.path.join(workdir, "responses.jsonl")
    protocol.write_jsonl(src, rows)
    out = os.path.join(workdir, f"scores_{dtype}.jsonl")
    for path in (out, protocol.done_marker(out)):  # each round scores again: a finished output is "done already"
        if os.path.exists(path):
            os.remove(path)
    score.main(policy=model, reference=model, responses=src, out=out, dtype=dtype)


def run_paper(model_path, tokenizer, rows, dtype):
    """The paper code's approach: per response file (sample index k) and per model, reload the model, then batch 1 =
    [response, "dummy response"] right-padded to a multiple of 8, full logits, log_softmax, gather, sum."""
    import torch
    from transformers import AutoModelForCausalLM

    K = len(rows[0]["responses"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for k in range(K):
        for _ in ("pi", "pi_ref"):
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(device).eval()
            for row in rows:
                prompt = data.to_messages(row["prompt"])
                n = len(models.chat_prompt_ids(tokenizer, row["prompt"]))
                ids = [tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": c}], tokenize=True,
                                                     return_dict=True)["input_ids"]
                       for c in (row["responses"][k], "dummy response")]
                width = -(-max(len(x) for x in ids) // 8) * 8
                input_ids = torch.full((2, width), tokenizer.pad_token_id, dtype=torch.long)
                attention = torch.zeros((2, width), dtype=torch.long)
                for b, x in enumerate(ids):
                    input_ids[b, : len(x)] = torch.tensor(x)
                    attention[b, : len(x)] = 1
                labels = input_ids.clone()
                labels[:, :n] = -100
                labels[attention == 0] = -100
                with torch.inference_mode():
                    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device))
                    logits = logits.logits[:, :-1].float()
                    target = labels[:, 1:].to(device)
                    logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                    (logp * (target != -100)).sum(-1).tolist()
            del model


def loop_and_raw(model_path, seqs, dtype):
    """Timed callables on the same loaded models: 02's scoring path (its batches, TRL's fused head, sums) with 02's
    default budget (1 on CPUs, 16384 on GPUs) and with 4096-token padded batches, and the raw forward (each sequence
    alone, logits only)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # plain model calls stay the original forward
    scorers = [trl_internals.load_scorer(model_path, dtype, device, False) for _ in range(2)]
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    lengths = [len(ids) for ids, _ in seqs]
    tensors = [torch.tensor([ids], device=device) for ids, _ in seqs]
    default_budget = 16384 if device == "cuda" else 1

    def scored(batch_tokens):
        for model in scorers:
            for batch in scoring.make_batches(lengths, batch_tokens):
                trl_internals.batch_logps(model, [seqs[i] for i in batch], 0, device, autocast)

    def raw():
        with torch.inference_mode():
            for model in scorers:
                for x in tensors:
                    model(input_ids=x)
            if device == "cuda":
                torch.cuda.synchronize()

    return {"loop": lambda: scored(default_budget), "raw": raw, "loop_4096": lambda: scored(4096)}


def main(prompts: int = 12, dtypes: list[Literal["float32", "bfloat16"]] = ("float32",), rounds: int = 2):
    """Benchmark 02_score.py against the paper code's approach and the raw forward (tokens/s, one table).

    Args:
        prompts: the first N prompts of gpt4_prefs_small.jsonl, 2 responses each (>= 1)
        dtypes: the dtypes to compare, e.g. float32,bfloat16
        rounds: each method runs this many times, alternating; its best round counts (>= 1)
    """
    args = cli.flags(main, locals())
    import torch

    import smollm2

    prompts, dtypes, rounds = args.prompts, args.dtypes, args.rounds
    model = smollm2.build()
    tokenizer = models.load_tokenizer(model)
    rows = load_rows(prompts)
    seqs = sequences(tokenizer, rows)
    tokens = 2 * sum(len(ids) for ids, _ in seqs)  # both models, real tokens only
    print(f"SmolLM2-135M-Instruct, {len(rows)} prompts x 2 responses = {len(seqs)} sequences, {tokens} tokens "
          f"(both models), torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    table = ["| dtype | 02 end to end | paper approach | 02 / paper | 02 loop | 02 loop / paper "
             "| 02 loop, 4096-token batches | raw forward | 02 loop / raw |", "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as workdir:
        for dtype in dtypes:
            methods = {"02": lambda: run_02(model, rows, dtype, workdir),
                       "paper": lambda: run_paper(model, tokenizer, rows, dtype),
                       **loop_and_raw(model, seqs, dtype)}
            best = {name: float("inf") for name in methods}
            for _ in range(rounds):  # alternate the methods; keep each one's best round
                for name, fn in methods.items():
                    start = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - start)
            r = {k: tokens / v for k, v in best.items()}
            table.append(f"| {dtype} | {r['02']:.0f} | {r['paper']:.0f} | {r['02'] / r['paper']:.2f}x | "
                         f"{r['loop']:.0f} | {r['loop'] / r['paper']:.2f}x | {r['loop_4096']:.0f} | {r['raw']:.0f} | "
                         f"{r['loop'] / r['raw']:.2f}x |")
            print(table[-1], flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.1f} (2 shared cores: figures are noisy)\n")
    print("\n".join(table))


if __name__ == "__main__":
    cli.run(main)
