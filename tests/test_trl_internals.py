"""Tests of dice/trl_internals.py: they FAIL when TRL (or the Trainer detail it relies on) changes under it.

First the pin: the installed TRL is TRL_VERSION, and every private internal the module touches is still there with the
shape it was read with (trl.trainer.utils._use_triton, add_fused_lm_head and the model's fused_lm_head/log_probs
forward, DPOTrainer._precompute_ref_logps's signature and cache file, trl.trainer.dpo_trainer.hash_module,
DPOTrainer._precompute_model_hash, the tokenized columns, the Trainer's checkpoint order). Then the behaviour of the
module's own functions on tiny offline models (CPU, seconds); 04's DiceDPOTrainer runs end to end in
tests/test_train_dpo.py.
"""
import inspect
import os

import pytest

from dice import DiceError, trl_internals

PAIRS = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
          "chosen": [{"role": "assistant", "content": f"It is {2 * i}."}],
          "rejected": [{"role": "assistant", "content": "The sky is blue."}]} for i in range(4)]


# ----------------------------------------------------------------------------- the pin

def test_installed_trl_is_the_pinned_version():
    import trl

    assert trl.__version__ == trl_internals.TRL_VERSION, (
        f"TRL {trl.__version__} is installed, dice/trl_internals.py was checked against {trl_internals.TRL_VERSION}: "
        "re-read every internal listed in its docstring, then update TRL_VERSION")


def test_use_triton_is_a_switch_of_trl_trainer_utils_taking_a_device():
    import torch
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    assert list(inspect.signature(original).parameters) == ["device"]
    assert original(torch.device("cpu")) is False  # CPUs: TRL projects every position (hence the switch)
    assert "_use_triton(hidden_states.device)" in inspect.getsource(trl_utils.add_fused_lm_head)
    with trl_internals.completion_positions_only():
        assert trl_utils._use_triton(torch.device("cpu")) is True
    assert trl_utils._use_triton is original


def test_fused_lm_head_forward_returns_per_token_log_probs(tiny_policy):
    """add_fused_lm_head, then model(..., labels, fused_lm_head=True).log_probs: (batch, seq - 1), zero where the label
    is -100, equal to a plain log-softmax of the logits (fp32, up to the chunked log-sum-exp's rounding)."""
    import torch
    from trl.trainer.utils import add_fused_lm_head

    assert list(inspect.signature(add_fused_lm_head).parameters)[:1] == ["model"]
    model = trl_internals.load_scorer(tiny_policy, "float32", "cpu", trust_remote_code=False)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3], [8, 9, 10, 11, 0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # the prompt
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert out.log_probs.shape == (2, 5)
    plain = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    plain = plain.masked_fill(labels[:, 1:] == -100, 0)
    assert torch.allclose(out.log_probs, plain, atol=1e-5)
    sums = trl_internals.batch_logps(model, [([5, 17, 42, 99, 7, 3], 2), ([8, 9, 10, 11], 2)], 0, "cpu")
    assert sums == pytest.approx(plain.sum(1).tolist(), abs=1e-5)


def test_dpo_trainer_internals_have_the_shape_they_were_read_with():
    import trl.trainer.dpo_trainer as trl_dpo
    from transformers import Trainer

    DPOTrainer = trl_dpo.DPOTrainer
    assert list(inspect.signature(DPOTrainer._precompute_ref_logps).parameters) == ["self", "dataset", "name",
                                                                                   "batch_size"]
    precompute = inspect.getsource(DPOTrainer._precompute_ref_logps)
    assert "self._precompute_model_hash" in precompute  # the cache key the subclass fills in when it precomputes
    assert "dataset._get_cache_file_path(" in precompute  # the cache beside the dataset's files (to_dataset)
    init = inspect.getsource(DPOTrainer.__init__)
    assert "self._precompute_model_hash = (" in init and "hash_module(" in init  # patched in DiceDPOTrainer.__init__
    assert "self._precompute_ref_logps(" in init
    assert list(inspect.signature(trl_dpo.hash_module).parameters) == ["module"]
    assert callable(DPOTrainer.compute_ref_log_probs)
    save = inspect.getsource(Trainer._save_checkpoint)  # latest_checkpoint: trainer_state.json is written last
    assert save.index("self.save_model(") < save.index("self._save_optimizer_and_scheduler(") \
        < save.index("self.state.save_to_json(")
    fields = trl_internals.dpo_config_fields()
    assert {"beta", "max_length", "precompute_ref_log_probs", "precompute_ref_batch_size", "loss_type",
            "output_dir", "resume"} <= set(fields)
    assert "resume" not in trl_internals.dpo_config_fields(reserved=False)


def test_dice_trainer_hashes_nothing_and_keeps_supplied_values(tiny_policy, tmp_path, monkeypatch):
    """A DiceDPOTrainer on rows that all carry values: TRL's tokenized columns are there, no precompute, the values as
    given; without them TRL's precompute runs. Neither hashes the weights (the cache lives in the run's own folder)."""
    import trl.trainer.dpo_trainer as trl_dpo
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{**p, "ref_chosen_logps": -1.0 - i, "ref_rejected_logps": -2.0 - i, "source": None, "where": str(i)}
            for i, p in enumerate(PAIRS)]
    hashed = []
    monkeypatch.setattr(trl_dpo, "hash_module", lambda module: hashed.append(1) or "h")
    config = trl_internals.dpo_config({}, output_dir=str(tmp_path / "w"), report_to="none", bf16="auto",
                                      precompute_ref_log_probs=True, per_device_train_batch_size=2)
    assert config.bf16 is False  # auto: no CUDA here

    def trainer(reuse, name):
        data = trl_internals.to_dataset(rows, reuse, str(tmp_path / name))
        return trl_internals.dice_dpo_trainer()(model=AutoModelForCausalLM.from_pretrained(tiny_policy), args=config,
                                                train_dataset=data, processing_class=AutoTokenizer.from_pretrained(
                                                    tiny_policy))

    supplied = trainer(True, "supplied")
    assert set(trl_internals.TOKENIZED_COLUMNS) <= set(supplied.train_dataset.column_names)
    assert supplied.train_dataset["ref_chosen_logps"] == [-1.0, -2.0, -3.0, -4.0]
    assert supplied.ref_logps_counts == {"train": {"supplied": 4, "computed": 0}}
    computed = trainer(False, "computed")
    assert computed.ref_logps_counts == {"train": {"supplied": 0, "computed": 4}}
    assert hashed == [] and supplied._precompute_model_hash is None and computed._precompute_model_hash is None
    assert all(v < 0 for v in computed.train_dataset["ref_chosen_logps"])
    counts = trl_internals.preparation(supplied, 4, 4, 0, started=0)
    assert counts["counts"] == {"pairs": 4, "train": 4, "eval": 0, "train_dropped_long_prompt": 0,
                                "train_truncated": 0}
    assert counts["reference_model_in_memory"] is False


