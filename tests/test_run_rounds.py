"""run_rounds.sh and its helpers: presets, settings checks, one run per OUT, round wiring, reruns ("done already"),
resume after kill -9, the settings refusal and FORCE, a failing shard worker, tools/merge_shards.py and tools/report.py.

Skipping and refusing are the stage scripts' (protocol.stage): these tests check that the loop hands every stage the
right command, passes --overwrite with FORCE=1, and stops on a refusal with one line. The slow tests run the tiny preset
(random 2-layer models, offline) end to end: a few minutes for the uninterrupted run on 2 CPU cores, shared by the
wiring, rerun and refusal tests.
"""
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import report
from conftest import ROOT, run_script
from dice import data, protocol

SCRIPT = os.path.join(ROOT, "run_rounds.sh")
# Flat KEY="${KEY:-value}" files (configs/node-check.env sources a paper preset: tests/test_node_check.py).
PRESETS = ["demo", "tiny", "llama3-8b", "zephyr-7b", "tulu3-8b", "tulu3-70b"]
# The settings every tiny run of these tests shares (the uninterrupted and the killed runs must be comparable).
# --batch_size 1: one generation batch per prompt, so a kill can land between two appended rows.
TINY = {"GEN_ARGS": "--batch_size 1", "ROUNDS": "2"}
STAGES = [("round_0", "train"), ("round_0", "eval"), ("round_1", "generate"), ("round_1", "score"),
          ("round_1", "score_offline"), ("round_1", "pairs"), ("round_1", "train"), ("round_1", "eval")]
ROUND_STAGES = ["generate", "score", "score_offline", "pairs", "train", "eval"]


def run_loop(out, preset="configs/tiny.env", check=True, **env):
    env = {"OUT": str(out), "PYTHON": sys.executable, "NUM_GPUS": "0", **TINY, **env}
    return run_script(["bash", SCRIPT, preset], check=check, env=env, timeout=900)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def stage_ends(stdout):
    """{"round_t/stage": the stage's last line} from the loop's `done round_t/stage (N s): LAST LINE` lines."""
    return dict(re.findall(r"\] done (round_\d+/\w+) \(\d+ s\): (.*)", stdout))


def output_of(out, rnd, stage):
    return out / rnd / report.OUTPUTS[stage]


def finish(path):
    """A done marker for a hand-made output, as protocol.stage writes it (the fields tools/report.py reads)."""
    marker = {"output": {"path": str(path), "fingerprint": protocol.fingerprint(path)}}
    protocol.write_json(protocol.done_marker(path), marker)


def _wait_for(predicate, proc, timeout=300):
    """Poll `predicate` until it holds (True), `proc` exits or `timeout` passes (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def start_loop(out, output, **env):
    """run_rounds.sh on the tiny preset in the background, in its own process group (to kill it whole); its stdout
    and stderr go to the file `output`."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OUT": str(out), "PYTHON": sys.executable,
           "NUM_GPUS": "0", **TINY, **env}
    with open(output, "w") as f:
        return subprocess.Popen(["bash", SCRIPT, "configs/tiny.env"], cwd=ROOT, env=env, start_new_session=True,
                                stdout=f, stderr=subprocess.STDOUT)


def lock_is_free(path):
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False


