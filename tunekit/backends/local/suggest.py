"""What to change when a run's memory estimate does not fit: QLoRA, gradient checkpointing, a smaller micro-batch,
a shorter max_length, or a combination, each checked to fit by re-running the estimate (memory.estimate passes
that check in: this module knows nothing of the estimate's terms). The searches bisect the halvings of the batch
and the length, so their cost does not grow with the values.
"""

from __future__ import annotations

from typing import Any, Callable

LENGTH_CHANGE = "shorten hyperparameters.max_length"  # how the length suggestion starts (resolve.py replaces it)


def _largest_fitting(start: int, floor: int, fits: Any) -> int | None:
    """The largest of start//2, start//4, ... (down to the first value <= floor) that fits, or None.
    Peak memory grows with batch and length, so ``fits`` is monotone along the halvings: bisect them."""
    halvings = []
    v = start
    while v > floor:
        v //= 2
        halvings.append(v)
    lo, hi = 0, len(halvings)  # the first fitting index lies in [lo, hi); hi = none fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(halvings[mid]):
            hi = mid
        else:
            lo = mid + 1
    return halvings[lo] if lo < len(halvings) else None


def changes(fits: Callable[..., bool], args: dict[str, Any]) -> list[str]:
    """Concrete changes that would fit (singles, then combined). ``args``: the run's memory._estimate arguments;
    ``fits(**change)``: whether the estimate with ``change`` applied to them fits."""

    def smallest_micro(**base: Any) -> int | None:
        return _largest_fitting(args["micro_batch"], 1, lambda mb: fits(micro_batch=mb, **base))

    def shortest_len(**base: Any) -> int | None:
        return _largest_fitting(args["max_length"], 128, lambda ml: fits(max_length=ml, **base))

    def micro_text(mb: int) -> str:
        return (f"lower the micro-batch to {mb} (raise hyperparameters.gradient_accumulation_steps so that "
                f"batch_size / gradient_accumulation_steps = {mb})")

    def len_text(ml: int) -> str:
        return f"{LENGTH_CHANGE} to {ml} (longer examples are truncated and counted)"

    out: list[str] = []
    nf4 = {"quantization": "nf4", "dtype": "bf16"}
    can_quantize = args["quantization"] != "nf4"
    if can_quantize and fits(**nf4):
        out.append("use QLoRA: quantization='nf4'")
    if not args["gradient_checkpointing"] and fits(gradient_checkpointing=True):
        out.append("enable gradient checkpointing")
    if (mb := smallest_micro()) is not None:
        out.append(micro_text(mb))
    if (ml := shortest_len()) is not None:
        out.append(len_text(ml))
    if out:
        return out
    # nothing alone is enough: combine, QLoRA first (the largest single saving)
    base = dict(nf4) if can_quantize else {}
    if not args["gradient_checkpointing"]:
        base["gradient_checkpointing"] = True
    prefix = ("use QLoRA (quantization='nf4') and " if can_quantize else "") + (
        "enable gradient checkpointing and " if not args["gradient_checkpointing"] else "")
    if (mb := smallest_micro(**base)) is not None:
        out.append(prefix + micro_text(mb))
    elif (ml := shortest_len(micro_batch=1, **base)) is not None:
        out.append(prefix + micro_text(1) + " and " + len_text(ml))
    else:
        out.append("use a smaller base model or a device with more memory (no change tunekit tried fits)")
    return out
