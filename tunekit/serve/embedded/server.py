"""Running the embedded server: in the foreground (``run``) or on a background thread (``start_in_thread``)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..._exceptions import ConfigError

log = logging.getLogger("tunekit.serve")


def _warn_if_exposed(host: str, api_key: str | None) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model "
                    "(pass api_key=... / --api-key)", host)


def run(base_model: str, adapters: dict[str, str] | None = None, *, host: str = "127.0.0.1", port: int = 8000,
        log_level: str = "info", **app_kwargs: Any) -> None:
    """Serve in the foreground until interrupted. ``app_kwargs`` go to :func:`create_app`."""
    import uvicorn

    from .app import create_app

    _warn_if_exposed(host, app_kwargs.get("api_key"))
    app = create_app(base_model, adapters, **app_kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


@dataclass
class ServerHandle:
    """A server running on a background thread; ``url`` has no trailing slash (use ``url + "/v1"``)."""

    url: str
    app: Any
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def engine(self):
        return self.app.state.engine

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self.engine.close()

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_in_thread(base_model: str, adapters: dict[str, str] | None = None, *, host: str = "127.0.0.1",
                    port: int = 0, startup_timeout: float = 60.0, **app_kwargs: Any) -> ServerHandle:
    """Start the server on a thread (port 0 = any free port) and return once it accepts requests."""
    import uvicorn

    from .app import create_app

    _warn_if_exposed(host, app_kwargs.get("api_key"))
    app = create_app(base_model, adapters, **app_kwargs)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="tunekit-embedded-http",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            app.state.engine.close()
            raise ConfigError(f"the embedded server did not start on {host}:{port}", field="port",
                              hint="pick another port, or check the log above")
        time.sleep(0.02)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    return ServerHandle(url=f"http://{shown}:{bound[1]}", app=app, _server=server, _thread=thread)
