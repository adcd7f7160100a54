"""run_rounds.sh inside a Slurm allocation of several nodes (README "Beyond one node"), simulated on one machine.

tests/slurm_standins/ holds stand-ins for `srun` and `scontrol show hostnames` (put first on PATH): every simulated
node's tasks run here as local processes with the environment Slurm gives a task, srun's --output pattern, and srun's
way of failing (the failing task named, the others stopped). The allocation is the environment run_rounds.sh reads in
a real one: SLURM_JOB_ID, SLURM_JOB_NUM_NODES and SLURM_JOB_NODELIST, here 127.0.0.[1-2] (two loopback addresses, so
node 1 reaches node 0's main process). The fast tests stub every stage (tests/test_run_rounds.py's stubs) and check the
commands; the slow one runs the tiny preset on 2 simulated nodes of 1 CPU process each (accelerate on gloo) against a
one-process run. Real GPUs on several real nodes are not tested here.
"""
import json
import os
import re
import shlex
import shutil
import sys

import pytest

import report
from conftest import ROOT
from test_run_rounds import _calls_of, _commands, _stub_tools, read_jsonl, run_loop, stage_ends

STANDINS = os.path.join(ROOT, "tests", "slurm_standins")
PORT = str(29500 + os.getpid() % 1000)


def allocation(nodes=2, path=None):
    """The environment of a (simulated) Slurm allocation of `nodes` nodes, the stand-ins first on PATH."""
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_JOB_NODELIST": f"127.0.0.[1-{nodes}]",
            "PATH": f"{STANDINS}:{path or os.environ['PATH']}", "MAIN_PROCESS_PORT": PORT}


# ----------------------------------------------------------------------------- fast: stages stubbed

def test_min_nodes_refuses_at_once(tmp_path):
    """MIN_NODES (configs/tulu3-70b.env: 4) refuses an allocation of fewer nodes, and outside Slurm (1 node), with one
    line, before anything is written; so does a GLOBAL_BATCH that the GPUs of all nodes do not divide."""
    out = tmp_path / "out"
    for env, line in (
            ({"MIN_NODES": "2"}, "error: MIN_NODES=2: this run has 1 node (not inside a Slurm allocation; "
                                 "sbatch configs/slurm/dice.sbatch runs it on several)\n"),
            ({"MIN_NODES": "3", **allocation(2)}, "error: MIN_NODES=3: this run has 2 nodes (Slurm job 4242, "
                                                  "SLURM_JOB_NUM_NODES)\n"),
            ({"MIN_NODES": "two"}, "error: MIN_NODES must be a whole number, got 'two'\n"),
            ({"NUM_GPUS": "2", "BATCH_SIZE": "1", "GLOBAL_BATCH": "6", **allocation(2)},
             "error: GLOBAL_BATCH=6 is not a multiple of BATCH_SIZE=1 x 4 device(s) (2 nodes x 2)\n")):
        proc = run_loop(out, check=False, **env)
        assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", line)
        assert not out.exists()
    proc = run_loop(out, check=False, preset="configs/tulu3-70b.env", DICE_REPO="none", EVAL_PREFS="none",
                    PROMPTS="data/demo/prompts.jsonl", OFFLINE_PREFS="data/demo/preferences.jsonl")
    assert proc.returncode == 1 and proc.stderr.startswith("error: MIN_NODES=4: this run has 1 node"), proc.stderr


def test_one_node_of_slurm_runs_as_today(tmp_path):
    """An allocation of 1 node runs the stages as outside Slurm: no srun (no stand-ins on PATH), the same commands."""
    calls, env = _stub_tools(tmp_path)

    def commands(folder, **slurm):  # the stubs' command lines (the two shards' in either order)
        run_loop(tmp_path / folder / "out", NUM_GPUS="2", GLOBAL_BATCH="4", **{**env, **slurm})
        lines = sorted(calls.read_text().replace(str(tmp_path / folder), "BASE").splitlines())
        calls.unlink()
        return lines

    plain = commands("plain")
    assert commands("slurm", **{**allocation(1), "PATH": env["PATH"]}) == plain
    assert len(plain) == 12 and not [line for line in plain if "--num_machines" in line]
    assert [line for line in plain if "--shard 1 --num_shards 2" in line]


