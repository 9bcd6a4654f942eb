"""ASGI middleware: a request id and a log line per request, a bound on request bodies, the Host check and
the JSON-only rule for request bodies.

All are plain ASGI (not Starlette's BaseHTTPMiddleware), so streamed answers and client disconnects
pass through untouched.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
import unicodedata
import uuid
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from olmo_tap.jsonl import DuplicateKeyError, loads
from olmo_tap.serve.config import WILDCARD_BINDS
from olmo_tap.serve.errors import APIError, error_payload, quote_input, shorten
from olmo_tap.serve.schemas import first_bad_path, non_text

log = logging.getLogger("olmo_tap.serve")

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # used with fullmatch: "$" would let a final newline through
LOG_VALUE_CHARS = 200  # a client-supplied value longer than this is cut in log lines
# Control and format characters (newlines, ESC, bidi overrides) and line/paragraph separators: a client's
# value carrying them could forge log lines or rewrite a terminal.
_UNPRINTABLE = {"Cc", "Cf", "Zl", "Zp"}


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex[:16]


def client_request_id(given: str) -> str:
    """The client's X-Request-ID when all of it is a well-formed id, else a fresh one."""
    return given if _CLIENT_ID.fullmatch(given) else new_request_id()


def log_safe(value: str, limit: int = LOG_VALUE_CHARS) -> str:
    """A client-supplied value fit for one log line: unprintable characters escaped, cut at ``limit``."""
    escaped = "".join(_escape(c) if unicodedata.category(c) in _UNPRINTABLE else c for c in value[:limit])
    return escaped + ("…" if len(value) > limit else "")


def _escape(c: str) -> str:
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


class RequestContext:
    """Gives each request an id (the client's ``X-Request-ID`` if well-formed), echoes it in the response
    headers and logs method, path, status and the time until the headers (a streamed answer logs its own
    line when it ends)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = client_request_id(given)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_HEADER.encode(), request_id.encode())]
                elapsed_ms = 1000 * (time.perf_counter() - started)
                log.info(
                    "%s %s %s -> %d, headers after %.1f ms",
                    request_id,
                    log_safe(scope["method"]),
                    log_safe(scope["path"]),
                    message["status"],
                    elapsed_ms,
                )
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the server's limit of {limit} bytes")


class BodySizeLimit:
    """Answers 413 to bodies over ``max_bytes``: at once when Content-Length says so, else as soon as the
    streamed body passes the limit (the error then goes through the app's HTTPException handler)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps(error_payload(413, BodyTooLarge(self.max_bytes).detail)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, status: int, message: str, code: str | None = None) -> None:
    """An error answer in the project's format, sent from a middleware (before the app is reached)."""
    body = json.dumps(error_payload(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def trusted_hosts(bind_host: str, allowed: Iterable[str] = ()) -> list[str]:
    """The Host names answered: the loopback names, the address the server listens on, and ``allowed``."""
    bound = f"[{bind_host}]" if ":" in bind_host and not bind_host.startswith("[") else bind_host
    return list(dict.fromkeys([*LOOPBACK_HOSTS, *([bound] if bound else []), *allowed]))


def _ip_literal(host: str) -> bool:
    name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """Answers only requests whose Host header names this server, so that a web page whose own domain an
    attacker re-points at this machine (DNS rebinding) cannot drive the model or read its answers.

    Starlette's TrustedHostMiddleware decides (its Host parsing, ports and '*.domain' patterns); this wrapper
    only gives its refusal the project's JSON error. Listening on every interface (``bind_host`` 0.0.0.0 or
    ::), a Host that is an IP address is answered too: rebinding needs a name the attacker controls, and an
    address is not one."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str], bind_host: str = "127.0.0.1") -> None:
        self.app = app
        self.any_ip = bind_host in WILDCARD_BINDS
        self.check = TrustedHostMiddleware(self._passed, allowed_hosts=allowed_hosts, www_redirect=False)

    async def _passed(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["olmo_tap.host_ok"] = True
        await self.app(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.check(scope, receive, send)
            return
        host = Headers(scope=scope).get("host", "")
        if self.any_ip and _ip_literal(host):
            await self.app(scope, receive, send)
            return

        async def refuse_in_our_format(message: Message) -> None:
            if scope.get("olmo_tap.host_ok"):
                await send(message)
            elif message["type"] == "http.response.start":
                await send_error(
                    send,
                    400,
                    f"the Host header {quote_input(host)} does not name this server; start it with "
                    "--allowed-hosts to answer to that name",
                    code="invalid_host",
                )
            # the middleware's own plain-text body is dropped: ours went out with the start

        await self.check(scope, receive, refuse_in_our_format)


JSON_BODY_METHODS = ("POST", "PUT", "PATCH")


class JSONBodiesOnly:
    """Answers 415 to a POST (PUT, PATCH) whose Content-Type is not application/json.

    A web page on another site can send a cross-site POST without asking first only as text/plain or a form;
    one declared as JSON needs the browser's CORS preflight, which this server does not grant (unless
    --cors-origins names the page's origin). So refusing other types keeps other sites' pages away from the
    model. FastAPI alone would try to read such a body as JSON anyway."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in JSON_BODY_METHODS:
            declared = Headers(scope=scope).get("content-type", "")
            media_type = declared.split(";", 1)[0].strip().lower()
            if media_type != "application/json":
                given = f"Content-Type {quote_input(declared)}" if declared else "no Content-Type"
                await send_error(
                    send, 415, f"request bodies must be JSON (Content-Type: application/json); got {given}"
                )
                return
        await self.app(scope, receive, send)


# Half of a UTF-16 surrogate pair (U+D800-U+DFFF): as a JSON escape (\ud800), or as its three bytes, which are not
# UTF-8, but which Python's JSON parser reads from bytes all the same ("surrogatepass").
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\xed[\xa0-\xbf][\x80-\xbf]")


class CheckedBodiesRoute(APIRoute):
    """A route whose JSON body is refused with a 400 when it is ambiguous or holds text that is not Unicode.

    - Ambiguous: an object naming one key twice. Python keeps the last value, other parsers the first, so a
      transcript sent to ``/v1/audit`` could be judged as one text and read by another tool as a different one.
    - Not Unicode: Python's JSON parser keeps a lone surrogate escape ("\\ud800") as a lone surrogate, which no
      tokenizer, hash or UTF-8 answer takes, and which pydantic itself cannot read as a dictionary key; the 400
      names the place.

    Both are checked in one parse before the body reaches pydantic (a malformed body is left to FastAPI's own
    parse, which says where it breaks)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            if request.method in JSON_BODY_METHODS:
                raw = await request.body()  # kept by the request: the handler reads it again without a copy
                try:
                    value = loads(raw) if raw else None
                except DuplicateKeyError as e:
                    raise APIError(400, f"the request body is ambiguous: {e}") from None
                except ValueError:
                    value = None  # malformed: FastAPI's own parse says where
                where = first_bad_path(value, non_text) if _SURROGATE.search(raw) else None
                if where is not None:
                    where = shorten(where.encode("utf-8", "backslashreplace").decode())  # a key's surrogate too
                    raise APIError(
                        400,
                        f"{where}: not valid Unicode text: a lone surrogate (JSON's \\u escapes of U+D800-U+DFFF "
                        "must come in pairs)",
                        param=where,
                    )
            return await handler(request)

        return checked