# ----------------------------------------------------------------------------- the module's own functions

def test_dpo_options_are_typed_by_hfargumentparser_with_one_line_errors():
    """Values as fire hands them over (strings, numbers, bools, a tuple for 1,2, a dict) typed by transformers'
    HfArgumentParser on DPOConfig; errors are DiceErrors, never argparse's usage text and exit."""
    got = trl_internals.dpo_options({
        "loss_type": ("sigmoid", "ipo"), "gradient_checkpointing": "False", "weight_decay": 0, "max_grad_norm": 2,
        "save_only_model": True, "report_to": "wandb", "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "precompute_ref_batch_size": 8, "loss_weights": (1, 2), "lr_scheduler_type": "cosine"})
    assert got == {"loss_type": ["sigmoid", "ipo"], "gradient_checkpointing": False, "weight_decay": 0.0,
                   "max_grad_norm": 2.0, "save_only_model": True, "report_to": "wandb",
                   "gradient_checkpointing_kwargs": '{"use_reentrant": false}',
                   "precompute_ref_batch_size": 8, "loss_weights": [1.0, 2.0], "lr_scheduler_type": "cosine"}
    from trl import DPOConfig

    config = DPOConfig(output_dir="unused", bf16=False, **got)  # DPOConfig itself reads the dict field's JSON
    assert config.gradient_checkpointing_kwargs == {"use_reentrant": False} and config.loss_weights == [1.0, 2.0]
    with pytest.raises(DiceError, match=r"unknown option --lerning_rate.*did you mean --learning_rate"):
        trl_internals.dpo_options({"lerning_rate": 1e-6})
    with pytest.raises(DiceError, match=r"invalid training option: argument --max_grad_norm.*invalid float value"):
        trl_internals.dpo_options({"max_grad_norm": "big"})
    with pytest.raises(DiceError, match=r"invalid training option: .*--save_only_model.*Truthy value expected"):
        trl_internals.dpo_options({"save_only_model": "maybe"})
    with pytest.raises(DiceError, match=r"invalid choice: 'constnt'"):
        trl_internals.dpo_options({"lr_scheduler_type": "constnt"})
    with pytest.raises(DiceError, match=r"^--output_dir is not accepted: checkpoints go to OUT.work/"):
        trl_internals.dpo_options({"output_dir": "x"})


def test_dpo_config_errors_are_one_line():
    with pytest.raises(DiceError, match=r"^invalid training options: "):
        trl_internals.dpo_config({"lr_scheduler_type": "constnt"}, output_dir="unused", bf16=False)


def test_rows_needing_ref_logps_flags_missing_and_truncated():
    from datasets import Dataset

    ref = {"ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}
    none = dict.fromkeys(ref)
    ds = Dataset.from_list([
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5], **ref},
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4], **none},
        {"prompt_ids": [1, 2], "chosen_ids": [3, 3, 3], "rejected_ids": [4], **ref},
    ])
    assert trl_internals.rows_needing_ref_logps(ds, max_length=4) == [1, 2]  # row 2: 2 + 3 tokens > 4, truncated
    assert trl_internals.rows_needing_ref_logps(ds, max_length=None) == [1]
    no_values = ds.remove_columns(list(trl_internals.REF_COLUMNS))
    assert trl_internals.rows_needing_ref_logps(no_values, max_length=None) == [0, 1, 2]


def test_latest_checkpoint_skips_and_removes_incomplete_ones(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    assert trl_internals.latest_checkpoint(str(tmp_path / "none")) is None
    for step, complete in ((2, True), (10, True), (12, False)):
        os.makedirs(tmp_path / f"checkpoint-{step}")
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-12")  # transformers alone takes the cut one
    assert trl_internals.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-2"]
