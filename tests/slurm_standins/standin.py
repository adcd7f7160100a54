"""Stand-ins for Slurm's `srun` and `scontrol show hostnames` (tests only; tests/test_slurm.py puts this folder first
on PATH). The allocation is simulated by the environment run_rounds.sh reads inside a real one: SLURM_JOB_ID,
SLURM_JOB_NUM_NODES and SLURM_JOB_NODELIST (e.g. 127.0.0.[1-2]: two loopback addresses, so that node 1 reaches node
0's main process). Every node's tasks run here as local processes, each in its own session, with the environment
Slurm gives a task: SLURM_PROCID (global rank), SLURM_NODEID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NNODES and
SLURMD_NODENAME; ranks are placed in blocks (node n holds ranks n x ntasks-per-node ...). --output PATTERN sends a
task's stdout and stderr to PATTERN with %t (rank), %n (node index), %N (node name), %j (job id) and %% filled in.
A task that fails is reported as srun reports it (`srun: error: NODE: task N: Exited with exit code C`) and, with
--kill-on-bad-exit=1, the other tasks are stopped (SIGTERM, then SIGKILL after 10 s) and srun exits with C.
An option srun has but this stand-in does not know is refused, so a test cannot pass on a flag it ignores.
"""
import os
import re
import signal
import subprocess
import sys
import time


def hostnames(nodelist):
    """Slurm's hostlist syntax, the part the tests use: a,b,prefix[1-3,7],node[01-02]."""
    names = []
    for prefix, ranges in re.findall(r"([^,\[]+)(?:\[([^\]]+)\])?,?", nodelist):
        if not ranges:
            names.append(prefix)
        for part in (ranges.split(",") if ranges else []):
            first, _, last = part.partition("-")
            names += [f"{prefix}{i:0{len(first)}d}" for i in range(int(first), int(last or first) + 1)]
    return names


def scontrol(args):
    if args[:1] != ["show"] or args[1:2] != ["hostnames"] or len(args) > 3:
        sys.exit(f"scontrol (stand-in): only `scontrol show hostnames [NODELIST]`, got {args}")
    print("\n".join(hostnames(args[2] if len(args) == 3 else os.environ["SLURM_JOB_NODELIST"])))


OPTIONS = {"-N": "nodes", "--nodes": "nodes", "-n": "ntasks", "--ntasks": "ntasks",
           "--ntasks-per-node": "ntasks_per_node", "-o": "output", "--output": "output", "--open-mode": "open_mode",
           "--kill-on-bad-exit": "kill_on_bad_exit", "-K": "kill_on_bad_exit", "--cpus-per-task": "cpus_per_task"}


def parse(args):
    opts = {"open_mode": "truncate", "kill_on_bad_exit": "0"}
    while args and args[0].startswith("-"):
        flag, eq, value = args.pop(0).partition("=")
        if flag not in OPTIONS:
            sys.exit(f"srun (stand-in): unsupported option {flag}")
        if not eq and OPTIONS[flag] != "kill_on_bad_exit":
            value = args.pop(0)
        opts[OPTIONS[flag]] = value or "1"
    if not args:
        sys.exit("srun (stand-in): no command")
    return opts, args


def srun(args):
    opts, command = parse(list(args))
    if "SLURM_JOB_ID" not in os.environ:
        sys.exit("srun: error: not inside a (simulated) Slurm allocation")
    hosts = hostnames(os.environ["SLURM_JOB_NODELIST"])
    nodes = int(opts.get("nodes", len(hosts)))
    per_node = int(opts.get("ntasks_per_node", 1))
    ntasks = int(opts.get("ntasks", nodes * per_node))
    if nodes > len(hosts) or len(hosts) != int(os.environ["SLURM_JOB_NUM_NODES"]) or ntasks != nodes * per_node:
        sys.exit(f"srun (stand-in): {ntasks} tasks on {nodes} nodes x {per_node} do not fit the allocation {hosts}")
    tasks = {}  # pid -> (rank, node name, Popen)

    def stop(sig, *_):
        for _, _, p in tasks.values():
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, lambda *_: stop(signal.SIGTERM))
    signal.signal(signal.SIGINT, lambda *_: stop(signal.SIGTERM))
    for rank in range(ntasks):
        node, local = divmod(rank, per_node)
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NODEID": str(node), "SLURM_LOCALID": str(local),
               "SLURM_NTASKS": str(ntasks), "SLURM_NNODES": str(nodes), "SLURMD_NODENAME": hosts[node]}
        out = None
        if "output" in opts:
            fields = {"t": str(rank), "n": str(node), "N": hosts[node], "j": os.environ["SLURM_JOB_ID"], "%": "%"}
            path = re.sub(r"%(.)", lambda m: fields[m.group(1)], opts["output"])
            out = open(path, "a" if opts["open_mode"] == "append" else "w")
        p = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                             start_new_session=True)
        tasks[p.pid] = (rank, hosts[node], p)
    code, deadline = 0, None
    while tasks:
        if deadline is not None and time.time() > deadline:
            stop(signal.SIGKILL)
        pid, status = os.waitpid(-1, os.WNOHANG) if deadline is not None else os.wait()
        if pid == 0:
            time.sleep(0.1)
            continue
        rank, host, p = tasks.pop(pid)
        p.returncode = rc = os.waitstatus_to_exitcode(status)
        if rc == 0:
            continue
        what = f"Exited with exit code {rc}" if rc > 0 else signal.strsignal(-rc)
        print(f"srun: error: {host}: task {rank}: {what}", file=sys.stderr, flush=True)
        if code == 0:
            code = rc if rc > 0 else 128 - rc
            if opts["kill_on_bad_exit"] == "1" and tasks:
                print("srun: Job step aborted", file=sys.stderr, flush=True)
                stop(signal.SIGTERM)
                deadline = time.time() + 10
    sys.exit(code)


if __name__ == "__main__":
    {"srun": srun, "scontrol": scontrol}[sys.argv[1]](sys.argv[2:])
