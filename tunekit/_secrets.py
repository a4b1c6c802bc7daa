"""Masking of every credential tunekit handles, wherever text leaves it: errors, the store, events, logs.

A secret is known when it sits in one of the credential variables below or was handed to tunekit
(``api_key=...``) and registered; any text is masked by replacing each known value with ``***``.
Providers echo keys back in error bodies, so masking happens at the sinks, not only where keys are used.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

CREDENTIAL_ENV = ("OPENAI_API_KEY", "TOGETHER_API_KEY", "FIREWORKS_API_KEY", "WANDB_API_KEY",
                  "TUNEKIT_SERVE_API_KEY")
MASK = "***"
# Shorter values would mask ordinary words (and are not real keys).
MIN_SECRET_LEN = 8

_registered: set[str] = set()


def register(value: str | None) -> None:
    """Remember a credential passed in code (not from the environment) so it is masked too."""
    if value and len(value) >= MIN_SECRET_LEN:
        _registered.add(str.__str__(value))


def known_secrets() -> list[str]:
    found = {os.environ.get(name) or "" for name in CREDENTIAL_ENV} | _registered
    # Longest first: a key that contains another is masked whole.
    return sorted((s for s in found if len(s) >= MIN_SECRET_LEN), key=len, reverse=True)


def mask(text: Any, pattern: re.Pattern[str] | None = None) -> Any:
    """``text`` with every known secret (and every match of ``pattern``, e.g. a provider's half-masked
    echo of a key) replaced by ``***``; non-strings are returned unchanged."""
    if not isinstance(text, str) or not text:
        return text
    for secret in known_secrets():
        if secret in text:
            text = text.replace(secret, MASK)
    return pattern.sub(MASK, text) if pattern is not None else text


def mask_data(value: Any, pattern: re.Pattern[str] | None = None) -> Any:
    """A JSON-like value with every string in it masked."""
    if isinstance(value, str):
        return mask(value, pattern)
    if isinstance(value, dict):
        return {k: mask_data(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask_data(v, pattern) for v in value)
    return value


def mask_exception(exc: BaseException | None, pattern: re.Pattern[str] | None = None) -> None:
    """Mask, in place, the messages of ``exc`` and of every exception chained to it, so a printed
    traceback (``TUNEKIT_DEBUG=1``) shows no secret. SDK errors also keep the body and message."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.args = tuple(mask_data(a, pattern) for a in exc.args)
        for attr in ("message", "body"):
            value = getattr(exc, attr, None)
            if isinstance(value, (str, dict, list)):
                try:
                    setattr(exc, attr, mask_data(value, pattern))
                except AttributeError:  # a read-only property: derived from args, already masked
                    pass
        exc = exc.__cause__ or exc.__context__


class MaskingFilter(logging.Filter):
    """Renders a record's message with secrets masked (the SDKs log request bodies at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None:
            mask_exception(record.exc_info[1])
            record.exc_text = None
        return True


_FILTER = MaskingFilter()


def mask_logs(*names: str) -> None:
    """Attach the masking filter to these loggers (a logger's filters apply to its own records only)."""
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
