"""Where tunekit keeps its state, and credentials read from the providers' usual variables.

Credentials are read at call time and never persisted, logged or shown in a repr.
"""

from __future__ import annotations

import os
from pathlib import Path


def tunekit_home() -> Path:
    """``$TUNEKIT_HOME`` or ``~/.tunekit``; created 0700 on first use."""
    home = Path(os.environ.get("TUNEKIT_HOME") or Path.home() / ".tunekit").expanduser()
    if not home.exists():
        home.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o700)
    return home


def state_db_path() -> Path:
    return tunekit_home() / "state.db"


def debug_enabled() -> bool:
    return os.environ.get("TUNEKIT_DEBUG", "") not in ("", "0", "false", "no")


def env_credential(*names: str) -> str | None:
    """The first non-empty environment variable among ``names``."""
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


class Secret(str):
    """A string that never shows itself in repr() or str() formatting of containers."""

    def __repr__(self) -> str:
        return "Secret('***')"
