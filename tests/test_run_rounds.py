"""run_rounds.sh and its helpers: presets, settings checks, round wiring, resume after kill -9, the settings refusal
and FORCE, a failing shard worker, tools/merge_shards.py and tools/report.py.

The slow tests run the tiny preset (random 2-layer models, offline) end to end: about 2 minutes for the uninterrupted
run on 2 CPU cores, shared by the wiring, resume and refusal tests.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_script

SCRIPT = os.path.join(ROOT, "run_rounds.sh")
PRESETS = ["demo", "tiny", "llama3-8b", "zephyr-7b"]
# The settings every tiny run of these tests shares (the uninterrupted and the killed runs must be comparable).
# --batch_size 1: one generation batch per prompt, so a kill can land between two appended rows.
TINY = {"GEN_ARGS": "--batch_size 1", "ROUNDS": "2"}
STAGES = [("round_0", "train"), ("round_0", "eval"), ("round_1", "generate"), ("round_1", "score"),
          ("round_1", "score_offline"), ("round_1", "pairs"), ("round_1", "train"), ("round_1", "eval")]


def run_loop(out, preset="configs/tiny.env", check=True, **env):
    env = {"OUT": str(out), "PYTHON": sys.executable, "NUM_GPUS": "0", **TINY, **env}
    return run_script(["bash", SCRIPT, preset], check=check, env=env, timeout=900)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- fast checks (no model)

def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "error", SCRIPT], check=True)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_overridable_key_value_files(name):
    """Every setting line is KEY="${KEY:-value}" (so the environment wins) and the file sources cleanly in bash."""
    path = os.path.join(ROOT, "configs", f"{name}.env")
    keys = []
    for line in open(path):
        line = line.split("  #")[0].strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r'([A-Z0-9_]+)="\$\{([A-Z0-9_]+):-[^"$`]*\}"', line)
        assert m and m.group(1) == m.group(2), f"{name}.env: not KEY=\"${{KEY:-value}}\": {line}"
        keys.append(m.group(1))
    assert {"OUT", "SFT_MODEL", "PROMPTS", "NUM_SAMPLES", "GAMMA", "BETA", "LEARNING_RATE"} <= set(keys)
    got = subprocess.run(["bash", "-c", f'set -eu; source "{path}"; echo "$NUM_SAMPLES $GAMMA"'],
                         env={"PATH": os.environ["PATH"], "NUM_SAMPLES": "7"}, capture_output=True, text=True,
                         check=True)
    assert got.stdout.split()[0] == "7"  # the environment overrides the preset


def test_paper_presets_hold_the_paper_settings():
    def load(name):
        out = subprocess.run(["bash", "-c", f'source configs/{name}.env; declare -p | grep -o "declare -- [A-Z_0-9]*=.*"'],
                             cwd=ROOT, capture_output=True, text=True, env={"PATH": os.environ["PATH"]}).stdout
        return dict(re.match(r'declare -- ([A-Z_0-9]+)="?(.*?)"?$', line).groups() for line in out.splitlines())

    llama, zephyr = load("llama3-8b"), load("zephyr-7b")
    assert (llama["DPO_MODEL"], llama["SFT_MODEL"]) == ("princeton-nlp/Llama-3-Base-8B-SFT-DPO",
                                                        "princeton-nlp/Llama-3-Base-8B-SFT")
    assert (zephyr["DPO_MODEL"], zephyr["SFT_MODEL"]) == ("HuggingFaceH4/zephyr-7b-beta",
                                                          "HuggingFaceH4/mistral-7b-sft-beta")
    assert (llama["TEMPERATURE"], llama["TOP_P"], llama["STOP_TOKEN_IDS"]) == ("0.9", "1.0", "128001,128009")
    assert (zephyr["TEMPERATURE"], zephyr["TOP_P"], zephyr["STOP_TOKEN_IDS"]) == ("0.7", "0.9", "")
    for p in (llama, zephyr):
        assert (p["NUM_SAMPLES"], p["MIN_VALID"], p["GAMMA"], p["BETA"], p["LEARNING_RATE"], p["MAX_STEPS"],
                p["WARMUP_STEPS"], p["GLOBAL_BATCH"], p["EVAL_SIZE"]) == ("16", "8", "0.5", "0.1", "5e-7", "300",
                                                                          "50", "32", "576")


@pytest.mark.parametrize("env, message", [
    ({"ROUNDS": "two"}, "ROUNDS must be a whole number"),
    ({"FORCE": "yes"}, "FORCE must be 0 or 1"),
    ({"NUM_GPUS": "4", "TP_SIZE": "3"}, "not a multiple of TP_SIZE"),
    ({"GLOBAL_BATCH": "3"}, "GLOBAL_BATCH=3 is not a multiple"),
    ({"PROMPTS": "data/demo/nope.jsonl"}, "input file data/demo/nope.jsonl not found"),
    ({"SFT_MODEL": "tiny:x"}, "expected tiny:SEED"),
])
def test_bad_settings_fail_early_with_one_line(tmp_path, env, message):
    proc = run_loop(tmp_path / "out", check=False, **env)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "out" / "round_0").exists()


def test_missing_preset_is_a_clear_error(tmp_path):
    proc = run_script(["bash", SCRIPT, "configs/nope.env"], check=False, env={"OUT": str(tmp_path)})
    assert proc.returncode == 2 and "preset configs/nope.env not found" in proc.stderr


# ----------------------------------------------------------------------------- tools/merge_shards.py

def _write_shard(path, rows, done=True):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if done:
        open(str(path) + ".done.json", "w").write("{}")


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a?", "b?", "c?", "a?", "d?"]))
    return path


def test_merge_shards_restores_the_unsharded_order(tmp_path, prompt_file):
    import common

    merge = pytest.importorskip("merge_shards")
    order = merge.expected_prompt_ids(str(prompt_file))
    assert order == sorted(common.prompt_id(p) for p in ["a?", "b?", "c?", "d?"])  # 01's order: deduplicated, sorted
    rows = [{"prompt_id": pid, "responses": [pid]} for pid in order]
    _write_shard(tmp_path / "s0.jsonl", rows[0::2])
    _write_shard(tmp_path / "s1.jsonl", rows[1::2])
    run_script(["python", "tools/merge_shards.py", "--prompts", prompt_file, "--out", tmp_path / "m.jsonl",
                tmp_path / "s0.jsonl", tmp_path / "s1.jsonl"])
    assert read_jsonl(tmp_path / "m.jsonl") == rows
    assert os.path.exists(tmp_path / "m.jsonl.done.json")
    assert merge.expected_prompt_ids(str(prompt_file), limit=2) == sorted(common.prompt_id(p) for p in ["a?", "b?"])


@pytest.mark.parametrize("case, message", [
    ("missing", "1 missing"), ("extra", "1 unexpected"), ("twice", "is also in"), ("unfinished", "is not finished"),
])
def test_merge_shards_refuses_a_wrong_union(tmp_path, prompt_file, case, message):
    merge = pytest.importorskip("merge_shards")
    rows = [{"prompt_id": pid, "responses": [pid]} for pid in merge.expected_prompt_ids(str(prompt_file))]
    s0, s1 = rows[0::2], rows[1::2]
    if case == "missing":
        s1 = s1[:-1]
    elif case == "extra":
        s1 = s1 + [{"prompt_id": "ffffffffffffffff", "responses": []}]
    elif case == "twice":
        s1 = s1 + s0[:1]
    _write_shard(tmp_path / "s0.jsonl", s0)
    _write_shard(tmp_path / "s1.jsonl", s1, done=case != "unfinished")
    proc = run_script(["python", "tools/merge_shards.py", "--prompts", prompt_file, "--out", tmp_path / "m.jsonl",
                       tmp_path / "s0.jsonl", tmp_path / "s1.jsonl"], check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert not os.path.exists(tmp_path / "m.jsonl")


# ----------------------------------------------------------------------------- tools/prepare_ultrafeedback.py

def test_prepare_ultrafeedback_on_a_local_copy(tmp_path):
    """A tiny DatasetDict in UltraFeedback-binarized form: the prompts and their pairs match, held-out prompts are
    disjoint from the rounds' prompts, identical pairs are skipped, the same seed gives the same files."""
    import datasets

    def conv(p, a):
        return [{"role": "user", "content": p}, {"role": "assistant", "content": a}]

    def rows(prefix, n):
        return {"prompt": [f"{prefix} {i}?" for i in range(n)],
                "chosen": [conv(f"{prefix} {i}?", f"good {i}") for i in range(n)],
                "rejected": [conv(f"{prefix} {i}?", "good 0" if i == 0 else f"bad {i}") for i in range(n)]}

    src = tmp_path / "uf"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_dict(rows("q", 12)),
                          "test_prefs": datasets.Dataset.from_dict(rows("t", 6))}).save_to_disk(str(src))
    for out in ("a", "b"):
        run_script(["python", "tools/prepare_ultrafeedback.py", "--source", src, "--out", tmp_path / out,
                    "--num_prompts", "5", "--num_eval", "3", "--seed", "1"])
    prompts = read_jsonl(tmp_path / "a" / "prompts.jsonl")
    prefs = read_jsonl(tmp_path / "a" / "preferences.jsonl")
    held = read_jsonl(tmp_path / "a" / "eval_preferences.jsonl")
    assert len(prompts) == 5 and [p["prompt"] for p in prefs] == [p["prompt"] for p in prompts]
    assert all(p["chosen"] == "good " + p["prompt"][2:-1] and p["rejected"].startswith("bad") for p in prefs)
    assert "q 0?" not in {p["prompt"] for p in prompts}  # chosen == rejected: skipped
    assert len(held) == 3 and all(p["prompt"].startswith("t ") for p in held)
    for name in ("prompts.jsonl", "preferences.jsonl", "eval_preferences.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    proc = run_script(["python", "tools/prepare_ultrafeedback.py", "--source", src, "--out", tmp_path / "a"],
                      check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr


# ----------------------------------------------------------------------------- tools/report.py on hand-made files

def test_report_figures_on_known_files(tmp_path):
    r1 = tmp_path / "round_1"
    (r1 / "stages").mkdir(parents=True)
    (r1 / "pairs").mkdir()
    (r1 / "model").mkdir()
    for stage in ("generate", "score", "pairs", "train", "eval"):
        (r1 / "stages" / f"{stage}.done.json").write_text("{}")
    _write_shard(r1 / "responses.jsonl", [
        {"prompt_id": "a", "prompt": "p", "responses": ["xx", "yyyy"], "finish_reasons": ["stop", "length"],
         "num_tokens": [2, 6]},
        {"prompt_id": "b", "prompt": "q", "responses": ["z", "wwwwww"], "finish_reasons": ["stop", "stop"],
         "num_tokens": [1, 3]}])
    _write_shard(r1 / "scores.jsonl", [{"rewards": [1.0, 3.0], "valid": [True, False]},
                                       {"rewards": [2.0, 0.0], "valid": [True, True]}])
    (r1 / "pairs" / "stats.json").write_text(json.dumps({
        "alpha": 0.003, "mean_len_diff_before": 12.5, "mean_len_diff_after": -0.5, "chosen_len": {"mean": 40.0},
        "rejected_len": {"mean": 40.5}, "counts": {"n_pairs_generated": 7, "n_pairs_offline": 7,
                                                   "n_dropped_min_valid": 2, "n_dropped_tie": 1,
                                                   "n_dropped_identical": 0}}))
    _write_shard(r1 / "model" / "metrics.jsonl", [
        {"loss": 0.6931, "rewards/accuracies": 0.0, "step": 1}, {"loss": 0.5, "rewards/accuracies": 0.75, "step": 2},
        {"train_runtime": 3.0, "train_loss": 0.6, "step": 2}])
    _write_shard(r1 / "eval_prefs.jsonl", [{"chosen_reward": 1.0, "rejected_reward": 0.0},
                                           {"chosen_reward": 0.0, "rejected_reward": 0.0},  # a tie counts as wrong
                                           {"chosen_reward": -1.0, "rejected_reward": 1.0},
                                           {"chosen_reward": 2.0, "rejected_reward": 1.0}])
    r2 = tmp_path / "round_2"  # a round whose stages have not finished: its files must not be read
    (r2 / "stages").mkdir(parents=True)
    (r2 / "responses.jsonl").write_text('{"torn": ')
    proc = run_script(["python", "tools/report.py", "--out", tmp_path])
    import report

    rows = report.collect(str(tmp_path))
    assert [r["round"] for r in rows] == [1, 2]
    one = rows[0]
    assert one["truncation_rate"] == 0.25 and one["gen_mean_tokens"] == 3.0 and one["gen_mean_chars"] == 3.25
    assert one["valid_rate"] == 0.75 and one["mean_reward"] == 1.0
    assert (one["alpha"], one["gap_before"], one["gap_after"], one["pairs_generated"], one["dropped_min_valid"]) == \
        (0.003, 12.5, -0.5, 7, 2)
    assert (one["loss_first"], one["loss_last"], one["reward_acc_last"]) == (0.6931, 0.5, 0.75)
    assert one["eval_accuracy"] == 0.5 and one["eval_pairs"] == 4
    assert rows[1]["stages_done"] == [] and "truncation_rate" not in rows[1]
    text = (tmp_path / "report.md").read_text()
    assert "| 1 | 0.003 | +12.5 | -0.5 | 7/7 | 25% | 0.6931->0.5000 | 0.75 | 0.500 |" in text
    assert "report_lengths.png" in text and (tmp_path / "report_eval.png").exists()
    assert "0.6931->0.5000" in proc.stdout


# ----------------------------------------------------------------------------- the tiny preset end to end (slow)

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted run of the tiny preset (round 0 + 2 rounds); the reference for the resume test."""
    out = tmp_path_factory.mktemp("tiny_run") / "out"
    started = time.time()
    proc = run_loop(out)
    return out, proc, time.time() - started


def _commands(log):
    return [line[2:] for line in open(log) if line.startswith("$ ")]


@pytest.mark.slow
def test_tiny_preset_end_to_end(tiny_run):
    out, proc, seconds = tiny_run
    sft, pi0, pi1 = out / "models" / "tiny-seed1", out / "round_0" / "model", out / "round_1" / "model"
    assert os.path.isfile(out / "round_0" / "model" / "model.safetensors")
    for t in (1, 2):
        r = out / f"round_{t}"
        for name in ("responses.jsonl", "scores.jsonl", "offline_scored.jsonl", "pairs/pairs.jsonl",
                     "pairs/stats.json", "model/model.safetensors", "eval_prefs.jsonl"):
            assert os.path.isfile(r / name), f"round_{t}/{name} missing"
        for stage in ("generate", "score", "score_offline", "pairs", "train", "eval"):
            assert os.path.isfile(r / "stages" / f"{stage}.done.json")
            assert len(_commands(r / "logs" / f"{stage}.log")) == 1  # the exact command, echoed once
        rows = read_jsonl(r / "responses.jsonl")
        assert len(rows) == 6 and all(len(row["responses"]) == 4 for row in rows)
        pairs = read_jsonl(r / "pairs" / "pairs.jsonl")
        assert {p["source"] for p in pairs} == {"generated", "offline"}
        # the replay pairs carry the scoring policy's log-probs, so training needs no reference forward
        assert all(p["ref_chosen_logps"] is not None for p in pairs)
    # the paper's wiring: round t generates with pi_{t-1} and scores with (pi_{t-1}, pi_{t-2}), pi_{-1} = SFT
    gen1, = _commands(out / "round_1" / "logs" / "generate.log")
    score1, = _commands(out / "round_1" / "logs" / "score.log")
    score2, = _commands(out / "round_2" / "logs" / "score.log")
    train2, = _commands(out / "round_2" / "logs" / "train.log")
    eval2, = _commands(out / "round_2" / "logs" / "eval.log")
    assert f"--model {pi0} " in gen1
    assert f"--policy {pi0} --reference {sft} " in score1
    assert f"--policy {pi1} --reference {pi0} " in score2
    assert f"--model {pi1} " in train2 and f"--out {out / 'round_2' / 'model'} " in train2
    assert f"--policy {out / 'round_2' / 'model'} --reference {pi1} " in eval2
    # the report: a row per round, printed at the end too
    text = (out / "report.md").read_text()
    for t in (0, 1, 2):
        assert re.search(rf"^\| {t} \|", text, re.M)
    assert "eval acc" in proc.stdout and "report.md" in proc.stdout
    print(f"tiny preset, uninterrupted: {seconds:.0f} s")


@pytest.mark.slow
def test_rerun_skips_and_changed_settings_are_refused(tiny_run, tmp_path):
    out, _, _ = tiny_run
    pairs = out / "round_2" / "pairs" / "pairs.jsonl"
    before = (pairs.read_bytes(), os.path.getmtime(pairs))
    proc = run_loop(out)
    assert proc.stdout.count("skip ") == 14  # 2 stages of round 0 + 6 per round
    assert "start " not in proc.stdout
    assert (pairs.read_bytes(), os.path.getmtime(pairs)) == before
    # a changed training setting of round 1 and later: refused, nothing touched
    proc = run_loop(out, check=False, MAX_STEPS="3")
    assert proc.returncode != 0
    assert "round_1/train finished before with other settings" in proc.stderr and "FORCE=1" in proc.stderr
    assert (pairs.read_bytes(), os.path.getmtime(pairs)) == before
    # a changed input file is a changed setting too
    prompts = tmp_path / "prompts.jsonl"
    shutil.copy(os.path.join(ROOT, "data/demo/prompts.jsonl"), prompts)
    with open(prompts, "a") as f:
        f.write(json.dumps({"prompt": "One more prompt?"}) + "\n")
    proc = run_loop(out, check=False, PROMPTS=str(prompts))
    assert proc.returncode != 0 and "round_1/generate finished before with other settings" in proc.stderr


def _without_plots(text):
    return re.sub(r"## Plots\n\n(!\[.*\n)+\n", "", text)


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_kill_9_inside_every_stage_then_rerun_equals_uninterrupted(tiny_run, tmp_path):
    """kill -9 the whole loop (its process group) inside each stage of rounds 0 and 1, rerun each time; the final
    pairs and the report equal the uninterrupted run's (for the same rounds: the killed run stops after round 1)."""
    ref, _, _ = tiny_run
    out = tmp_path / "out"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OUT": str(out), "PYTHON": sys.executable,
           "NUM_GPUS": "0", **TINY}
    run_log = out / "run.log"
    for rnd, stage in STAGES:
        seen = run_log.read_text() if run_log.exists() else ""
        stage_log = out / rnd / "logs" / f"{stage}.log"
        log_before = stage_log.read_text() if stage_log.exists() else ""
        proc = subprocess.Popen(["bash", SCRIPT, "configs/tiny.env"], cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = lambda: run_log.exists() and f"start  {rnd}/{stage}" in run_log.read_text()[len(seen):]  # noqa
        assert _wait_for(started, proc), f"{rnd}/{stage} never started"
        if stage == "generate":  # kill between two appended rows of the partial file
            assert _wait_for(lambda: "[2/6 prompts]" in stage_log.read_text()[len(log_before):], proc)
        else:
            time.sleep(0.5 if stage == "pairs" else 1.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (out / rnd / "stages" / f"{stage}.done.json").exists(), f"the kill came after {rnd}/{stage}"
        if stage == "generate":
            assert len(read_jsonl(out / rnd / "responses.jsonl.partial")) >= 2
    run_loop(out, ROUNDS="1")  # round 2 would add nothing but time; the reference report is cut to rounds 0-1
    assert "resume: " in (out / "round_1" / "logs" / "generate.log").read_text()  # 01 resumed its partial file
    assert (out / "round_1" / "pairs" / "pairs.jsonl").read_text() == \
        (ref / "round_1" / "pairs" / "pairs.jsonl").read_text()
    cut = tmp_path / "reference"
    for rnd in ("round_0", "round_1"):
        shutil.copytree(ref / rnd, cut / rnd, symlinks=True)
    run_script(["python", "tools/report.py", "--out", cut, "--plots", "false"])
    assert _without_plots((out / "report.md").read_text()) == _without_plots((cut / "report.md").read_text())


@pytest.mark.slow
def test_a_failing_shard_worker_fails_the_stage(tmp_path):
    """NUM_GPUS=2 on a CPU: two generation shards; a PYTHON wrapper makes shard 1 exit 3. The stage fails naming the
    worker, the other worker is stopped, nothing is merged. A rerun with the wrapper fixed resumes, merges, and the
    merged file holds exactly the rows an unsharded 01_generate.py writes."""
    wrapper = tmp_path / "python"
    wrapper.write_text("#!/usr/bin/env bash\nprev=\nfor a in \"$@\"; do\n"
                       "  if [[ $prev == --shard && $a == 1 ]]; then echo 'simulated failure' >&2; exit 3; fi\n"
                       "  prev=$a\ndone\n"
                       f"exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    settings = dict(NUM_GPUS="2", ROUNDS="1", DPO_MODEL="tiny:2", GLOBAL_BATCH="4", STOP_AFTER="round_1/generate")
    proc = run_loop(out, check=False, PYTHON=str(wrapper), **settings)
    assert proc.returncode != 0
    assert "round_1/generate failed: worker 1 exited with status 3" in proc.stderr
    assert "simulated failure" in proc.stderr
    r1 = out / "round_1"
    assert not (r1 / "responses.jsonl").exists() and not (r1 / "stages" / "generate.done.json").exists()
    assert not (r1 / "shards" / "responses.0-of-2.jsonl.done.json").exists()  # worker 0 was stopped
    for i in (0, 1):  # one worker per (fake) GPU
        assert _commands(r1 / "logs" / f"generate.shard{i}.log")[0].startswith(f"CUDA_VISIBLE_DEVICES={i} ")
    # the worker fixed (same PYTHON path, so the same settings), a rerun resumes; generation finishes and the loop
    # stops there (STOP_AFTER: what follows would run under `accelerate launch` for 2 GPUs)
    wrapper.write_text(f"#!/usr/bin/env bash\nexec {sys.executable} \"$@\"\n")
    proc = run_loop(out, PYTHON=str(wrapper), **settings)
    assert "resume round_1/generate" in proc.stdout and "stop   after round_1/generate" in proc.stdout
    assert not (r1 / "stages" / "score.started.json").exists()
    assert (r1 / "stages" / "generate.done.json").exists()
    merged = read_jsonl(r1 / "responses.jsonl")
    gen, = _commands(r1 / "logs" / "generate.shard0.log")[-1:]
    single = tmp_path / "single.jsonl"
    run_script(["python", "01_generate.py", "--model", out / "models" / "tiny-seed2", "--prompts",
                "data/demo/prompts.jsonl", "--out", single, "--num_samples", "4", "--temperature", "10", "--top_p",
                "1.0", "--max_new_tokens", "48", "--seed", "1", "--engine", "auto", "--limit", "6",
                "--stop_token_ids", ",".join(map(str, range(3, 21))), "--batch_size", "1"])
    assert "--shard 0 --num_shards 2" in gen
    assert merged == read_jsonl(single)


@pytest.mark.slow
def test_force_redoes_a_changed_stage_and_what_follows(tiny_run):
    """Last, as it changes the reference run: FORCE=1 with fewer prompts redoes round 1 from generation on and
    skips what did not change (round 0, the scoring of the offline pairs)."""
    out, _, _ = tiny_run
    proc = run_loop(out, ROUNDS="1", FORCE="1", PROMPT_LIMIT="5")
    assert "skip   round_0/train" in proc.stdout and "skip   round_1/score_offline" in proc.stdout
    for stage in ("generate", "score", "pairs", "train", "eval"):
        assert f"FORCE  round_1/{stage}" in proc.stdout
    assert len(read_jsonl(out / "round_1" / "responses.jsonl")) == 5


def test_a_moved_run_folder_is_still_recognised(tmp_path):
    """The stage keys write OUT as $OUT: a finished stage copied elsewhere is skipped, not refused (no model needed:
    round 0's train stage is faked by its done marker and its model folder)."""
    out = tmp_path / "a"
    proc = run_loop(out, check=False, ROUNDS="0", EVAL_PREFS="", ROUND0_MAX_STEPS="0")
    assert proc.returncode != 0  # 04 refuses 0 steps; the stage started and recorded its key
    started = out / "round_0" / "stages" / "train.started.json"
    key = json.loads(started.read_text())["key"]
    moved = tmp_path / "b"
    shutil.copytree(out, moved)
    proc = run_loop(moved, check=False, ROUNDS="0", EVAL_PREFS="", ROUND0_MAX_STEPS="0")
    assert "resume round_0/train" in proc.stdout  # same key: an unfinished run with the same settings
    assert json.loads((moved / "round_0" / "stages" / "train.started.json").read_text())["key"] == key


# ----------------------------------------------------------------------------- the demo preset with the real model (slow)

@pytest.mark.slow
def test_demo_preset_runs_with_smollm2_scaled_down(smollm2, tmp_path):
    """The default preset as a user runs it, on the real SmolLM2-135M-Instruct, made small (6 prompts, 1 round, 2 steps,
    20 offline pairs): round 0 trains pi_0, round 1 samples, scores, builds pairs and trains pi_1 with the generated
    pairs' reference log-probs supplied by stage 2 and only the replayed pairs' computed by stage 4 (SCORE_OFFLINE=0).
    About 3 minutes on 2 CPU cores; the full demo (16.5 min) is measured in the README."""
    offline, held_out = tmp_path / "prefs.jsonl", tmp_path / "eval.jsonl"
    offline.write_text("".join(open(os.path.join(ROOT, "data/demo/preferences.jsonl")).readlines()[:20]))
    held_out.write_text("".join(open(os.path.join(ROOT, "data/demo/eval_preferences.jsonl")).readlines()[:6]))
    out = tmp_path / "out"
    run_loop(out, preset="configs/demo.env", SFT_MODEL=smollm2, ROUNDS="1", PROMPT_LIMIT="6",
             OFFLINE_PREFS=str(offline), EVAL_PREFS=str(held_out), ROUND0_MAX_STEPS="2", MAX_STEPS="2", GEN_ARGS="")
    pi0, pi1 = out / "round_0" / "model", out / "round_1" / "model"
    gen, = _commands(out / "round_1" / "logs" / "generate.log")
    assert f"--model {pi0} " in gen and "--max_new_tokens 128 " in gen and "--num_samples 4 " in gen
    score, = _commands(out / "round_1" / "logs" / "score.log")
    assert f"--policy {pi0} --reference {smollm2} " in score
    rows = read_jsonl(out / "round_1" / "responses.jsonl")
    assert len(rows) == 6 and all(len(r["responses"]) == 4 for r in rows)
    scored = {r["prompt_id"]: r for r in read_jsonl(out / "round_1" / "scores.jsonl")}
    pairs = read_jsonl(out / "round_1" / "pairs" / "pairs.jsonl")
    generated = [p for p in pairs if p["source"] == "generated"]
    offline_rows = [p for p in pairs if p["source"] == "offline"]
    assert generated and len(offline_rows) == len(generated)  # gamma 0.5
    for p in generated:  # pi_0's log-probs of the two responses, as 02 wrote them, become pi_1's reference log-probs
        s = scored[p["prompt_id"]]
        c, r = s["responses"].index(p["chosen"]), s["responses"].index(p["rejected"])
        assert s["valid"][c] and s["valid"][r]
        if s["completion_starts"][c] == s["completion_starts"][r]:
            assert (p["ref_chosen_logps"], p["ref_rejected_logps"]) == (s["policy_logps"][c], s["policy_logps"][r])
    assert all(p["ref_chosen_logps"] is None for p in offline_rows)  # SCORE_OFFLINE=0: stage 4 computes these
    supplied = sum(p["ref_chosen_logps"] is not None for p in pairs)
    train_log = (out / "round_1" / "logs" / "train.log").read_text()
    assert f'reference log-probs: {{"train": {{"supplied": {supplied}, "computed": {len(pairs) - supplied}}}}}' \
        in train_log
    assert os.path.isfile(pi1 / "model.safetensors")
    text = (out / "report.md").read_text()
    assert re.search(r"^\| 0 \|", text, re.M) and re.search(r"^\| 1 \|", text, re.M)
