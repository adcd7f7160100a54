"""TRL as the stages drive it: every use of its private internals is here, each marked `TRL 1.16.0 internal`.

tests/test_trl_internals.py fails when the installed TRL is not TRL_VERSION or one of these internals moved, so a TRL
upgrade is a deliberate act: re-read each of them.
  - trl.trainer.utils.add_fused_lm_head, the model's `fused_lm_head=True` forward and its `log_probs`: 02's log-probs
    are TRL's (batch_logps, load_scorer); trl.trainer.utils._use_triton, made to say yes on every device so that the
    head projects only completion positions (completion_positions_only: faster on CPUs, same values);
  - DPOTrainer._precompute_ref_logps(dataset, name, batch_size), overridden to keep the reference log-probs a dataset
    has, its cache beside the dataset's files (hence to_dataset), trl.trainer.dpo_trainer.hash_module, patched while
    __init__ sets _precompute_model_hash, and the tokenized columns (TOKENIZED_COLUMNS): 04's DiceDPOTrainer;
  - transformers' Trainer writes a checkpoint's trainer_state.json last (latest_checkpoint, work_folder).
04's command line meets DPOConfig here too (dpo_config_fields, dpo_options, dpo_config).
"""
import contextlib
import functools
import json
import os
import shutil
import time
from unittest import mock

from dice import DiceError

TRL_VERSION = "1.16.0"  # the version every internal below was read from and tested against
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")  # TRL 1.16.0 internal: DPOTrainer's tokenized rows


# ----------------------------------------------------------------------------- 02: TRL's log-probs

def completion_positions_only():
    """A context in which TRL's fused LM head projects only the completion positions on every device, as it does where
    Triton runs (GPUs), not every position then masking (elsewhere): the same per-token log-probs up to float rounding
    (the tests compare with TRL's own CPU path), about 10% faster on CPUs when most tokens are prompt."""
    import trl.trainer.utils as trl_utils

    # TRL 1.16.0 internal: _use_triton(device) -> bool
    return mock.patch.object(trl_utils, "_use_triton", lambda device: True)


