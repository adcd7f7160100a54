"""Stage 4 of DICE: train the next policy with DPO (TRL's DPOTrainer), the reference being the starting policy.

Each DICE round trains pi_{t+1} from pi_t on the round's pairs with the DPO loss (Rafailov et al. 2023, Eq. 7),
the objective every DICE round optimizes (Chen et al. 2025, Sec. 2-3):

    L(theta) = -E_(x, y_w, y_l) log sigmoid( beta * [log pi_theta(y_w|x) - log pi_ref(y_w|x)]
                                            - beta * [log pi_theta(y_l|x) - log pi_ref(y_l|x)] )

with pi_ref = pi_t (the model being trained, frozen at its starting weights). log pi(y|x) is the sum of the
completion's token log-probs, computed exactly as TRL 1.16 does for conversational rows. Defaults are the paper's
(its released script: beta 0.1, lr 5e-7, 50 warmup steps, 300 steps of 1 pair x 4 accumulation x 8 GPUs = 32 pairs,
bf16, max length 4096, 576 held-out pairs evaluated every 20 steps, checkpoints every 100). The schedule is
constant_with_warmup: the released script asks for `--lr_scheduler_type constant --warmup_steps 50`, and transformers'
`constant` ignores warmup, so --lr_scheduler_type=constant reproduces that script exactly. The same script trains
round 0 (DPO from an SFT model on offline pairs).

Reference log-probs are reused, not recomputed: rows of 03's pairs.jsonl carry `ref_chosen_logps`/`ref_rejected_logps`,
the log-probs that 02_score.py computed with this very starting policy. With --reuse_ref_logps (default) those values
feed the loss directly: no reference model is loaded and no reference forward runs. Rows without them (offline
pairs, or any pair that --max_length truncates, whose supplied values cover the untruncated response) get them from
TRL's own precompute, once, before training, with the starting policy. With --reuse_ref_logps=False every row is
precomputed that way, and --reuse_ref_logps=False --precompute_ref_log_probs=False is TRL's default: a reference
model held in memory and run at every step.

Input  (--pairs, JSONL, one pair a line): `prompt` (string, or a list of {role, content} messages), `chosen`,
       `rejected` (strings); optional `ref_chosen_logps`, `ref_rejected_logps` (floats or null); other fields ignored.
       A prompt string becomes one user turn; chosen/rejected become one assistant turn (TRL's conversational format).
Output (--out, a standard HF model folder, published by renaming a finished temporary folder):
       model (safetensors), config, generation config, tokenizer; trainer_state.json; metrics.jsonl (the trainer's log
       history, one entry a line); loss.png (train/eval loss, reward accuracy, reward margin); training_args.json
       (every DPOConfig field); dice_train.json (resolved arguments, seed, counts, timings). Also OUT.done.json (the
       same record, written last). Checkpoints every --save_steps go to OUT.work/, removed once OUT is published
       unless --keep_checkpoints; --resume continues from the last complete one.

Smoke (CPU, seconds; tiny offline model from tools/tiny_model.py):
    python tools/tiny_model.py --out /tmp/tiny --seed 0
    python 04_train_dpo.py --model /tmp/tiny --pairs data/demo/preferences.jsonl --out /tmp/tiny_dpo --max_steps 2 \
        --warmup_steps 0 --eval_size 4 --eval_steps 1 --logging_steps 1 --learning_rate 1e-3 --gradient_checkpointing False
Full run (one 8-GPU node, DeepSpeed ZeRO-3, the paper's settings):
    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml 04_train_dpo.py \
        --model runs/round1/model --pairs runs/round1/pairs/pairs.jsonl --out runs/round2/model
"""
import dataclasses
import difflib
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
import types
import typing
from unittest import mock

import trl.trainer.dpo_trainer as trl_dpo

import common
from common import DiceError

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# DPOConfig fields this script owns: passing them as extra options would fight with its own arguments.
RESERVED_OPTIONS = {
    "output_dir": "checkpoints go to OUT.work/ beside --out",
    "resume_from_checkpoint": "use --resume",
    "model_init_kwargs": "the model is loaded by this script (safetensors only)",
}


# ----------------------------------------------------------------------------- input

