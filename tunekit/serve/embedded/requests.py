"""What the engine is asked for: sampling settings, one generated sequence (a choice) and its result.

Kept apart from engine.py so the scheduler's parts (running.py) can name a request without importing the engine.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

Sink = Callable[[int, str, Any], None]  # (row index, "delta"|"done"|"error", payload)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class GenRequest:
    """One generated sequence (a choice). ``sink`` gets text deltas, then done(finish_reason, n_tokens)."""

    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    sink: Sink
    index: int = 0
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    cancelled: bool = False
    finished: bool = False  # done, failed or cancelled: nothing more is sent to its sink
    # decoding state
    generated: list[int] = field(default_factory=list)
    emitted: int = 0
    text: str = ""  # the text of `generated` so far, grown by detok.grow_text
    prefix_offset: int = 0  # detok.grow_text's window: context tokens from here,
    read_offset: int = 0  # new tokens from here
    generator: Any = None

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class GenResult:
    text: str
    finish_reason: str
    completion_tokens: int