def batch_logps(model, seqs, pad_id, device, autocast_dtype=None):
    """Summed completion log-probs of sequences [(ids, completion_start)], one forward, computed the way TRL's
    DPOTrainer does (right padding, labels -100 outside the completion, TRL's fused LM head, sum over tokens)."""
    import torch

    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for b, (ids, start) in enumerate(seqs):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention_mask[b, : len(ids)] = 1
        labels[b, start : len(ids)] = torch.tensor(ids[start:])
    input_ids, attention_mask, labels = (t.to(device) for t in (input_ids, attention_mask, labels))
    autocast = (torch.autocast(torch.device(device).type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast, completion_positions_only():  # TRL 1.16.0 internal: the fused head
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                    use_cache=False)
        per_token = out.log_probs[:, -(width - 1):]
        return per_token.sum(dim=1).float().cpu().tolist()


def load_scorer(path, dtype, device, trust_remote_code, attn_implementation=None):
    """A model ready for batch_logps: safe loading (models.load_model) plus TRL's fused LM head."""
    from trl.trainer.utils import add_fused_lm_head  # TRL 1.16.0 internal (not exported by `trl`)

    from dice import models

    model = models.load_model(path, dtype=dtype, trust_remote_code=trust_remote_code, device=device,
                              attn_implementation=attn_implementation)
    add_fused_lm_head(model)
    return model


# ----------------------------------------------------------------------------- 04: DPOConfig from the command line

# DPOConfig fields 04 owns (as extra options they would fight with its own flags), and the --resume of old versions.
RESERVED_OPTIONS = {
    "output_dir": "checkpoints go to OUT.work/ beside --out",
    "resume_from_checkpoint": "a stopped run resumes by itself when rerun with the same arguments",
    "resume": "a stopped run resumes by itself when rerun with the same arguments",
    "model_init_kwargs": "the model is loaded by this script (safetensors only)",
    **dict.fromkeys(("hub_strategy", "hub_always_push", "hub_revision"),
                    "--push_to_hub uploads the published folder once it is complete (to --hub_model_id)"),
    "hub_token": "log in with `hf auth login` or set HF_TOKEN (--push_to_hub uses huggingface_hub's upload_folder)",
}


def dpo_config_fields(reserved=True):
    """DPOConfig's field names and the reserved ones: cli.run's extra_flags (imports TRL: called only when needed)."""
    import dataclasses

    from trl import DPOConfig

    return [f.name for f in dataclasses.fields(DPOConfig) if f.init] + (list(RESERVED_OPTIONS) if reserved else [])


def dpo_options(options):
    """The extra options (as fire parsed them) typed as DPOConfig fields by transformers' HfArgumentParser, the parser
    of TRL's own scripts; a reserved or unknown name or a bad value is one line."""
    import argparse
    import difflib

    from transformers import HfArgumentParser
    from trl import DPOConfig

    names, strings = dpo_config_fields(reserved=False), []
    for name, value in options.items():
        if name in RESERVED_OPTIONS:
            raise DiceError(f"--{name} is not accepted: {RESERVED_OPTIONS[name]}")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            raise DiceError(f"unknown option --{name}: neither an argument of 04_train_dpo.py nor a DPOConfig field"
                            + (f" (did you mean --{close[0]}?)" if close else ""))
        values = value if isinstance(value, (list, tuple)) else [value]  # fire reads 1,2 as a tuple: a list field
        strings += [f"--{name}", *(json.dumps(v) if isinstance(v, dict) else str(v) for v in values)]
    try:  # a one-line error, not argparse's usage text and exit
        parsed = vars(HfArgumentParser(DPOConfig, exit_on_error=False).parse_args(strings))
    except argparse.ArgumentError as e:
        raise DiceError(f"invalid training option: {e}") from None
    return {name: parsed[name] for name in options}


def dpo_config(extra, **fields):
    """DPOConfig(**fields) with the extra options (dpo_options) over them; a bad value is one line. bf16 "auto" = under
    DeepSpeed the launcher's mixed precision (transformers stops at train() when they differ), else bf16 on a CUDA
    device that supports it, fp32 elsewhere (never with fp16). Processes without a GPU (torchrun, accelerate launch)
    form one DDP or DeepSpeed run (gloo) only with use_cpu, else each would train alone on all the data."""
    import torch
    from trl import DPOConfig

    fields = {**fields, **extra}
    if fields.get("fp16"):
        fields["bf16"] = False
    elif fields["bf16"] == "auto" and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":  # accelerate launch
        fields["bf16"] = os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16"  # e.g. the paper's config on CPUs
    elif fields["bf16"] == "auto":
        fields["bf16"] = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fields.setdefault("use_cpu", True)
    try:
        return DPOConfig(**fields)
    except (ValueError, TypeError) as e:
        raise DiceError(f"invalid training options: {str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- 04: DPOTrainer with supplied log-probs

def to_dataset(rows, reuse_ref_logps, folder, main_process=True):
    """The rows as a datasets.Dataset written to `folder` by the main process (anew) and loaded back by every process,
    the reference columns only where they will be used; None for no rows. On disk because TRL's precompute caches
    beside the dataset's files, where every process reads it (an in-memory dataset's cache is per process)."""
    from datasets import Dataset, load_from_disk

    if not rows:
        return None
    keep = ["prompt", "chosen", "rejected"]
    if reuse_ref_logps and any(r[REF_COLUMNS[0]] is not None for r in rows):
        keep += list(REF_COLUMNS)
    if main_process:  # TRL 1.16.0 internal: _precompute_ref_logps caches at dataset._get_cache_file_path(...)
        shutil.rmtree(folder, ignore_errors=True)  # a resumed run's rows are written again
        Dataset.from_list([{k: r[k] for k in keep} for r in rows]).save_to_disk(folder)
    return load_from_disk(folder)


def truncated(dataset, max_length):
    """Indices of the tokenized rows that training truncates: prompt + the longer response > max_length tokens."""
    if max_length is None:
        return []
    lengths = zip(*(dataset[c] for c in TOKENIZED_COLUMNS))
    return [i for i, (p, c, r) in enumerate(lengths) if len(p) + max(len(c), len(r)) > max_length]


def rows_needing_ref_logps(dataset, max_length):
    """Indices of tokenized rows whose reference log-probs must be computed: no supplied value, or truncated (the
    supplied value covers the whole response, the training loss only the kept part)."""
    cut = set(truncated(dataset, max_length))
    supplied = dataset[REF_COLUMNS[0]] if REF_COLUMNS[0] in dataset.column_names else [None] * len(dataset)
    return [i for i, value in enumerate(supplied) if value is None or i in cut]


@functools.cache
def dice_dpo_trainer():
    """The DiceDPOTrainer class, built on first use (importing TRL takes seconds; a "done already" rerun needs none)."""
    import trl.trainer.dpo_trainer as trl_dpo

    class DiceDPOTrainer(trl_dpo.DPOTrainer):
        """TRL's DPOTrainer, except that reference log-probs already in the dataset are used as they are.

        TRL reads `ref_chosen_logps`/`ref_rejected_logps` from the batch only with precompute_ref_log_probs=True, when
        its __init__ recomputes every row (`_precompute_ref_logps`, which fails on existing columns): here only the rows
        that lack values or that training truncates. TRL's hash of every weight (the model half of its precompute cache
        key) is skipped: 04's datasets are written anew in the run's own folder, so the cache there is this run's."""

        def _prepare_inputs(self, inputs):
            # transformers 5.19.0 internal: Trainer._prepare_input casts a DeepSpeed batch's float tensors to bf16,
            # which rounds the reference log-probs (sums of hundreds of nats) by up to 8 nats: they stay fp32
            refs = {k: inputs.pop(k) for k in REF_COLUMNS if k in inputs}
            inputs = super()._prepare_inputs(inputs)
            inputs.update({k: v.to(self.args.device) for k, v in refs.items()})
            return inputs

        def __init__(self, *args, **kwargs):
            self.ref_logps_counts = {}
            # TRL 1.16.0 internal: __init__ sets _precompute_model_hash = hash_module(model) (every weight, hashed)
            with mock.patch.object(trl_dpo, "hash_module", lambda module: None):
                super().__init__(*args, **kwargs)

        def _precompute_ref_logps(self, dataset, name, batch_size):  # TRL 1.16.0 internal, same signature
            todo = rows_needing_ref_logps(dataset, self.args.max_length)
            self.ref_logps_counts[name] = {"supplied": len(dataset) - len(todo), "computed": len(todo)}
            if not todo:
                return dataset
            present = [c for c in REF_COLUMNS if c in dataset.column_names]
            if len(todo) == len(dataset):  # TRL's own precompute, as it is
                return super()._precompute_ref_logps(dataset.remove_columns(present), name, batch_size)
            computed = super()._precompute_ref_logps(dataset.select(todo).remove_columns(present), name, batch_size)
            for c in REF_COLUMNS:  # select() kept the order of `todo`
                values = list(dataset[c])
                for i, value in zip(todo, computed[c]):
                    values[i] = value
                dataset = dataset.remove_columns(c).add_column(c, values)
            return dataset

    return DiceDPOTrainer


def preparation(trainer, n_pairs, n_train, n_eval, started):
    """For the record: pairs read, held out, dropped by TRL (prompt alone >= max_length) and truncated per split;
    where the reference log-probs come from; whether a reference model is held; seconds since `started`."""
    max_length, counts = trainer.args.max_length, {"pairs": n_pairs, "train": n_train, "eval": n_eval}
    for split, dataset, n in (("train", trainer.train_dataset, n_train), ("eval", trainer.eval_dataset, n_eval)):
        if dataset is None:
            continue
        if len(dataset) == 0:
            raise DiceError(f"no {split} pair is left: TRL drops pairs whose prompt alone is >= max_length "
                            f"({max_length}) tokens")
        counts[f"{split}_dropped_long_prompt"] = n - len(dataset)
        counts[f"{split}_truncated"] = len(truncated(dataset, max_length))
    online = not trainer.args.precompute_ref_log_probs
    return {"counts": counts, "reference_model_in_memory": trainer.ref_model is not None,
            "reference_logps": "reference model forward at every step" if online else trainer.ref_logps_counts,
            "prepare_seconds": round(time.time() - started, 3)}


@contextlib.contextmanager
def work_folder(st):
    """OUT.work/, the Trainer's output_dir (checkpoints, the datasets, TensorBoard's runs/), which `st.work` resumes or
    starts. A run that fails before its first complete checkpoint removes the folder it made: nothing to resume."""
    work = st.out + ".work"
    made = not os.path.lexists(work)
    try:
        yield work
    except BaseException:
        if st.main and made and latest_checkpoint(work, main_process=False) is None:
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(work + ".args.json")
        raise


def latest_checkpoint(work, main_process=True):
    """The newest complete checkpoint in `work` (transformers' get_last_checkpoint), or None. The trainer writes
    trainer_state.json last: a checkpoint without it was cut off by a kill and is removed first (main process)."""
    from transformers.trainer_utils import get_last_checkpoint

    # transformers 5.19 internal (Trainer._save_checkpoint): model, optimizer, RNG state, then trainer_state.json
    if not os.path.isdir(work):
        return None
    for name in os.listdir(work):
        folder = os.path.join(work, name)
        if main_process and name.startswith("checkpoint-") and not os.path.exists(f"{folder}/trainer_state.json"):
            shutil.rmtree(folder)
    return get_last_checkpoint(work)
