"""Generate the JSON Schemas under ``schemas/`` from the pydantic models.

    python -m tunekit.schemas._jsonschema           # write every schema file
    python -m tunekit.schemas._jsonschema --check   # exit 1 when a checked-in file is out of date

``tests/test_jsonschema_sync.py`` fails when the checked-in files differ from what this generates.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, for the three row kinds and the TrainingSpec."""
    from tunekit.schemas.rows import ROW_MODELS
    from tunekit.schemas.spec import TrainingSpec

    out: dict[str, dict[str, Any]] = {}
    for kind, model in ROW_MODELS.items():
        out[f"{kind.value}.schema.json"] = _finish(model.model_json_schema(), f"tunekit {kind.value} row (one JSONL line)")
    out["training_spec.schema.json"] = _finish(TrainingSpec.model_json_schema(), "tunekit TrainingSpec")
    return out


def _finish(schema: dict[str, Any], title: str) -> dict[str, Any]:
    schema = dict(schema)
    schema["$schema"] = DIALECT
    schema["title"] = title
    return schema


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tunekit.schemas._jsonschema", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a file is out of date")
    ap.add_argument("--dir", type=Path, default=SCHEMA_DIR, help=f"output folder (default {SCHEMA_DIR})")
    args = ap.parse_args(argv)
    stale = []
    for name, schema in schemas().items():
        path = args.dir / name
        text = render(schema)
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(name)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run: python -m tunekit.schemas._jsonschema", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
