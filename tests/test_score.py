"""02_score.py: the log-probs are TRL 1.16 DPOTrainer's own (computed by TRL in the test), the paper's validity rule,
bad input, and one merged output from several processes."""
import json
import math
import os
import re
import shutil

import pytest

from conftest import ROOT, load_script, run_script
from dice import DiceError, models, protocol, scoring, trl_internals

score = load_script("02_score")

# A ChatML variant whose generation prompt ends in a space: the prompt's last token (" ") merges with a response that
# starts with a letter (" reward" is one token), so the response starts before the prompt's end (as with Llama-2's
# "[/INST] "); a response starting with "\n" does not merge.
SPACE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}"
)

PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris is the capital of France.", "rejected": "Bread."},
    {"prompt": "Write a short poem about the sea.", "chosen": "The sea is blue, the sky is blue.\nThe fox is quick.",
     "rejected": "A language model assigns a probability to every sequence.", "id": 7},
    {"prompt": "List three uses of a paperclip.", "chosen": "1. hold paper 2. reset 3. pick a lock",
     "rejected": "reward"},
    {"prompt": "Explain why the sky is blue. " * 6, "chosen": "Light scatters.", "rejected": "Because it is."},
    {"prompt": "Hello, how are you today?", "chosen": "\nFine, thank you.",
     "rejected": "reward is beta times the log ratio"},
]


def tol(x):  # tighter than the 1e-3 + 1e-6*|logp|: on these tiny fp32 models TRL and 02 agree to float noise
    return 1e-4 + 1e-6 * abs(x)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def with_template(src, dst, template):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "chat_template.jinja"), "w") as f:
        f.write(template)
    return str(dst)


@pytest.fixture(scope="module")
def space_models(tiny_policy, tiny_reference, tmp_path_factory):
    base = tmp_path_factory.mktemp("space")
    return (with_template(tiny_policy, base / "policy", SPACE_TEMPLATE),
            with_template(tiny_reference, base / "reference", SPACE_TEMPLATE))


TEMPLATES = {name: os.path.join(ROOT, "configs", "templates", f"{name}-dice.jinja") for name in ("zephyr", "llama3")}


