"""Errors in OpenAI's format (``{"error": {"message", "type", "param", "code"}}``), for every failure path.

FastAPI answers invalid bodies with 422 and its own ``detail`` list; OpenAI clients expect 400 and one
message naming the field, so the validation handler is replaced. Unexpected exceptions become a 500 in the
same format (logged with the request id) and never take the server down.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("olmo_tap.serve")

ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_unavailable",
}


class APIError(Exception):
    """An error answer: HTTP status, message, the request field at fault (``param``) and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return error_payload(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status, headers=self.headers)


QUOTE_CHARS = 80  # the most of a client's input an error message quotes
MAX_MESSAGE_CHARS = 1000  # a backstop: no error message, whatever it quotes, is longer


def shorten(text: str, limit: int = QUOTE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quote_input(value: Any, limit: int = QUOTE_CHARS) -> str:
    """A client's value as an error message quotes it: repr'd, at most ``limit`` characters (then "…")."""
    text = value if isinstance(value, str) else str(value)
    return repr(shorten(text, limit))


def error_payload(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    message = shorten(message, MAX_MESSAGE_CHARS)
    param = None if param is None else shorten(param)  # a field name can be the client's (an unknown key)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# pydantic names a union's branch in the location ("content", "list[TextPart]", 0, ...): not a field.
_UNION_BRANCH = re.compile(r"str|int|float|bool|dict|list|.*\[.*\]")


def field_path(loc: tuple[Any, ...] | list[Any], client_key: bool = False) -> str | None:
    """pydantic's location ("body", "messages", 0, "content") as "messages[0].content"; with ``client_key`` the
    last part is the client's own (an unknown field's name), kept whatever it looks like."""
    path = ""
    for i, part in enumerate(loc):
        if part == "body" and not path:
            continue
        if isinstance(part, str) and _UNION_BRANCH.fullmatch(part) and not (client_key and i == len(loc) - 1):
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def first_problem(errors: list[Any]) -> dict[str, Any]:
    """The error to report: the first, or when it is one of a union's failed branches, the branch that got
    furthest into the input (a list given for "str | list[...]" is reported where the list is wrong)."""
    parent = tuple(errors[0].get("loc", ()))[:-1]
    branches = [e for e in errors if tuple(e.get("loc", ()))[: len(parent)] == parent]
    return max(branches, key=lambda e: len(e.get("loc", ())))


def validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    """One readable message for a pydantic error, quoting at most a short part of the input (it may be huge)."""
    kind = error.get("type", "")
    loc = tuple(error.get("loc", ()))
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "malformed")
        return f"the request body is not valid JSON ({detail})", None
    param = field_path(loc, client_key=kind == "extra_forbidden")
    if param is None:
        if kind == "missing":
            return "the request needs a JSON body", None
        return f"the request body must be a JSON object: {error.get('msg', 'invalid')}", None
    param = shorten(param)
    if kind == "extra_forbidden":
        return f"{param}: unknown field: this server refuses fields it does not honour rather than ignore them", param
    if kind == "finite_number":
        return f"{param}: must be a finite number (not NaN or Infinity)", param
    msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    given = error.get("input")
    if isinstance(given, str) and len(given) > QUOTE_CHARS and given in msg:  # e.g. a union's tag, echoed whole
        msg = msg.replace(given, shorten(given))
    return f"{param}: {shorten(msg, MAX_MESSAGE_CHARS // 2)}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        message, param = validation_message(first_problem(errors)) if errors else ("invalid request", None)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return APIError(400, message, param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "-")
        log.exception("%s unexpected error", request_id)
        return APIError(500, f"internal server error (request {request_id})").response()
