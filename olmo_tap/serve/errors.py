"""Errors in OpenAI's format (``{"error": {"message", "type", "param", "code"}}``), for every failure path.

FastAPI answers invalid bodies with 422 and its own ``detail`` list; OpenAI clients expect 400 and one
message naming the field, so the validation handler is replaced. Unexpected exceptions become a 500 in the
same format (logged with the request id) and never take the server down.
"""

from __future__ import annotations

import logging
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


def error_payload(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def field_path(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """pydantic's location ("body", "messages", 0, "content") as "messages[0].content"."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def validation_message(error: dict[str, Any]) -> tuple[str, str | None]:
    """One readable message for a pydantic error (never echoing the input, which may be huge)."""
    kind = error.get("type", "")
    loc = tuple(error.get("loc", ()))
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "malformed")
        return f"the request body is not valid JSON ({detail})", None
    param = field_path(loc)
    if param is None:
        if kind == "missing":
            return "the request needs a JSON body", None
        return f"the request body must be a JSON object: {error.get('msg', 'invalid')}", None
    msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{param}: {msg}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        message, param = validation_message(errors[0]) if errors else ("invalid request", None)
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