def tiny_model_with(tok, out, seed):
    """A tiny random Llama (as tools/tiny_model.py builds) around the tokenizer `tok`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def dice_models(tmp_path_factory):
    """{"zephyr"|"llama3": (policy, reference)}: tiny models whose tokenizers have the real models' special tokens
    (zephyr-7b-beta: <s>, </s> = EOS; Llama-3 base SFT: <|begin_of_text|>, <|eot_id|>, <|end_of_text|> = EOS) and
    a ChatML template of their own, so only --chat_template can render the official formats."""
    from test_templates import make_tokenizer

    base = tmp_path_factory.mktemp("dice")
    return {name: tuple(tiny_model_with(make_tokenizer(f"{name}-custom"), base / f"{name}_{who}", seed)
                        for who, seed in (("policy", 1), ("reference", 2))) for name in TEMPLATES}


def trl_logps(model_dir, rows, max_length, truncation_mode="keep_start", chat_template=None):
    """TRL's own numbers: DPOTrainer with precompute_ref_log_probs=True and no ref_model computes the log-probs of
    `model` itself for every conversational pair (fp32, bf16=False); `chat_template` (a file) replaces the tokenizer's
    template in its processing_class. Returns {row index: (chosen, rejected)}; rows TRL drops are missing."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if chat_template:
        with open(chat_template) as f:
            tok.chat_template = f.read()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}], "idx": i} for i, r in enumerate(rows)])
    with tempfile.TemporaryDirectory() as d:
        args = DPOConfig(output_dir=d, report_to="none", bf16=False, use_cpu=True, precompute_ref_log_probs=True,
                         max_length=max_length, truncation_mode=truncation_mode, per_device_train_batch_size=2,
                         remove_unused_columns=False)
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        return {r["idx"]: (r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in trainer.train_dataset}


def run_main(tmp_path, policy, reference, rows, mode="pairs", name="out.jsonl", src=None, **kw):
    """Score `rows` (or the prepared input `src`) into tmp_path/name; returns (output rows, done marker)."""
    src = src or write_jsonl(tmp_path / f"in_{name}", rows)
    out = str(tmp_path / name)
    score.main(policy=policy, reference=reference, out=out, **{mode: src}, **kw)
    return read_jsonl(out), json.load(open(out + ".done.json"))


# ----------------------------------------------------------------------------- pure functions

def test_is_valid_is_the_paper_filter():
    # paper code: keep stop_reason != 'length' and 3 < len(response) < 6700
    assert not score.is_valid("abc", "stop") and score.is_valid("abcd", "stop")
    assert score.is_valid("x" * 6699, "stop") and not score.is_valid("x" * 6700, "stop")
    assert not score.is_valid("a fine answer", "length")
    assert not score.is_valid("abcdef", "stop", min_chars=6) and score.is_valid("abcdef", "stop", max_chars=7)


def test_truncate_matches_trl_collator():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    prompt, chosen, rejected = [1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11]
    for mode in ("keep_start", "keep_end"):
        batch = DataCollatorForPreference(pad_token_id=0, max_length=7, truncation_mode=mode)(
            [{"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}])
        for b, completion in enumerate((chosen, rejected)):
            ids, start, cut = scoring.truncate(prompt + completion, len(prompt), 7, mode)
            n = len(ids)
            assert batch["input_ids"][b, :n].tolist() == ids and batch["attention_mask"][b].sum() == n
            assert batch["completion_mask"][b, :n].tolist() == [0] * start + [1] * (n - start)
            assert cut == (len(prompt + completion) > 7)
    assert scoring.truncate([1, 2, 3, 4, 5], 4, 4, "keep_start") is None  # prompt fills max_length: TRL drops the row
    assert scoring.truncate([1, 2, 3, 4, 5], 4, 4, "keep_end") == ([2, 3, 4, 5], 3, True)


def test_completion_positions_switch_is_scoped():
    import torch
    import trl.trainer.utils

    with trl_internals.completion_positions_only():  # the switch exists in the pinned TRL: the fast path is taken
        assert trl.trainer.utils._use_triton(torch.device("cpu")) is True
    assert trl.trainer.utils._use_triton(torch.device("cpu")) is False


def test_batches_cover_every_sequence_once_within_the_budget():
    lengths = [5, 300, 17, 17, 120, 9, 64, 64, 64, 1000, 2]
    batches = scoring.make_batches(lengths, 256)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 256
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)  # sorted by length: little padding
    owners = scoring.assign_batches(batches, lengths, 3)
    assert set(owners) == {0, 1, 2} and scoring.assign_batches(batches, lengths, 1) == [0] * len(batches)


def test_tokenization_is_trls(tiny_policy, space_models):
    """Prompt/completion split and ids equal TRL's _prepare_dataset (including a merge across the boundary and a
    dropped row), for both the tiny ChatML template and the space-ended one."""
    from types import SimpleNamespace

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    merges = 0
    for model_dir in (tiny_policy, space_models[0]):
        tok = AutoTokenizer.from_pretrained(model_dir)
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                 "rejected": [{"role": "assistant", "content": r["rejected"]}], "idx": i}
                                for i, r in enumerate(PAIRS)])
        args = SimpleNamespace(dataset_num_proc=None, max_length=40, truncation_mode="keep_start")
        prepared = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), ds, tok, args, "train")
        trl_rows = {r["idx"]: r for r in prepared}
        for i, row in enumerate(PAIRS):
            seqs, starts, counts = scoring.tokenize_row(tok, row, "pairs", None, "keep_start")
            merges += counts["boundary_merges"]
            (c_ids, c_start), (r_ids, r_start) = seqs
            _, _, cut = scoring.tokenize_row(tok, row, "pairs", 40, "keep_start")
            if i not in trl_rows:  # TRL dropped it: its prompt alone fills max_length
                assert cut["prompt_too_long"] == 2
                continue
            t = trl_rows[i]
            assert c_start == r_start == starts[0] == starts[1] == len(t["prompt_ids"])
            assert c_ids == t["prompt_ids"] + t["chosen_ids"] and r_ids == t["prompt_ids"] + t["rejected_ids"]
    assert merges > 0  # the merge case really happened


# ----------------------------------------------------------------------------- log-probs equal TRL's

@pytest.mark.parametrize("case", ["chatml", "merge", "truncate_keep_start", "truncate_keep_end"])
def test_pairs_equal_trl(case, tiny_policy, tiny_reference, space_models, tmp_path):
    policy, reference = space_models if case == "merge" else (tiny_policy, tiny_reference)
    max_length = 40 if case.startswith("truncate") else 512
    mode = "keep_end" if case.endswith("keep_end") else "keep_start"
    rows, done = run_main(tmp_path, policy, reference, PAIRS, max_length=max_length, truncation_mode=mode,
                          batch_tokens=64)
    import torch
    import trl.trainer.utils

    # 02 scored on TRL's completion-positions-only path and gave the switch back: TRL below runs its own CPU path
    assert trl.trainer.utils._use_triton(torch.device("cpu")) is False
    expect = {who: trl_logps(model, PAIRS, max_length, mode) for who, model in (("policy", policy),
                                                                                 ("reference", reference))}
    counts = done["counts"]
    if case == "merge":
        assert counts["boundary_merges"] > 0 and counts["rows_with_split_mismatch"] > 0
    if case.startswith("truncate"):
        assert counts["truncated"] > 0
    if case == "truncate_keep_start":
        assert counts["prompt_too_long"] == 2 and len(expect["policy"]) == len(PAIRS) - 1
    correct = 0
    for i, row in enumerate(rows):
        assert {k: row[k] for k in PAIRS[i]} == PAIRS[i]  # input fields kept, order kept
        if i not in expect["policy"]:
            assert row["policy_chosen_logps"] == row["reference_rejected_logps"] == 0.0
            continue
        for who in ("policy", "reference"):
            for j, side in enumerate(("chosen", "rejected")):
                got, want = row[f"{who}_{side}_logps"], expect[who][i][j]
                assert abs(got - want) <= tol(want), (case, i, who, side, got, want)
        assert row["chosen_reward"] == row["policy_chosen_logps"] - row["reference_chosen_logps"]
        correct += row["chosen_reward"] > row["rejected_reward"]
    assert done["accuracy"] == correct / len(expect["policy"])