def test_two_nodes_commands(tmp_path):
    """2 nodes x 4 GPUs, TP_SIZE=2, every stage stubbed: generation is 2 srun tasks per node, global ranks 0-3 of 4,
    each on its own 2 of its node's GPUs; scoring, judging and training are one `accelerate launch` per node with
    --num_machines 2, the node's --machine_rank, node 0's address and 8 processes in all; ACCELERATE_ARGS goes to
    training only; gradient accumulation counts every GPU (32 pairs = 1 x 8 GPUs x 4); every task logs its command.
    The reward-model judge fails on both nodes: its note names a task, its node and its log, and the run goes on."""
    calls, env = _stub_tools(tmp_path)
    out = tmp_path / "out"
    env.update(allocation(2, env["PATH"]), NUM_GPUS="4", TP_SIZE="2", BATCH_SIZE="1", GLOBAL_BATCH="32",
               ACCELERATE_ARGS="--mixed_precision no", ALPACA_EVAL="data/demo/eval_preferences.jsonl",
               JUDGE_RM="org/rm", STUB_FAIL="tools/judge_rm.py")
    proc = run_loop(out, **env)
    assert "nodes: 2 (127.0.0.1 first)" in proc.stdout
    gen = _calls_of(calls, "01_generate.py")
    shards = [line for line in gen if "--shard " in line]
    assert len(shards) == 4 and len(gen) == 4 + 2  # + the AlpacaEval answers of pi_0 and pi_1, on this node
    for rank in range(4):
        line, = [g for g in shards if f"--shard {rank} --num_shards 4" in g]
        gpus = "0,1" if rank % 2 == 0 else "2,3"  # local task 0 or 1 of its node
        assert line.startswith(f"CUDA_VISIBLE_DEVICES={gpus} python 01_generate.py ")
        assert f"--out {out}/round_1/shards/responses.{rank}-of-4.jsonl " in line
        log = (out / "round_1" / "logs" / f"generate.shard{rank}.log").read_text().splitlines()
        assert re.fullmatch(rf"# \S+ task {rank} on 127\.0\.0\.{rank // 2 + 1} \(node {rank // 2}\)", log[0])
        assert shlex.split(log[1][2:])[:4] == ["env", f"CUDA_VISIBLE_DEVICES={gpus}", env["PYTHON"], "01_generate.py"]
    merge, = _calls_of(calls, "tools/merge_shards.py")
    assert all(f"{out}/round_1/shards/responses.{i}-of-4.jsonl" in merge for i in range(4))
    srun = shlex.split(_commands(out / "round_1" / "logs" / "generate.log")[0])
    assert srun[:15] == ["srun", "--nodes", "2", "--ntasks", "4", "--ntasks-per-node", "2", "--kill-on-bad-exit=1",
                         "--output", f"{out}/round_1/logs/generate.shard%t.log", "--open-mode=append", "bash",
                         "tools/slurm_task.sh", "2", env["PYTHON"]]
    assert srun[srun.index("--shard") + 1] == "{rank}"  # tools/slurm_task.sh fills in each task's global rank
    assert srun[srun.index("--out") + 1] == f"{out}/round_1/shards/responses.{{rank}}-of-4.jsonl"
    flags = (f"--num_machines 2 --machine_rank {{}} --main_process_ip 127.0.0.1 --main_process_port {PORT} "
             "--num_processes 8 ")
    for script, config, count in (("02_score.py", "multi_gpu.yaml", 4), ("04_train_dpo.py", "deepspeed_zero3.yaml", 2),
                                  ("tools/judge_rm.py", "multi_gpu.yaml", None)):
        lines = _calls_of(calls, script)  # (the failing judge's second task may be stopped before its stub starts)
        assert len(lines) == 2 * count if count else 2 <= len(lines) <= 4
        for node in (0, 1):
            launch = f"CUDA_VISIBLE_DEVICES= accelerate launch --config_file configs/accelerate/{config} " + \
                flags.format(node) + ("--mixed_precision no " if script == "04_train_dpo.py" else "") + script
            assert count is None or len([line for line in lines if line.startswith(launch)]) == count, lines
        assert all(re.match(launch.replace("machine_rank 1", "machine_rank [01]"), line) for line in lines)
    assert all("--gradient_accumulation_steps 4 " in line for line in _calls_of(calls, "04_train_dpo.py"))
    for node in (0, 1):
        log = (out / "round_1" / "logs" / f"train.node{node}.log").read_text()
        assert f"--machine_rank {node} " in log and "{node}" not in log
    srun = shlex.split(_commands(out / "round_1" / "logs" / "train.log")[0])
    assert srun[:16] == ["srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
                         "--output", f"{out}/round_1/logs/train.node%n.log", "--open-mode=append", "bash",
                         "tools/slurm_task.sh", "0", "accelerate", "launch"]
    assert srun[srun.index("--machine_rank") + 1] == "{node}"  # tools/slurm_task.sh fills it in on each node
    note = (out / "round_1" / "alpaca_eval" / "judge_note.txt").read_text()
    assert re.fullmatch(r"judge_rm failed: task ([01]) on 127\.0\.0\.[12] exited with exit code 1 \(see "
                        r"round_1/logs/judge_rm\.node\1\.log; last line: stub failure\)\n", note), note
    assert "] finished: final policy" in proc.stdout


