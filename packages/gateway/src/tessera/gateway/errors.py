"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Every failure the server answers goes through `APIError`, so a client library maps it the way it maps
OpenAI's own (400 -> BadRequestError, 401 -> AuthenticationError, 429 -> RateLimitError, ...). Request
validation errors become 400 naming the offending field, never FastAPI's default 422.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tessera.gateway import protocol

log = logging.getLogger("tessera.gateway")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable", 504: "timeout_error"}


class APIError(Exception):
    """An error answered as an OpenAI error body; `headers` (e.g. Retry-After) go on the response."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _field_names() -> frozenset[str]:
    names: set[str] = set()
    for obj in vars(protocol).values():
        if isinstance(obj, type) and issubclass(obj, BaseModel):
            names.update(obj.model_fields)
    return frozenset(names)


_FIELDS = _field_names()


def param_of(loc: tuple[int | str, ...], *, unknown_last: bool = False) -> str | None:
    """The dotted OpenAI-style name of a pydantic error location, without pydantic's union-member tags
    (`prompt.list[int].3` -> `prompt[3]`). `unknown_last`: the last part is a field the client made up."""
    out = ""
    for k, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELDS or (unknown_last and k == len(loc) - 1):
            out += f".{part}" if out else part
    return out or None


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def from_validation(errors: list[dict[str, Any]], *, in_body: bool = True) -> APIError:
    """One 400 for a list of pydantic errors: `param` names the first failing field, the message lists
    every failure with the value given."""
    # A value that matches no member of a union (`prompt`: string, strings, ids, lists of ids) fails
    # once per member; the members that failed on a value rather than on its type are the shape the
    # client meant, so only their errors are reported.
    specific = [e for e in errors if not str(e.get("type", "")).endswith("_type")]
    if specific:
        errors = specific
    parts, first_param = [], None
    for err in errors:
        loc = tuple(err.get("loc", ()))
        if in_body and loc[:1] == ("body",):
            loc = loc[1:]
        unknown = err.get("type") == "extra_forbidden"
        param = param_of(loc, unknown_last=unknown)
        first_param = first_param or param
        where = f"{param}: " if param else ""
        given = f" (got {_short(err['input'])})" if param and "input" in err and err.get("type") != "missing" else ""
        msg = "unknown field (not part of this API)" if unknown else err.get("msg", "invalid value")
        parts.append(f"{where}{msg}{given}")
    if errors and errors[0].get("type") == "json_invalid":
        return bad_request(None, "request body is not valid JSON: " + "; ".join(parts), code="invalid_json")
    return bad_request(first_param, "; ".join(parts) or "invalid request")


def install(app: FastAPI) -> None:
    """Register handlers so every error leaves as an OpenAI error body."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation(list(exc.errors())).response()

    @app.exception_handler(ValidationError)
    async def _spec_validation(_: Request, exc: ValidationError) -> JSONResponse:
        return from_validation(exc.errors(), in_body=False).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()
