"""Benchmark of 02_score.py: tokens/s on the same tokens, one run, side by side, SmolLM2-135M-Instruct.

    python bench/bench_score.py                          # fp32, 12 prompts x 2 responses (a few minutes on 2 cores)
    python bench/bench_score.py --dtypes float32,bfloat16 --prompts 12

Same tokens for every method: the first --prompts prompts of ../shared/data/gpt4_prefs_small.jsonl, each with K=2
responses (its chosen and rejected answers, as 01 would have sampled them), scored by a policy and a reference (both
SmolLM2-135M-Instruct: the cost does not depend on the weights). tokens/s = real tokens (prompt + response, both
models, no padding, no dummy) / wall seconds, so overheads show up as a lower rate.
  - 02_score: `02_score.main(...)` end to end (load both models once, tokenize, batch by length, score, write).
    Also its scoring loop alone (the `seconds` in the done marker: no model loading).
  - paper code's approach (sail-sg/dice generate_dpo_scores.py through LLaMA-Factory): one response file per sample
    index, models reloaded for every file and model, batch 1, each response paired with the dummy rejected response
    "dummy response" (pad_to_multiple_of 8), full logits, log_softmax + gather.
  - raw forward (the limit): model(input_ids) on each sequence alone, no padding, no log-probs, no bookkeeping, models
    loaded beforehand (not timed).
Goals (the issue): 02 >= 2x the paper code's approach on CPU (>= 4x on a GPU); 02's loop >= 0.9x the raw forward.
Prints one markdown table row per dtype. The machine is shared: figures are noisy; every method runs on the same
tokens in the same run, one after the other.
"""
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]

import common  # noqa: E402


def load_rows(prompts):
    path = os.path.join(os.path.dirname(ROOT), "shared", "data", "gpt4_prefs_small.jsonl")
    if not os.path.exists(path):
        sys.exit(f"skip: {path} is absent")
    rows = []
    for _, row in zip(range(prompts), common.read_jsonl(path)):
        r = row[1]
        rows.append({"prompt_id": common.prompt_id(r["prompt"]), "prompt": r["prompt"],
                     "responses": [r["chosen"], r["rejected"]], "finish_reasons": ["stop", "stop"],
                     "num_tokens": [0, 0], "generator": "gpt4_prefs_small"})
    return rows


def sequences(tokenizer, rows):
    """(prompt+response ids, response start) of every response, as 02 builds them."""
    score = common_script()
    out = []
    for row in rows:
        seqs, _ = score.tokenize_row(tokenizer, row, "responses", 4096, "keep_start")
        out.extend(seqs)
    return out


def common_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("score", os.path.join(ROOT, "02_score.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_02(model, rows, dtype, workdir):
    score = common_script()
    src = os.path.join(workdir, "responses.jsonl")
    common.write_jsonl(src, rows)
    out = os.path.join(workdir, f"scores_{dtype}.jsonl")
    start = time.perf_counter()
    score.main(policy=model, reference=model, responses=src, out=out, dtype=dtype, overwrite=True)
    total = time.perf_counter() - start
    return total, json.load(open(common.done_marker(out)))["seconds"]


def run_paper(model_path, tokenizer, rows, dtype):
    """The paper code's approach: per response file (sample index k) and per model, reload the model, then batch 1 =
    [response, "dummy response"] right-padded to a multiple of 8, full logits, log_softmax, gather, sum."""
    import torch
    from transformers import AutoModelForCausalLM

    K = len(rows[0]["responses"])
    start = time.perf_counter()
    for k in range(K):
        for _ in ("pi", "pi_ref"):
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
            for row in rows:
                prompt = common.to_messages(row["prompt"])
                n = len(common.chat_prompt_ids(tokenizer, row["prompt"]))
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
                    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
                    target = labels[:, 1:]
                    logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                    (logp * (target != -100)).sum(-1).tolist()
            del model
    return time.perf_counter() - start


def run_raw(model_path, seqs, dtype):
    """The limit: each sequence alone through each model, logits only."""
    import torch
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval() for _ in range(2)]
    tensors = [torch.tensor([ids]) for ids, _ in seqs]
    start = time.perf_counter()
    with torch.inference_mode():
        for model in models:
            for x in tensors:
                model(input_ids=x)
    return time.perf_counter() - start


def main(prompts=12, dtypes="float32"):
    import smollm2
    import torch

    prompts = common.as_int("prompts", prompts, minimum=1)
    dtypes = dtypes.split(",") if isinstance(dtypes, str) else list(dtypes)
    model = smollm2.build()
    tokenizer = common.load_tokenizer(model)
    rows = load_rows(prompts)
    seqs = sequences(tokenizer, rows)
    tokens = 2 * sum(len(ids) for ids, _ in seqs)  # both models, real tokens only
    print(f"SmolLM2-135M-Instruct, {len(rows)} prompts x 2 responses = {len(seqs)} sequences, {tokens} tokens "
          f"(both models), torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    table = ["| dtype | 02 end to end tok/s | paper approach tok/s | 02 / paper | 02 loop tok/s | raw forward tok/s "
             "| 02 loop / raw |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as workdir:
        for dtype in dtypes:
            t02, loop = run_02(model, rows, dtype, workdir)
            tpaper = run_paper(model, tokenizer, rows, dtype)
            traw = run_raw(model, seqs, dtype)
            r = {k: tokens / v for k, v in (("02", t02), ("paper", tpaper), ("loop", loop), ("raw", traw))}
            table.append(f"| {dtype} | {r['02']:.0f} | {r['paper']:.0f} | {r['02'] / r['paper']:.2f}x | "
                         f"{r['loop']:.0f} | {r['raw']:.0f} | {r['loop'] / r['raw']:.2f}x |")
            print(table[-1], flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.1f} (2 shared cores: figures are noisy)\n")
    print("\n".join(table))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
