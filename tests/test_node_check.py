"""configs/node-check.env and tools/node_check.py: a paper preset in miniature and its verdict.

The preset's wiring on two simulated GPUs (every command stubbed) for both paper presets, its refusal on a CPU; the
stage lines, code paths and forecast of tools/node_check.py on hand-made run folders with hand-computed answers; and
its kill-and-resume check on a real tiny training run on the CPU (slow).
"""
import json
import math
import os
import shlex
import struct
import sys

import pytest

import node_check
from conftest import ROOT, run_script
from dice import protocol
from test_report import finish, write_jsonl  # hand-made outputs with their done markers

SCRIPT = os.path.join(ROOT, "run_rounds.sh")
ZERO3 = "accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes 2 04_train_dpo.py"
# What each paper preset hands the check: its small SFT/DPO pair, chat template, sampling and stop ids.
PRESETS = {
    "llama3-8b": dict(sft="AIR-hl/Llama-3.2-1B-ultrachat200k", dpo="AIR-hl/Llama-3.2-1B-DPO",
                      template="configs/templates/llama3-dice.jinja", sampling="--temperature 0.9 --top_p 1.0",
                      stop="--stop_token_ids 128001,128009"),
    "zephyr-7b": dict(sft="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
                      dpo="TinyLlama/TinyLlama-1.1B-Chat-v1.0", template="configs/templates/zephyr-dice.jinja",
                      sampling="--temperature 0.7 --top_p 0.9", stop=None),
}


def safetensors_file(path, shapes):
    """A safetensors file written by hand: 8-byte little-endian header size, the JSON header, the float32 data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


# ----------------------------------------------------------------------------- configs/node-check.env in run_rounds.sh

def run_preset(out, check=True, **env):
    env = {"OUT": str(out), "PYTHON": sys.executable, **env}
    return run_script(["bash", SCRIPT, "configs/node-check.env"], check=check, env=env, timeout=300)


def stub_tools(tmp_path):
    """A PYTHON and an `accelerate` that only append their command line (with CUDA_VISIBLE_DEVICES) to calls.txt and
    exit 0: the loop's command construction, without running any stage."""
    calls, bin_dir = tmp_path / "calls.txt", tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "accelerate"):
        (bin_dir / name).write_text("#!/usr/bin/env bash\n"
                                    f'echo "CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}} {name} $*" >>{calls}\n')
        (bin_dir / name).chmod(0o755)
    env = {"PYTHON": str(bin_dir / "python"), "PATH": f"{bin_dir}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "",
           "OPENAI_API_KEY": ""}
    return calls, env