def kill_group(proc, out):
    """kill -9 the loop's whole process group (the loop, its workers and their children), then wait until the
    kernel has freed OUT/run.lock: every worker holds it, and a killed worker takes a moment to exit."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # every process of the group has exited already
        pass
    proc.wait()
    lock = os.path.join(out, "run.lock")
    deadline = time.time() + 60
    while os.path.exists(lock) and not lock_is_free(lock) and time.time() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(lock) or lock_is_free(lock)


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
    assert {"OUT", "SFT_MODEL", "NUM_SAMPLES", "GAMMA", "BETA", "LEARNING_RATE"} <= set(keys)
    assert "PROMPTS" in keys or "DICE_REPO" in keys  # the paper presets' prompts come from the official repository
    got = subprocess.run(["bash", "-c", f'set -eu; source "{path}"; echo "$NUM_SAMPLES $GAMMA"'],
                         env={"PATH": os.environ["PATH"], "NUM_SAMPLES": "7"}, capture_output=True, text=True,
                         check=True)
    assert got.stdout.split()[0] == "7"  # the environment overrides the preset


def test_paper_presets_hold_the_paper_settings():
    def load(name):
        script = f'source configs/{name}.env; declare -p | grep -o "declare -- [A-Z_0-9]*=.*"'
        out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                             env={"PATH": os.environ["PATH"]}).stdout
        return dict(re.match(r'declare -- ([A-Z_0-9]+)="?(.*?)"?$', line).groups() for line in out.splitlines())

    llama, zephyr = load("llama3-8b"), load("zephyr-7b")
    assert (llama["DPO_MODEL"], llama["SFT_MODEL"]) == ("princeton-nlp/Llama-3-Base-8B-SFT-DPO",
                                                        "princeton-nlp/Llama-3-Base-8B-SFT")
    assert (zephyr["DPO_MODEL"], zephyr["SFT_MODEL"]) == ("HuggingFaceH4/zephyr-7b-beta",
                                                          "HuggingFaceH4/mistral-7b-sft-beta")
    assert (llama["TEMPERATURE"], llama["TOP_P"], llama["STOP_TOKEN_IDS"]) == ("0.9", "1.0", "128001,128009")
    assert (zephyr["TEMPERATURE"], zephyr["TOP_P"], zephyr["STOP_TOKEN_IDS"]) == ("0.7", "0.9", "")
    for p in (llama, zephyr):
        # WARMUP_STEPS 0: the official `--lr_scheduler_type constant --warmup_steps 50` trains at a flat rate
        assert (p["NUM_SAMPLES"], p["MIN_VALID"], p["GAMMA"], p["BETA"], p["LEARNING_RATE"], p["MAX_STEPS"],
                p["WARMUP_STEPS"], p["GLOBAL_BATCH"], p["EVAL_SIZE"]) == ("16", "8", "0.5", "0.1", "5e-7", "300",
                                                                          "0", "32", "576")
        # the authors' data from a clone of sail-sg/dice, not set by the preset itself; held-out pairs from UF's test.
        # No PROMPT_FIELD: run_rounds.sh reads DICE_REPO's prompt.json with `instruction`, 01 finds the field of others
        assert p["DICE_REPO"] == "official-dice" and p["ATTN_IMPLEMENTATION"] == ""
        # the reference in training precision (README "The reference's precision"): TRL's precompute in 04
        assert (p["TRAIN_ARGS"], p["SCORE_OFFLINE"]) == ("--reuse_ref_logps False", "0")
        assert "PROMPTS" not in p and "OFFLINE_PREFS" not in p and "PROMPT_FIELD" not in p
        assert p["EVAL_PREFS"] == "data/ultrafeedback/eval_preferences.jsonl"
    assert (llama["CHAT_TEMPLATE"], llama["PAPER"]) == ("configs/templates/llama3-dice.jinja", "llama3-8b")
    assert (zephyr["CHAT_TEMPLATE"], zephyr["PAPER"]) == ("configs/templates/zephyr-dice.jinja", "zephyr-7b")
    for p in (llama, zephyr):
        assert os.path.isfile(os.path.join(ROOT, p["CHAT_TEMPLATE"]))
    for name in ("demo", "tiny"):  # the small presets keep their tokenizers' own templates, and a flat rate
        assert (load(name)["CHAT_TEMPLATE"], load(name)["WARMUP_STEPS"]) == ("", "0")


@pytest.mark.parametrize("env, message", [
    ({"ROUNDS": "two"}, "ROUNDS must be a whole number"),
    ({"FORCE": "yes"}, "FORCE must be 0 or 1"),
    ({"NUM_GPUS": "4", "TP_SIZE": "3"}, "not a multiple of TP_SIZE"),
    ({"GLOBAL_BATCH": "3"}, "GLOBAL_BATCH=3 is not a multiple"),
    ({"GLOBAL_BATCH": "many"}, "GLOBAL_BATCH must be a whole number or auto"),
    ({"REQUIRE_GPU": "yes"}, "REQUIRE_GPU must be 0 or 1"),
    ({"CHAT_TEMPLATE": "configs/templates/nope.jinja"}, "input file configs/templates/nope.jinja not found"),
    ({"PROMPTS": "data/demo/nope.jsonl"}, "input file data/demo/nope.jsonl not found"),
    ({"SFT_MODEL": "tiny:x"}, "expected tiny:SEED"),
    ({"EVAL_PREFS": "data/demo/nope.jsonl"},
     "input file data/demo/nope.jsonl not found (EVAL_PREFS; EVAL_PREFS=none to go without)"),
    ({"NODE_CHECK_PRESET": "llama3"}, "NODE_CHECK_PRESET must be llama3-8b or zephyr-7b, got 'llama3'"),
    ({"STOP_AFTER": "round_1/pair"}, "STOP_AFTER=round_1/pair names no stage of this run"),
    ({"STOP_AFTER": "round_0/generate"}, "round_0/STAGE with STAGE one of train, eval, alpaca_eval, "),
    ({"STOP_AFTER": "round_3/train"}, "round_T/STAGE with T in 1..2 (ROUNDS) and STAGE one of generate, score, "),
    ({"STOP_AFTER": "round_01/train"}, "STOP_AFTER=round_01/train names no stage"),
    ({"STOP_AFTER": "train"}, "STOP_AFTER=train names no stage"),
])
def test_bad_settings_fail_early_with_one_line(tmp_path, env, message):
    proc = run_loop(tmp_path / "out", check=False, **env)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "out" / "round_0").exists()


def test_missing_preset_is_a_clear_error(tmp_path):
    proc = run_script(["bash", SCRIPT, "configs/nope.env"], check=False, env={"OUT": str(tmp_path)})
    assert proc.returncode == 2 and "preset configs/nope.env not found" in proc.stderr


def test_a_missing_dice_repo_is_one_line_naming_the_files_and_the_clone(tmp_path):
    """The paper presets read the authors' data from a clone of sail-sg/dice (DICE_REPO); without it, one line names
    the expected files and the clone command. PROMPTS and OFFLINE_PREFS set by the user make DICE_REPO unnecessary."""
    repo, out = tmp_path / "no-clone", tmp_path / "out"
    proc = run_loop(out, preset="configs/zephyr-7b.env", check=False, DICE_REPO=str(repo))
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    data = f"{repo}/data/UF-10k-subset"
    for text in (f"{data}/prompt.json", f"{data}/preference.json", f"git clone https://github.com/sail-sg/dice {repo}"):
        assert text in proc.stderr
    assert not out.exists()
    proc = run_loop(out, preset="configs/zephyr-7b.env", check=False, DICE_REPO=str(repo),
                    EVAL_PREFS="data/demo/eval_preferences.jsonl", PROMPTS="data/demo/prompts.jsonl",
                    OFFLINE_PREFS="data/demo/preferences.jsonl", ALPACA_EVAL="none", BATCH_SIZE="2", GLOBAL_BATCH="3")
    # past the data check, stopped by the next one
    assert "GLOBAL_BATCH=3 is not a multiple" in proc.stderr and "UF-10k-subset" not in proc.stderr


def _stub_tools(tmp_path):
    """A PYTHON and an `accelerate` that only append their command line (with CUDA_VISIBLE_DEVICES) to calls.txt and
    exit 0, or 1 when the line contains $STUB_FAIL: the loop's command construction, without running any stage."""
    calls, bin_dir = tmp_path / "calls.txt", tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "accelerate", "alpaca_eval"):
        (bin_dir / name).write_text(
            "#!/usr/bin/env bash\n"
            f'line="CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}} {name} $*"\n'
            f'echo "$line" >>{calls}\n'
            '[[ -z ${STUB_FAIL:-} || $line != *"$STUB_FAIL"* ]] || { echo "stub failure" >&2; exit 1; }\n')
        (bin_dir / name).chmod(0o755)
    env = {"PYTHON": str(bin_dir / "python"), "PATH": f"{bin_dir}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": "",
           "OPENAI_API_KEY": "", "GEN_ARGS": "", "ROUNDS": "1"}
    return calls, env


def test_node_check_ends_every_run_with_its_verdict_for_the_preset(tmp_path):
    """NODE_CHECK=1 (set by configs/node-check.env, whose own wiring tests/test_node_check.py checks), every command
    stubbed: tools/node_check.py runs last with --preset NODE_CHECK_PRESET (llama3-8b unless set), also after a failing
    stage, whose one line still fails the run."""
    calls, env = _stub_tools(tmp_path)
    out = tmp_path / "out"
    proc = run_loop(out, NODE_CHECK="1", NUM_GPUS="0", **env)
    assert proc.returncode == 0
    assert calls.read_text().splitlines()[-1] == \
        f"CUDA_VISIBLE_DEVICES= python tools/node_check.py --out {out} --preset llama3-8b"
    calls.unlink()
    proc = run_loop(tmp_path / "out2", check=False, NODE_CHECK="1", NUM_GPUS="0", STUB_FAIL="--round 1",
                    NODE_CHECK_PRESET="zephyr-7b", **env)
    assert proc.returncode == 1 and "error: round_1/train failed" in proc.stderr
    assert calls.read_text().splitlines()[-1] == \
        f"CUDA_VISIBLE_DEVICES= python tools/node_check.py --out {tmp_path / 'out2'} --preset zephyr-7b"


def _calls_of(calls, script):
    return [line for line in calls.read_text().splitlines() if f" {script} " in line]


def test_without_flock_on_path_the_run_stops_at_once(tmp_path):
    """A PATH of links to every program here but flock: exit 2 with one line naming flock and how to get it, before
    anything is written or run. The same PATH with flock added runs to the end (every stage stubbed): flock was the
    only thing missing."""
    calls, env = _stub_tools(tmp_path)
    tools = tmp_path / "tools"
    tools.mkdir()
    for folder in filter(os.path.isdir, os.environ["PATH"].split(os.pathsep)):
        for name in os.listdir(folder):
            if name != "flock" and not os.path.lexists(tools / name):
                (tools / name).symlink_to(os.path.join(folder, name))
    env["PATH"] = f"{tmp_path / 'bin'}:{tools}"
    out = tmp_path / "out"
    proc = run_loop(out, check=False, **env)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: run_rounds.sh needs flock (util-linux) on PATH; ")
    assert "apt-get install util-linux" in proc.stderr and "brew install util-linux" in proc.stderr
    assert not out.exists() and not calls.exists()
    (tools / "flock").symlink_to(shutil.which("flock"))
    assert "] finished: final policy" in run_loop(out, **env).stdout


