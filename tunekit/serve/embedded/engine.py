"""The embedded engine: one resident base model, a scheduler thread, batched multi-adapter decoding.

Requests are queued; the scheduler waits ``batch_window_ms`` after the first arrival, takes up to
``max_batch_size`` of them whose adapters fit in ``max_loras`` slots, and decodes them together:
one forward per step for the whole batch, each row through its own adapter (or the base). Rows
leave the batch as they finish (KV cache rows dropped). Continuous batching: requests arriving
meanwhile are prefilled together and join the running rows at the next decode step, as far as
``max_batch_size`` and ``max_loras`` allow (see running.py).
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from ..._exceptions import ConfigError
from . import lora_triton
from .attention import use_gqa_decode
from .detok import grow_text
from .fused import apply_fused_kernels
from .requests import GenRequest, GenResult, SamplingParams, Sink
from .running import Running, joinable
from .static import StaticRunning, bucket, initial_length, unsupported

logger = logging.getLogger(__name__)

def _default_device_dtype(device: str | None, dtype: str | None):
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in names:
        dt = names[dtype]
    else:
        raise ConfigError(f"dtype {dtype!r} is not one of bf16, fp16, fp32", field="dtype")
    return dev, dt


def prompt_char_bound(tokenizer: Any, max_model_len: int) -> int:
    """Characters beyond which a text cannot fit in ``max_model_len`` tokens, known without tokenizing it.

    No token stands for more characters than its vocabulary string has (byte-level and SentencePiece
    pieces are at least as long as the text they decode to), so a fitting text has at most
    ``max_model_len * longest`` characters; x4 leaves room for normalizers that compose characters.
    """
    longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
    return max_model_len * max(longest, 1) * 4


class Engine:
    def __init__(self, base_model: str | Path, adapters: dict[str, str | Path] | None = None, *,
                 max_loras: int = 4, max_cpu_loras: int | None = None, max_lora_rank: int | None = None,
                 device: str | None = None, dtype: str | None = None, max_batch_size: int = 32,
                 batch_window_ms: float = 2.0, decode: str = "auto", kernels: str = "auto") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .pool import AdapterPool

        self.base_model = str(base_model)
        self.device, self.dtype = _default_device_dtype(device, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        # Load straight onto the GPU (no full host copy first); the base is loaded once, in 16-bit on GPU.
        placement = {"device_map": {"": str(self.device)}} if self.device.type == "cuda" else {}
        model = AutoModelForCausalLM.from_pretrained(self.base_model, dtype=self.dtype, **placement)
        self.model = model.to(self.device).eval()
        self.kernels, self.kernels_note = apply_fused_kernels(self.model, self.device, kernels)
        use_gqa_decode(self.model)  # decode attention without repeating K/V per query head (stats: attention)
        # transformers renamed `past_key_values` to `cache` (5.2x); support both spellings.
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.max_model_len = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
        self.max_prompt_chars = prompt_char_bound(self.tokenizer, self.max_model_len)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.pool = AdapterPool(self.model, max_loras=max_loras, device=self.device, dtype=self.dtype,
                                max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank)
        for name, path in (adapters or {}).items():
            self.pool.register(name, path)
        self.max_batch_size = max_batch_size
        self.decode, self.decode_note = self._decode_mode(decode)
        self._spare: StaticRunning | None = None  # the last static cache (and its graphs), reused by the next batch
        self.batch_window_s = batch_window_ms / 1000
        self._torch = torch
        self._cv = threading.Condition()
        self._pending: collections.deque[GenRequest] = collections.deque()
        self._paused = 0
        self._closed = False
        self._running: Running | None = None  # rows decoding now (scheduler thread only)
        self._can_join = True
        self._stats = collections.Counter()
        self._batches: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)
        self._thread = threading.Thread(target=self._loop, name="tunekit-embedded-scheduler", daemon=True)
        self._thread.start()

    # -- public API ----------------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str | Path) -> None:
        self.pool.register(name, path)

    def remove_adapter(self, name: str) -> None:
        self.pool.unregister(name)

    def adapters(self) -> dict[str, Path]:
        return {n: self.pool.info(n).path for n in self.pool.names()}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def submit(self, req: GenRequest) -> GenRequest:
        if self._closed:
            raise RuntimeError("engine is closed")
        if req.adapter is not None and self.pool.info(req.adapter) is None:
            raise KeyError(req.adapter)
        with self._cv:
            self._pending.append(req)
            self._cv.notify_all()
        return req

    def generate(self, prompt: str | list[int], adapter: str | None = None, **params: Any) -> GenResult:
        """Blocking convenience: one completion (used by the benchmark and tests)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        done = threading.Event()
        parts: list[str] = []
        final: dict[str, Any] = {}

        def sink(_i: int, kind: str, payload: Any) -> None:
            if kind == "delta":
                parts.append(payload)
            else:
                final[kind] = payload
                done.set()

        self.submit(GenRequest(ids, adapter, SamplingParams(**params), sink))
        done.wait()
        if "error" in final:
            raise RuntimeError(final["error"])
        reason, n = final["done"]
        return GenResult("".join(parts), reason, n)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold new batches while inside (requests still queue); lets tests line up concurrent requests."""
        with self._cv:
            self._paused += 1
        try:
            yield
        finally:
            with self._cv:
                self._paused -= 1
                self._cv.notify_all()

    def pending(self) -> int:
        with self._cv:
            return len(self._pending)

    def stats(self) -> dict[str, Any]:
        with self._cv:
            out = dict(self._stats)
            out["recent_batches"] = list(self._batches)
            out["pending"] = len(self._pending)
        out["decode"] = self.decode
        if self.decode_note:
            out["decode_fallback"] = self.decode_note
        out["kernels"] = self.kernels
        out["attention"] = self.model.config._attn_implementation
        out["lora_decode"] = "triton" if self.pool.slots.kernels else "bmm"  # mixed-adapter decode steps
        if self.pool.slots.kernels and self.pool.slots.fused and lora_triton.TUNING["fuse"]:  # see lora_fusion
            out["lora_fused"] = dict(self.pool.slots.fused)
        if self.kernels_note:
            out["kernels_note"] = self.kernels_note
        out["adapters"] = self.pool.stats()
        return out

    def _decode_mode(self, asked: str) -> tuple[str, str | None]:
        """``auto``: CUDA graphs over a static cache on a GPU, the eager path elsewhere; why a mode fell back."""
        if asked not in ("auto", "eager", "static", "graphs"):
            raise ConfigError(f"decode {asked!r} is not one of auto, eager, static, graphs", field="decode")
        if asked == "eager" or asked == "auto" and self.device.type != "cuda":
            return "eager", None
        reason = unsupported(self.model)
        if reason:
            return "eager", f"static cache unsupported: {reason}"
        if asked in ("auto", "graphs") and self.device.type != "cuda":
            return "static", "CUDA graphs need a CUDA device"
        return ("graphs" if asked == "auto" else asked), None

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        running = self._running.rows if self._running is not None else []
        for req in [r for r in running if not r.finished] + list(self._pending):
            req.sink(req.index, "error", "server shutting down")

    # -- scheduler -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and self._running is None and (not self._pending or self._paused):
                    self._cv.wait()
                if self._closed:
                    return
                idle = self._running is None
            if idle and self.batch_window_s:  # a new batch: let requests arriving together start together
                time.sleep(self.batch_window_s)
            with self._cv:
                new = [] if self._paused else self._take_batch()
            try:
                if new:
                    self._admit(new)
                if self._running is not None:
                    self._step()
            except Exception as exc:  # never kill the scheduler: fail these rows, keep serving
                logger.exception("decode step failed; its rows get an error")
                self._stats["failed_batches"] += 1
                failed = (self._running.rows if self._running is not None else []) + new
                self._running = None
                self.pool.slots.set_rows([0])
                for req in failed:
                    if not req.finished:
                        req.finished = True
                        req.sink(req.index, "error", f"{type(exc).__name__}: {exc}")

    def _take_batch(self) -> list[GenRequest]:
        """Queued requests that fit next to the running rows (batch size, adapters per batch), in order."""
        running = self._running.rows if self._running is not None else []
        if running and not self._can_join:
            return []
        batch: list[GenRequest] = []
        chosen = {r.adapter for r in running if r.adapter is not None}
        keep: collections.deque[GenRequest] = collections.deque()
        while self._pending:
            req = self._pending.popleft()
            if req.cancelled:  # its client went away while it waited
                self._stats["cancelled_rows"] += 1
                continue
            if len(running) + len(batch) >= self.max_batch_size or (
                    req.adapter is not None and req.adapter not in chosen and len(chosen) >= self.pool.max_loras):
                keep.append(req)  # waits for a free row, keeping its place in line
                continue
            if req.adapter is not None:
                chosen.add(req.adapter)
            batch.append(req)
        self._pending = keep
        return batch

    def _admit(self, rows: list[GenRequest]) -> None:
        """Prefill ``rows`` together, sample their first tokens, and make them join the running rows."""
        torch = self._torch
        for r in rows:
            if r.adapter is not None and self.pool.info(r.adapter) is None:  # unloaded while queued
                r.finished = True
                r.sink(r.index, "error", f"adapter {r.adapter!r} was unloaded")
        rows = [r for r in rows if not r.finished]
        if not rows:
            return
        run = self._running
        if run is not None:  # an adapter unloaded while its rows decode: its slot may go to a joining adapter
            for r in run.rows:
                if r.adapter is not None and self.pool.info(r.adapter) is None:
                    self._fail_row(r, f"adapter {r.adapter!r} was unloaded while this request was decoding")
            run.keep([i for i, r in enumerate(run.rows) if not r.finished])
            if not run.rows:
                self._running = run = None
        running = run.rows if run is not None else []
        # Slots for every row: a layout rebuild (a larger adapter registered) re-places the running ones too.
        slots = self.pool.acquire([r.adapter for r in running + rows])
        if run is not None:
            run.slots = slots[:len(running)]
        slots = slots[len(running):]
        models = sorted({r.adapter or "__base__" for r in rows})
        with self._cv:
            self._stats["batches"] += 1
            self._stats["mixed_batches"] += len(models) > 1
            self._stats["joined_rows"] += len(rows) if running else 0
            self._batches.append({"size": len(rows), "models": models, "joined": len(running),
                                  "request_ids": sorted({r.request_id for r in rows})})
        seeded = [self._seed(r) for r in rows]
        slots = [s for s, ok in zip(slots, seeded) if ok]
        rows = [r for r, ok in zip(rows, seeded) if ok]
        if not rows:
            if self._running is not None:  # rows may have left or moved slots above: route the others again
                self._route(self._running)
            return
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's last prompt token is at the end
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        self.pool.slots.set_rows(slots)
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                             **{self._cache_kw: None})
        self._stats["forward_passes"] += 1
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        new = Running(rows, slots, cache, ids[:, -1:], mask, pos[:, -1:])
        self._next(new, out.logits[:, -1, :])
        if new.rows and run is not None:
            run.join(new)
        elif new.rows and self.decode != "eager":
            self._running = self._static_for(new)
            self._running.join(new)
        elif new.rows:
            self._running = new
        if self._running is not None:
            self._route(self._running)
            # Rows can join later only when every layer's cache can be padded and concatenated.
            self._can_join = isinstance(self._running, StaticRunning) or joinable(self._running.cache)

    def _step(self) -> None:
        """One decode forward for every running row."""
        run = self._running
        with self._torch.inference_mode():
            if isinstance(run, StaticRunning):
                logits = run.forward(self._cache_kw, self.decode == "graphs")
            else:
                logits = self.model(input_ids=run.ids, attention_mask=run.mask, position_ids=run.pos, use_cache=True,
                                    logits_to_keep=1, **{self._cache_kw: run.cache}).logits[:, -1, :]
        self._stats["forward_passes"] += 1
        self._next(run, logits)
        if not run.rows:
            self._running = None
            if isinstance(run, StaticRunning):
                self._spare = run
            self.pool.slots.set_rows([0])

    def _next(self, run: Running, logits) -> None:
        """Sample each row's next token; finished rows leave, the others get their next forward's inputs."""
        torch = self._torch
        tokens = self._sample(logits.float(), run.rows)
        keep = []
        for i, r in enumerate(run.rows):
            if tokens[i] is not None and not self._advance(r, tokens[i]):
                keep.append(i)
            else:
                r.finished = True
        n = len(run.rows)
        run.keep(keep)
        if len(keep) < n and run.rows:
            self._route(run)
        if run.rows and isinstance(run, StaticRunning):
            run.advance(torch.tensor([tokens[i] for i in keep]))
        elif run.rows:
            run.ids = torch.tensor([tokens[i] for i in keep], device=self.device).unsqueeze(1)
            run.mask = torch.cat([run.mask, run.mask.new_ones((len(keep), 1))], dim=1)
            run.pos = run.pos + 1

    def _static_for(self, first: Running) -> StaticRunning:
        """A static cache for a new batch: the previous one (its graphs captured) when it is large enough."""
        need = initial_length(first.mask.shape[1], max(r.params.max_tokens for r in first.rows), self.max_model_len)
        spare, self._spare = self._spare, None
        if spare is not None and spare.cap >= bucket(len(first.rows)) and spare.length >= need:
            return spare
        del spare  # free its buffers and graphs before allocating new ones
        run = StaticRunning(self.model, bucket(len(first.rows)), need, first.cache.layers[0].keys)
        run.before_capture = self.pool.slots.regather
        return run

    def _route(self, run: Running | StaticRunning) -> None:
        """Point the LoRA slots at ``run``'s rows (for graphs: through index tensors, the key of the capture)."""
        if isinstance(run, StaticRunning):
            graphs = self.decode == "graphs"
            self.pool.slots.set_rows(run.batch_slots(), indexed=graphs)
            run.graph_key = self.pool.slots.route_key if graphs else None
        else:
            self.pool.slots.set_rows(run.slots)

    def _seed(self, r: GenRequest) -> bool:
        """Give a seeded row its generator; a seed torch refuses fails that row only (False)."""
        if r.params.seed is None:
            return True
        try:
            r.generator = self._torch.Generator(device=self.device).manual_seed(r.params.seed)
            return True
        except (ValueError, RuntimeError, OverflowError) as exc:
            self._fail_row(r, f"invalid seed {r.params.seed}: {exc}")
            return False

    def _fail_row(self, r: GenRequest, message: str) -> None:
        with self._cv:
            self._stats["failed_rows"] += 1
        r.finished = True
        r.sink(r.index, "error", message)

    def _sample(self, logits, rows: list[GenRequest]) -> list[int | None]:
        """Next token per row; None for a row whose sampling failed (it gets an error, the others go on)."""
        torch = self._torch
        out: list[int | None] = logits.argmax(-1).tolist()
        for j, r in enumerate(rows):
            p = r.params
            if p.temperature <= 0:
                continue
            try:
                probs = torch.softmax(logits[j] / p.temperature, dim=-1)
                if p.top_p < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    cut = sorted_p.cumsum(0) - sorted_p > p.top_p  # keep the smallest set with mass >= top_p
                    sorted_p[cut] = 0
                    probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
                out[j] = int(torch.multinomial(probs, 1, generator=r.generator).item())
            except RuntimeError as exc:  # e.g. logits / temperature overflowed: NaN probabilities
                self._fail_row(r, f"sampling failed (temperature={p.temperature}, top_p={p.top_p}): {exc}")
                out[j] = None
        return out

    def _advance(self, r: GenRequest, token: int) -> bool:
        """Append ``token`` to row ``r``, emit new text; True when the row is finished."""
        if r.cancelled:  # its client went away: stop decoding it
            with self._cv:
                self._stats["cancelled_rows"] += 1
            return True
        p = r.params
        reason = None
        if token in self.eos_ids:
            reason = "stop"
        else:
            r.generated.append(token)
        text = grow_text(self.tokenizer, r)
        cut = False
        if p.stop:
            start = max(0, r.emitted - max(len(s) for s in p.stop))
            hits = [i for i in (text.find(s, start) for s in p.stop) if i >= 0]
            if hits:
                text, reason, cut = text[:min(hits)], "stop", True
        if reason is None and (len(r.generated) >= p.max_tokens
                               or len(r.prompt_ids) + len(r.generated) >= self.max_model_len):
            reason = "length"
        if reason is None:
            safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence waits for its next byte
            # Hold back a tail that may still grow into a stop string.
            hold = max((k for s in p.stop for k in range(1, min(len(s), safe + 1))
                        if text[:safe].endswith(s[:k])), default=0)
            safe -= hold
            if safe > r.emitted:
                r.sink(r.index, "delta", text[r.emitted:safe])
                r.emitted = safe
            return False
        if not cut:  # the whole output, decoded once (with any bytes grow_text still held back)
            text = self.tokenizer.decode(r.generated, skip_special_tokens=True)
        if len(text) > r.emitted:
            r.sink(r.index, "delta", text[r.emitted:])
            r.emitted = len(text)
        r.sink(r.index, "done", (reason, len(r.generated)))
        return True

