"""ASGI middleware: a request id and a log line per request, and a bound on request bodies.

Both are plain ASGI (not Starlette's BaseHTTPMiddleware), so streamed answers and client disconnects
pass through untouched.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from olmo_tap.serve.errors import error_payload

log = logging.getLogger("olmo_tap.serve")

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex[:16]


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
        request_id = given if _CLIENT_ID.match(given) else new_request_id()
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
                    scope["method"],
                    scope["path"],
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