def read_pairs(path):
    """Rows of a pairs file in TRL's conversational format (+ the supplied reference log-probs or None, + line)."""
    rows = []
    for line, row in common.read_jsonl(path):
        where = f"{path}:{line}"
        messages = common.check_pair(row, where)
        ref = [row.get(key) for key in REF_COLUMNS]
        for key, value in zip(REF_COLUMNS, ref):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value > 1e-3
            ):
                raise DiceError(f"{where}: {key} must be a log-probability (a finite number <= 0) or null, got {value!r}")
        if None in ref:  # one value without the other cannot be used: both get computed
            ref = [None, None]
        rows.append({
            "prompt": messages,
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
            REF_COLUMNS[0]: None if ref[0] is None else float(ref[0]),
            REF_COLUMNS[1]: None if ref[1] is None else float(ref[1]),
            "line": line,
        })
    if not rows:
        raise DiceError(f"{path}: no pairs (the file is empty)")
    return rows


def split_eval(rows, eval_size, seed):
    """(train, eval): a seeded random `eval_size` rows held out; both keep the file's order."""
    if eval_size >= len(rows):
        raise DiceError(
            f"--eval_size {eval_size} leaves no training pairs: the pairs file has {len(rows)} "
            f"(pass a smaller --eval_size; 0 = no evaluation)"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:eval_size])
    return [r for i, r in enumerate(rows) if i not in held_out], [r for i, r in enumerate(rows) if i in held_out]


def to_dataset(rows, reuse_ref_logps, folder):
    """The rows as a datasets.Dataset saved in `folder` and loaded back; the reference columns only where they will be
    used. On disk, not in memory: TRL's precompute caches its results beside the dataset's files and every process
    reads them there (an in-memory dataset's cache lives in a per-process temporary folder the others cannot see)."""
    from datasets import Dataset, load_from_disk

    keep = ["prompt", "chosen", "rejected"]
    if reuse_ref_logps and any(r[REF_COLUMNS[0]] is not None for r in rows):
        keep += list(REF_COLUMNS)
    if not os.path.exists(folder):  # written by the main process first; the others load it
        Dataset.from_list([{k: r[k] for k in keep} for r in rows]).save_to_disk(folder)
    return load_from_disk(folder)


# ----------------------------------------------------------------------------- DPOConfig pass-through

def _coerce(name, value, hint):
    """`value` (as fire parsed it) converted to the DPOConfig field type `hint`, or a DiceError."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    choices = typing.get_args(hint) if union else (hint,)
    if (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))) and type(None) in choices:
        return None
    for t in choices:
        origin = typing.get_origin(t) or t
        if origin is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
        elif origin is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
                return int(value)
        elif origin is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif origin is str:
            if isinstance(value, str):
                return value
        elif origin is list:
            (item,) = typing.get_args(t) or (typing.Any,)
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            try:
                return [v if item is typing.Any else _coerce(name, v, item) for v in items]
            except DiceError:
                continue
        elif origin is dict:
            if isinstance(value, dict):
                return value
            if isinstance(value, str):
                try:
                    parsed = json.loads(value)
                except json.JSONDecodeError:
                    continue
                if isinstance(parsed, dict):
                    return parsed
        elif origin is typing.Any or (isinstance(origin, type) and isinstance(value, origin)):
            return value
    if str in choices and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    raise DiceError(f"--{name} expects {kind}, got {value!r}")


def dpo_options(options):
    """Check extra CLI options against TRL's DPOConfig fields (clear error for unknown names) and convert them."""
    from trl import DPOConfig

    hints = typing.get_type_hints(DPOConfig)
    names = [f.name for f in dataclasses.fields(DPOConfig) if f.init]
    resolved = {}
    for name, value in options.items():
        name = name.replace("-", "_")
        if name in RESERVED_OPTIONS:
            raise DiceError(f"--{name} is not accepted: {RESERVED_OPTIONS[name]}")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise DiceError(f"unknown option --{name}: neither an argument of 04_train_dpo.py nor a DPOConfig field{hint}")
        resolved[name] = _coerce(name, value, hints[name])
    return resolved


def resolve_bf16(value):
    """'auto' -> bf16 on a CUDA device that supports it, fp32 elsewhere (CPU)."""
    if value == "auto":
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return common.as_bool("bf16", value)