def test_a_bash_older_than_5_1_is_refused_before_the_script_block():
    """The version check runs before bash reads the `{ ... }` block, which bash parses whole before running any of it
    (and whose `wait -n -p` needs bash 5.1). No older bash is installed here and BASH_VERSINFO is read-only, so this
    runs the check's own lines from run_rounds.sh with BASH_VERSINFO/BASH_VERSION renamed: macOS's 3.2.57, 4.4 and 5.0
    are refused with one line and exit 2, 5.1 and 5.2 pass."""
    head = open(SCRIPT).read().split("\n{ # the whole script", 1)[0]
    before, check = head.split("set -euo pipefail\n")
    assert all(line.startswith("#") for line in before.splitlines())  # nothing but comments before the checks
    check = check.replace("BASH_VERSINFO", "FAKE_VERSINFO").replace("$BASH_VERSION", "$FAKE_VERSION")
    for version, refused in (("3.2.57", True), ("4.4.23", True), ("5.0.17", True), ("5.1.0", False),
                             ("5.2.15", False)):
        script = f"FAKE_VERSINFO=({version.replace('.', ' ')}); FAKE_VERSION={version}\n{check}\necho passed\n"
        proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
        if refused:
            assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
            assert proc.stderr.startswith(f"error: run_rounds.sh needs bash >= 5.1 (for wait -n -p), this is bash "
                                          f"{version}; macOS: brew install bash, then run $(brew --prefix)/bin/bash ")
        else:
            assert (proc.returncode, proc.stdout, proc.stderr) == (0, "passed\n", "")


def _fake_dice_repo(tmp_path):
    data = tmp_path / "official-dice" / "data" / "UF-10k-subset"
    data.mkdir(parents=True)
    (data / "prompt.json").write_text(json.dumps({"instruction": "Name a color."}) + "\n")
    (data / "preference.json").write_text(json.dumps({"prompt": "p?", "chosen": "yes", "rejected": "no"}) + "\n")
    return tmp_path / "official-dice", data


def test_none_turns_optional_settings_off_and_your_own_prompts_get_no_field(tmp_path):
    """`none` turns an optional setting off where an empty one is filled by the preset: the llama3-8b preset without
    UltraFeedback's held-out pairs stops with one line naming EVAL_PREFS=none, and runs with it (stages stubbed).
    PROMPT_FIELD=instruction goes with DICE_REPO's prompt.json only: your own PROMPTS get no --prompt_field (01 finds
    prompt, instruction or messages; tests/test_generate.py), nor do DICE_REPO's with PROMPT_FIELD=none."""
    calls, env = _stub_tools(tmp_path)
    repo, data = _fake_dice_repo(tmp_path)
    env.update(DICE_REPO=str(repo), NUM_GPUS="0", ALPACA_EVAL="none")
    out, preset = tmp_path / "out", "configs/llama3-8b.env"
    if not os.path.exists(os.path.join(ROOT, "data/ultrafeedback/eval_preferences.jsonl")):
        for unset in ({}, {"EVAL_PREFS": ""}):  # empty = unset: the preset's file
            proc = run_loop(out, preset=preset, check=False, **env, **unset)
            assert proc.returncode == 1 and proc.stdout == "" and proc.stderr == (
                "error: input file data/ultrafeedback/eval_preferences.jsonl not found (EVAL_PREFS; EVAL_PREFS=none "
                "to go without, or get it: python tools/prepare_ultrafeedback.py --out data/ultrafeedback)\n")
            assert not out.exists()
    # EVAL_PREFS=none: no evaluation; DPO_MODEL=none: round 0 trains pi_0 from the SFT model on the replay pairs
    run_loop(out, preset=preset, EVAL_PREFS="none", DPO_MODEL="none", **env)
    assert not [line for line in calls.read_text().splitlines() if "eval_prefs.jsonl" in line]
    train0, _ = _calls_of(calls, "04_train_dpo.py")
    assert f"--model princeton-nlp/Llama-3-Base-8B-SFT --pairs {data}/preference.json --out " in train0
    gen, = _calls_of(calls, "01_generate.py")
    assert f"--model {out}/round_0/model --prompts {data}/prompt.json " in gen and "--prompt_field instruction" in gen
    assert "--chat_template configs/templates/llama3-dice.jinja" in gen and "--stop_token_ids 128001,128009" in gen
    # your own prompts, and every optional input off
    calls.unlink()
    run_loop(tmp_path / "out2", preset=preset, PROMPTS="data/demo/prompts.jsonl", OFFLINE_PREFS="none",
             EVAL_PREFS="none", CHAT_TEMPLATE="none", STOP_TOKEN_IDS="none", PROMPT_LIMIT="none", **env)
    gen, = _calls_of(calls, "01_generate.py")
    assert "--model princeton-nlp/Llama-3-Base-8B-SFT-DPO --prompts data/demo/prompts.jsonl " in gen
    for flag in ("--prompt_field", "--chat_template", "--stop_token_ids", "--limit"):
        assert flag not in gen
    pairs, = _calls_of(calls, "03_build_pairs.py")
    score, = _calls_of(calls, "02_score.py")  # neither the replay buffer nor held-out pairs
    assert "--offline" not in pairs and "--responses" in score and "--chat_template" not in score
    train, = _calls_of(calls, "04_train_dpo.py")
    assert "--round 1 " in train  # the preset's DPO model: no round 0
    calls.unlink()
    run_loop(tmp_path / "out3", preset=preset, PROMPT_FIELD="none", EVAL_PREFS="none", **env)
    gen, = _calls_of(calls, "01_generate.py")
    assert f"--prompts {data}/prompt.json " in gen and "--prompt_field" not in gen


