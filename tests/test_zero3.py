"""DeepSpeed ZeRO-3, the paper's training path, run for real: 04_train_dpo.py under the paper's config file
configs/accelerate/deepspeed_zero3.yaml as it is, on 2 CPU processes (DeepSpeed 0.19 from requirements-cpu.txt, on
gloo). Only launch flags differ from a GPU node: 2 processes (LAUNCH), and for (a) and (b) fp32 (FP32), which lets the
losses be compared tightly; (c) runs the file's bf16.

Four launches of ~25 s on 2 cores (the first launch on a machine compiles DeepSpeed's shm op with g++/ninja into
~/.cache/torch_extensions, ~75 s more) and one in-process run; (a) and (b) share one fp32 run (module fixtures):
(a) 2 processes x 1 pair equal 1 process x 1 pair x 2 accumulation without DeepSpeed (the same 2 pairs a step, in the
    same order): losses within 1e-5, weights within 1e-5 (observed 3e-6 and 2.7e-6; 4 steps move weights by up to
    4e-3). Not bitwise, although DDP on 2 CPU processes is (configs/accelerate/cpu_2proc.yaml): after one plain SGD
    step without clipping, 64 of the 100k weights already differ by 1 ulp (ZeRO-3's backward and reduce-scatter add
    some gradient terms in another order), and AdamW's m/sqrt(v) enlarges that where a gradient is near 0;
(b) the published folder is a plain safetensors HF model that 01_generate.py samples from;
(c) in bf16, the file as it is: a run killed (SIGKILL of the launcher and both training processes) once its first
    checkpoint is complete resumes to exactly the losses and weights of an uninterrupted run.
"""
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import ROOT, load_script, run_script
from dice import trl_internals
from test_train_dpo import LOG2, make_pairs, train_logs, trl_ref_logps, write_jsonl

train, generate = load_script("04_train_dpo"), load_script("01_generate")

LAUNCH = ["accelerate", "launch", "--config_file", "configs/accelerate/deepspeed_zero3.yaml", "--num_processes", "2"]
FP32 = ["--mixed_precision", "no"]  # else the file's bf16 (04's --bf16 auto follows it)
STEPS = dict(max_steps=4, save_steps=2, learning_rate=1e-3, eval_size=2, eval_steps=2, logging_steps=1,
             per_device_train_batch_size=1, gradient_accumulation_steps=1)  # else 04's (gradient checkpointing on)
