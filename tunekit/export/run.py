"""``export_model``: a PEFT LoRA adapter (or a job's adapter) -> GGUF for llama.cpp, or a folder for Ollama."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .._exceptions import ConfigError
from . import arch as _arch
from .gguf_file import OUTTYPES, write_adapter, write_model

FORMATS = ("gguf", "ollama")


@dataclass
class ExportResult:
    format: str
    outtype: str
    architecture: str
    files: dict[str, str]  # role (adapter, model, base, modelfile) -> path
    tensor_types: dict[str, dict[str, str]]  # file role -> tensor name -> GGML type written
    merge_check: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        return bool(self.merge_check and self.merge_check.get("flagged"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_model(adapter: str | os.PathLike[str], out: str | os.PathLike[str], *, format: str = "gguf",
                 merge: bool = False, outtype: str = "f16", base_model: str | None = None,
                 base_gguf: str | os.PathLike[str] | None = None, overwrite: bool = False) -> ExportResult:
    """Export ``adapter`` (a directory, registry id/name or job id).

    ``format="gguf"``: ``out`` is the .gguf file — a LoRA adapter GGUF (llama.cpp ``--lora`` over the base's
    GGUF), or with ``merge=True`` the whole merged model. ``format="ollama"``: ``out`` is a directory with the
    GGUF file(s) and a Modelfile (``FROM`` the merged model, or ``FROM`` the base + ``ADAPTER``); the base is
    converted too unless ``base_gguf`` names an existing GGUF of it.
    """
    from ..adapters.info import read_adapter
    from ..adapters.resolve import resolve_adapter

    if format not in FORMATS:
        raise ConfigError(f"format {format!r} is not one of {', '.join(FORMATS)}", field="format")
    if outtype not in OUTTYPES:
        raise ConfigError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}", field="outtype",
                          hint="f16 keeps the most precision, q8_0 is the smallest")
    if base_gguf is not None and (format != "ollama" or merge):
        raise ConfigError("base_gguf names the base for an Ollama ADAPTER; it applies to format='ollama' without merge",
                          field="base_gguf", hint="drop --base-gguf, or use --format ollama without --merge")
    _require_gguf()
    path, _record = resolve_adapter(adapter)
    info = read_adapter(path)
    out = Path(out).expanduser()
    _check_out(out, directory=format == "ollama", overwrite=overwrite)
    base_dir = _model_dir(base_model or info.base_model)
    config = json.loads((base_dir / "config.json").read_text())
    arch = _arch.arch_of(config)
    _arch.check_rope(config)
    if not merge:
        _refuse_unmerged(info)
    name = path.name
    result = ExportResult(format=format, outtype=outtype, architecture=arch.gguf_name, files={}, tensor_types={})
    if format == "ollama":
        out.mkdir(parents=True, exist_ok=True)

    if merge:
        from ..adapters.merge import merge_adapter

        target = out / "model.gguf" if format == "ollama" else out
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".tunekit-merge-", dir=target.parent) as tmp:
            merged = merge_adapter(adapter, tmp, base_model=str(base_dir),
                                   dtype="fp16" if outtype == "f16" else "bf16", overwrite=True)
            mcfg = json.loads((Path(tmp) / "config.json").read_text())
            result.tensor_types["model"] = _atomic(target, lambda p: write_model(
                p, Path(tmp), arch=arch, config=mcfg, name=f"{name} (merged)", outtype=outtype,
                tensors=_model_tensors(Path(tmp), mcfg, arch)))
        result.files["model"] = str(target)
        result.merge_check = {k: v for k, v in merged.to_dict().items() if k not in ("prompts", "out_dir")}
        result.notes += merged.notes
    else:
        alpha, rank, tensors = _adapter_tensors(info, config, arch)
        if format == "ollama":  # the base first: a base that cannot be converted leaves no adapter behind
            if base_gguf is not None:
                result.files["base"] = str(Path(base_gguf).expanduser().resolve())
            else:  # the base in the same GGUF conventions, with the adapter's tokenizer and chat template
                tok_dir = path if (path / "tokenizer.json").is_file() else base_dir
                base_out = out / "base.gguf"
                result.tensor_types["base"] = _atomic(base_out, lambda p: write_model(
                    p, tok_dir, arch=arch, config=config, name=base_dir.name, outtype=outtype,
                    tensors=_model_tensors(base_dir, config, arch)))
                result.files["base"] = str(base_out)
        target = out / "adapter.gguf" if format == "ollama" else out
        result.tensor_types["adapter"] = _atomic(target, lambda p: write_adapter(
            p, arch=arch, name=name, alpha=alpha, rank=rank, tensors=tensors, outtype=outtype))
        result.files["adapter"] = str(target)
        if info.use_rslora:
            result.notes.append(f"rsLoRA: adapter.lora.alpha={alpha:g} (lora_alpha*sqrt(r)), so llama.cpp's "
                                "alpha/r scale equals PEFT's lora_alpha/sqrt(r)")
    if format == "ollama":
        from .ollama import write_modelfile

        tok_dir = path if (path / "tokenizer_config.json").is_file() else base_dir
        result.files["modelfile"] = str(write_modelfile(out, result.files, tok_dir))
    return result


# -- adapter tensors -----------------------------------------------------------------------------------

def _refuse_unmerged(info: Any) -> None:
    """What llama.cpp cannot apply as a LoRA adapter: same checks as the servers, with export's alternative."""
    from ..serve.adapters import refuse_unservable

    alt = "export the merged model instead: add --merge (merge_adapter folds it into the 16-bit base first)"
    try:
        refuse_unservable(info, engine="llama.cpp")
    except ConfigError as exc:
        raise ConfigError(exc.message, field=exc.field, hint=alt) from None
    pattern = {k: float(v) for k, v in (info.raw.get("alpha_pattern") or {}).items()}
    if any(v != info.lora_alpha for v in pattern.values()):
        raise ConfigError(f"{info.path}: alpha_pattern gives modules their own lora_alpha; a llama.cpp adapter "
                          "has one alpha for all tensors", field="adapter.alpha_pattern", hint=alt)
    if info.use_rslora and info.max_rank != info.r:
        raise ConfigError(f"{info.path}: rsLoRA with a rank_pattern scales each module by alpha/sqrt(r_i), which "
                          "one llama.cpp alpha cannot express", field="adapter.rank_pattern", hint=alt)


