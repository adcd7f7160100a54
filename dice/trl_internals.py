"""Every use of TRL's private internals, in one place, each checked against the TRL version below.

The stages compute log-probs exactly as TRL's DPOTrainer does, and stage 4 feeds it reference log-probs it already
has. Both reach past TRL's public API; tests/test_trl_internals.py fails when an installed TRL differs from
TRL_VERSION or when one of these internals moves, so a TRL upgrade is a deliberate act:
  - trl.trainer.utils.add_fused_lm_head, the model's `fused_lm_head=True` forward and its `log_probs` output: the
    chunked LM head TRL sums completion log-probs with (02's scoring uses it, so its numbers are TRL's);
  - trl.trainer.utils._use_triton: asked to say yes on every device, so the fused head projects only completion
    positions (02, faster on CPUs, same values);
  - DPOTrainer._precompute_ref_logps, trl.trainer.dpo_trainer.hash_module and DPOTrainer._precompute_model_hash:
    overridden / patched so that reference log-probs already in the dataset are used as they are (04).
"""
import contextlib
import functools
from unittest import mock

from dice import DiceError

TRL_VERSION = "1.16.0"  # the version every internal below was read from and tested against
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@contextlib.contextmanager
def completion_positions_only():
    """TRL's fused LM head projects only the completion positions where Triton runs (GPUs) and every position
    elsewhere, masking afterwards. Ask for the former on every device: the same per-token log-probs up to float
    rounding (the tests compare with TRL's own CPU path), about 10% faster on CPUs when most tokens are prompt. If
    the private switch moves in another TRL version, TRL's own choice stays (slower, equally exact)."""
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        yield
        return
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original


def batch_logps(model, seqs, pad_id, device, autocast_dtype=None):
    """Summed completion log-probs of sequences [(ids, completion_start)], one forward, computed the way TRL's
    DPOTrainer does (right padding, labels -100 outside the completion, TRL's fused LM head, sum over tokens)."""
    import torch

    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, (ids, start) in enumerate(seqs):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention_mask[b, : len(ids)] = 1
        completion_mask[b, start : len(ids)] = 1
    input_ids, attention_mask, completion_mask = (t.to(device) for t in (input_ids, attention_mask, completion_mask))
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    autocast = (torch.autocast(torch.device(device).type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast, completion_positions_only():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True,
                    use_cache=False)
        per_token = out.log_probs[:, -(width - 1):]
        return per_token.sum(dim=1).float().cpu().tolist()


def load_scorer(path, dtype, device, trust_remote_code):
    """A model ready for batch_logps: safe loading (models.load_model) plus TRL's fused LM head."""
    from trl.trainer.utils import add_fused_lm_head

    from dice import models

    model = models.load_model(path, dtype=dtype, trust_remote_code=trust_remote_code, device=device)
    add_fused_lm_head(model)
    return model


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


@functools.cache
def dice_dpo_trainer():
    """The DiceDPOTrainer class, built on first use: importing TRL takes seconds, and a finished rerun answers "done
    already" without it."""
    import trl.trainer.dpo_trainer as trl_dpo

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

    return DiceDPOTrainer
