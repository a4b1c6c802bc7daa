"""Merge a LoRA adapter into its base model, and check the merge.

The base is always reloaded in 16-bit (bf16/fp16) — a QLoRA adapter is merged onto the full-precision
base, never onto 4-bit weights, which is the quality loss users report after merging. The check
compares the logits of base+adapter (unmerged PEFT model) with the merged checkpoint as saved, on
sample prompts (ideally rows of the training data), and flags the merge when the top-1 tokens agree
on fewer than ``agreement_threshold`` of the positions.

On CPU the check computes in fp32 by default: the merged weights are rounded to the saved dtype
once and then upcast exactly, so the measured difference is the merge's own rounding and not bf16
CPU matmul noise. On GPU it computes in the saved dtype. ``MergeResult.compute_dtype`` says which.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError, ResourceError

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Write a short note thanking a colleague for their help.",
    "Question: what is 17 times 3?\nAnswer:",
)
_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}


@dataclass
class MergeResult:
    out_dir: str
    adapter_path: str
    base_model: str
    dtype: str  # saved weights
    compute_dtype: str  # dtype of the logits comparison
    device: str
    max_abs_diff: float
    top1_agreement: float
    flagged: bool
    agreement_threshold: float
    prompts: list[str]
    positions: int  # token positions compared
    seconds: float
    notes: list[str] = field(default_factory=list)
    saved: bool = True  # False: non-finite weights, nothing was written to out_dir

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_prompts(data_path: str | os.PathLike[str], n: int = 8, tokenizer: Any = None) -> list[str]:
    """The first ``n`` rows of a JSONL training file as text.

    Chat rows are rendered with the chat template; a preference (DPO) row as its input messages plus
    the preferred reply, the conversation it was trained to prefer; a prompt/completion row as the two
    texts joined.
    """
    from ..data._checks import guess_kind
    from ..data.convert import iter_rows, to_chat_row
    from ..schemas.rows import RowKind

    prompts: list[str] = []
    for lineno, row in iter_rows(data_path):
        kind = guess_kind(row)
        if kind in (RowKind.CHAT, RowKind.PREFERENCE):
            try:
                chat = to_chat_row(row, kind)
                msgs = [{"role": m.get("role"), "content": m.get("content") or ""} for m in chat["messages"]]
            except (KeyError, TypeError, AttributeError):
                raise ConfigError(f"{data_path}:{lineno}: not a valid {kind.value} row", field="check_data",
                                  hint=f"run `tunekit validate {data_path}`") from None
            if tokenizer is not None and getattr(tokenizer, "chat_template", None):
                prompts.append(tokenizer.apply_chat_template(msgs, tokenize=False))
            else:
                prompts.append("\n".join(f"{m['role']}: {m['content']}" for m in msgs))
        elif "prompt" in row:
            prompts.append(str(row["prompt"]) + str(row.get("completion", row.get("response", ""))))
        elif "text" in row:
            prompts.append(str(row["text"]))
        else:
            raise ConfigError(f"{data_path}:{lineno}: row is no chat, preference, prompt/completion or text row",
                              field="check_data", hint=f"run `tunekit validate {data_path}`")
        if len(prompts) >= n:
            break
    if not prompts:
        raise ConfigError(f"{data_path} has no rows", field="check_data")
    return prompts


def merge_adapter(adapter_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                  base_model: str | None = None, dtype: str = "bf16", check_prompts: list[str] | None = None,
                  check_data: str | os.PathLike[str] | None = None, agreement_threshold: float = 0.99,
                  device: str | None = None, compute_dtype: str | None = None, max_check_tokens: int = 256,
                  overwrite: bool = False) -> MergeResult:
    """Merge ``adapter_path`` (a PEFT LoRA dir or a registry key) into a 16-bit base; save to ``out_dir``.

    ``check_prompts`` (or the first rows of ``check_data``; for a registry adapter, its job's training
    data) feed the merge check; built-in prompts are used when none is known. A registry adapter gets
    the check recorded (``merge_check``).
    """
    from .info import read_adapter
    from .resolve import resolve_adapter

    t0 = time.time()
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not bf16 or fp16", field="dtype",
                          hint="merge into a 16-bit checkpoint: dtype='bf16' (default) or 'fp16'")
    path, record = resolve_adapter(adapter_path)
    if check_prompts is None and check_data is None and record is not None and record.job_id:
        check_data = _training_data(record.job_id)  # check on the job's own training prompts
    info = read_adapter(path)
    if info.unconverted_init:
        raise ConfigError(
            f"{path} is a {info.unconverted_init!r} adapter saved unconverted: merging it onto the original base "
            "gives a wrong model (it was trained against a rewritten residual base)",
            field="adapter.init_lora_weights",
            hint="re-save it converted with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    base = base_model or info.base_model
    if not base:
        raise ConfigError(f"{path}/adapter_config.json names no base model (base_model_name_or_path)",
                          field="base_model", hint="pass base_model=<the 16-bit base the adapter was trained on>")
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty", field="out_dir",
                          hint="pick a new directory, or pass overwrite=True (CLI: --overwrite)")
    _refuse_prequantized(base)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    save_dt = getattr(torch, _DTYPES[dtype])
    if compute_dtype is None:
        check_dt = torch.float32 if dev.type == "cpu" else save_dt
    else:
        check_dt = getattr(torch, {"fp32": "float32", "float32": "float32", **_DTYPES}[compute_dtype])
    notes: list[str] = []
    if check_dt != save_dt:
        notes.append(f"check computed in {str(check_dt)[6:]} on {dev.type}: merged weights were rounded to "
                     f"{str(save_dt)[6:]} (as saved) and upcast exactly; the reference is the 16-bit base + the "
                     "unmerged adapter")

    tok_src = path if (path / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(str(tok_src))
    prompts = list(check_prompts) if check_prompts else (
        sample_prompts(check_data, tokenizer=tokenizer) if check_data else list(DEFAULT_PROMPTS))
    if not check_prompts and not check_data:
        notes.append("no check prompts or training data given: used tunekit's built-in prompts")

    # Before loading anything big: will the merged weights fit where they go?
    _check_free_space(out, _merged_bytes(base, save_dt, len(tokenizer)))
    # 16-bit base (never a quantized one), upcast for the check when computing in fp32 (exact).
    model = AutoModelForCausalLM.from_pretrained(base, dtype=save_dt)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
        notes.append(f"resized the base embeddings to the adapter tokenizer ({len(tokenizer)} tokens)")
    model = model.to(device=dev, dtype=check_dt)
    peft_model = PeftModel.from_pretrained(model, str(path)).to(dev)
    peft_model.eval()
    batch = _encode(tokenizer, prompts, max_check_tokens, dev)
    with torch.inference_mode():
        ref = peft_model(**batch).logits.float()
    merged = peft_model.merge_and_unload()
    merged = merged.to(save_dt)  # what gets saved
    with torch.inference_mode():
        got = merged.to(check_dt)(**batch).logits.float()
    merged = merged.to(save_dt)
    valid = batch["attention_mask"].bool()
    max_abs = float((ref - got).abs()[valid].max())
    agree = float((ref.argmax(-1) == got.argmax(-1))[valid].float().mean())
    # NaN compares unequal to everything, and argmax of NaN logits can still "agree": never call it ok.
    finite = bool(torch.isfinite(ref[valid]).all() and torch.isfinite(got[valid]).all())
    if not finite:
        notes.append("the logits are not finite (NaN or inf): the adapter or the merged weights hold non-finite "
                     f"values, so the merge is flagged whatever the top-1 agreement, and nothing was written to {out}")

    result = MergeResult(out_dir=str(out), adapter_path=str(path), base_model=str(base), dtype=str(save_dt)[6:],
                         compute_dtype=str(check_dt)[6:], device=dev.type, max_abs_diff=max_abs,
                         top1_agreement=agree, flagged=agree < agreement_threshold or not finite,
                         agreement_threshold=agreement_threshold, prompts=prompts, positions=int(valid.sum()),
                         seconds=round(time.time() - t0, 2), notes=notes, saved=finite)
    if finite:  # a model that computes NaN would be served as a plain base, where no adapter check runs
        _write_merged(out, merged, tokenizer, result)
    if record is not None:
        from ..store import default_store

        check = {k: v for k, v in result.to_dict().items() if k != "prompts"}
        default_store().update_adapter(record.id, merge_check=check)
    return result


_CONFIG_MARGIN = 64 * 2**20  # tokenizer, config and tunekit_merge.json beside the weights


def _merged_bytes(base: str, dtype: Any, vocab: int) -> int:
    """Size of the merged weights: the base's parameters (built on the meta device, no memory) in ``dtype``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    if vocab > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(vocab, mean_resizing=False)  # the mean needs real values
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def _check_free_space(out: Path, weight_bytes: int) -> None:
    """Refuse before writing when the disk that will hold ``out`` has less free space than the merged model."""
    where = out.parent
    while not where.exists():
        where = where.parent
    needed, free = weight_bytes + _CONFIG_MARGIN, shutil.disk_usage(where).free
    if free < needed:
        raise ResourceError(
            f"not enough disk space for the merged model in {where}: it needs about {_gib(needed)}, "
            f"{_gib(free)} is free", hint=f"free {_gib(needed - free)} there, or pick an --out on a disk with "
                                          f"{_gib(needed)} free")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _write_merged(out: Path, merged: Any, tokenizer: Any, result: MergeResult) -> None:
    """Write into a temporary directory beside ``out`` and rename it at the end, so ``out`` is complete or
    absent: a merge that fails halfway (disk full, killed) never leaves a model that looks whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.merging-{uuid.uuid4().hex[:8]}"
    old = None
    try:
        tmp.mkdir()
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "tunekit_merge.json").write_text(json.dumps(result.to_dict(), indent=2))
        if out.exists():  # empty, or overwrite=True: swap, then drop the old one
            old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None:
                os.rename(old, out)
            raise
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise ResourceError(f"the disk filled up while writing the merged model to {out}: nothing was kept",
                                hint=f"free space under {out.parent}, or pick an --out on another disk") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _training_data(job_id: str) -> str | None:
    from .._exceptions import JobNotFoundError
    from ..store import default_store

    try:
        return (default_store().get_job(job_id).data or {}).get("train", {}).get("path")
    except JobNotFoundError:
        return None


def _refuse_prequantized(base: str) -> None:
    cfg = Path(base).expanduser() / "config.json"
    if cfg.is_file():
        try:
            quant = json.loads(cfg.read_text()).get("quantization_config")
        except (OSError, json.JSONDecodeError):
            return
        if quant:
            raise ConfigError(
                f"base {base} is a pre-quantized checkpoint ({quant.get('quant_method', 'quantized')}); merging "
                "onto quantized weights loses quality", field="base_model",
                hint="pass base_model=<the original 16-bit model> — the adapter is merged onto the bf16/fp16 base")


def _encode(tokenizer: Any, prompts: list[str], max_tokens: int, device: Any) -> dict[str, Any]:
    """Right-padded batch (pad id 0, masked out), without touching the tokenizer that gets saved."""
    import torch

    rows = [tokenizer(p, truncation=True, max_length=max_tokens)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