def responses_rows():
    resp = [["Paris is the capital of France.", "Bread.", "The sky is blue."],
            ["A poem: the sea is blue.", "no", "Direct preference optimization trains a policy."],
            ["\nWhat is the capital of France?", "reward", "Give me a recipe for pancakes: flour, milk, eggs."]]
    reasons = [["stop", "stop", "length"], ["stop", "stop", "stop"], ["stop", "stop", "stop"]]
    return [{"prompt_id": f"p{i}", "prompt": p, "responses": r, "finish_reasons": f, "num_tokens": [1] * 3,
             "generator": "tiny"}
            for i, (p, r, f) in enumerate(zip(["What is the capital of France?", "Write a short poem about the sea.",
                                               "Hello, how are you today?"], resp, reasons))]


@pytest.mark.parametrize("template", ["chatml", "space"])
def test_responses_equal_trl(template, tiny_policy, tiny_reference, space_models, tmp_path):
    policy, reference = space_models if template == "space" else (tiny_policy, tiny_reference)
    rows_in = responses_rows()
    rows, done = run_main(tmp_path, policy, reference, rows_in, mode="responses", chunk_rows=2, batch_tokens=50)
    # every response as the chosen side of a TRL pair with a partner that splits where it does (TRL's split of a pair
    # is the shorter common prefix of the tokenized prompt and each prompt+response)
    from transformers import AutoTokenizer
    from trl.data_utils import common_prefix_length

    tok = AutoTokenizer.from_pretrained(policy)
    pairs, where, merges, mismatched, all_splits, split_pairs = [], [], 0, 0, [], []
    for i, r in enumerate(rows_in):
        prompt = [{"role": "user", "content": r["prompt"]}]
        prompt_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        splits = [common_prefix_length(prompt_ids["input_ids"], tok.apply_chat_template(
            prompt + [{"role": "assistant", "content": x}], tokenize=True, return_dict=True)["input_ids"])
            for x in r["responses"]]
        merges += sum(s < len(prompt_ids["input_ids"]) for s in splits)
        mismatched += len(set(splits)) > 1
        all_splits.append(splits)
        late = [k for k, s in enumerate(splits) if s == max(splits)]
        early = [k for k, s in enumerate(splits) if s < max(splits)]
        if early:  # a pair whose two responses split at different tokens: TRL splits both at the earlier one
            split_pairs.append((i, late[0], {"prompt": r["prompt"], "chosen": r["responses"][late[0]],
                                             "rejected": r["responses"][early[0]]}))
        for k, resp in enumerate(r["responses"]):
            partner = [x for x, s in zip(r["responses"], splits) if s == splits[k] and x != resp] or [resp]
            pairs.append({"prompt": r["prompt"], "chosen": resp, "rejected": partner[0]})
            where.append((i, k))
    expect = {"policy": trl_logps(policy, pairs, 4096), "reference": trl_logps(reference, pairs, 4096)}
    for j, (i, k) in enumerate(where):
        for who in ("policy", "reference"):
            got, want = rows[i][f"{who}_logps"][k], expect[who][j][0]
            assert abs(got - want) <= tol(want), (template, i, k, who, got, want)
    assert [r["completion_starts"] for r in rows] == all_splits
    if split_pairs:  # why 03 leaves such pairs' reference log-probs to stage 4: TRL's value is another number
        trl_split = trl_logps(policy, [p for _, _, p in split_pairs], 4096)
        for j, (i, k, _) in enumerate(split_pairs):
            assert abs(rows[i]["policy_logps"][k] - trl_split[j][0]) > 1e-3
    for row, row_in in zip(rows, rows_in):
        assert {k: row[k] for k in row_in} == row_in
        assert row["rewards"] == [p - q for p, q in zip(row["policy_logps"], row["reference_logps"])]
    assert [r["valid"] for r in rows] == [[True, True, False], [True, False, True], [True, True, True]]
    assert done["counts"]["invalid"] == 2 and done["counts"]["invalid_finish_length"] == 1
    assert (done["counts"]["boundary_merges"], done["counts"]["rows_with_split_mismatch"]) == (merges, mismatched)
    if template == "space":  # responses whose first word is a " word" token merge with the prompt's final " "
        assert merges > 0 and mismatched > 0
    else:
        assert merges == 0