def test_splits_hub_revisions_and_attention_reach_the_stages(tmp_path):
    """OFFLINE_PREFS and EVAL_PREFS as two splits of one hub dataset pinned at a revision (ORG/NAME@REV passes the
    input-file check untouched): OFFLINE_PREFS_SPLIT goes with OFFLINE_PREFS to round 0's 04, to 02 scoring it and,
    with SCORE_OFFLINE=0, to 03's --offline; EVAL_PREFS_SPLIT with EVAL_PREFS to 02's evaluations. 03 reading the
    scored copy gets no split. ATTN_IMPLEMENTATION goes to every 02 and 04 and nowhere else."""
    calls, env = _stub_tools(tmp_path)
    hub = "HuggingFaceH4/ultrafeedback_binarized@v1.0"
    settings = dict(OFFLINE_PREFS=hub, OFFLINE_PREFS_SPLIT="train_prefs", EVAL_PREFS=hub, EVAL_PREFS_SPLIT="test_prefs",
                    ATTN_IMPLEMENTATION="sdpa", ALPACA_EVAL="data/demo/eval_preferences.jsonl", JUDGE_RM="org/rm",
                    NUM_GPUS="0")
    out = tmp_path / "out"
    run_loop(out, **settings, **env)
    train0, train1 = _calls_of(calls, "04_train_dpo.py")
    assert f"--pairs {hub} --split train_prefs --out {out}/round_0/model " in train0
    assert f"--pairs {out}/round_1/pairs/pairs.jsonl --out " in train1
    scores = _calls_of(calls, "02_score.py")
    evals = [line for line in scores if "eval_prefs.jsonl" in line]
    assert len(scores) == 4 and len(evals) == 2  # round 0's eval; round 1's score, score_offline and eval
    assert all(f"--pairs {hub} --split test_prefs --out " in line for line in evals)
    offline, = [line for line in scores if "offline_scored.jsonl" in line]
    assert f"--pairs {hub} --split train_prefs --out {out}/round_1/offline_scored.jsonl " in offline
    pairs, = _calls_of(calls, "03_build_pairs.py")
    assert pairs.endswith(f"--offline {out}/round_1/offline_scored.jsonl --gamma 0.5")
    for line in scores + [train0, train1]:
        assert f"{line} ".count(" --attn_implementation sdpa ") == 1
    others = _calls_of(calls, "01_generate.py") + _calls_of(calls, "tools/judge_rm.py") + [pairs]
    assert len(others) == 6 and not any("--attn_implementation" in line for line in others)
    calls.unlink()  # without scoring the replay buffer, 03 reads it itself, with its split
    run_loop(tmp_path / "out2", SCORE_OFFLINE="0", **settings, **env)
    pairs, = _calls_of(calls, "03_build_pairs.py")
    assert pairs.endswith(f"--offline {hub} --split train_prefs --gamma 0.5")


def test_the_alpaca_eval_judge_gets_its_reference_and_a_cache_in_the_run_folder(tmp_path):
    """alpaca_eval 0.6.6 loads its own reference outputs as a dataset script, which datasets >= 4 refuses
    (tests/test_alpaca_eval_judge.py shows both): the judge gets ALPACA_EVAL_REFERENCE, by default ALPACA_EVAL (the AE2
    baseline file holds instructions and reference answers), its annotation cache in the run folder and no weights
    written into alpaca_eval's install; `none` leaves the flag out. The paper presets read the AE2 file, and without
    it the run stops at once naming the command that gets it."""
    calls, env = _stub_tools(tmp_path)
    env.update(ALPACA_EVAL="data/demo/eval_preferences.jsonl", OPENAI_API_KEY="sk-test", NUM_GPUS="0")
    out = tmp_path / "out"
    run_loop(out, **env)
    judges = [line for line in calls.read_text().splitlines() if " alpaca_eval --model_outputs" in line]
    assert len(judges) == 2 and judges[1] == (
        f"CUDA_VISIBLE_DEVICES= alpaca_eval --model_outputs {out}/round_1/alpaca_eval/model_outputs.json "
        "--reference_outputs data/demo/eval_preferences.jsonl --annotators_config weighted_alpaca_eval_gpt4_turbo "
        f"--output_path {out}/round_1/alpaca_eval --caching_path {out}/round_1/alpaca_eval/annotations_cache.json "
        "--metric_kwargs {'save_weights_dir': None}")
    calls.unlink()
    run_loop(tmp_path / "out2", ALPACA_EVAL_REFERENCE="none", **env)
    assert "--reference_outputs" not in calls.read_text() and " alpaca_eval --model_outputs" in calls.read_text()
    for preset in ("llama3-8b", "zephyr-7b"):
        proc = run_loop(tmp_path / "out3", preset=f"configs/{preset}.env", check=False, DICE_REPO="none",
                        PROMPTS="data/demo/prompts.jsonl", OFFLINE_PREFS="data/demo/preferences.jsonl",
                        EVAL_PREFS="none", ALPACA_EVAL="", **{k: v for k, v in env.items() if k != "ALPACA_EVAL"})
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and not (tmp_path / "out3").exists()
        assert proc.stderr == (
            "error: input file data/alpaca_eval/alpaca_eval_gpt4_baseline.json not found (ALPACA_EVAL; ALPACA_EVAL=none"
            " to go without, or get it: hf download tatsu-lab/alpaca_eval alpaca_eval_gpt4_baseline.json --repo-type"
            " dataset --local-dir data/alpaca_eval)\n")


def test_stop_after_names_exactly_the_stages_the_loop_starts(tmp_path):
    """With every stage on (round 0's training and evaluation, AlpacaEval answers and both judges; then a round's
    generation, scoring and pairs too), the stages the loop starts are exactly the lists STOP_AFTER's refusal gives,
    in their order; STOP_AFTER=round_1/score_offline stops there."""
    calls, env = _stub_tools(tmp_path)
    settings = {**env, "ALPACA_EVAL": "data/demo/eval_preferences.jsonl", "JUDGE_RM": "org/rm",
                "OPENAI_API_KEY": "key", "NUM_GPUS": "0"}
    proc = run_loop(tmp_path / "out", **settings)
    started = re.findall(r"\] start round_(\d)/(\w+)", proc.stdout)
    refusal = run_loop(tmp_path / "out", check=False, STOP_AFTER="round_1/nothing", **settings)
    assert refusal.returncode == 1 and refusal.stderr.count("\n") == 1
    lists = re.search(r"STAGE one of (.*), or round_T/STAGE with T in 1\.\.1 \(ROUNDS\) and STAGE one of (.*)$",
                      refusal.stderr.strip())
    assert lists.group(1).split(", ") == [s for t, s in started if t == "0"]
    assert lists.group(2).split(", ") == [s for t, s in started if t == "1"]
    assert len(started) == 5 + 9
    calls.unlink()
    proc = run_loop(tmp_path / "out2", STOP_AFTER="round_1/score_offline", **settings)
    assert proc.stdout.rstrip().endswith("stop after round_1/score_offline (STOP_AFTER)")
    assert not _calls_of(calls, "03_build_pairs.py")


def test_a_second_run_on_the_same_out_is_refused_at_once(tmp_path):
    """While one run_rounds.sh holds OUT/run.lock (it wrote its PID there), a second one on the same OUT stops at once
    with one line naming the holder, and writes nothing to OUT. The kernel frees the lock when the holder dies."""
    out = tmp_path / "out"
    lock = out / "run.lock"
    first = start_loop(out, tmp_path / "first.log")
    try:
        assert _wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), first, timeout=60)
        started = time.time()
        second = run_loop(out, check=False)
        assert time.time() - started < 30
        assert second.returncode == 1 and second.stdout == ""
        assert second.stderr.count("\n") == 1
        assert f"is in use by run_rounds.sh process {first.pid} (it holds {out}/run.lock)" in second.stderr
        assert lock.read_text().strip() == str(first.pid)
        run_log = out / "run.log"  # the second run wrote nothing there (the first one may not have either, yet)
        assert not run_log.exists() or run_log.read_text().count("run_rounds.sh ") <= 1
    finally:
        kill_group(first, out)  # which waits until the kernel has freed the lock


# ----------------------------------------------------------------------------- tools/merge_shards.py

def _write_shard(path, rows, done=True):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if done:
        finish(path)


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a?", "b?", "c?", "a?", "d?"]))
    return path


