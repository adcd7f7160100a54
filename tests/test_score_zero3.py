"""Scoring with sharded models, run for real: 02_score.py and tools/judge_rm.py with DeepSpeed ZeRO-3 on 2 CPU
processes (DeepSpeed 0.19 on gloo). Each process holds half of every weight (loaded sharded), all step in lockstep (a
chunk with an odd number of batches makes one run dummy forwards) and the main process writes the file one process
writes: byte for byte in fp32 (the gathered weights are the weights; the same batches, one thread each), and in bf16
when --dtype bfloat16 asks for it (mixed_precision 'no': the script's own --dtype decides the precision of the shards).

02 --responses runs under configs/accelerate/zero3_scoring.yaml as it is. A tiny model stays gathered after its first
forward there (DeepSpeed keeps up to stage3_max_live_parameters = 1e9 weights live), so 02 --pairs and the judge run
under the same settings with that limit 0 (TIGHT): every forward gathers every layer from both processes, as a 70B
model's do, and a process that skipped its dummy forwards would meet the other in a mismatched collective (gloo: error).
02 --pairs scores models with an LM head of their own (untied, as Llama-3-70B's), which TRL's fused head gathers itself.

Three launches of ~25 s on 2 cores (the first launch on a machine compiles DeepSpeed's shm op with g++/ninja into
~/.cache/torch_extensions, ~75 s more) and four one-process runs in this process, shared through one module fixture.
"""
import contextlib
import json
import re
import socket

import pytest

import judge_rm
from conftest import load_script, run_script
from dice import models, scoring
from test_judge_rm import outputs_file, reward_model  # noqa: F401 (a fixture)
from test_score import PAIRS, responses_rows, write_jsonl

score = load_script("02_score")
RESPONSES = dict(chunk_rows=4, batch_tokens=60)  # 9 rows x 3 responses: chunks of 12, 12 and 3 sequences
PAIR_ARGS = dict(chunk_rows=3, batch_tokens=80, max_length=60)  # 10 pairs: some cut, the long prompt's 2 pairs dropped
TEXTS = ["A short one.", "A somewhat longer answer with more words in it.", "", "Mid length text.", "Yes."]
TIGHT = {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0,
                               "stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 0}}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def tight_config(folder):
    """An accelerate config: configs/accelerate/zero3_scoring.yaml's settings with a DeepSpeed file (TIGHT)."""
    with open(folder / "ds.json", "w") as f:
        json.dump(TIGHT, f)
    with open(folder / "tight.json", "w") as f:  # accelerate reads a .json config as it reads a .yaml one
        json.dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "num_machines": 1,
                   "deepspeed_config": {"deepspeed_config_file": str(folder / "ds.json"), "zero3_init_flag": True},
                   "num_processes": 2}, f)
    return str(folder / "tight.json")