@pytest.mark.parametrize("name", ["zephyr", "llama3"])
def test_chat_template_pairs_equal_trl(name, dice_models, tmp_path):
    """--chat_template FILE: 02's log-probs equal TRL's when TRL's processing_class carries that template, for both
    official formats (cut to a max_length that truncates some, drops one)."""
    policy, reference = dice_models[name]
    rows, done = run_main(tmp_path, policy, reference, PAIRS, max_length=70, chat_template=TEMPLATES[name],
                          batch_tokens=300)
    own, _ = run_main(tmp_path, policy, reference, PAIRS, name="own.jsonl", max_length=70)  # their ChatML
    expect = {who: trl_logps(model, PAIRS, 70, chat_template=TEMPLATES[name])
              for who, model in (("policy", policy), ("reference", reference))}
    assert done["args"]["chat_template"] == TEMPLATES[name]
    assert done["inputs"]["chat_template"]["fingerprint"] == protocol.fingerprint(TEMPLATES[name])
    assert done["counts"]["truncated"] > 0 and done["counts"]["prompt_too_long"] == 2
    assert len(expect["policy"]) == len(PAIRS) - 1
    for i, row in enumerate(rows):
        if i not in expect["policy"]:
            continue
        for who in ("policy", "reference"):
            for j, side in enumerate(("chosen", "rejected")):
                got, want = row[f"{who}_{side}_logps"], expect[who][i][j]
                assert abs(got - want) <= tol(want), (name, i, who, side, got, want)
                assert abs(got - own[i][f"{who}_{side}_logps"]) > 1e-3  # the template really changed the tokens