# ----------------------------------------------------------------------------- the trainer

def rows_needing_ref_logps(dataset, max_length):
    """Indices of tokenized rows whose reference log-probs must be computed: no supplied value, or a sequence that
    training truncates (the supplied value covers the whole response, the training loss only the kept part)."""
    supplied = REF_COLUMNS[0] in dataset.column_names
    chosen = dataset[REF_COLUMNS[0]] if supplied else [None] * len(dataset)
    prompt, chosen_ids, rejected_ids = dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]
    return [
        i for i in range(len(dataset))
        if chosen[i] is None
        or (max_length is not None and len(prompt[i]) + max(len(chosen_ids[i]), len(rejected_ids[i])) > max_length)
    ]


class DiceDPOTrainer(trl_dpo.DPOTrainer):
    """TRL 1.16's DPOTrainer, except that reference log-probs already in the dataset are used as they are.

    TRL reads `ref_chosen_logps`/`ref_rejected_logps` from the batch only with precompute_ref_log_probs=True, and
    its __init__ then recomputes every row with `_precompute_ref_logps` (which fails on the existing columns). This
    subclass overrides that private method (TRL pinned to 1.16.0; tests/test_train_dpo.py checks the behaviour):
    only rows that lack values, or that training truncates, go through TRL's precompute; the others keep theirs.
    TRL's hash of every weight (its precompute cache key) is taken only when a precompute actually runs.
    """

    def __init__(self, *args, **kwargs):
        self.ref_logps_counts = {}
        with mock.patch.object(trl_dpo, "hash_module", lambda module: None):
            super().__init__(*args, **kwargs)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if len(dataset) == 0:
            raise DiceError(f"no {name} pair is left: TRL drops pairs whose prompt alone is >= max_length tokens")
        todo = rows_needing_ref_logps(dataset, self.args.max_length)
        self.ref_logps_counts[name] = {"supplied": len(dataset) - len(todo), "computed": len(todo)}
        if not todo:
            return dataset
        if self._precompute_model_hash is None:  # the reference is the untrained policy itself
            self._precompute_model_hash = trl_dpo.hash_module(self.model)
        present = [c for c in REF_COLUMNS if c in dataset.column_names]
        if len(todo) == len(dataset):
            return super()._precompute_ref_logps(dataset.remove_columns(present), name, batch_size)
        computed = super()._precompute_ref_logps(dataset.select(todo).remove_columns(present), name, batch_size)
        values = {c: list(dataset[c]) for c in REF_COLUMNS}
        for c in REF_COLUMNS:  # positions within this very dataset: select() keeps the order of `todo`
            for j, i in enumerate(todo):
                values[c][i] = computed[c][j]
        dataset = dataset.remove_columns(present)
        for c in REF_COLUMNS:
            dataset = dataset.add_column(c, values[c])
        return dataset


# ----------------------------------------------------------------------------- output

def last_checkpoint(work):
    """The newest complete checkpoint in `work` (trainer_state.json is written last), or None."""
    if not os.path.isdir(work):
        return None
    steps = []
    for name in os.listdir(work):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isfile(os.path.join(work, name, "trainer_state.json")):
            steps.append(int(m.group(1)))
    return os.path.join(work, f"checkpoint-{max(steps)}") if steps else None


