"""The Ollama Modelfile next to the exported GGUF files.

The chat template travels inside the GGUF (``tokenizer.chat_template``), which ``ollama create`` reads; the
Modelfile adds the stop token(s) from the tokenizer so generation ends where the template ends a turn.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_modelfile(out: Path, files: dict[str, str], tokenizer_dir: Path) -> Path:
    def ref(p: str) -> str:
        path = Path(p)
        return f"./{path.name}" if path.parent.resolve() == out.resolve() else str(path)

    lines = ["# written by `tunekit export --format ollama`; create it with: ollama create NAME -f Modelfile"]
    if "model" in files:
        lines.append(f"FROM {ref(files['model'])}")
    else:
        lines += [f"FROM {ref(files['base'])}", f"ADAPTER {ref(files['adapter'])}"]
    for stop in _stops(tokenizer_dir):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    path = out / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _stops(tokenizer_dir: Path) -> list[str]:
    cfg_path = tokenizer_dir / "tokenizer_config.json"
    if not cfg_path.is_file():
        return []
    eos = json.loads(cfg_path.read_text(encoding="utf-8")).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return [eos] if isinstance(eos, str) and eos else []
