"""The GPU tests' base model: a random-weight Llama-3.1-8B-shaped model with tunekit's code-made tokenizer.

Nothing is downloaded: the model is built from the real config, saved once (bf16, ``save_pretrained``) and
loaded by the tests through ``from_pretrained``. Speed and memory do not depend on the weight values.

Environment (read by the tests and by ``python3 -m tests.gpu.model``):

  TUNEKIT_GPU_SHAPE      llama-3.1-8b (default) | tiny (2 layers, 64 wide: the CPU smoke shape)
  TUNEKIT_GPU_LAYERS     decoder layers (default: the shape's; 32 for llama-3.1-8b)
  TUNEKIT_GPU_MODEL_DIR  where the model is saved (default <temp dir>/tunekit-gpu/<shape>-L<layers>)
  TUNEKIT_GPU_FORCE_CPU  1: run the tests on CPU (smoke test of the test code itself)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

VOCAB = 128256  # Llama 3's; the byte tokenizer's ids (< 300) all fit
SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}


def settings() -> dict:
    shape = os.environ.get("TUNEKIT_GPU_SHAPE", "llama-3.1-8b")
    if shape not in SHAPES:
        raise SystemExit(f"TUNEKIT_GPU_SHAPE={shape!r}: expected one of {sorted(SHAPES)}")
    layers = int(os.environ.get("TUNEKIT_GPU_LAYERS") or SHAPES[shape]["num_hidden_layers"])
    path = os.environ.get("TUNEKIT_GPU_MODEL_DIR") or f"{tempfile.gettempdir()}/tunekit-gpu/{shape}-L{layers}"
    force_cpu = os.environ.get("TUNEKIT_GPU_FORCE_CPU", "") not in ("", "0")
    return {"shape": shape, "layers": layers, "path": Path(path), "force_cpu": force_cpu}


def config(shape: str, layers: int, tokenizer):
    """The Llama-3.1-8B config (or the tiny one); same kwargs as benchmarks/serve_hotswap.py's llama8b_config."""
    from transformers import LlamaConfig

    dims = dict(SHAPES[shape], num_hidden_layers=layers)
    return LlamaConfig(vocab_size=VOCAB, **dims, max_position_embeddings=8192, rope_theta=500000.0,
                       tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build(path: Path, shape: str, layers: int, device: str) -> dict:
    """Save the random-weight model + tokenizer to ``path`` once; returns what was done (idempotent)."""
    import torch
    from transformers import LlamaForCausalLM

    from tunekit.testing import build_tokenizer

    path = Path(path)
    if (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file():
        return {"step": "build_model", "built": False, "path": str(path)}
    t = time.perf_counter()
    tok = build_tokenizer()
    cfg = config(shape, layers, tok)
    top = max(tok.get_vocab().values())
    if top >= cfg.vocab_size:
        raise SystemExit(f"tokenizer id {top} does not fit vocab_size {cfg.vocab_size}")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 8B in bf16 (16 GB) is built and saved as is, never in fp32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    params = sum(p.numel() for p in model.parameters())
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"step": "build_model", "built": True, "path": str(path), "shape": shape, "layers": layers,
            "params": params, "vocab_size": cfg.vocab_size, "tokenizer_len": len(tok),
            "seconds": round(time.perf_counter() - t, 1)}


def main() -> int:
    import torch

    s = settings()
    device = "cuda" if torch.cuda.is_available() and not s["force_cpu"] else "cpu"
    print(json.dumps(build(s["path"], s["shape"], s["layers"], device)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
