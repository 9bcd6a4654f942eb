"""A real uvicorn server on a free localhost port, in this process (benchmarks and tests talk to it over HTTP)."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn


class LiveServer:
    """Runs ``app`` with uvicorn in a background thread (port chosen by the OS) until the ``with`` block ends."""

    def __init__(self, app: Any, start_timeout_s: float = 60.0) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-live", daemon=True)
        self.start_timeout_s = start_timeout_s

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