def test_merge_shards_restores_the_unsharded_order(tmp_path, prompt_file):
    merge = pytest.importorskip("merge_shards")
    order = merge.expected_prompt_ids(str(prompt_file))
    assert order == sorted(data.prompt_id(p) for p in ["a?", "b?", "c?", "d?"])  # 01's order: deduplicated, sorted
    rows = [{"prompt_id": pid, "responses": [pid]} for pid in order]
    _write_shard(tmp_path / "s0.jsonl", rows[0::2])
    _write_shard(tmp_path / "s1.jsonl", rows[1::2])
    merge_args = ["python", "tools/merge_shards.py", "--prompts", prompt_file, "--out", tmp_path / "m.jsonl",
                  tmp_path / "s0.jsonl", tmp_path / "s1.jsonl"]
    run_script(merge_args)
    assert read_jsonl(tmp_path / "m.jsonl") == rows
    assert report.finished(str(tmp_path / "m.jsonl"))
    # the stage protocol: the same shards again are done already; a changed shard is refused unless --overwrite
    assert "done already" in run_script(merge_args).stdout
    _write_shard(tmp_path / "s1.jsonl", rows[1::2][::-1])
    proc = run_script(merge_args, check=False)
    assert proc.returncode == 2 and "input --shard1 changed" in proc.stderr and "--overwrite" in proc.stderr
    run_script(merge_args + ["--overwrite"])
    assert read_jsonl(tmp_path / "m.jsonl") == rows  # the unsharded order whatever the order inside a shard
    assert merge.expected_prompt_ids(str(prompt_file), limit=2) == sorted(data.prompt_id(p) for p in ["a?", "b?"])


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
    (r1 / "pairs").mkdir(parents=True)
    (r1 / "model").mkdir()
    _write_shard(r1 / "responses.jsonl", [
        {"prompt_id": "a", "prompt": "p", "responses": ["xx", "yyyy"], "finish_reasons": ["stop", "length"],
         "num_tokens": [2, 6]},
        {"prompt_id": "b", "prompt": "q", "responses": ["z", "wwwwww"], "finish_reasons": ["stop", "stop"],
         "num_tokens": [1, 3]}])
    _write_shard(r1 / "scores.jsonl", [{"rewards": [1.0, 3.0], "valid": [True, False]},
                                       {"rewards": [2.0, 0.0], "valid": [True, True]}])
    _write_shard(r1 / "pairs" / "pairs.jsonl", [])
    (r1 / "pairs" / "stats.json").write_text(json.dumps({
        "alpha": 0.003, "mean_len_diff_before": 12.5, "mean_len_diff_after": -0.5, "chosen_len": {"mean": 40.0},
        "rejected_len": {"mean": 40.5}, "counts": {"n_pairs_generated": 7, "n_pairs_offline": 7,
                                                   "n_dropped_min_valid": 2, "n_dropped_tie": 1,
                                                   "n_dropped_identical": 0}}))
    _write_shard(r1 / "model" / "metrics.jsonl", [
        {"loss": 0.6931, "rewards/accuracies": 0.0, "step": 1}, {"loss": 0.5, "rewards/accuracies": 0.75, "step": 2},
        {"train_runtime": 3.0, "train_loss": 0.6, "step": 2}], done=False)
    finish(r1 / "model")
    _write_shard(r1 / "eval_prefs.jsonl", [{"chosen_reward": 1.0, "rejected_reward": 0.0},
                                           {"chosen_reward": 0.0, "rejected_reward": 0.0},  # a tie counts as wrong
                                           {"chosen_reward": -1.0, "rejected_reward": 1.0},
                                           {"chosen_reward": 2.0, "rejected_reward": 1.0}])
    r2 = tmp_path / "round_2"  # a round whose stages have not finished: its files must not be read
    r2.mkdir()
    (r2 / "responses.jsonl").write_text('{"torn": ')  # no done marker (a partial file)
    _write_shard(r2 / "scores.jsonl", [{"rewards": [1.0], "valid": [True]}])
    (r2 / "scores.jsonl").write_text('{"torn": ')  # a marker that no longer matches the file (being replaced)
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
    assert one["stages_done"] == ["generate", "score", "pairs", "train", "eval"]
    assert rows[1]["stages_done"] == [] and "truncation_rate" not in rows[1] and "valid_rate" not in rows[1]
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
        for stage in ROUND_STAGES:
            assert report.finished(str(output_of(out, f"round_{t}", stage)))  # its own done marker matches it
            assert len(_commands(r / "logs" / f"{stage}.log")) == 1  # the exact command, echoed once
        assert not (r / "stages").exists()  # no bookkeeping of the loop's own
        rows = read_jsonl(r / "responses.jsonl")
        assert len(rows) == 6 and all(len(row["responses"]) == 4 for row in rows)
        pairs = read_jsonl(r / "pairs" / "pairs.jsonl")
        assert {p["source"] for p in pairs} == {"generated", "offline"}
        # the replay pairs carry the scoring policy's log-probs, so training needs no reference forward
        assert all(p["ref_chosen_logps"] is not None for p in pairs)
    # a line per stage start and end, in the paper's order, on stdout and in run.log
    order = ["round_0/train", "round_0/eval"] + [f"round_{t}/{s}" for t in (1, 2) for s in ROUND_STAGES]
    assert list(stage_ends(proc.stdout)) == order
    assert list(stage_ends((out / "run.log").read_text())) == order
    assert re.findall(r"\] start (round_\d+/\w+)", proc.stdout) == order
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
    assert not any("--overwrite" in c for c in (gen1, score1, score2, train2, eval2))  # only with FORCE=1
    # the report: a row per round, printed at the end too
    text = (out / "report.md").read_text()
    for t in (0, 1, 2):
        assert re.search(rf"^\| {t} \|", text, re.M)
    assert "eval acc" in proc.stdout and "report.md" in proc.stdout
    print(f"tiny preset, uninterrupted: {seconds:.0f} s")


def _snapshot(out):
    """(path, size, mtime) of every file the stages wrote (not the logs, not the report)."""
    found = []
    for folder, _, files in os.walk(out):
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, out)
            if "/logs/" not in f"/{rel}" and not name.startswith(("run.", "report")):
                found.append((rel, os.path.getsize(path), os.stat(path).st_mtime_ns))
    return sorted(found)


@pytest.mark.slow
def test_rerun_runs_no_stage_again_and_changed_settings_are_refused(tiny_run, tmp_path):
    """A rerun of a finished run: every stage says "done already" and no file changes. Changed settings, or a changed
    input file, stop the loop at the first stage they change, with one line naming it and FORCE=1. A run folder moved
    elsewhere (same name) is done already there too: stages compare their inputs by content, not by path, and
    run_rounds.sh names each round's generator (RUN_NAME-round_t) instead of passing its path."""
    out, _, _ = tiny_run
    before = _snapshot(out)
    proc = run_loop(out)
    ends = stage_ends(proc.stdout)
    assert len(ends) == 14 and all("done already" in line for line in ends.values()), ends  # 2 + 6 per round
    assert _snapshot(out) == before
    moved = tmp_path / "elsewhere" / out.name
    shutil.copytree(out, moved, symlinks=True)  # copy2: sizes and mtimes kept
    ends = stage_ends(run_loop(moved).stdout)
    assert len(ends) == 14 and all("done already" in line for line in ends.values()), ends
    assert _snapshot(moved) == before
    # a changed training setting of round 1 and later: refused, nothing touched
    proc = run_loop(out, check=False, MAX_STEPS="3")
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert "error: round_1/train failed" in proc.stderr and "max_steps: 2 -> 3" in proc.stderr
    assert "FORCE=1" in proc.stderr
    assert list(stage_ends(proc.stdout))[-1] == "round_1/pairs"  # what came before: done already
    assert _snapshot(out) == before
    # a changed input file is a changed setting too
    prompts = tmp_path / "prompts.jsonl"
    shutil.copy(os.path.join(ROOT, "data/demo/prompts.jsonl"), prompts)
    with open(prompts, "a") as f:
        f.write(json.dumps({"prompt": "One more prompt?"}) + "\n")
    proc = run_loop(out, check=False, PROMPTS=str(prompts))
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert "error: round_1/generate failed" in proc.stderr and "input --prompts changed" in proc.stderr
    assert "FORCE=1" in proc.stderr
    assert _snapshot(out) == before