@pytest.mark.parametrize("preset", PRESETS)
def test_the_presets_settings_reach_every_command_on_two_simulated_gpus(tmp_path, preset):
    """NODE_CHECK_PRESET=PRESET with NUM_GPUS=2, every command stubbed: the paper preset's chat template, sampling and
    stop ids reach 01 (2 vLLM shards of K=16 samples from the DPO model: no round 0) and its AlpacaEval answers; 01
    reads data/demo/prompt.json with --prompt_field instruction; 02 scores in bf16 under `accelerate launch`; 04
    trains the DPO model under ZeRO-3 with the preset's 32 pairs a step (1 x 16 accumulation x 2 GPUs), 8 held-out
    pairs evaluated every 2 steps and a checkpoint saved every 2 steps and kept; the report shows the preset's paper."""
    calls, env = stub_tools(tmp_path)
    out = tmp_path / "out"
    run_preset(out, NUM_GPUS="2", NODE_CHECK_PRESET=preset, **env)
    lines = calls.read_text().splitlines()
    p = PRESETS[preset]

    def find(*parts):
        found = [line for line in lines if all(part in line for part in parts)]
        assert found, f"no call with {parts}:\n" + "\n".join(lines)
        return found

    train, = find("04_train_dpo.py")  # round 1 only: the run starts from the DPO model
    pairs = out / "round_1" / "pairs" / "pairs.jsonl"
    assert train.startswith(f"CUDA_VISIBLE_DEVICES= {ZERO3} --model {p['dpo']} --pairs {pairs} ")
    for part in ("--round 1 ", "--max_steps 4 ", "--beta 0.1 --learning_rate 5e-7 --warmup_steps 0 ",
                 "--per_device_train_batch_size 1 --gradient_accumulation_steps 16 ", "--eval_size 8 ",
                 f"--chat_template {p['template']} "):
        assert part in train
    assert train.endswith(" --eval_steps 2 --save_steps 2 --keep_checkpoints true --reuse_ref_logps False")
    generate = [find(f"CUDA_VISIBLE_DEVICES={i} python 01_generate.py --model {p['dpo']} --prompts "
                     "data/demo/prompt.json ", f"--num_samples 16 {p['sampling']} --max_new_tokens 512 ",
                     "--engine vllm ", "--limit 32 --prompt_field instruction ", f"--chat_template {p['template']}",
                     f"--shard {i} --num_shards 2")[0] for i in (0, 1)]
    answers = [find(f"CUDA_VISIBLE_DEVICES=0 python 01_generate.py --model {model} --prompts "
                    "data/demo/eval_preferences.jsonl ", f"--out {out}/round_{t}/alpaca_eval/model_outputs.json",
                    f"{p['sampling']} --max_new_tokens 512 ", "--engine vllm --limit 8 ",
                    f"--chat_template {p['template']}")[0]
               for t, model in ((0, p["dpo"]), (1, out / "round_1" / "model"))]
    for line in generate + answers:
        assert (p["stop"] in line) if p["stop"] else "--stop_token_ids" not in line
    score = find("02_score.py")
    assert len(score) == 3  # eval of round 0; score and eval of round 1 (SCORE_OFFLINE=0: 04 computes the reference)
    assert all("--dtype bfloat16 " in line and f"--chat_template {p['template']}" in line for line in score)
    find("accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 2 02_score.py --policy "
         f"{p['dpo']} --reference {p['sft']} --responses {out}/round_1/responses.jsonl ")
    find(f"python tools/report.py --out {out} ", f"--sft {p['sft']} ", f"--paper {preset}")
    assert f"tools/node_check.py --out {out}" in lines[-1]


@pytest.mark.parametrize("preset", PRESETS)
def test_a_machine_without_gpus_is_refused_at_once(tmp_path, preset):
    proc = run_preset(tmp_path / "out", check=False, NUM_GPUS="0", NODE_CHECK_PRESET=preset)
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert "needs a GPU node (REQUIRE_GPU=1)" in proc.stderr and "configs/tiny.env is the CPU check" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_preset_is_one_line(tmp_path):
    proc = run_preset(tmp_path / "out", check=False, NUM_GPUS="2", NODE_CHECK_PRESET="llama3")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "error: NODE_CHECK_PRESET must be llama3-8b or zephyr-7b, got 'llama3'\n"
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- tools/node_check.py: stages, forecast

def test_count_parameters_from_safetensors_headers(tmp_path):
    safetensors_file(tmp_path / "model-00001-of-00002.safetensors", {"a": [3, 4], "b": [5]})  # 12 + 5
    safetensors_file(tmp_path / "model-00002-of-00002.safetensors", {"c": [2, 2, 2]})  # 8
    assert node_check.count_parameters(str(tmp_path)) == 25
    numpy, save_file = pytest.importorskip("numpy"), pytest.importorskip("safetensors.numpy").save_file
    (tmp_path / "other").mkdir()  # the same count for a file written by safetensors itself
    save_file({"w": numpy.zeros((7, 3), dtype=numpy.float32), "s": numpy.zeros((), dtype=numpy.float32)},
              str(tmp_path / "other" / "model.safetensors"))
    assert node_check.count_parameters(str(tmp_path / "other")) == 22  # 21 + a scalar (shape [] = 1)
    assert node_check.count_parameters(str(tmp_path / "nothing")) is None


