"""What a user sees of the repository itself: the license, what git ignores, and the two install files agreeing."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pins(name):
    """{package: version} of a requirements file's `package==version` lines (comments dropped)."""
    with open(os.path.join(ROOT, name)) as f:
        lines = [line.split("#")[0].strip() for line in f]
    return dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line).groups() for line in lines if line)


def test_the_gpu_and_cpu_stacks_pin_the_same_versions_of_what_they_share():
    """The exactness checks made on a CPU (02 == TRL) hold on the GPU node only with the same transformers/TRL; the
    replication block's AlpacaEval and tracking packages are pinned on both."""
    gpu, cpu = pins("requirements.txt"), pins("requirements-cpu.txt")
    shared = set(gpu) & set(cpu) - {"torch"}  # torch: the CUDA build on the node, the CPU build here
    assert {"transformers", "trl", "datasets", "accelerate", "alpaca_eval", "tensorboard"} <= shared
    assert {name: gpu[name] for name in shared} == {name: cpu[name] for name in shared}


def test_license_is_the_apache_2_text():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text


def test_data_the_tools_fetch_is_ignored_by_git():
    paths = ["data/ultrafeedback/eval_preferences.jsonl", "data/alpaca_eval/alpaca_eval_gpt4_baseline.json",
             "runs/dice/report.md", "official-dice/data/UF-10k-subset/prompt.json"]
    proc = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.split() == paths
    proc = subprocess.run(["git", "check-ignore", "data/demo/prompts.jsonl"], cwd=ROOT, capture_output=True)
    assert proc.returncode == 1  # the demo data is the repository's own