@pytest.mark.parametrize("name", ["zephyr", "llama3"])
def test_chat_template_scores_exactly_the_official_response_tokens(name, dice_models, tmp_path):
    """With zephyr-dice.jinja the scored tokens of a response (the completion mask) are exactly the tokenization of
    `{response}</s>` after the prompt `<|system|>\\n </s>\\n<|user|>\\n{prompt}</s>\\n<|assistant|>\\n`, ending in the
    EOS id, nothing after it (llama3-dice.jinja: `{response}<|eot_id|>`); the log-probs are those of these tokens,
    computed here by a plain forward and log-softmax."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy, reference = dice_models[name]
    prompts = ["Write a poem about the sea.", "line one\nline two\n", "  caf\u00e9, \u6771\u4eac \U0001f642 {{ x }}"]
    responses = ["The sea is wide.", " spaced answer ", "Multi-line\n\n- item 1\n", "\u6771\u4eac \U0001f642"]
    rows_in = [{"prompt": p, "responses": responses, "finish_reasons": ["stop"] * len(responses)} for p in prompts]
    rows, _ = run_main(tmp_path, policy, reference, rows_in, mode="responses", chat_template=TEMPLATES[name])
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    end = "</s>" if name == "zephyr" else "<|eot_id|>"
    tokenizer = models.load_tokenizer(policy, chat_template=TEMPLATES[name])
    for p, row in zip(prompts, rows):
        if name == "zephyr":
            prompt_text = f"<|system|>\n </s>\n<|user|>\n{p}</s>\n<|assistant|>\n"
        else:
            prompt_text = (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{p}<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        for k, y in enumerate(responses):
            response_ids = tok(y + end, add_special_tokens=False)["input_ids"]
            assert response_ids[-1] == tok.convert_tokens_to_ids(end) and response_ids.count(response_ids[-1]) == 1
            (seq,), starts, _ = scoring.tokenize_row(tokenizer, {"prompt": p, "responses": [y]}, "responses", None,
                                                   "keep_start")
            assert seq == (prompt_ids + response_ids, len(prompt_ids)) and starts == [len(prompt_ids)]
            assert row["completion_starts"][k] == len(prompt_ids)
            ids = torch.tensor([prompt_ids + response_ids])
            with torch.no_grad():
                logps = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            want = logps[torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1), ids[0, len(prompt_ids):]].sum().item()
            assert abs(row["policy_logps"][k] - want) <= tol(want), (name, p, y, row["policy_logps"][k], want)


def test_chat_template_is_part_of_the_stage_and_replaces_both_templates(tiny_policy, tiny_reference, space_models,
                                                                         tmp_path):
    """Policy and reference whose own templates differ are refused, and agree once --chat_template overrides both
    (the same weights score the same); the template file is an input compared by content."""
    template = tmp_path / "t.jinja"
    shutil.copy(TEMPLATES["zephyr"], template)
    src = write_jsonl(tmp_path / "r.jsonl", [GOOD, GOOD])
    out = str(tmp_path / "o.jsonl")
    kw = dict(policy=tiny_policy, responses=src, out=out)
    with pytest.raises(DiceError, match="different chat templates.*--chat_template"):
        score.main(reference=space_models[1], **kw)  # tiny_reference's weights, the space template
    score.main(reference=space_models[1], chat_template=str(template), **kw)
    same, _ = run_main(tmp_path, tiny_policy, tiny_reference, [GOOD, GOOD], mode="responses", name="same.jsonl",
                       chat_template=str(template))
    assert read_jsonl(out) == same
    with pytest.raises(protocol.AlreadyDone):
        score.main(reference=space_models[1], chat_template=str(template), **kw)
    with open(template, "a") as f:
        f.write("{# edited #}")
    with pytest.raises(DiceError, match=r"other arguments or inputs \(.*input --chat_template changed\)"):
        score.main(reference=space_models[1], chat_template=str(template), **kw)
    with pytest.raises(DiceError, match=r"cannot read chat template .*missing.jinja"):
        score.main(reference=space_models[1], chat_template=str(tmp_path / "missing.jinja"), **kw)
    assert read_jsonl(out) == same


# ----------------------------------------------------------------------------- inputs as users hold them

def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def write_shape(path, rows, split=None):
    """`rows` saved as `path` says: .jsonl, .json (a list; `split="lines"`: JSON lines), .parquet, or a folder saved
    with datasets (a DatasetDict holding `split`, beside a decoy split holding the rows in reverse order)."""
    import datasets
    import pyarrow
    import pyarrow.parquet

    path = str(path)
    if path.endswith(".jsonl") or split == "lines":
        return write_jsonl(path, rows)
    if path.endswith(".json"):
        with open(path, "w") as f:
            json.dump(rows, f)
    elif path.endswith(".parquet"):
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    else:
        datasets.DatasetDict({split: datasets.Dataset.from_list(rows),
                              "decoy": datasets.Dataset.from_list(rows[::-1])}).save_to_disk(path)
    return path


def test_every_pair_shape_scores_the_same(tiny_policy, tiny_reference, tmp_path):
    """The same pairs as strings, TRL's conversational format, ultrafeedback_binarized's full conversations and
    trl-lib's implicit prompt, in .jsonl, .json (list and JSON lines), .parquet and a datasets folder (--split): the
    same scores, bit for bit; the output holds prompt/chosen/rejected as strings and keeps every other field."""
    strings = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in PAIRS]
    conversational = [{"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]),
                       "rejected": assistant(r["rejected"])} for r in strings]
    binarized = [{"prompt": r["prompt"], "prompt_id": f"id{i}", "chosen": user(r["prompt"]) + assistant(r["chosen"]),
                  "rejected": user(r["prompt"]) + assistant(r["rejected"]),
                  "messages": user(r["prompt"]) + assistant(r["chosen"]), "score_chosen": 8.0, "score_rejected": 2.5}
                 for i, r in enumerate(strings)]
    implicit = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in binarized]
    shapes = {"strings.jsonl": (strings, None), "strings.json": (strings, None), "lines.json": (strings, "lines"),
              "strings.parquet": (strings, None), "strings_folder": (strings, "test"),
              "conversational.jsonl": (conversational, None), "conversational.parquet": (conversational, None),
              "conversational_folder": (conversational, "train"), "binarized_folder": (binarized, "test_prefs"),
              "binarized.parquet": (binarized, None), "implicit.json": (implicit, None)}
    outputs = {}
    for name, (rows, split) in shapes.items():
        src = write_shape(tmp_path / name, rows, split)
        out = str(tmp_path / f"{name}.scores.jsonl")
        score.main(policy=tiny_policy, reference=tiny_reference, pairs=src, out=out, split=split or "train")
        outputs[name] = read_jsonl(out)
        done = json.load(open(out + ".done.json"))
        assert done["args"]["split"] == (split if name.endswith("folder") else None)  # a file has no split
        assert done["counts"]["rows"] == len(PAIRS)
    base = outputs["strings.jsonl"]
    fields = ["prompt", "chosen", "rejected", "policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps",
              "reference_rejected_logps", "chosen_reward", "rejected_reward"]
    assert [list(r) for r in base] == [fields] * len(PAIRS)
    for name, rows in outputs.items():
        assert [{k: r[k] for k in fields} for r in rows] == base, name
    for name in ("binarized_folder", "binarized.parquet"):  # the other fields kept as they were, in their order
        assert [list(r)[:7] for r in outputs[name]] == [list(binarized[0])] * len(PAIRS)
        assert [{k: r[k] for k in ("prompt_id", "messages", "score_chosen")} for r in outputs[name]] == [
            {k: r[k] for k in ("prompt_id", "messages", "score_chosen")} for r in binarized]
    with pytest.raises(DiceError, match=r"cannot load dataset .*binarized_folder \(split nope\)"):
        score.main(policy=tiny_policy, reference=tiny_reference, pairs=str(tmp_path / "binarized_folder"),
                   split="nope", out=str(tmp_path / "x.jsonl"))
    assert not os.path.exists(tmp_path / "x.jsonl")


def test_responses_from_parquet_and_a_dataset_folder(tiny_policy, tiny_reference, tmp_path):
    """01's rows as .parquet or a datasets folder score exactly as the .jsonl; a bad row names its row."""
    rows_in = responses_rows()
    outputs = []
    for name, split in (("r.jsonl", None), ("r.parquet", None), ("r_folder", "train")):
        src = write_shape(tmp_path / name, rows_in, split)
        outputs.append(run_main(tmp_path, tiny_policy, tiny_reference, None, mode="responses", name=f"{name}.out",
                                src=src, split=split or "train")[0])
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == len(rows_in)
    bad = write_shape(tmp_path / "bad.parquet", [rows_in[0], {**rows_in[1], "finish_reasons": ["stop"]}])
    with pytest.raises(DiceError, match=re.escape(f"{bad}: row 1: 3 responses but 1 finish_reasons")):
        score.main(policy=tiny_policy, reference=tiny_reference, responses=bad, out=str(tmp_path / "x.jsonl"))
    assert not os.path.exists(tmp_path / "x.jsonl")