def check_run(out):
    """A run folder: round 0 trained (reference forward every step), round 1 generated in 2 shards, scored, paired,
    and its training failed; score_offline never started."""
    r0, r1 = out / "round_0", out / "round_1"
    (r0 / "model").mkdir(parents=True)
    safetensors_file(r0 / "model" / "model.safetensors", {"w": [10, 10]})  # 100 parameters
    write_jsonl(str(r0 / "model" / "metrics.jsonl"), [{"loss": 0.7, "num_tokens": 1000.0, "step": 5},
                                                      {"train_runtime": 5.0, "step": 5}], done=False)
    finish(str(r0 / "model"), seconds=35.2, global_step=5, train_runtime=5.0,
           reference_logps="reference model forward at every step")  # 200 tokens/s at 4 passes
    write_jsonl(str(r0 / "eval_prefs.jsonl"), [], seconds=4.0, tokens_per_second=999.0)
    write_jsonl(str(r1 / "shards" / "responses.0-of-2.jsonl"), [], seconds=20.0, tokens_per_second=100.0)
    write_jsonl(str(r1 / "shards" / "responses.1-of-2.jsonl"), [{"x": 1}], seconds=25.0, tokens_per_second=150.0)
    write_jsonl(str(r1 / "responses.jsonl"), [{"x": 1}], seconds=1.5)  # the merge: 25 + 1.5 s
    write_jsonl(str(r1 / "scores.jsonl"), [], seconds=12.0, tokens_per_second=400.0)
    write_jsonl(str(r1 / "pairs" / "pairs.jsonl"), [], seconds=0.8)
    (r1 / "logs").mkdir()
    (r1 / "logs" / "train.log").write_text("$ accelerate launch 04_train_dpo.py ...\n  5%|#   | 1/20\r 10%|##  | 2/20\n"
                                           "torch.OutOfMemoryError: CUDA out of memory.\n\n")


def test_stage_lines_passed_failed_and_never_started(tmp_path):
    check_run(tmp_path)
    assert node_check.stage_lines(str(tmp_path)) == [
        ("passed", "round_0/train", 35.2, None), ("passed", "round_0/eval", 4.0, None),
        ("-", "round_0/alpaca_eval", None, None), ("-", "round_0/judge_rm", None, None),
        ("passed", "round_1/generate", 26.5, None), ("passed", "round_1/score", 12.0, None),
        ("-", "round_1/score_offline", None, None), ("passed", "round_1/pairs", 0.8, None),
        ("failed", "round_1/train", None, "round_1/logs/train.log: torch.OutOfMemoryError: CUDA out of memory."),
        ("-", "round_1/eval", None, None), ("-", "round_1/alpaca_eval", None, None),
        ("-", "round_1/judge_rm", None, None)]
    assert node_check.last_line(str(tmp_path / "round_1" / "logs" / "train.log")) == \
        "torch.OutOfMemoryError: CUDA out of memory."
    (tmp_path / "round_1" / "logs" / "train.log").write_text("x\n 5%|#   | 1/20\r 10%|##  | 2/20\n")
    assert node_check.last_line(str(tmp_path / "round_1" / "logs" / "train.log")) == "10%|##  | 2/20"
    start = tmp_path / "dpo_start"  # a run from a DPO model: round 0 has no training to list
    write_jsonl(str(start / "round_0" / "eval_prefs.jsonl"), [], seconds=3.0)
    assert node_check.stage_lines(str(start))[:2] == [("passed", "round_0/eval", 3.0, None),
                                                      ("-", "round_0/alpaca_eval", None, None)]


def test_each_presets_work_per_round_is_read_from_its_file():
    for preset in PRESETS:
        assert node_check.preset_work(preset) == dict(prompts=10_000, samples=16, steps=300, pairs_per_step=32,
                                                      new_tokens=450, sequence_tokens=600, pair_tokens=1_200)


def test_the_forecast_of_each_preset_by_hand():
    rates = {"generate": 1000.0, "score": 2000.0, "train": 500.0, "train_passes": 3.0}
    # 160,000 sequences x 450 new tokens / (1000 x 1e8 / 8.03e9); 160,000 x 600 / (2000 / 80.3);
    # 300 steps x 32 pairs x 1,200 tokens / (500 / 80.3): trained tokens at the check's passes (no reference forward
    # in either), so the passes cancel
    llama = node_check.forecast(rates, 1e8, node_check.PRESET_PARAMS["llama3-8b"], node_check.preset_work("llama3-8b"))
    assert llama == pytest.approx({"generate": 5_781_600, "score": 3_854_400, "train": 1_850_112})
    zephyr = node_check.forecast(rates, 1e8, node_check.PRESET_PARAMS["zephyr-7b"],
                                 node_check.preset_work("zephyr-7b"))  # x 72.4 instead of 80.3
    assert zephyr == pytest.approx({"generate": 5_212_800, "score": 3_475_200, "train": 1_668_096})
    assert node_check.forecast({"score": 2000.0}, 1e8, 7.24e9, node_check.preset_work("zephyr-7b")) == \
        pytest.approx({"score": 3_475_200})


