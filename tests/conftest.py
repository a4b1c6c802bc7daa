"""Shared fixtures: an isolated TUNEKIT_HOME per test, and one tiny Llama saved per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Triton kernels (tunekit/serve/embedded/lora_triton.py) run in Triton's CPU interpreter where no GPU can compile
# them. Decided here, before anything imports triton: its own @jit helpers (tl.sum, tl.zeros) are built at import.
if "TRITON_INTERPRET" not in os.environ and not _cuda():
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(autouse=True)
def tunekit_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "tunekit-home"
    monkeypatch.setenv("TUNEKIT_HOME", str(home))
    # Never let a test reach a real provider or a hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    for var in ("OPENAI_API_KEY", "TOGETHER_API_KEY", "FIREWORKS_API_KEY", "FIREWORKS_ACCOUNT_ID",
                "OPENAI_BASE_URL", "TOGETHER_BASE_URL", "FIREWORKS_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from tunekit.testing import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def nan_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny Llama with one NaN weight: every forward pass, hence the first loss, is NaN."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("models") / "nan-llama"
    shutil.copytree(tiny_model, path)
    weights = load_file(path / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path
