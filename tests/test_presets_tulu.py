"""The Tulu 3 presets (configs/tulu3-8b.env, configs/tulu3-70b.env): KEY="${KEY:-value}" files that run_rounds.sh
sources, models pinned to hub commits that hold safetensors, and the settings taken from the evidence (the configs'
headers): the tokenizers' own chat template, <|end_of_text|> as the stop id, the paper's method, Tulu's 70B rate, and
for 70B the node count, tensor parallelism and ZeRO-3 that its memory arithmetic needs. Offline, seconds."""
import os
import re
import subprocess

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "run_rounds.sh")
# The hub commits holding model-*.safetensors (configs' headers): SFT mains; the 8B DPO's main after its merged PR #2;
# the 70B DPO's unmerged PR refs/pr/3 (its main holds only pytorch_model-*.bin pickles).
PINS = {"tulu3-8b": ("allenai/Llama-3.1-Tulu-3-8B-SFT@4ddd761e6750e04ea3d468175f78463628bba860",
                     "allenai/Llama-3.1-Tulu-3-8B-DPO@cabed4c781e9b161a38d781ed57c6b147ee70495"),
        "tulu3-70b": ("allenai/Llama-3.1-Tulu-3-70B-SFT@3c697e90c0ceefc179a09006c6fb964b650b7462",
                      "allenai/Llama-3.1-Tulu-3-70B-DPO@72a7a36aacd13b7fd798074cebb300008d810cd0")}


def load(name, **env):
    """The preset's settings after `source` in a clean bash (environment variables in env win)."""
    script = f'source configs/{name}.env; declare -p | grep -oE "^declare -[-x] [A-Z_0-9]+=.*"'
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PATH": os.environ["PATH"], **env}).stdout
    return dict(re.match(r'declare -[-x] ([A-Z_0-9]+)="?(.*?)"?$', line).groups() for line in out.splitlines())


@pytest.mark.parametrize("name", sorted(PINS))
def test_tulu_presets_are_overridable(name):
    """The file format (KEY="${KEY:-value}" lines) is checked with every preset's in tests/test_run_rounds.py."""
    assert load(name)["DPO_MODEL"] == PINS[name][1]
    assert load(name, DPO_MODEL="my/dpo", NUM_SAMPLES="7")["DPO_MODEL"] == "my/dpo"  # the environment wins


@pytest.mark.parametrize("name", sorted(PINS))
def test_tulu_models_are_pinned_to_safetensors_commits(name):
    p = load(name)
    assert (p["SFT_MODEL"], p["DPO_MODEL"]) == PINS[name]
    size = {"tulu3-8b": "8B", "tulu3-70b": "70B"}[name]
    for kind, model in (("SFT", p["SFT_MODEL"]), ("DPO", p["DPO_MODEL"])):  # a commit, never a moving branch
        assert re.fullmatch(rf"allenai/Llama-3\.1-Tulu-3-{size}-{kind}@[0-9a-f]{{40}}", model), model


@pytest.mark.parametrize("name", sorted(PINS))
def test_tulu_presets_hold_the_method_and_tulu_settings(name):
    p = load(name)
    # the paper's method: K=16 of the authors' 10k UltraFeedback prompts, >= 8 valid, alpha auto, replay 0.5, DPO beta
    # 0.1 at a flat rate, 300 steps x 32 pairs, max length 4096, 576 held-out pairs, bf16 scoring
    assert (p["NUM_SAMPLES"], p["MIN_VALID"], p["ALPHA"], p["GAMMA"], p["BETA"], p["WARMUP_STEPS"], p["MAX_STEPS"],
            p["BATCH_SIZE"], p["GLOBAL_BATCH"], p["TRAIN_MAX_LENGTH"], p["EVAL_SIZE"], p["SCORE_DTYPE"]) == (
        "16", "8", "auto", "0.5", "0.1", "0", "300", "1", "32", "4096", "576", "bfloat16")
    assert (p["DICE_REPO"], p["MAX_NEW_TOKENS"]) == ("official-dice", "2048")
    # PROMPTS, OFFLINE_PREFS and PROMPT_FIELD come from DICE_REPO (run_rounds.sh); no paper numbers for this pair
    assert not {"PROMPTS", "OFFLINE_PREFS", "PROMPT_FIELD", "PAPER"} & set(p)
    # Tulu's tokenizers carry the "tulu" template (no file), generation ends at <|end_of_text|>; the Llama-3 sampling
    assert (p["CHAT_TEMPLATE"], p["STOP_TOKEN_IDS"], p["TEMPERATURE"], p["TOP_P"]) == ("", "128001", "0.9", "1.0")
    # Tulu's DPO learning rates: 5e-7 at 8B (also the paper's), 2e-7 at 70B
    assert p["LEARNING_RATE"] == {"tulu3-8b": "5e-7", "tulu3-70b": "2e-7"}[name]