def test_measured_throughputs_and_the_printed_forecast(tmp_path):
    check_run(tmp_path)
    r1 = tmp_path / "round_1"  # make round 1's training finish: 600 tokens at step 2 of 4 in 2 s = 600 tokens/s
    write_jsonl(str(r1 / "model" / "metrics.jsonl"), [{"loss": 0.7, "num_tokens": 300.0, "step": 1},
                                                      {"loss": 0.6, "num_tokens": 600.0, "step": 2}], done=False)
    finish(str(r1 / "model"), seconds=9.0, global_step=4, train_runtime=2.0,
           reference_logps={"train": {"computed": 1, "supplied": 3}})  # 3 + 1/4 passes
    rates = node_check.measured(str(tmp_path))
    # generation: shards add up; scoring: 02 on responses only; training: mean 400, passes (600*3.25 + 200*4) / 800
    assert rates == {"generate": 250.0, "score": 400.0, "train": 400.0, "train_passes": 3.4375}
    proc = run_script(["python", "tools/node_check.py", "--out", tmp_path, "--preset", "zephyr-7b",
                       "--resume_check", "false"], check=False)  # exit 1: hand-made markers fail code paths
    lines = proc.stdout.splitlines()
    assert lines[4] == "passed  round_1/generate       26.5 s" and lines[8] == "passed  round_1/train          9.0 s"
    assert lines[13] == "code paths of the zephyr-7b preset:"
    assert lines[23] == node_check.CANNOT
    assert lines[25] == ("rough forecast of one zephyr-7b round on this node (a ROUGH ESTIMATE scaled by parameter "
                         "count; see the assumptions below)")
    # 72 M new tokens at 250 x 100 / 7.24e9 tokens/s (the check model: round 0's, 100 parameters)
    assert lines[26] == ("  generate  72.0 M new tokens (10,000 prompts x 16 samples x ~450): check 250 tokens/s -> "
                         f"{250 * 100 / 7.24e9:.3g} tokens/s at 7.24 B -> {72e6 / (250 * 100 / 7.24e9) / 86400:,.0f} "
                         "days")
    assert lines[28].startswith("  train     11.5 M tokens (300 steps x 32 pairs x ~1,200): check 400 tokens/s")
    assert "check model 100 parameters (safetensors of " in proc.stdout
    assert "04 ran 3.44 forward passes per trained token in the check" in proc.stdout


def test_node_check_exits_1_naming_the_failed_stage(tmp_path):
    check_run(tmp_path)
    proc = run_script(["python", "tools/node_check.py", "--out", tmp_path, "--resume_check", "false"], check=False)
    assert proc.returncode == 1
    assert "failed  round_1/train  (see round_1/logs/train.log: torch.OutOfMemoryError: CUDA out of memory.)" \
        in proc.stdout.splitlines()
    assert "-       round_1/score_offline" in proc.stdout.splitlines()
    assert "  train     11.5 M tokens (300 steps x 32 pairs x ~1,200): check 200 tokens/s" in proc.stdout
    assert "rough forecast of one llama3-8b round" in proc.stdout
    missing = run_script(["python", "tools/node_check.py", "--out", tmp_path / "nope"], check=False)
    assert missing.returncode == 2 and "no round_N folders" in missing.stderr


# ----------------------------------------------------------------------------- tools/node_check.py: the code paths