def plot_metrics(log_history, path):
    """loss.png: train/eval loss, reward accuracy and reward margin against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "DPO loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for ax, (key, title) in zip(axes, panels):
        for prefix, label in (("", "train"), ("eval_", "eval")):
            points = [(e["step"], e[prefix + key]) for e in log_history if prefix + key in e]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    with common.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def publish(tmp, out):
    """Rename the finished `tmp` folder onto `out`; a previous `out` (--overwrite) is removed only afterwards."""
    old = None
    if os.path.exists(out):
        old = f"{out}.tmp.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- main

def main(
    model: str,  # starting policy: HF model folder (or hub id); it is also the DPO reference
    pairs: str,  # JSONL of pairs: prompt, chosen, rejected (+ optional ref_chosen_logps, ref_rejected_logps)
    out: str,  # output model folder (published when complete); checkpoints go to OUT.work/
    beta: float = 0.1,  # DPO beta (paper 0.1)
    learning_rate: float = 5e-7,  # peak learning rate (paper 5e-7)
    lr_scheduler_type: str = "constant_with_warmup",  # any transformers scheduler name
    warmup_steps: int = 50,  # linear warmup steps (paper 50)
    max_steps: int = 300,  # optimizer steps (paper 300)
    per_device_train_batch_size: int = 1,  # pairs per device per micro-batch (paper 1)
    gradient_accumulation_steps: int = 4,  # micro-batches per step (paper 4; x 8 GPUs = 32 pairs a step)
    max_length: int = 4096,  # tokens of prompt + response; longer pairs truncated, prompts this long dropped (TRL)
    eval_size: int = 576,  # pairs held out (seeded) and evaluated every --eval_steps (paper 576); 0 = none
    eval_steps: int = 20,  # evaluate every N steps (paper 20)
    logging_steps: int = 20,  # log metrics every N steps (paper 20; the first step is always logged)
    save_steps: int = 100,  # checkpoint into OUT.work/ every N steps (paper 100)
    save_total_limit: int = 1,  # checkpoints kept in OUT.work/ (paper 1)
    bf16="auto",  # auto = bf16 on a CUDA device that supports it, fp32 elsewhere; or true/false
    seed: int = 42,  # seed of the eval split, data order and trainer
    reuse_ref_logps: bool = True,  # use the rows' ref_chosen_logps/ref_rejected_logps (no reference model)
    resume: bool = False,  # continue from the last complete checkpoint in OUT.work/ (fresh start if none)
    overwrite: bool = False,  # replace an existing --out (kept until the new one is complete)
    keep_checkpoints: bool = False,  # keep OUT.work/ after publishing --out
    trust_remote_code: bool = False,  # allow custom model code from the model folder
    **options,  # any other DPOConfig / TrainingArguments field, e.g. --gradient_checkpointing=False --report_to=wandb
):
    started = time.time()
    out = str(out).rstrip("/")
    beta = common.as_float("beta", beta, minimum=0)
    learning_rate = common.as_float("learning_rate", learning_rate, minimum=0)
    warmup_steps = common.as_int("warmup_steps", warmup_steps, minimum=0)
    max_steps = common.as_int("max_steps", max_steps, minimum=1)
    per_device_train_batch_size = common.as_int("per_device_train_batch_size", per_device_train_batch_size, minimum=1)
    gradient_accumulation_steps = common.as_int("gradient_accumulation_steps", gradient_accumulation_steps, minimum=1)
    max_length = common.as_int("max_length", max_length, minimum=2)
    eval_size = common.as_int("eval_size", eval_size, minimum=0)
    eval_steps = common.as_int("eval_steps", eval_steps, minimum=1)
    logging_steps = common.as_int("logging_steps", logging_steps, minimum=1)
    save_steps = common.as_int("save_steps", save_steps, minimum=1)
    save_total_limit = common.as_int("save_total_limit", save_total_limit, minimum=1)
    seed = common.as_int("seed", seed)
    reuse_ref_logps, resume, overwrite, keep_checkpoints, trust_remote_code = (
        common.as_bool(n, v) for n, v in (("reuse_ref_logps", reuse_ref_logps), ("resume", resume),
                                          ("overwrite", overwrite), ("keep_checkpoints", keep_checkpoints),
                                          ("trust_remote_code", trust_remote_code))
    )
    options = dpo_options(options)
    bf16 = False if options.get("fp16") else resolve_bf16(bf16)
    is_main = int(os.environ.get("RANK", "0")) == 0
    say = print if is_main else (lambda *a, **k: None)

    # Inputs are checked before anything heavy runs or anything is written.
    common.refuse_overwrite(out, overwrite)
    model = common.check_model_path(model)
    if not os.path.isfile(pairs):
        raise DiceError(f"pairs file not found: {pairs}")
    rows = read_pairs(pairs)
    train_rows, eval_rows = split_eval(rows, eval_size, seed)
    n_supplied = sum(r[REF_COLUMNS[0]] is not None for r in rows)
    uses_supplied = reuse_ref_logps and n_supplied > 0
    if uses_supplied and options.get("precompute_ref_log_probs") is False:
        raise DiceError(
            f"{pairs} has reference log-probs and --reuse_ref_logps is on, which needs precompute_ref_log_probs; "
            "pass --reuse_ref_logps=False to run a reference model at every step instead"
        )
    precompute = options.pop("precompute_ref_log_probs", True)

    work = f"{out}.work"
    checkpoint = last_checkpoint(work) if resume else None
    if not resume and last_checkpoint(work) and not overwrite:
        raise DiceError(f"{work} holds checkpoints of an earlier run: pass --resume to continue or --overwrite to restart")

    args = {
        "model": model, "pairs": os.path.abspath(pairs), "out": os.path.abspath(out), "beta": beta,
        "learning_rate": learning_rate, "lr_scheduler_type": lr_scheduler_type, "warmup_steps": warmup_steps,
        "max_steps": max_steps, "per_device_train_batch_size": per_device_train_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps, "max_length": max_length, "eval_size": eval_size,
        "eval_steps": eval_steps, "logging_steps": logging_steps, "save_steps": save_steps,
        "save_total_limit": save_total_limit, "bf16": bf16, "seed": seed, "reuse_ref_logps": reuse_ref_logps,
        "precompute_ref_log_probs": precompute, "resume": resume, "overwrite": overwrite,
        "keep_checkpoints": keep_checkpoints, "trust_remote_code": trust_remote_code, "options": options,
    }
    say("04_train_dpo: " + json.dumps(args, default=str))

    import torch
    from trl import DPOConfig

    config = dict(
        output_dir=work, beta=beta, learning_rate=learning_rate, lr_scheduler_type=lr_scheduler_type,
        warmup_steps=warmup_steps, max_steps=max_steps, per_device_train_batch_size=per_device_train_batch_size,
        per_device_eval_batch_size=1, gradient_accumulation_steps=gradient_accumulation_steps, max_length=max_length,
        eval_strategy="steps" if eval_rows else "no", eval_steps=eval_steps, logging_steps=logging_steps,
        logging_first_step=True, save_strategy="steps", save_steps=save_steps, save_total_limit=save_total_limit,
        bf16=bf16, seed=seed, precompute_ref_log_probs=precompute or uses_supplied,
        trust_remote_code=trust_remote_code, report_to="none",
    )
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        config["use_cpu"] = True  # several CPU processes (torchrun/accelerate): accelerate joins them (gloo) only so
    config.update(options)
    try:
        dpo_config = DPOConfig(**config)
    except (ValueError, TypeError) as e:
        raise DiceError(f"invalid training options: {str(e).splitlines()[0]}") from None

    # OUT.work/: a fresh run starts empty; a resumed run must have the same settings as the run it continues.
    record_path = os.path.join(work, "dice_args.json")
    fixed = {k: v for k, v in args.items() if k not in ("resume", "overwrite", "keep_checkpoints", "max_steps")}
    fixed = json.loads(json.dumps({**fixed, "pairs_sha256": sha256_file(pairs)}, default=str))
    if checkpoint is not None and os.path.isfile(record_path):
        with open(record_path, encoding="utf-8") as f:
            before = json.load(f)
        changed = sorted(k for k in set(before) | set(fixed) if before.get(k) != fixed.get(k))
        if changed:
            raise DiceError(f"--resume: {work} was started with other settings ({', '.join(changed)}); "
                            "pass the same ones, or --overwrite to restart")
    with dpo_config.main_process_first(desc="work folder"):
        if is_main:
            if checkpoint is None and os.path.exists(work):
                shutil.rmtree(work)
            common.write_json(record_path, fixed)
    if resume:
        say(f"resuming from {checkpoint}" if checkpoint else f"--resume: no checkpoint in {work}; starting from step 0")

    tokenizer = common.load_tokenizer(model, trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        raise DiceError(f"{model}: the tokenizer has no chat template (pairs are trained as chat turns, as TRL does)")
    policy = common.load_model(model, trust_remote_code=trust_remote_code)
    online_reference = not dpo_config.precompute_ref_log_probs
    reference = common.load_model(model, trust_remote_code=trust_remote_code) if online_reference else None
    if is_main:
        example = random.Random(seed).choice(train_rows)
        say(f"example pair ({pairs}:{example['line']}):")
        for key in ("prompt", "chosen", "rejected"):
            say(f"  {key}: {example[key][-1]['content'][:200]!r}")

    data = os.path.join(work, "data")
    with dpo_config.main_process_first(local=False, desc="datasets"):
        if is_main:
            shutil.rmtree(data, ignore_errors=True)
        train_dataset = to_dataset(train_rows, reuse_ref_logps, os.path.join(data, "train"))
        eval_dataset = to_dataset(eval_rows, reuse_ref_logps, os.path.join(data, "eval")) if eval_rows else None
    t0 = time.time()
    trainer = DiceDPOTrainer(
        model=policy,
        ref_model=reference,
        args=dpo_config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    prepare_seconds = time.time() - t0
    counts = {"pairs": len(rows), "train": len(train_rows), "eval": len(eval_rows)}
    for split, dataset, n in (("train", trainer.train_dataset, len(train_rows)), ("eval", trainer.eval_dataset, len(eval_rows))):
        if dataset is None:
            continue
        if len(dataset) == 0:
            raise DiceError(f"no {split} pair is left: TRL drops pairs whose prompt alone is >= max_length ({max_length}) tokens")
        lengths = zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])
        counts[f"{split}_dropped_long_prompt"] = n - len(dataset)
        counts[f"{split}_truncated"] = sum(len(p) + max(len(c), len(r)) > max_length for p, c, r in lengths)
    reference_logps = (
        "reference model forward at every step" if online_reference else trainer.ref_logps_counts
    )
    say(f"reference log-probs: {json.dumps(reference_logps)}; reference model in memory: {trainer.ref_model is not None}")
    say(f"counts: {json.dumps(counts)} (prepare {prepare_seconds:.1f} s)")

    result = trainer.train(resume_from_checkpoint=checkpoint)

    # Publish: save into a temporary folder, add the records, then rename it onto --out.
    tmp = f"{out}.tmp.incomplete"
    with dpo_config.main_process_first(desc="temporary output folder"):
        if is_main and os.path.exists(tmp):
            shutil.rmtree(tmp)
    trainer.save_model(tmp)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        training_args_bin = os.path.join(tmp, "training_args.bin")  # a pickle: replaced by training_args.json
        if os.path.exists(training_args_bin):
            os.remove(training_args_bin)
        common.write_json(os.path.join(tmp, "training_args.json"), dpo_config.to_dict())
        trainer.state.save_to_json(os.path.join(tmp, "trainer_state.json"))
        common.write_jsonl(os.path.join(tmp, "metrics.jsonl"), trainer.state.log_history)
        plot_metrics(trainer.state.log_history, os.path.join(tmp, "loss.png"))

        record = {
            "args": args, "counts": counts, "reference_logps": reference_logps,
            "reference_model_in_memory": trainer.ref_model is not None, "resumed_from": checkpoint,
            "processes": trainer.accelerator.num_processes,
            "prepare_seconds": round(prepare_seconds, 3), "train_runtime": result.metrics.get("train_runtime"),
            "train_loss": result.metrics.get("train_loss"), "global_step": trainer.state.global_step,
            "pairs_sha256": fixed["pairs_sha256"], "versions": common.package_versions("torch", "transformers", "trl"),
            "wall_seconds": round(time.time() - started, 3),
        }
        common.write_json(os.path.join(tmp, "dice_train.json"), record)
        marker = common.done_marker(out)
        if os.path.exists(marker):
            os.remove(marker)
        publish(tmp, out)
        common.write_json(marker, record)
        if not keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)
        last = [e for e in trainer.state.log_history if "loss" in e][-1:]
        evals = [e for e in trainer.state.log_history if "eval_loss" in e][-1:]
        print(f"wrote {out} ({trainer.state.global_step} steps, train_runtime {result.metrics.get('train_runtime')} s)")
        print(f"pairs: {json.dumps(counts)}")
        if last:
            print(f"last train log: loss {last[0]['loss']:.4f}, reward accuracy {last[0].get('rewards/accuracies')}")
        if evals:
            print(f"last eval: loss {evals[0]['eval_loss']:.4f}, reward accuracy {evals[0].get('eval_rewards/accuracies')}")
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    common.cli(main)
