"""Cost before launch: what a planned job is expected to cost, shown by ``plan``/``finetune`` before any upload.

Managed backends: the catalog's dated price table (USD per 1M trained tokens) times the trained tokens,
epochs x the tokens of the training file as validation counted them; Together's own estimate (the SDK's
estimate-price call, made before its create) is recorded as well once the file is uploaded. Local runs:
GPU-hours from the planned precision (the memory plan's quantization) and the training throughput measured on
an H200 (docs/benchmarks.md), scaled by model size. Every figure is an estimate and says what it rests on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ._exceptions import ConfigError

# Without a tokenizer the validator measures rows in characters; ~4 characters per token is the usual rule
# of thumb for English text with Llama/GPT tokenizers (code and other languages use more tokens).
CHARS_PER_TOKEN = 4.0

# Training tokens/s of tunekit's local backend on one H200 for Llama-3.1-8B width (32 layers, 8.03e9
# parameters), 2,048-token rows; docs/benchmarks.md: nf4 and DoRA at commit a589fb1 (2026-11-29T01:44Z),
# bf16 ("auto" resolved to bf16) at commit 72a9a4c (2026-11-29T00:23Z).
THROUGHPUT_H200 = {"nf4": 9921.0, "nf4+dora": 9105.0, "none": 14751.0}
THROUGHPUT_PARAMS = 8.03e9
_RECIPE = {"nf4": "QLoRA (nf4)", "nf4+dora": "QLoRA + DoRA (nf4)", "none": "16-bit LoRA"}


@dataclass
class CostEstimate:
    backend: str
    tokens: int  # trained tokens: epochs x tokens of the training file
    usd: float | None = None
    gpu_hours: float | None = None
    basis: str = ""  # what the figure rests on
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        what = []
        if self.usd is not None:
            what.append(usd(self.usd))
        if self.gpu_hours is not None:
            hours = self.gpu_hours
            what.append(f"{hours:,.3g} GPU-hours" if hours >= 1e-3 else "under 0.001 GPU-hours (seconds)")
        figure = " / ".join(what) or "unknown"
        return f"estimated cost: {figure} for {self.tokens:,} trained tokens ({self.basis})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def usd(amount: float) -> str:
    """$4.20, or 3 significant digits below a dollar ($0.00123), so a small job never shows as $0.00."""
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.3g}"


def trained_tokens(report: Any, epochs: int) -> tuple[int, str | None]:
    """(epochs x tokens in the file, a note when the count is derived from characters)."""
    ln = report.length
    total = (ln.mean or 0.0) * (ln.count or 0)
    if ln.unit == "tokens":
        return int(round(total * epochs)), None
    return int(round(total / CHARS_PER_TOKEN * epochs)), (
        f"tokens counted as characters / {CHARS_PER_TOKEN:g} (validated without a tokenizer)")


def estimate(backend: str, spec: Any, plan: Any, report: Any) -> CostEstimate:
    """The estimate for a planned job (``plan`` from the backend, ``report`` from validating the training file)."""
    tokens, note = trained_tokens(report, spec.hyperparameters.epochs)
    est = CostEstimate(backend=backend, tokens=tokens, notes=[note] if note else [])
    if spec.method == "dpo":
        est.notes.append("DPO: the price table is per trained token of SFT; providers may bill DPO differently")
    if backend == "local":
        _local(est, plan.request or {})
        return est
    from .catalog import training_price

    model = str((plan.request or {}).get("model") or (plan.request or {}).get("base_model") or spec.base_model or "")
    price = training_price(backend, model)
    if price is None:
        est.basis = f"no price known for {model!r} on {backend}"
        return est
    per_million, where = price
    est.usd = tokens / 1e6 * per_million
    est.basis = f"${per_million:g} per 1M trained tokens, {where}"
    return est


def _local(est: CostEstimate, request: dict[str, Any]) -> None:
    from .backends.local.memory import count_params, read_model_config
    from .catalog import size_in_name

    mode = (request.get("quantization") or {}).get("mode") or "none"
    key = "nf4+dora" if mode == "nf4" and (request.get("lora") or {}).get("use_dora") else mode
    rate = THROUGHPUT_H200.get(key, THROUGHPUT_H200["none"])
    base = str(request.get("base_model") or "")
    cfg = read_model_config(base)
    params = count_params(cfg)["total"] if cfg else (size_in_name(base) or 0) * 1e9
    if not params:
        est.basis = f"GPU-hours unknown: no config.json for {base!r} here and no size in its name"
        return
    rate *= THROUGHPUT_PARAMS / params  # training FLOPs per token grow with the parameter count
    est.gpu_hours = est.tokens / rate / 3600
    est.basis = (f"{rate:,.0f} tokens/s: tunekit's {_RECIPE.get(key, key)} training throughput measured on an "
                 f"H200 for an 8B model (docs/benchmarks.md), scaled to {params / 1e9:.2g}B parameters")
    device = (request.get("device") or {}).get("name") or (request.get("device") or {}).get("type")
    if device and "H200" not in str(device):
        est.notes.append(f"this run's device is {device}: its speed differs from the H200 figure")


def check_limit(est: CostEstimate, max_cost: float | None, *, what: str = "the estimate") -> None:
    """Refuse (ConfigError on field max_cost) when ``est`` is above ``max_cost`` USD, or unknown."""
    if max_cost is None:
        return
    if est.usd is None:
        if est.backend == "local":
            return  # local runs are GPU time, not a bill: --max-cost applies to managed backends
        raise ConfigError(f"--max-cost {max_cost:g}: no cost estimate for this job ({est.basis})",
                          field="max_cost", hint="drop --max-cost, or pick a model the price table knows")
    if est.usd > max_cost:
        raise ConfigError(f"{what} {usd(est.usd)} is above --max-cost {usd(max_cost)} "
                          f"({est.tokens:,} trained tokens; {est.basis}); nothing was created",
                          field="max_cost",
                          hint="raise --max-cost, or train on fewer rows/epochs or a smaller model")
