"""A real uvicorn server on a free localhost port, in this process (tests talk to it over HTTP), or ``olmo-tap serve``
in a child process (the concurrency benchmark)."""

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


class ServeProcess:
    """``olmo-tap serve`` in a child process on a free localhost port until the ``with`` block ends: the server as
    deployed, whose event loop and decoding thread share no interpreter (nor its lock) with the client.

    ``args`` are more ``olmo-tap serve`` flags; ``threads`` (None: torch's default) sets the child's CPU threads.
    A child that exits or is not ready (``/health`` ok) within ``start_timeout_s`` raises with its last output.
    """

    def __init__(self, args: list[str], threads: int | None = None, start_timeout_s: float = 600.0) -> None:
        self.args = args
        self.threads = threads
        self.start_timeout_s = start_timeout_s
        self.port = _free_port()
        self.process: Any = None
        self.log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServeProcess:
        import os
        import subprocess
        import sys
        import tempfile

        import httpx

        env = dict(os.environ)
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)  # torch's intra-op threads in the child
        command = [sys.executable, "-c", "import sys; from olmo_tap.cli import main; sys.exit(main())", "serve"]
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", *self.args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._stop()
                why = self._tail()
                self.__exit__()
                raise RuntimeError(f"olmo-tap serve did not start: {why}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).json().get("status") == "ok":
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)

    def _tail(self) -> str:
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").strip().splitlines()
        return " | ".join(lines[-5:]) or f"exit code {self.process.returncode}"

    def __exit__(self, *exc: object) -> None:
        self._stop()
        if self.log is not None:
            self.log.close()
            self.log = None

    def _stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except Exception:
                self.process.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