# ----------------------------------------------------------------------------- slow: the tiny preset on 2 nodes

# Both runs: the tiny preset from a given pi_0 (no round 0), one round, 2 pairs a step (1 per process and 2
# micro-batches on one process), the replay pairs' reference log-probs computed by 04 (no score_offline stage).
SETTINGS = dict(DPO_MODEL="tiny:2", ROUNDS="1", EVAL_PREFS="none", SCORE_OFFLINE="0", BATCH_SIZE="1",
                GLOBAL_BATCH="2", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """One run on 1 process, and one on 2 simulated nodes (NUM_GPUS=0: 1 CPU process per node) that fails twice:
    generation task 1 (node 1) exits 3, then, generation fixed, the `accelerate launch` of node 1 exits 4 in
    scoring; the third try finishes. The same folder name (OUT=.../out) gives both the same generator names."""
    base = tmp_path_factory.mktemp("slurm")
    run_loop(base / "one" / "out", **SETTINGS)
    flag = base / "fail"
    wrapper, stubs = base / "python", base / "bin"
    wrapper.write_text("#!/usr/bin/env bash\n"
                       f'if [[ -e {flag}.generate && " $* " == *" --shard 1 "* ]]; then\n'
                       "  echo 'simulated failure' >&2; exit 3\nfi\n"
                       f'exec {sys.executable} "$@"\n')
    stubs.mkdir()
    (stubs / "accelerate").write_text("#!/usr/bin/env bash\n"
                                      f'if [[ -e {flag}.score && " $* " == *" --machine_rank 1 "* ]]; then\n'
                                      "  echo 'simulated node failure' >&2; exit 4\nfi\n"
                                      f'exec {shutil.which("accelerate")} "$@"\n')
    for f in (wrapper, stubs / "accelerate"):
        f.chmod(0o755)
    out = base / "two" / "out"
    env = {**SETTINGS, **allocation(2, f"{stubs}:{os.environ['PATH']}"), "PYTHON": str(wrapper),
           "ACCELERATE_CONFIG": "configs/accelerate/cpu_2proc.yaml"}
    tries, r1 = [], out / "round_1"
    for step in ("generate", "score", None):
        if step:
            (base / f"fail.{step}").touch()
        proc = run_loop(out, check=step is None, **env)
        finished = {name: report.finished(str(r1 / name)) for name in ("shards/responses.0-of-2.jsonl",
                                                                       "responses.jsonl", "scores.jsonl")}
        tries.append((proc, finished))
        if step:
            (base / f"fail.{step}").unlink()
    return base / "one" / "out", out, tries


@pytest.mark.slow
def test_two_nodes_build_the_one_process_files(two_nodes):
    """2 nodes of 1 process each write byte for byte the responses, scores, pairs and trained model of 1 process (a
    sample depends only on (seed, prompt, k); scoring splits batches that never depend on the process count; DDP's
    2 x 1 pair sums the same gradients as 1 process's 2 micro-batches), with the same losses and gradient norms."""
    one, two, tries = two_nodes
    assert "] finished: final policy" in tries[-1][0].stdout
    for name in ("responses.jsonl", "scores.jsonl", "pairs/pairs.jsonl", "model/model.safetensors"):
        assert (two / "round_1" / name).read_bytes() == (one / "round_1" / name).read_bytes(), name
        assert report.finished(str(two / "round_1" / name.split("/model.")[0]))

    def losses(out):
        return [(m["step"], m["loss"], m["grad_norm"]) for m in read_jsonl(out / "round_1" / "model" / "metrics.jsonl")
                if "loss" in m]

    assert losses(two) == losses(one) and len(losses(one)) == 2
    marker = json.load(open(two / "round_1" / "model.done.json"))
    assert marker["processes"] == 2 and marker["args"]["gradient_accumulation_steps"] == 1
    assert json.load(open(one / "round_1" / "model.done.json"))["args"]["gradient_accumulation_steps"] == 2
    assert json.load(open(two / "round_1" / "scores.jsonl.done.json"))["args"]["num_processes"] == 2


@pytest.mark.slow
def test_a_failing_task_fails_the_stage_naming_its_node_and_log(two_nodes):
    """The first try: generation task 1 on node 127.0.0.2 exits 3; the stage fails with one line naming the task, its
    node and its log's last line, task 0 is stopped and nothing is merged. The second: node 1's `accelerate launch`
    exits 4 in scoring while node 0's waits for it; the stage fails naming node 1's log, and no scores are written.
    Each rerun resumes: generation is done already on the third try."""
    _, out, ((gen, after_gen), (score, after_score), (last, _)) = two_nodes
    logs = out / "round_1" / "logs"
    assert gen.returncode == 1 and gen.stderr.count("error: ") == 1, gen.stderr  # (and tiny_model.py's progress bars)
    assert gen.stderr.endswith("\nerror: round_1/generate failed: task 1 on 127.0.0.2 exited with exit code 3 (see "
                               "round_1/logs/generate.shard1.log; last line: simulated failure)\n")
    srun = (logs / "generate.log").read_text()
    assert "srun: error: 127.0.0.2: task 1: Exited with exit code 3" in srun
    assert "srun: error: 127.0.0.1: task 0: " in srun  # stopped
    assert not any(after_gen.values())  # task 0's shard unfinished, nothing merged
    assert score.returncode == 1 and score.stderr == (
        "error: round_1/score failed: task 1 on 127.0.0.2 exited with exit code 4 (see round_1/logs/score.node1.log; "
        "last line: simulated node failure)\n"), score.stderr
    assert "srun: error: 127.0.0.1: task 0: " in (logs / "score.log").read_text()  # node 0's launch, stopped
    assert stage_ends(score.stdout)["round_1/generate"].startswith("merged 2 shards")
    assert after_score["responses.jsonl"] and not after_score["scores.jsonl"]
    ends = stage_ends(last.stdout)
    assert list(ends) == ["round_1/generate", "round_1/score", "round_1/pairs", "round_1/train"]
    assert "done already" in ends["round_1/generate"] and "done already" not in ends["round_1/score"]


@pytest.mark.slow
def test_two_nodes_logged_commands(two_nodes):
    """Every task's log starts with its exact command: the generation shards their global rank, the accelerate
    launches their node's --machine_rank, --num_machines 2, node 0's address and 2 processes in all."""
    _, out, _ = two_nodes
    logs = out / "round_1" / "logs"
    for rank in (0, 1):
        gen = _commands(logs / f"generate.shard{rank}.log")[-1]
        assert f"--out {out}/round_1/shards/responses.{rank}-of-2.jsonl " in gen
        assert f"--shard {rank} --num_shards 2 " in gen
    for stage, config in (("score", "multi_gpu.yaml"), ("train", "cpu_2proc.yaml")):
        for node in (0, 1):
            launch = _commands(logs / f"{stage}.node{node}.log")[-1]
            assert launch.startswith(f"accelerate launch --config_file configs/accelerate/{config} --num_machines 2 "
                                     f"--machine_rank {node} --main_process_ip 127.0.0.1 --main_process_port {PORT} "
                                     "--num_processes 2 "), launch
    assert "wrote " in (logs / "train.node0.log").read_text()