def test_batching_and_chunking_do_not_change_scores(tiny_policy, tiny_reference, tmp_path):
    rows_in = responses_rows() * 3
    a, _ = run_main(tmp_path, tiny_policy, tiny_reference, rows_in, mode="responses", name="a.jsonl",
                    chunk_rows=1, batch_tokens=1)
    b, _ = run_main(tmp_path, tiny_policy, tiny_reference, rows_in, mode="responses", name="b.jsonl",
                    batch_tokens=4096)  # padded batches of several sequences
    assert len(a) == len(b) == 9
    for x, y in zip(a, b):
        assert x["prompt_id"] == y["prompt_id"] and x["valid"] == y["valid"]
        for key in ("policy_logps", "reference_logps"):
            assert all(abs(p - q) <= tol(q) for p, q in zip(x[key], y[key]))


def test_bfloat16_runs_close_to_float32(tiny_policy, tiny_reference, tmp_path):
    a, _ = run_main(tmp_path, tiny_policy, tiny_reference, PAIRS, name="f32.jsonl")
    b, done = run_main(tmp_path, tiny_policy, tiny_reference, PAIRS, name="bf16.jsonl", dtype="bfloat16")
    assert done["args"]["dtype"] == "bfloat16"
    for x, y in zip(a, b):
        for key in ("policy_chosen_logps", "reference_rejected_logps"):
            assert x[key] != y[key] and abs(x[key] - y[key]) <= 0.02 * abs(x[key]) + 1.0


# ----------------------------------------------------------------------------- bad input

GOOD = {"prompt_id": "a", "prompt": "Hi?", "responses": ["Hello there.", "Hi."], "finish_reasons": ["stop", "stop"]}


@pytest.mark.parametrize("row,message", [
    ("{not json", "bad JSON"),
    ({"responses": ["a"], "finish_reasons": ["stop"]}, "missing field 'prompt'"),
    ({"prompt": "Hi?", "finish_reasons": ["stop"]}, "missing field 'responses'"),
    ({**GOOD, "finish_reasons": ["stop"]}, "2 responses but 1 finish_reasons"),
    ({**GOOD, "responses": ["ok", 3]}, "responses[1] must be a string"),
    ({**GOOD, "responses": []}, "'responses' is empty"),
    ({**GOOD, "prompt": ""}, "empty prompt"),
    ({**GOOD, "policy_logps": [0.0, 0.0]}, "already has 'policy_logps'"),
])
def test_bad_rows_are_errors_naming_file_and_line(row, message, tiny_policy, tiny_reference, tmp_path):
    src = tmp_path / "responses.jsonl"
    src.write_text(json.dumps(GOOD) + "\n" + (row if isinstance(row, str) else json.dumps(row)) + "\n")
    with pytest.raises(DiceError, match=re.escape(f"{src}:2: ") + ".*" + re.escape(message)):
        score.main(policy=tiny_policy, reference=tiny_reference, responses=str(src), out=str(tmp_path / "o.jsonl"))
    assert os.listdir(tmp_path) == ["responses.jsonl"]  # nothing written


