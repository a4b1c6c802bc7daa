"""pytest fixture for the replay server: ``from tests.replay.fixtures import replay_server``.

    def test_x(replay_server):
        srv = replay_server(RECORDINGS / "lifecycle.json")    # or an inline dict
        ... point the SDK at srv.url (+ the provider's path prefix) ...
        srv.assert_done()                                     # all exchanges served, no mismatch

The fixture is a factory: several servers per test are fine; all are shut down at teardown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.replay.server import ReplayServer, start_replay_server

RECORDINGS = Path(__file__).resolve().parents[1] / "recordings"


@contextmanager
def serve_recording(recording: str | Path | dict[str, Any]) -> Iterator[ReplayServer]:
    """Context-manager form, for scripts and non-fixture use."""
    server = start_replay_server(recording)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def replay_server() -> Iterator[Callable[[str | Path | dict[str, Any]], ReplayServer]]:
    started: list[ReplayServer] = []

    def start(recording: str | Path | dict[str, Any]) -> ReplayServer:
        server = start_replay_server(recording)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()