def _without_plots(text):
    return re.sub(r"## Plots\n\n(!\[.*\n)+\n", "", text)


@pytest.mark.slow
def test_kill_9_inside_every_stage_then_rerun_equals_uninterrupted(tiny_run, tmp_path):
    """kill -9 the whole loop (its process group) inside each stage of rounds 0 and 1, rerun each time; the final
    pairs and the report equal the uninterrupted run's (for the same rounds: the killed run stops after round 1).
    Each kill lands at a point the test sees: the stage holds its output's lock (OUTPUT.lock, taken by protocol.stage
    before any work and removed when the output is published); in generation, 2 of 6 prompts are in the partial file."""
    ref, _, _ = tiny_run
    out = tmp_path / "out"
    for rnd, stage in STAGES:
        output = output_of(out, rnd, stage)
        lock, partial = f"{output}.lock", f"{output}.partial"
        assert not os.path.exists(lock)
        loop_log = tmp_path / f"{rnd}.{stage}.log"
        proc = start_loop(out, loop_log)
        if stage == "generate":  # between two appended rows of the partial file
            inside = lambda: os.path.exists(partial) and open(partial).read().count("\n") >= 2  # noqa: E731
        else:
            inside = lambda: os.path.exists(lock)  # noqa: E731
        reached = _wait_for(inside, proc)
        kill_group(proc, out)
        assert reached, f"the loop ended before {rnd}/{stage}:\n{loop_log.read_text()[-3000:]}"
        assert not report.finished(str(output)), f"the kill came after {rnd}/{stage} finished"
    run_loop(out, ROUNDS="1")  # round 2 would add nothing but time; the reference report is cut to rounds 0-1
    assert "resume: " in (out / "round_1" / "logs" / "generate.log").read_text()  # 01 resumed its partial file
    assert (out / "round_1" / "pairs" / "pairs.jsonl").read_text() == \
        (ref / "round_1" / "pairs" / "pairs.jsonl").read_text()
    cut = tmp_path / "reference"
    for rnd in ("round_0", "round_1"):
        shutil.copytree(ref / rnd, cut / rnd, symlinks=True)
    run_script(["python", "tools/report.py", "--out", cut, "--plots", "false", "--sft", out / "models" / "tiny-seed1"])
    assert _without_plots((out / "report.md").read_text()) == _without_plots((cut / "report.md").read_text())


@pytest.mark.slow
def test_a_failing_shard_worker_fails_the_stage(tmp_path):
    """NUM_GPUS=2 on a CPU: two generation shards; a PYTHON wrapper makes shard 1 exit 3. The stage fails naming the
    worker and its log's last line, the other worker is stopped, nothing is merged. A rerun with the wrapper fixed
    generates, merges, and the merged file holds exactly the rows an unsharded 01_generate.py writes."""
    wrapper = tmp_path / "python"
    wrapper.write_text("#!/usr/bin/env bash\nprev=\nfor a in \"$@\"; do\n"
                       "  if [[ $prev == --shard && $a == 1 ]]; then echo 'simulated failure' >&2; exit 3; fi\n"
                       "  prev=$a\ndone\n"
                       f"exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    # no EVAL_PREFS: round 0's evaluation would run under `accelerate launch` for 2 GPUs
    settings = dict(NUM_GPUS="2", ROUNDS="1", DPO_MODEL="tiny:2", GLOBAL_BATCH="4", EVAL_PREFS="none",
                    STOP_AFTER="round_1/generate")
    proc = run_loop(out, check=False, PYTHON=str(wrapper), **settings)
    assert proc.returncode != 0
    assert "round_1/generate failed: worker 1 exited with status 3" in proc.stderr
    assert "last line: simulated failure" in proc.stderr
    r1 = out / "round_1"
    assert not (r1 / "responses.jsonl").exists() and not report.finished(str(r1 / "responses.jsonl"))
    assert not (r1 / "shards" / "responses.0-of-2.jsonl").exists()  # worker 0 was stopped
    for i in (0, 1):  # one worker per (fake) GPU
        assert _commands(r1 / "logs" / f"generate.shard{i}.log")[0].startswith(f"env CUDA_VISIBLE_DEVICES={i} ")
    # the worker fixed, a rerun generates both shards and merges them; the loop stops there (STOP_AFTER: what
    # follows would run under `accelerate launch` for 2 GPUs)
    wrapper.write_text(f"#!/usr/bin/env bash\nexec {sys.executable} \"$@\"\n")
    proc = run_loop(out, PYTHON=str(wrapper), **settings)
    assert "stop after round_1/generate" in proc.stdout
    assert stage_ends(proc.stdout)["round_1/generate"].startswith("merged 2 shards")
    assert report.finished(str(r1 / "responses.jsonl")) and not (r1 / "scores.jsonl").exists()
    merged = read_jsonl(r1 / "responses.jsonl")
    gen = _commands(r1 / "logs" / "generate.shard0.log")[-1]
    assert "--shard 0 --num_shards 2" in gen
    single = tmp_path / "single.jsonl"
    run_script(["python", "01_generate.py", "--model", out / "models" / "tiny-seed2", "--prompts",
                "data/demo/prompts.jsonl", "--out", single, "--num_samples", "4", "--temperature", "10", "--top_p",
                "1.0", "--max_new_tokens", "48", "--seed", "1", "--engine", "auto", "--limit", "6", "--generator",
                "out-round_0", "--stop_token_ids", ",".join(map(str, range(3, 21))), "--batch_size", "1"])
    assert merged == read_jsonl(single)


@pytest.mark.slow
def test_force_redoes_a_changed_stage_and_what_follows(tiny_run):
    """Last, as it changes the reference run: FORCE=1 with fewer prompts passes --overwrite to every stage; generation
    changes, so do the stages that read it, while round 0 and the scoring of the offline pairs stay done already."""
    out, _, _ = tiny_run
    proc = run_loop(out, ROUNDS="1", FORCE="1", PROMPT_LIMIT="5")
    ends = stage_ends(proc.stdout)
    for stage in ("round_0/train", "round_0/eval", "round_1/score_offline"):
        assert "done already" in ends[stage]
    for stage in ("generate", "score", "pairs", "train", "eval"):
        assert "done already" not in ends[f"round_1/{stage}"]
    assert "--overwrite" in _commands(out / "round_1" / "logs" / "score.log")[-1]
    assert len(read_jsonl(out / "round_1" / "responses.jsonl")) == 5


@pytest.mark.slow
def test_two_splits_of_one_dataset_folder_and_the_attention_setting(tmp_path):
    """OFFLINE_PREFS and EVAL_PREFS name one save_to_disk DatasetDict (train_prefs: the demo's pairs, test_prefs: its
    held-out ones) with OFFLINE_PREFS_SPLIT and EVAL_PREFS_SPLIT, on the tiny preset up to round 1's pairs: round 0
    trains on train_prefs, round 0's evaluation scores exactly test_prefs, the replay buffer scored for round 1 is
    train_prefs, and the replayed pairs come from it. ATTN_IMPLEMENTATION=eager is in every 02 and 04 done marker."""
    import datasets

    prefs = read_jsonl(os.path.join(ROOT, "data/demo/preferences.jsonl"))[:20]
    held = read_jsonl(os.path.join(ROOT, "data/demo/eval_preferences.jsonl"))
    folder = tmp_path / "prefs"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(prefs),
                          "test_prefs": datasets.Dataset.from_list(held)}).save_to_disk(str(folder))
    out = tmp_path / "out"
    proc = run_loop(out, ROUNDS="1", OFFLINE_PREFS=str(folder), OFFLINE_PREFS_SPLIT="train_prefs",
                    EVAL_PREFS=str(folder), EVAL_PREFS_SPLIT="test_prefs", ATTN_IMPLEMENTATION="eager",
                    STOP_AFTER="round_1/pairs")
    assert "stop after round_1/pairs" in proc.stdout

    def marker(path):
        return json.load(open(protocol.done_marker(str(path))))

    train0 = marker(out / "round_0" / "model")
    assert (train0["args"]["split"], train0["args"]["attn_implementation"]) == ("train_prefs", "eager")
    assert f"--pairs {folder} --split train_prefs " in _commands(out / "round_0" / "logs" / "train.log")[0]
    evaluated = read_jsonl(out / "round_0" / "eval_prefs.jsonl")
    assert [(r["prompt"], r["chosen"]) for r in evaluated] == [(r["prompt"], r["chosen"]) for r in held]
    scored = read_jsonl(out / "round_1" / "offline_scored.jsonl")
    assert [(r["prompt"], r["chosen"]) for r in scored] == [(r["prompt"], r["chosen"]) for r in prefs]
    for path, split in ((out / "round_0" / "eval_prefs.jsonl", "test_prefs"),
                        (out / "round_1" / "offline_scored.jsonl", "train_prefs"),
                        (out / "round_1" / "scores.jsonl", None)):
        assert (marker(path)["args"]["split"], marker(path)["args"]["attn_implementation"]) == (split, "eager")
    replayed = [p for p in read_jsonl(out / "round_1" / "pairs" / "pairs.jsonl") if p["source"] == "offline"]
    assert replayed and all({k: p[k] for k in ("prompt", "chosen", "rejected")} in prefs for p in replayed)


