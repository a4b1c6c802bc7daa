"""Fixtures of the GPU integration tests (tests/gpu): the saved base model, the device, the figures report.

Nothing heavy is imported here at module level: on a CPU-only CI machine the test modules skip themselves
at collection and these fixtures are never run.
"""

from __future__ import annotations

import gc
import json
import os

import pytest


@pytest.fixture(scope="session")
def gpu_env() -> dict:
    import torch

    from .model import settings

    s = settings()
    on_gpu = torch.cuda.is_available() and not s["force_cpu"]
    s["device"] = "cuda" if on_gpu else "cpu"
    s["device_name"] = torch.cuda.get_device_name(0) if on_gpu else "cpu"
    return s


@pytest.fixture(scope="session")
def gpu_model(gpu_env):
    """Path of the saved base model (built on first use; `python3 -m tests.gpu.model` builds it ahead)."""
    from .model import build

    info = build(gpu_env["path"], gpu_env["shape"], gpu_env["layers"], gpu_env["device"])
    if info["built"]:
        emit_figures({"test": "build_model", **info})
    return gpu_env["path"]


def emit_figures(rec: dict) -> None:
    """Print one figures line (run pytest with -s) and append it to $TUNEKIT_GPU_REPORT when set."""
    line = json.dumps(rec, default=str)
    print("\nGPU-FIGURES " + line, flush=True)
    path = os.environ.get("TUNEKIT_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture
def figures():
    return emit_figures


@pytest.fixture(autouse=True)
def _release_device_memory():
    """Each test loads an 8B model: give its memory back before the next one loads another."""
    yield
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