PAUSE = """# python pause.py FLAG 04_train_dpo.py ARGS: 04 waiting to be killed once its first checkpoint is complete
import os, runpy, sys, time
import transformers.trainer

save = transformers.trainer.Trainer._save_checkpoint

def save_then_wait(self, *args, **kwargs):
    save(self, *args, **kwargs)
    with open(f"{FLAG}.tmp{os.getpid()}", "w") as f:
        f.write(str(os.getpid()))
    os.replace(f.name, f"{FLAG}.{os.environ['RANK']}")
    time.sleep(600)

transformers.trainer.Trainer._save_checkpoint = save_then_wait
FLAG, sys.argv = sys.argv[1], sys.argv[2:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def command(model, pairs, out, precision=FP32, script=("04_train_dpo.py",), **extra):
    flags = [str(a) for k, v in {**STEPS, **extra}.items() for a in (f"--{k}", v)]
    return [*LAUNCH, *precision, "--main_process_port", free_port(), *script, "--model", model, "--pairs", pairs,
            "--out", out, *flags]


def outputs(out):
    from safetensors.torch import load_file

    with open(f"{out}.done.json") as f:
        record = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    return record, metrics, load_file(os.path.join(out, "model.safetensors"))


@pytest.fixture(scope="module")
def pairs(tiny_policy, tmp_path_factory):
    """10 pairs, every other one with TRL's reference log-probs: the supplied path and TRL's precompute under ZeRO-3."""
    rows = make_pairs(10)
    chosen, rejected = trl_ref_logps(tiny_policy, rows)
    rows = [{**r, "ref_chosen_logps": c, "ref_rejected_logps": j} if i % 2 else r
            for i, (r, c, j) in enumerate(zip(rows, chosen, rejected))]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def zero3(tiny_policy, pairs, tmp_path_factory):
    """(folder, done marker, metrics, weights) of an uninterrupted ZeRO-3 run on 2 CPU processes (checkpoints kept)."""
    out = tmp_path_factory.mktemp("zero3") / "model"
    run_script(command(tiny_policy, pairs, out, keep_checkpoints=True), env={"CUDA_VISIBLE_DEVICES": ""})
    return out, *outputs(out)


@pytest.fixture(scope="module")
def one_process(tiny_policy, pairs, tmp_path_factory):
    """(folder, done marker, metrics, weights) of 1 process x 2 accumulation, no DeepSpeed: 2 pairs a step too."""
    out = tmp_path_factory.mktemp("one") / "model"
    train.main(model=tiny_policy, pairs=pairs, out=str(out), **{**STEPS, "gradient_accumulation_steps": 2})
    return out, *outputs(out)


@pytest.mark.slow
def test_two_zero3_processes_train_as_one_process_does(zero3, one_process):
    import torch

    out, record, metrics, weights = zero3
    _, one_record, one_metrics, one_weights = one_process
    assert (record["processes"], record["global_step"], record["bf16"]) == (2, 4, False)
    assert record["reference_logps"]["train"] == one_record["reference_logps"]["train"] == {"supplied": 3,
                                                                                            "computed": 5}
    ranks = sorted(os.listdir(f"{out}.work/checkpoint-4/global_step4"))  # DeepSpeed's ZeRO-3 files: 1 shard a process
    assert ranks == sorted(f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for kind in ("model", "optim") for r in "01")
    losses = {"loss": ([m["loss"] for m in train_logs(metrics)], [m["loss"] for m in train_logs(one_metrics)]),
              "eval_loss": ([m["eval_loss"] for m in metrics if "eval_loss" in m],
                            [m["eval_loss"] for m in one_metrics if "eval_loss" in m])}
    assert [len(z) for z, _ in losses.values()] == [4, 2] and abs(losses["loss"][0][0] - LOG2) < 1e-5
    for name, (z, one) in losses.items():
        assert z == pytest.approx(one, abs=1e-5, rel=0), name
    assert len(set(losses["loss"][0])) == 4  # the loss moved at every step: the comparison is not of constants
    assert weights.keys() == one_weights.keys()
    for key in weights:
        assert weights[key].dtype == torch.float32 and torch.allclose(weights[key], one_weights[key], atol=1e-5), key


@pytest.mark.slow
def test_the_published_zero3_model_is_a_plain_folder_that_01_samples_from(zero3, one_process, tiny_policy, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, _, _, weights = zero3
    files = os.listdir(out)
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]  # no pickle, no DeepSpeed shards
    start = load_file(os.path.join(tiny_policy, "model.safetensors"))
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in start.items()}  # gathered whole
    assert all(not torch.equal(weights[k], start[k]) for k in start)  # every tensor trained
    model, info = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weight
    assert all(torch.equal(p, weights[k]) for k, p in model.state_dict().items() if k in weights)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("Why is the sky blue?", "Hello")])
    samples = []
    for model_dir in (out, one_process[0]):  # the same seeds: the ZeRO-3 model samples what the one-process one does
        path = tmp_path / f"{len(samples)}.jsonl"
        generate.main(model=str(model_dir), prompts=prompts, out=str(path), num_samples=2, temperature=1.0,
                      max_new_tokens=8, engine="hf")
        samples.append([{k: v for k, v in json.loads(line).items() if k != "generator"} for line in open(path)])
    assert samples[0] == samples[1] and sum(n for row in samples[0] for n in row["num_tokens"]) > 8, samples


@pytest.mark.slow
def test_a_killed_bf16_zero3_run_resumes_to_the_uninterrupted_weights(tiny_policy, pairs, tmp_path):
    """The paper's precision: the config file exactly as it is (bf16), with 2 processes."""
    import torch

    cpu = {"CUDA_VISIBLE_DEVICES": ""}
    run_script(command(tiny_policy, pairs, tmp_path / "full", precision=()), env=cpu)
    full_record, full_metrics, full_weights = outputs(tmp_path / "full")
    out, flag, work = tmp_path / "model", tmp_path / "saved", f"{tmp_path / 'model'}.work"
    (tmp_path / "pause.py").write_text(PAUSE)
    script = (tmp_path / "pause.py", flag, "04_train_dpo.py")
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(command(tiny_policy, pairs, out, (), script), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **cpu, "TOKENIZERS_PARALLELISM": "false"})
    deadline = time.time() + 600
    while not all(os.path.exists(f"{flag}.{rank}") for rank in (0, 1)):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher, mid-run, and (torchrun starts them in sessions of their own)
    for rank in (0, 1):                  # both training processes, as a crash of the machine would
        os.kill(int(open(f"{flag}.{rank}").read()), signal.SIGKILL)
    proc.wait()
    assert not out.exists() and [n for n in os.listdir(work) if n.startswith("checkpoint-")] == ["checkpoint-2"]
    shards = [f"{bf16}zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in "01"
              for bf16, kind in (("", "model"), ("bf16_", "optim"))]  # DeepSpeed's bf16 ZeRO-3 files, 1 a process
    assert sorted(os.listdir(f"{work}/checkpoint-2/global_step2")) == sorted(shards)

    run_script(command(tiny_policy, pairs, out, precision=()), env=cpu)  # the same command again
    record, metrics, weights = outputs(out)
    assert record["resumed_from"] == os.path.join(work, "checkpoint-2") and record["global_step"] == 4
    assert record["bf16"] is full_record["bf16"] is True and {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert [m["step"] for m in train_logs(metrics)] == [1, 2, 3, 4]
    assert [m["loss"] for m in train_logs(metrics)] == [m["loss"] for m in train_logs(full_metrics)]
    assert weights.keys() == full_weights.keys()
    assert all(torch.equal(weights[k], full_weights[k]) for k in weights)
    assert not os.path.exists(work)


def test_bf16_auto_follows_the_launchers_precision_under_deepspeed(monkeypatch):
    """Under `accelerate launch` with a DeepSpeed config, bf16 "auto" is the config's mixed_precision (transformers
    refuses a DPOConfig that differs from it, once training starts), so the paper's file runs as it is on CPUs too."""
    import torch
    import trl

    monkeypatch.setattr(trl, "DPOConfig", lambda **fields: fields)
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    deepspeed = {"ACCELERATE_USE_DEEPSPEED": "true"}
    for env, bf16 in (({}, gpu_bf16), ({**deepspeed, "ACCELERATE_MIXED_PRECISION": "bf16"}, True),
                      ({**deepspeed, "ACCELERATE_MIXED_PRECISION": "no"}, False)):
        for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_MIXED_PRECISION"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert trl_internals.dpo_config({}, bf16="auto")["bf16"] is bf16, env
        assert trl_internals.dpo_config({}, bf16=True)["bf16"] is True  # an explicit value stays as given