def test_pairs_need_chosen_and_rejected(tiny_policy, tiny_reference, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi?", "chosen": "Hello."}])
    with pytest.raises(DiceError, match=r"p.jsonl:1: missing field 'rejected'"):
        score.main(policy=tiny_policy, reference=tiny_reference, pairs=src, out=str(tmp_path / "o.jsonl"))


def test_models_must_exist_and_share_a_tokenizer(tiny_policy, tiny_reference, space_models, tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", [GOOD])
    out = str(tmp_path / "o.jsonl")
    with pytest.raises(DiceError, match="model not found: /nonexistent/model"):
        score.main(policy="/nonexistent/model", reference=tiny_reference, responses=src, out=out)
    with pytest.raises(DiceError, match="different chat templates"):
        score.main(policy=tiny_policy, reference=space_models[1], responses=src, out=out)
    with pytest.raises(DiceError, match="exactly one of --responses"):
        score.main(policy=tiny_policy, reference=tiny_reference, responses=src, pairs=src, out=out)
    with pytest.raises(DiceError, match="--dtype must be one of float32, bfloat16"):
        score.main(policy=tiny_policy, reference=tiny_reference, responses=src, out=out, dtype="fp16")
    assert not os.path.exists(out)


def test_nan_logps_are_an_error_and_nothing_is_written(tiny_policy, tiny_reference, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = str(tmp_path / "broken")
    shutil.copytree(tiny_reference, broken)
    weights = load_file(os.path.join(broken, "model.safetensors"))
    weights["model.norm.weight"][:] = float("nan")
    save_file(weights, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    src = write_jsonl(tmp_path / "r.jsonl", [GOOD, GOOD])
    out = tmp_path / "o.jsonl"
    with pytest.raises(DiceError, match=r"r.jsonl:1: non-finite log-prob"):
        score.main(policy=tiny_policy, reference=broken, responses=src, out=str(out))
    assert sorted(os.listdir(tmp_path)) == ["broken", "r.jsonl"]


def test_cli_one_line_errors_and_the_stage_protocol(tiny_policy, tiny_reference, tmp_path):
    """Arguments first, output and counts last; a rerun is "done already" (exit 0); changed arguments or inputs are
    refused with one line unless --overwrite, which redoes the output; speed settings are not compared."""
    src = write_jsonl(tmp_path / "r.jsonl", [GOOD])
    out = str(tmp_path / "scores.jsonl")
    cmd = ["python", "02_score.py", "--policy", tiny_policy, "--reference", tiny_reference, "--responses", src,
           "--out", out]
    first = run_script(cmd).stdout.splitlines()
    assert json.loads(first[0].removeprefix("02_score "))["min_chars"] == 3
    assert first[-4] == f"wrote {out} (1 rows, 2 sequences) and {out}.done.json"
    assert first[-3].startswith("counts: rows 1, sequences 2, invalid 1, ")
    assert first[-2].startswith("valid responses: 1 of 2")  # "Hi." has 3 characters
    before, marker = open(out).read(), open(out + ".done.json").read()
    done = f"{out}: done already (same arguments and inputs; see {out}.done.json)"
    for extra in ([], ["--batch_tokens", "7", "--chunk_rows", "3"], ["--overwrite"]):
        again = run_script(cmd + extra)
        assert again.stdout.strip().splitlines()[-1] == done and again.stderr.strip() == ""
    changed = run_script(cmd + ["--min_chars", "1"], check=False)
    assert changed.returncode == 2 and changed.stderr.strip().splitlines() == [
        f"error: {out} was made with other arguments or inputs (min_chars: 3 -> 1); pass --overwrite to redo it"]
    assert (open(out).read(), open(out + ".done.json").read()) == (before, marker)
    redo = run_script(cmd + ["--min_chars", "1", "--overwrite"])
    assert "valid responses: 2 of 2" in redo.stdout
    assert [r["valid"] for r in read_jsonl(out)] == [[True, True]]
    assert json.load(open(out + ".done.json"))["args"]["min_chars"] == 1
    write_jsonl(src, [GOOD, GOOD])
    moved = run_script(cmd + ["--min_chars", "1"], check=False)
    assert moved.returncode == 2 and moved.stderr.strip() == (
        f"error: {out} was made with other arguments or inputs (input --responses changed); pass --overwrite to "
        "redo it")
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "finish_reasons": ["stop"]}])
    proc = run_script(cmd[:7] + [bad, "--out", str(tmp_path / "x.jsonl")], check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {bad}:2: 2 responses but 1 finish_reasons"
    assert not os.path.exists(tmp_path / "x.jsonl")
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "r.jsonl", "scores.jsonl", "scores.jsonl.done.json"]


def test_flags_are_checked_before_any_work(tiny_policy, tiny_reference, tmp_path):
    """Through the real command line: a misspelt flag is one line with a did-you-mean, exit 2, nothing read or written,
    also when the output is finished already; a value out of its range likewise; --help exits 0 and loads no model
    (the models and the input it is given do not exist)."""
    src = write_jsonl(tmp_path / "r.jsonl", [GOOD])
    out = str(tmp_path / "scores.jsonl")
    cmd = ["python", "02_score.py", "--policy", tiny_policy, "--reference", tiny_reference, "--responses", src,
           "--out", out]
    typo = ["--polciy" if a == "--policy" else a for a in cmd]

    def files():
        return {name: (tmp_path / name).read_bytes() for name in sorted(os.listdir(tmp_path))}

    for finished in (False, True):
        if finished:
            run_script(cmd)
        before = files()
        for argv, error in (
                (typo, "unknown flag --polciy (did you mean --policy?); see --help"),
                (cmd + ["--chunk_row", "8"], "unknown flag --chunk_row (did you mean --chunk_rows?); see --help"),
                (cmd + ["--max_length", "1"], "--max_length must be >= 2, got 1")):
            proc = run_script(argv, check=False)
            assert (proc.returncode, proc.stdout, proc.stderr.splitlines()) == (2, "", [f"error: {error}"]), argv
            assert files() == before
        assert list(before) == (["r.jsonl", "scores.jsonl", "scores.jsonl.done.json"] if finished else ["r.jsonl"])
    missing = str(tmp_path / "missing")
    proc = run_script(["python", "02_score.py", "--help", "--policy", missing, "--reference", missing, "--responses",
                       missing, "--out", str(tmp_path / "h.jsonl")])
    assert proc.stdout.startswith("usage: python 02_score.py") and proc.stderr == ""
    for line in ("--policy (str; required)", "--max_length (int; default 4096)",
                 "--dtype (float32 | bfloat16; default float32)"):
        assert line in proc.stdout
    assert files() == before


def test_done_already_is_decided_before_any_model_is_loaded(tiny_policy, tiny_reference, tmp_path, monkeypatch):
    run_main(tmp_path, tiny_policy, tiny_reference, [GOOD], mode="responses")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    monkeypatch.setattr(models, "load_tokenizer", no_loading)
    monkeypatch.setattr(trl_internals, "load_scorer", no_loading)
    with pytest.raises(protocol.AlreadyDone, match="done already"):
        run_main(tmp_path, tiny_policy, tiny_reference, [GOOD], mode="responses")
    with pytest.raises(DiceError, match=r"other arguments or inputs \(dtype: 'float32' -> 'bfloat16'\)"):
        run_main(tmp_path, tiny_policy, tiny_reference, [GOOD], mode="responses", dtype="bfloat16")


# ----------------------------------------------------------------------------- several processes, real model

@pytest.mark.slow
def test_accelerate_two_processes_write_the_single_process_output(tiny_policy, tiny_reference, tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", responses_rows() * 4)
    common_args = ["02_score.py", "--policy", tiny_policy, "--reference", tiny_reference, "--responses", src,
                   "--chunk_rows", "5", "--batch_tokens", "60"]
    # the same kernels in both runs; no GPU: accelerate 1.15's `launch --cpu --num_processes 2` starts ONE process
    # without mpirun, while `--multi_gpu` on a machine without CUDA starts 2 through torchrun, joined by gloo
    env = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run_script(["python"] + common_args + ["--out", str(tmp_path / "one.jsonl")], env=env)
    two = run_script(["python", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
                     + common_args + ["--out", str(tmp_path / "two.jsonl")], env=env)
    assert "with 2 process(es)" in two.stdout and two.stdout.count("wrote ") == 1  # one writer
    assert json.load(open(tmp_path / "two.jsonl.done.json"))["args"]["num_processes"] == 2
    assert open(tmp_path / "two.jsonl").read() == open(tmp_path / "one.jsonl").read()
    # every process decides "done already" on a rerun (all exit 0, rank 0 prints the one line); one process on the
    # two-process output decides the same
    again = run_script(["python", "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
                       + common_args + ["--out", str(tmp_path / "two.jsonl")], env=env)
    assert again.stdout.count("done already") == 1 and "wrote" not in again.stdout and "error:" not in again.stderr
    alone = run_script(["python"] + common_args + ["--out", str(tmp_path / "two.jsonl")], env=env)
    assert "done already" in alone.stdout
    assert sorted(os.listdir(tmp_path)) == ["one.jsonl", "one.jsonl.done.json", "r.jsonl", "two.jsonl",
                                            "two.jsonl.done.json"]


@pytest.mark.slow
def test_smollm2_real_pairs_equal_trl(smollm2, shared_data, tmp_path):
    """SmolLM2-135M, fp32, real GPT-4-judged pairs (one whose response starts with whitespace that merges with the
    prompt's last token): |02 - TRL| <= 1e-3 + 1e-6*|logp| for every sequence."""
    with open(os.path.join(shared_data, "gpt4_prefs_small.jsonl")) as f:
        rows = [json.loads(line) for _, line in zip(range(5), f)]
    with open(os.path.join(shared_data, "gpt4_prefs_train.jsonl")) as f:
        merging = [json.loads(line) for line in f]
    merging = [r for r in merging if re.match(r"\s\s", r["chosen"]) or re.match(r"\s\s", r["rejected"])]
    rows.append(min(merging, key=lambda r: len(r["prompt"] + r["chosen"] + r["rejected"])))
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    out, done = run_main(tmp_path, smollm2, smollm2, rows, batch_tokens=2048)
    assert done["counts"]["boundary_merges"] >= 1 and done["counts"]["rows_with_split_mismatch"] >= 1
    expect = trl_logps(smollm2, rows, 4096)
    assert len(expect) == len(rows)
    worst = 0.0
    for i, row in enumerate(out):
        for j, side in enumerate(("chosen", "rejected")):
            want = expect[i][j]
            for who in ("policy", "reference"):
                got = row[f"{who}_{side}_logps"]
                assert math.isfinite(got) and abs(got - want) <= 1e-3 + 1e-6 * abs(want), (i, side, who, got, want)
                worst = max(worst, abs(got - want))
    print(f"SmolLM2 fp32, {2 * len(rows)} sequences: max |02 - TRL| = {worst:.3g}")