def launch(script, config, **flags):
    """SCRIPT FLAGS under the accelerate config on 2 CPU processes, one thread each; returns stdout. A process left
    waiting in a collective would hang: the timeout makes that a failure."""
    flags = [str(a) for k, v in flags.items() for a in (f"--{k}", v)]
    return run_script(["python", "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
                       "--main_process_port", free_port(), script, *flags],
                      env={"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}, timeout=300).stdout


@contextlib.contextmanager
def one_thread():
    """One process scoring as each launched one does: one thread (the same kernels, the same sums)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def untied(model, out, seed):
    """The tiny model's architecture and tokenizer with an LM head of its own, random weights."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(model)
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def runs(tiny_policy, tiny_reference, reward_model, tmp_path_factory):  # noqa: F811
    """The input files, the models and {name: (ZeRO-3 stdout, ZeRO-3 output, one-process output)} of 02
    (--responses: the tiny models, --pairs: untied ones) and judge_rm (bf16), plus "judge_fp32": judge_rm in fp32, one
    process."""
    base = tmp_path_factory.mktemp("zero3_scoring")
    inputs = {"responses": write_jsonl(base / "responses.jsonl", responses_rows() * 3),
              "pairs": write_jsonl(base / "pairs.jsonl", PAIRS * 2),
              "outputs": str(outputs_file(base / "model_outputs.json", TEXTS, "m"))}
    config, tight = "configs/accelerate/zero3_scoring.yaml", tight_config(base)
    pair = {"responses": (tiny_policy, tiny_reference),
            "pairs": (untied(tiny_policy, base / "policy", 3), untied(tiny_policy, base / "reference", 4))}
    jobs = {mode: ("02_score.py", score.main, conf, {"policy": pair[mode][0], "reference": pair[mode][1],
                                                     mode: inputs[mode], **extra})
            for mode, conf, extra in (("responses", config, RESPONSES), ("pairs", tight, PAIR_ARGS))}
    jobs["judge"] = ("tools/judge_rm.py", judge_rm.main, tight, {"model": reward_model, "outputs": inputs["outputs"],
                                                                 "batch_size": 1, "dtype": "bfloat16"})
    out = {}
    for name, (script, main, conf, flags) in jobs.items():
        one, zero3 = str(base / f"one_{name}.jsonl"), str(base / f"zero3_{name}.jsonl")
        with one_thread():
            main(**flags, out=one)
        out[name] = launch(script, conf, **flags, out=zero3), zero3, one
    judge_rm.main(**{**jobs["judge"][3], "dtype": "float32"}, out=str(base / "judge_fp32.jsonl"))
    out["judge_fp32"] = str(base / "judge_fp32.jsonl")
    return inputs, pair, out


def shares(tokenizer_path, rows_path, mode, chunk_rows, batch_tokens, max_length=4096):
    """Per chunk, the number of batches (process 0's, process 1's) that 02 gives 2 processes for these rows."""
    tokenizer = models.load_tokenizer(tokenizer_path)
    rows = [row for _, row in scoring.read_input(rows_path, None, mode)]
    counts = []
    for start in range(0, len(rows), chunk_rows):
        seqs = [s for row in rows[start:start + chunk_rows]
                for s in scoring.tokenize_row(tokenizer, row, mode, max_length, "keep_start")[0] if s is not None]
        lengths = [len(ids) for ids, _ in seqs]
        owner = scoring.assign_batches(scoring.make_batches(lengths, batch_tokens), lengths, 2)
        counts.append((owner.count(0), owner.count(1)))
    return counts


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["responses", "pairs"])
def test_two_zero3_processes_write_the_one_process_scores(mode, runs):
    from transformers import AutoModelForCausalLM

    inputs, pair, runs = runs
    stdout, out, one = runs[mode]
    assert "with 2 process(es)" in stdout and stdout.count("wrote ") == 1  # one writer
    assert read(out) == read(one)  # byte for byte
    done, one_done = (json.loads(read(path + ".done.json")) for path in (out, one))
    assert len(read(out).splitlines()) == {"responses": 9, "pairs": 10}[mode]
    assert done["args"]["num_processes"] == 2 and done["counts"] == one_done["counts"]
    if mode == "pairs":  # the cut and the dropped sequences took the same paths
        assert done["counts"]["truncated"] > 0 and done["counts"]["prompt_too_long"] == 4
    # sharded: the main process held half of the two models' weights (ZeRO-3 pads each tensor to split evenly)
    held, total = map(int, re.search(r"ZeRO-3 over 2 processes: the main process holds (\d+) of the (\d+) weights",
                                     stdout).groups())
    size = sum(sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
               for path in pair[mode])
    assert total == size and total / 2 <= held <= total / 2 + 64
    # lockstep was needed: in some chunk the two processes had different numbers of batches (dummy forwards ran)
    counts = shares(pair[mode][0], inputs[mode], mode, **(RESPONSES if mode == "responses" else PAIR_ARGS))
    assert any(a != b for a, b in counts), counts


@pytest.mark.slow
def test_the_judge_under_zero3_scores_as_one_process_in_the_asked_precision(runs):
    stdout, out, one = runs[2]["judge"]
    assert "ZeRO-3 over 2 processes" in stdout and stdout.count("wrote ") == 1
    assert read(out) == read(one)  # bf16, byte for byte; 5 rows, 3 + 2: process 1 ran a dummy forward
    bf16, fp32 = ([json.loads(line)["reward"] for line in read(path).splitlines()]
                  for path in (out, runs[2]["judge_fp32"]))
    assert len(bf16) == len(TEXTS) and all(a != b and abs(a - b) < 0.01 for a, b in zip(bf16, fp32))