def passing_run(out):
    """A run folder in which every code path of the paper presets passed on 2 GPUs (markers as the stages write
    them: 01's engine, 02's num_processes and dtype, 04's bf16 and eval_size; 04's kept ZeRO-3 checkpoint)."""
    r0, r1 = out / "round_0", out / "round_1"
    write_jsonl(str(r0 / "eval_prefs.jsonl"), [], seconds=2.0)
    write_jsonl(str(r0 / "alpaca_eval" / "model_outputs.json"), [], engine="vllm", args={"model": "org/dpo"})
    for i in (0, 1):
        write_jsonl(str(r1 / "shards" / f"responses.{i}-of-2.jsonl"), [], engine="vllm", tokens_per_second=50.0)
    write_jsonl(str(r1 / "responses.jsonl"), [], seconds=1.0)
    write_jsonl(str(r1 / "scores.jsonl"), [], args={"num_processes": 2, "dtype": "bfloat16"})
    write_jsonl(str(r1 / "pairs" / "pairs.jsonl"), [])
    write_jsonl(str(r1 / "model" / "metrics.jsonl"), [{"loss": 0.7, "step": 1}, {"eval_loss": 0.69, "step": 2},
                                                      {"eval_loss": 0.68, "step": 4}], done=False)
    finish(str(r1 / "model"), bf16=True, args={"eval_size": 8}, global_step=4)
    (r1 / "model.work" / "checkpoint-4" / "global_step4").mkdir(parents=True)
    (r1 / "model.work" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (r1 / "logs").mkdir()
    (r1 / "logs" / "train.log").write_text(f"# then\n$ {ZERO3} --model org/dpo --out {r1}/model\nwrote it\n")
    write_jsonl(str(r1 / "eval_prefs.jsonl"), [])
    write_jsonl(str(r1 / "alpaca_eval" / "model_outputs.json"), [], engine="vllm", args={"model": str(r1 / "model")})


def test_every_code_path_passed(tmp_path):
    passing_run(tmp_path)
    assert node_check.path_lines(str(tmp_path), ("passed", "resumed")) == [
        ("passed", "vLLM generation shards", "2 vLLM shards, merged"),
        ("passed", "scoring with accelerate", "2 processes"),
        ("passed", "bf16", "02 scoring and 04 training"),
        ("passed", "ZeRO-3 training", "accelerate launch, 2 processes, ZeRO-3"),
        ("passed", "evaluation during training", "2 evaluations, at steps 2, 4"),
        ("passed", "checkpoint saved", "checkpoint-4 with DeepSpeed's global_step*/"),
        ("passed", "training killed and resumed under ZeRO-3", "resumed"),
        ("passed", "trained model loaded back by vLLM", "round_1/model"),
        ("passed", "AlpacaEval generation", "round_0, round_1")]
    proc = run_script(["python", "tools/node_check.py", "--out", tmp_path, "--resume_check", "false"])
    assert "-       training killed and resumed under ZeRO-3  not run (--resume_check false)" in proc.stdout


def test_code_paths_not_taken_or_failed(tmp_path):
    """One GPU (no shards, python instead of `accelerate launch`), fp32 scoring, hf answers, no held-out pairs and no
    checkpoint kept: "-" where the node could not take the path, failed where the run took another one."""
    passing_run(tmp_path)
    r1 = tmp_path / "round_1"
    for shard in (r1 / "shards").iterdir():
        shard.unlink()
    write_jsonl(str(r1 / "responses.jsonl"), [], engine="vllm")
    write_jsonl(str(r1 / "scores.jsonl"), [], args={"num_processes": 1, "dtype": "float32"})
    (r1 / "logs" / "train.log").write_text(f"$ python 04_train_dpo.py --model org/dpo --out {r1}/model\n")
    finish(str(r1 / "model"), bf16=True, args={"eval_size": 0}, global_step=4)
    (r1 / "model.work" / "checkpoint-4" / "trainer_state.json").unlink()
    write_jsonl(str(r1 / "alpaca_eval" / "model_outputs.json"), [], engine="hf", args={"model": str(r1 / "model")})
    assert node_check.path_lines(str(tmp_path), ("-", "round_1/train did not pass")) == [
        ("-", "vLLM generation shards", "one vLLM worker (1 GPU): no shards"),
        ("-", "scoring with accelerate", "one process (1 GPU)"),
        ("failed", "bf16", "not bf16: 02 scoring"),
        ("-", "ZeRO-3 training", "python, one process (no DeepSpeed)"),
        ("-", "evaluation during training", "EVAL_SIZE=0: no pairs held out"),
        ("-", "checkpoint saved", "none kept (TRAIN_ARGS --keep_checkpoints true keeps them)"),
        ("-", "training killed and resumed under ZeRO-3", "round_1/train did not pass"),
        ("failed", "trained model loaded back by vLLM", "engine hf, not vllm"),
        ("passed", "AlpacaEval generation", "round_0, round_1")]
    proc = run_script(["python", "tools/node_check.py", "--out", tmp_path, "--resume_check", "false"], check=False)
    assert proc.returncode == 1 and "failed  bf16  " in proc.stdout


# ----------------------------------------------------------------------------- tools/node_check.py: kill and resume

def test_with_flags_replaces_or_appends_04s_flags():
    argv = ["accelerate", "launch", "--num_processes", "2", "04_train_dpo.py", "--out", "a", "--save_steps=2"]
    assert node_check.with_flags(argv, out="b", save_steps=1, seed=3) == [
        "accelerate", "launch", "--num_processes", "2", "04_train_dpo.py", "--out", "b", "--save_steps=1",
        "--seed", "3"]
    assert node_check.with_flags(["python", "04_train_dpo.py"], num_processes=4) == \
        ["python", "04_train_dpo.py", "--num_processes", "4"]  # a launcher's flag before the script is not 04's


def logged_run(out, command):
    """round_1 of a run folder whose training finished (a hand-made marker) with `command` as its logged line."""
    (out / "round_1" / "logs").mkdir(parents=True)
    (out / "round_1" / "model").mkdir()
    finish(str(out / "round_1" / "model"))
    (out / "round_1" / "logs" / "train.log").write_text(f"# then\n$ {shlex.join(map(str, command))}\nwrote it\n")


def test_kill_and_resume_reports_a_run_that_ends_before_its_first_checkpoint(tmp_path):
    assert node_check.kill_and_resume(str(tmp_path)) == ("-", "round_1/train did not pass")  # nothing logged
    logged_run(tmp_path, [sys.executable, "04_train_dpo.py", "--model", tmp_path / "missing", "--pairs",
                          "data/demo/preferences.jsonl", "--out", tmp_path / "round_1" / "model"])
    status, detail = node_check.kill_and_resume(str(tmp_path))
    assert status == "failed"
    assert detail == ("the run ended (status 2) before it could be killed at a checkpoint (see "
                      f"node_check/resume/train.log: error: model not found: {tmp_path}/missing is not a model folder)")


@pytest.mark.slow
def test_kill_and_resume_on_a_real_tiny_training_run(tiny_policy, tmp_path):
    """Round 1's training command as logged, the paper's path: DeepSpeed ZeRO-3 (the config as it is, bf16) on 2
    processes, here on the CPU. Rerun into node_check/resume/model with --save_steps 1: killed (the launcher and both
    training processes) once checkpoint-k is complete, the same command again resumes from it and finishes all 4
    steps; the logged run's own output is untouched."""
    logged_run(tmp_path, ["accelerate", "launch", "--config_file", "configs/accelerate/deepspeed_zero3.yaml",
                          "--num_processes", "2", "04_train_dpo.py", "--model", tiny_policy, "--pairs",
                          "data/demo/preferences.jsonl", "--out", tmp_path / "round_1" / "model", "--round", "1",
                          "--max_steps", "4", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps",
                          "1", "--eval_size", "0", "--logging_steps", "1", "--save_steps", "2",
                          "--learning_rate", "1e-3"])
    status, detail = node_check.kill_and_resume(str(tmp_path))
    assert status == "passed", detail
    k = int(detail.split("checkpoint-")[1].split(",")[0])
    assert detail == f"killed after checkpoint-{k}, resumed from it to step 4 (accelerate launch, 2 processes, ZeRO-3)"
    assert 1 <= k < 4
    model = tmp_path / "node_check" / "resume" / "model"
    marker = protocol.finished_marker(str(model))
    assert marker["resumed_from"] == f"{model}.work/checkpoint-{k}" and marker["global_step"] == 4
    log = (tmp_path / "node_check" / "resume" / "train.log").read_text()
    commands = [line for line in log.splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and commands[0] == commands[1]  # the same command twice
    assert f"--out {model} " in commands[0] and "--save_steps 1 " in commands[0] and "--save_steps 2" not in log
    assert "starting at step 0" in log and f"resuming from {model}.work/checkpoint-{k}" in log
    assert os.listdir(tmp_path / "round_1" / "model") == []  # the run's own model: untouched
