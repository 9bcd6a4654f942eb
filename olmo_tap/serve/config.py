"""The server's settings: defaults, environment variables and their checks."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "OLMO_TAP_SERVE_"


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one server process (each one has a flag of ``olmo-tap serve`` and an environment variable)."""

    host: str = "127.0.0.1"
    port: int = 8000
    queue_size: int = 8  # requests allowed to wait while one is decoded; beyond that: 429
    request_timeout_s: float = 300.0  # queue wait + decoding of one request
    default_max_tokens: int = 256  # when a request gives no max_tokens (capped by the context)
    default_temperature: float = 0.7  # when a request gives no temperature
    max_body_bytes: int = 1_000_000  # larger request bodies get 413
    log_level: str = "info"
    signing_key: str | None = None  # Ed25519 private key (PEM) that signs every transcript's digest; None: unsigned

    def __post_init__(self) -> None:
        checks = {
            "port": 0 <= self.port <= 65535,
            "queue_size": self.queue_size >= 0,
            "request_timeout_s": self.request_timeout_s > 0,
            "default_max_tokens": self.default_max_tokens >= 1,
            "default_temperature": self.default_temperature >= 0,
            "max_body_bytes": self.max_body_bytes >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"server setting {name} has an invalid value: {getattr(self, name)!r}")


def env_name(flag: str) -> str:
    """The environment variable of a flag: --queue-size -> OLMO_TAP_SERVE_QUEUE_SIZE."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def env_default(flag: str, default: Any, cast: Callable[[str], Any] = str) -> Any:
    """The flag's environment variable cast to its type when set (and not empty), else ``default``."""
    name = env_name(flag)
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a valid {cast.__name__}") from None