def _adapter_tensors(info: Any, config: dict[str, Any], arch: _arch.Arch) -> tuple[float, int, list]:
    """(alpha for llama.cpp's alpha/r scale, rank, [(gguf name, tensor)]): lora_a (r, in), lora_b (out, r)."""
    weights = _load_adapter_weights(info.path)
    tmap = _arch.name_map(arch, int(config["num_hidden_layers"]))
    n_head, n_kv = _arch.head_counts(config)
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in weights.items():
        part = "a" if ".lora_A.weight" in key else "b" if ".lora_B.weight" in key else None
        if part is None:
            raise ConfigError(f"{info.path}: tensor {key!r} is not a LoRA A/B matrix (embedding LoRA or a fully "
                              "trained module), which a llama.cpp adapter cannot carry", field="adapter",
                              hint="export the merged model instead: add --merge")
        hf = key.removeprefix("base_model.model.").replace(f".lora_{part.upper()}.weight", ".weight")
        pairs.setdefault(hf, {})[part] = tensor
    tensors = []
    for hf, ab in sorted(pairs.items()):
        name = _arch.gguf_name(tmap, hf)
        if name is None or set(ab) != {"a", "b"}:
            raise ConfigError(f"{info.path}: LoRA on {hf!r} has no llama.cpp tensor to apply to",
                              field="adapter.target_modules", hint="export the merged model instead: add --merge")
        if name == "output.weight" and config.get("tie_word_embeddings"):
            raise ConfigError(f"{info.path}: LoRA on lm_head, which this model ties to the embeddings",
                              field="adapter.target_modules", hint="export the merged model instead: add --merge")
        b = ab["b"]
        if arch.permute_qk and hf.endswith("q_proj.weight"):
            b = _arch.permute_rows(b, n_head)
        elif arch.permute_qk and hf.endswith("k_proj.weight"):
            b = _arch.permute_rows(b, n_kv)
        tensors += [(name + ".lora_a", ab["a"]), (name + ".lora_b", b)]
    # llama.cpp scales by alpha / rank (rank read from lora_a); rsLoRA scales by alpha / sqrt(rank)
    alpha = info.lora_alpha * math.sqrt(info.r) if info.use_rslora else info.lora_alpha
    return alpha, info.r, tensors


def _load_adapter_weights(path: Path) -> dict[str, Any]:
    if (path / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(path / "adapter_model.safetensors"))
    import torch

    return torch.load(str(path / "adapter_model.bin"), map_location="cpu", weights_only=True)


# -- model tensors --------------------------------------------------------------------------------------

def _model_tensors(model_dir: Path, config: dict[str, Any], arch: _arch.Arch) -> Iterator[tuple[str, Any]]:
    """Every weight of a safetensors checkpoint under its GGUF name (q/k permuted for Llama-family models)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{model_dir} has no *.safetensors weights", field="base_model",
                          hint="save the model with save_pretrained(safe_serialization=True)")
    tmap = _arch.name_map(arch, int(config["num_hidden_layers"]))
    n_head, n_kv = _arch.head_counts(config)
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue  # llama.cpp reuses token_embd
                name = _arch.gguf_name(tmap, key)
                if name is None:
                    raise ConfigError(f"{file}: tensor {key!r} has no GGUF name for {arch.gguf_name}",
                                      field="base_model",
                                      hint="convert it with llama.cpp's convert_hf_to_gguf.py")
                t = f.get_tensor(key)
                if arch.permute_qk and ".q_proj." in key:
                    t = _arch.permute_rows(t, n_head)
                elif arch.permute_qk and ".k_proj." in key:
                    t = _arch.permute_rows(t, n_kv)
                yield name, t


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        from .._exceptions import MissingDependencyError

        raise MissingDependencyError("exporting to GGUF needs the gguf package (gguf-py)",
                                     hint="pip install 'tunekit[export]'") from None


# -- files ----------------------------------------------------------------------------------------------

def _model_dir(base: str | None) -> Path:
    """A local directory for ``base``: a path, or a Hugging Face id already in the local cache (nothing downloaded)."""
    if not base:
        raise ConfigError("the adapter names no base model (base_model_name_or_path)", field="base_model",
                          hint="pass --base-model <the model the adapter was trained on>")
    if Path(base).expanduser().is_dir():
        return Path(base).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss means: not on this machine
        raise ConfigError(f"base model {base!r} is neither a directory nor in the Hugging Face cache",
                          field="base_model",
                          hint=f"download it first (`hf download {base}`) or pass --base-model DIR") from None


def _check_out(out: Path, *, directory: bool, overwrite: bool) -> None:
    if overwrite or not out.exists():
        return
    if directory and out.is_dir() and not any(out.iterdir()):
        return
    raise ConfigError(f"{out} exists", field="out", hint="pick a new path, or pass --overwrite")


def _atomic(target: Path, write: Any) -> Any:
    """Write through a temporary file so a failed export never leaves a truncated GGUF behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    try:
        value = write(tmp)
        os.replace(tmp, target)
        return value
    finally:
        tmp.unlink(missing_ok=True)