def test_a_wrong_attention_implementation_is_one_line(tmp_path, tiny_models):
    """ATTN_IMPLEMENTATION's flag --attn_implementation reaches transformers' from_pretrained in 02 and 04: a value it
    does not know stops the stage with one error line quoting it, no traceback, nothing written."""
    policy, reference = tiny_models
    pairs = os.path.join(ROOT, "data/demo/eval_preferences.jsonl")
    for command in (["02_score.py", "--policy", policy, "--reference", reference, "--pairs", pairs],
                    ["04_train_dpo.py", "--model", policy, "--pairs", pairs, "--max_steps", "1", "--eval_size", "0"]):
        proc = run_script(["python", *command, "--out", tmp_path / "out", "--attn_implementation", "bogus"],
                          check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and 'attn_implementation="bogus"' in last, proc.stderr[-2000:]
        assert os.listdir(tmp_path) == [], command[0]


# ----------------------------------------------------------------------------- paper presets on tiny models (slow)

# The tiny preset's sampling workarounds (see configs/tiny.env) and small sizes, for a paper preset on tiny models.
TINY_SAMPLING = dict(SFT_MODEL="tiny:1", DPO_MODEL="tiny:2", NUM_SAMPLES="4", MAX_NEW_TOKENS="48", TEMPERATURE="10",
                     TOP_P="1.0", STOP_TOKEN_IDS=",".join(map(str, range(3, 21))), MIN_VALID="2", MAX_STEPS="2",
                     GLOBAL_BATCH="2", EVAL_SIZE="0", TRAIN_MAX_LENGTH="256")


@pytest.mark.slow
def test_zephyr_preset_reads_the_authors_data_files(tmp_path):
    """Rows written in exactly the official formats (sail-sg/dice data/UF-10k-subset: prompt.json = JSON lines with
    `instruction`, preference.json = JSON lines with `prompt`, `chosen`, `rejected` strings) under a fake DICE_REPO go
    through the zephyr-7b preset's own 01 and 03 commands (its template, --prompt_field instruction), on tiny models:
    round 1 samples the official prompts, and its pairs replay rows of preference.json."""
    repo = tmp_path / "official-dice"
    data = repo / "data" / "UF-10k-subset"
    data.mkdir(parents=True)
    instructions = ["Name three primary colors.", "Write a haiku about rain.\nKeep it short.",
                    "  What is 2 + 2?  ", "Explain {{ templates }} to a child."]
    offline = [{"prompt": f"Question {i}: why is the sky blue?", "chosen": f"Rayleigh scattering, answer {i}.",
                "rejected": f"Because it is {i}."} for i in range(8)]
    (data / "prompt.json").write_text("".join(json.dumps({"instruction": p}) + "\n" for p in instructions))
    (data / "preference.json").write_text("".join(json.dumps(r) + "\n" for r in offline))
    held_out = tmp_path / "eval.jsonl"  # the preset's EVAL_PREFS (UltraFeedback's test split) is not here
    held_out.write_text("".join(json.dumps(r) + "\n" for r in offline[:2]))
    out = tmp_path / "out"
    proc = run_loop(out, preset="configs/zephyr-7b.env", DICE_REPO=str(repo), EVAL_PREFS=str(held_out),
                    ALPACA_EVAL="none", STOP_AFTER="round_1/pairs", **TINY_SAMPLING)
    assert "stop after round_1/pairs" in proc.stdout
    gen, = _commands(out / "round_1" / "logs" / "generate.log")
    assert f"--prompts {data / 'prompt.json'} " in gen and "--prompt_field instruction " in gen
    assert "--chat_template configs/templates/zephyr-dice.jinja " in gen
    pairs_cmd, = _commands(out / "round_1" / "logs" / "pairs.log")
    # SCORE_OFFLINE=0 (04 computes the reference in training precision): 03 reads preference.json itself
    assert f"--offline {data / 'preference.json'} --gamma 0.5 " in pairs_cmd
    assert not (out / "round_1" / "logs" / "score_offline.log").exists()
    rows = read_jsonl(out / "round_1" / "responses.jsonl")
    assert sorted(r["prompt"] for r in rows) == sorted(instructions)  # as written: not stripped, not reformatted
    assert all(len(r["responses"]) == 4 for r in rows)
    pairs = read_jsonl(out / "round_1" / "pairs" / "pairs.jsonl")
    replayed = [p for p in pairs if p["source"] == "offline"]
    assert replayed and [p for p in pairs if p["source"] == "generated"]
    for p in replayed:
        assert {k: p[k] for k in ("prompt", "chosen", "rejected")} in offline


@pytest.mark.slow
def test_alpaca_eval_outputs_for_every_model_and_a_failing_judge(tmp_path):
    """ALPACA_EVAL set: pi_0 (round 0) and pi_1 answer the first 3 instructions in AlpacaEval's format, named per round;
    a reward-model judge that does not exist leaves one line in judge_note.txt and the run finishes (exit 0); the
    report shows the alpaca_eval command to run for each round (no API judge configured here). With REPORT_TO:
    04 gets --report_to and a run name per round, and TensorBoard's event files appear in the published model."""
    out = tmp_path / "out"
    proc = run_loop(out, ROUNDS="1", EVAL_PREFS="none", ALPACA_EVAL="data/demo/eval_preferences.jsonl",
                    ALPACA_EVAL_LIMIT="3", JUDGE_RM=str(tmp_path / "no-such-reward-model"), OPENAI_API_KEY="",
                    HF_HUB_OFFLINE="1", REPORT_TO="tensorboard", RUN_NAME="check")
    assert proc.returncode == 0 and not (out / "round_0" / "eval_prefs.jsonl").exists()  # EVAL_PREFS=none
    expected = [json.loads(line)["prompt"] for line in open(os.path.join(ROOT, "data/demo/eval_preferences.jsonl"))]
    for t, model in ((0, out / "round_0" / "model"), (1, out / "round_1" / "model")):
        folder = out / f"round_{t}" / "alpaca_eval"
        outputs = json.load(open(folder / "model_outputs.json"))
        assert [o["instruction"] for o in outputs] == expected[:3]
        assert {o["generator"] for o in outputs} == {f"check-round_{t}"}
        assert report.finished(str(folder / "model_outputs.json"))
        gen, = _commands(out / f"round_{t}" / "logs" / "alpaca_eval.log")
        assert f"--model {model} " in gen and "--num_samples 1 " in gen and "--temperature 10 " in gen
        note = (folder / "judge_note.txt").read_text()
        assert note.count("\n") == 1 and note.startswith("judge_rm failed") and "judge_rm.log" in note
        assert not (out / f"round_{t}" / "logs" / "alpaca_eval_judge.log").exists()  # no API judge configured
        train, = _commands(out / f"round_{t}" / "logs" / "train.log")
        assert f"--round {t} " in train and f"--report_to tensorboard --run_name check-round_{t}" in train
        assert glob.glob(str(out / f"round_{t}" / "model" / "runs" / "**" / "events.out.tfevents*"), recursive=True)
    text = (out / "report.md").read_text()
    reference = os.path.join(ROOT, "data/demo/eval_preferences.jsonl")  # the instructions answered (ALPACA_EVAL)
    for t in (0, 1):
        assert report.judge_command("", t, report.PAPER_ANNOTATOR, reference) in text
    assert "judge_rm failed" in text
    assert "failed round_1/judge_rm" in proc.stdout and "the run goes on" in proc.stdout


# ----------------------------------------------------------------------------- the demo preset, real model (slow)

@pytest.mark.slow
def test_demo_preset_runs_with_smollm2_scaled_down(smollm2, tmp_path):
    """The default preset as a user runs it, on the real SmolLM2-135M-Instruct, made small (6 prompts, 1 round, 2 steps,
    20 offline pairs): round 0 trains pi_0, round 1 samples, scores, builds pairs and trains pi_1 with the generated
    pairs' reference log-probs supplied by stage 2 and only the replayed pairs' computed by stage 4 (SCORE_OFFLINE=0).
    About 3 minutes on 2 CPU cores; the full demo (11 min) is measured in the README."""
    offline, held_out = tmp_path / "prefs.jsonl", tmp_path / "eval.jsonl"
    offline.write_text("".join(open(os.path.join(ROOT, "data/demo/preferences.jsonl")).readlines()[:20]))
    held_out.write_text("".join(open(os.path.join(ROOT, "data/demo/eval_preferences.jsonl")).readlines()[:6]))
    out = tmp_path / "out"
    run_loop(out, preset="configs/demo.env", SFT_MODEL=smollm2, ROUNDS="1", PROMPT_LIMIT="6",
             OFFLINE_PREFS=str(offline), EVAL_PREFS=str(held_out), ROUND0_MAX_STEPS="2", MAX_STEPS="2", GEN_ARGS="")
    pi0, pi1 = out / "round_0" / "model", out / "round_1" / "model"
    gen, = _commands(out / "round_1" / "logs" / "generate.log")
    assert f"--model {pi0} " in gen and "--max_new_tokens 128 " in gen and "--num_samples 4 " in gen
    assert "--dtype bfloat16" in gen  # the demo samples and scores in bf16 (its 12-minute budget on 2 cores)
    score, = _commands(out / "round_1" / "logs" / "score.log")
    assert f"--policy {pi0} --reference {smollm2} " in score and "--dtype bfloat16" in score
    rows = read_jsonl(out / "round_1" / "responses.jsonl")
    assert len(rows) == 6 and all(len(r["responses"]) == 4 for r in rows)
    scored = {r["prompt_id"]: r for r in read_jsonl(out / "round_1" / "scores.jsonl")}
    # The demo's prompts ask for short answers so that the 128-token cap cuts few samples: 21 of these 24 samples
    # valid; 16 with the earlier open versions of the same prompts, whose cut samples left too few pairs for the full
    # demo's length bias to show.
    valid = [v for r in scored.values() for v in r["valid"]]
    assert sum(valid) > 0.75 * len(valid), f"{sum(valid)} of {len(valid)} samples valid"
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
    marker = json.load(open(out / "round_1" / "model.done.json"))  # 04's done marker records where they came from
    assert marker["reference_logps"] == {"train": {"supplied": supplied, "computed": len(pairs) - supplied}}
    assert os.path.isfile(pi1 / "model.safetensors")
    text = (out / "report.md").read_text()
    assert re.search(r"^\| 0 \|", text, re.M) and re.search(r"^\| 1 \|", text, re.M)


def test_the_run_log_says_which_smollm2_it_got(tmp_path, tiny_policy):
    """SFT_MODEL=smollm2: tools/smollm2.py's line saying where the model came from (the HF cache, the hub, or the PyPI
    wheel's dequantized copy) goes to OUT/run.log. A PYTHON wrapper stands in for tools/smollm2.py (no download)."""
    wrapper = tmp_path / "python"
    wrapper.write_text("#!/usr/bin/env bash\n"
                       "if [[ $1 == tools/smollm2.py ]]; then echo 'SmolLM2-135M-Instruct: a test stand-in' >&2; "
                       f"echo {tiny_policy}; exit 0; fi\n"
                       f"exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    run_loop(out, PYTHON=str(wrapper), SFT_MODEL="smollm2", DPO_MODEL="tiny:2", ROUNDS="0",
             EVAL_PREFS=os.path.join(ROOT, "data/demo/eval_preferences.jsonl"))
    log = (out / "run.log").read_text()
    assert f"SFT: {tiny_policy}," in log and "SmolLM2-135M-Instruct: a test stand-in" in log