def test_tulu_70b_preset_fits_its_hardware():
    p, eight = load("tulu3-70b"), load("tulu3-8b")
    nodes, tp, gpus_per_node = int(p["MIN_NODES"]), int(p["TP_SIZE"]), 8
    assert (nodes, tp) == (4, 4) and "MIN_NODES" not in eight and eight["TP_SIZE"] == "1"
    params, gb = 70.55e9, 1e9
    assert 2 * params / tp / gb == pytest.approx(35.3, abs=0.1)  # bf16 weights per GPU of a vLLM worker
    assert 16 * params / (nodes * gpus_per_node) / gb == pytest.approx(35.3, abs=0.1)  # ZeRO-3 AdamW states per GPU
    assert int(p["GLOBAL_BATCH"]) % (int(p["BATCH_SIZE"]) * nodes * gpus_per_node) == 0 and gpus_per_node % tp == 0
    assert (p["REQUIRE_GPU"], p["SCORE_ACCELERATE_CONFIG"], p["ACCELERATE_CONFIG"]) == (
        "1", "configs/accelerate/zero3_scoring.yaml", "configs/accelerate/deepspeed_zero3.yaml")
    assert os.path.isfile(os.path.join(ROOT, p["ACCELERATE_CONFIG"]))
    # TRAIN_ARGS turns on gradient checkpointing, a DPOConfig field 04_train_dpo.py passes through
    from dice import trl_internals
    assert p["TRAIN_ARGS"] == "--gradient_checkpointing True --reuse_ref_logps False"  # and the reference as measured
    assert trl_internals.dpo_options({"gradient_checkpointing": True}) == {"gradient_checkpointing": True}


@pytest.mark.parametrize("name,env,error", [
    ("tulu3-8b", {"NUM_GPUS": "3"}, "GLOBAL_BATCH=32 is not a multiple of BATCH_SIZE=1 x 3 device(s)"),
    ("tulu3-70b", {"NUM_GPUS": "6"}, "NUM_GPUS=6 is not a multiple of TP_SIZE=4"),
    ("tulu3-70b", {"NUM_GPUS": "0"}, "this preset needs a GPU node (REQUIRE_GPU=1) and found no GPU"),
])
def test_run_rounds_sources_the_tulu_presets(tmp_path, name, env, error):
    """run_rounds.sh reads the preset's settings and refuses what they cannot run on, before writing anything."""
    data = tmp_path / "dice" / "data" / "UF-10k-subset"  # where DICE_REPO's files are looked for (never read here)
    data.mkdir(parents=True)
    (data / "prompt.json").write_text("")
    (data / "preference.json").write_text("")
    out = tmp_path / "out"
    env = {"PATH": os.environ["PATH"], "OUT": str(out), "DICE_REPO": str(tmp_path / "dice"), "EVAL_PREFS": "none",
           "ALPACA_EVAL": "none", "MIN_NODES": "1", **env}
    got = subprocess.run(["bash", SCRIPT, f"configs/{name}.env"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env=env)
    assert got.returncode != 0 and error in got.stderr, got.stderr
    assert not out.exists()
