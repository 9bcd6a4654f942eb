"""The server's settings: defaults, environment variables and their checks."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from olmo_tap.certainty.names import DEFAULT_SIMILARITY, SIMILARITY_NAMES
from olmo_tap.jsonl import is_finite_number, is_int

ENV_PREFIX = "OLMO_TAP_SERVE_"


@dataclass(frozen=True)
class ServeConfig:
    """Settings of one server process (each one has a flag of ``olmo-tap serve`` and an environment variable)."""

    host: str = "127.0.0.1"
    port: int = 8000
    queue_size: int = 8  # requests allowed to wait beyond a full batch; beyond that: 429
    max_batch: int = 8  # answers decoded together (continuous batching); more wait in the queue
    request_timeout_s: float = 300.0  # queue wait + decoding of one request
    default_max_tokens: int = 256  # when a request gives no max_tokens (capped by the context)
    default_temperature: float = 0.7  # when a request gives no temperature
    max_body_bytes: int = 1_000_000  # larger request bodies get 413
    # Prompt + output tokens over all sequences of one /v1/verify or /v1/audit request; more get 400. 0: the
    # model's context, the longest single sequence it can replay, so any one valid sequence fits while a
    # request stays one context's work (time and memory) however many sequences it carries.
    max_verify_tokens: int = 0
    log_level: str = "info"
    signing_key: str | None = None  # Ed25519 private key (PEM) that signs every transcript's digest; None: unsigned
    # Host header names answered besides the loopback names and ``host`` (DNS-rebinding protection); "*" turns the
    # check off, "*.example.com" allows a domain's subdomains.
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API (CORS); none: no CORS headers at all
    docs: bool = False  # /docs and /redoc: Swagger UI and ReDoc load their assets from a CDN
    # KLE's similarity (olmo_tap.certainty.similarity): a built-in name, or "nli:<checkpoint>" (--nli-model)
    similarity: str = DEFAULT_SIMILARITY
    # The robustness probe's attack bank (olmo_tap.robustness.bank); None: the one shipped for the model's preset
    attack_bank: str | None = None

    def __post_init__(self) -> None:
        from olmo_tap.inference.sampling import MIN_TEMPERATURE  # imports torch: only when a server is configured

        checks = {  # name -> (valid, what is)
            "port": (is_int(self.port) and 0 <= self.port <= 65535, "an integer in [0, 65535] (0: any free port)"),
            "queue_size": (is_int(self.queue_size) and self.queue_size >= 0, "an integer >= 0"),
            "max_batch": (is_int(self.max_batch) and 1 <= self.max_batch <= 256, "an integer in [1, 256]"),
            "request_timeout_s": (
                is_finite_number(self.request_timeout_s) and self.request_timeout_s > 0,
                "seconds > 0",
            ),
            "default_max_tokens": (is_int(self.default_max_tokens) and self.default_max_tokens > 0, "an integer >= 1"),
            "default_temperature": (
                _temperature_ok(self.default_temperature),
                f"0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_API_TEMPERATURE:g}]",
            ),
            "max_body_bytes": (is_int(self.max_body_bytes) and self.max_body_bytes >= 1, "an integer >= 1"),
            "max_verify_tokens": (is_int(self.max_verify_tokens) and self.max_verify_tokens >= 0, "an integer >= 0"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"server setting {name} must be {expected}, got {getattr(self, name)!r}")
        if self.similarity not in SIMILARITY_NAMES and not self.similarity.startswith("nli:"):
            names = ", ".join(SIMILARITY_NAMES)
            raise ValueError(f"similarity {self.similarity!r}: one of {names}, or nli:<checkpoint>")
        for pattern in self.allowed_hosts:
            # Starlette's TrustedHostMiddleware asserts this rule; checked here to fail with a clear message.
            if not pattern or "*" in pattern[1:] or (pattern.startswith("*") and pattern != "*" and pattern[1] != "."):
                raise ValueError(f"allowed host {pattern!r}: give a name, an address, '*.example.com' or '*'")
        for origin in self.cors_origins:
            # A browser's Origin header is scheme://host[:port], never with a path: anything else never matches.
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"CORS origin {origin!r}: give scheme://host[:port] (no path), or '*'")


MAX_API_TEMPERATURE = 2.0  # OpenAI's bound on a request's temperature, which the service keeps


def _temperature_ok(value: Any) -> bool:
    """The decoder's temperature rule (``check_temperature``) within the API's bound."""
    from olmo_tap.inference.sampling import check_temperature

    try:
        return check_temperature(value) <= MAX_API_TEMPERATURE
    except ValueError:
        return False


WILDCARD_BINDS = ("0.0.0.0", "::", "")  # --host values that listen on every interface
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s]+", re.IGNORECASE)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def comma_list(raw: str) -> tuple[str, ...]:
    """A comma-separated flag value as its non-empty items: "a, b," -> ("a", "b")."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def boolean(raw: str) -> bool:
    """An environment variable's yes/no: 1/0, true/false, yes/no, on/off (any case)."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a yes/no value: {raw!r}")


def public_model_id(given: str) -> str:
    """The name the service shows for a model: a preset name or hub id as given, a local path as its base name.

    The id appears in /v1/models, /health, every response, transcript and log line: a path would tell any client
    how the server's disk is laid out (user names, directories)."""
    name = given.strip()
    local = os.path.lexists(os.path.expanduser(name))
    plain = not re.search(r"[/\\]", name) and not name.startswith("~")
    if not local and (plain or _HUB_ID.fullmatch(name)):
        return name
    base = re.split(r"[/\\]", name.rstrip("/\\"))[-1]
    if base in ("", ".", "..", "~"):
        base = os.path.basename(os.path.abspath(os.path.expanduser(name)))
    return base or "local-model"


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
