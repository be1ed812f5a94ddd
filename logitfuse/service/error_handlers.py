"""One error envelope, `{"error": {"message", "type", "param", "code"}}`, and every handler, registered once."""

from __future__ import annotations

import json
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from logitfuse.engine.request import TokenEvent
from logitfuse.errors import InvalidRequest, ModelUnavailable, Overloaded, Unavailable, UnknownName
from logitfuse.service.failures import Failure, format_trace, keep

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An answer other than 200. A 5xx may name its cause (an exception's type name) and carry the traceback
    and sequence id of a failure caught elsewhere (the engine's), for the log line (failures.py)."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None,
                 cause: str | None = None, trace: str | None = None, sequence: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.cause, self.trace, self.sequence = cause, trace, sequence


def generation_failed(request_id: str | None, ev: TokenEvent) -> APIError:
    """The 500 of a sequence that ended with an error event (the event brings the engine's cause and traceback);
    a 400 naming the field where the request itself was at fault."""
    detail = ev.error_detail
    if detail is not None and detail.param is not None:
        return APIError(400, ev.error or "invalid request", detail.param)
    return APIError(500, f"generation failed (request id {request_id}): {ev.error or 'engine error'}",
                    cause=detail.cause if detail else "engine_fault", trace=detail.trace if detail else None,
                    sequence=ev.rid)


def failure_of(status: int, err: BaseException) -> Failure:
    """What the log says of a 5xx: an APIError's own message, cause and traceback (its own raise when it names
    no other), else the exception's."""
    if not isinstance(err, APIError):
        return Failure.of(status, err)
    return Failure(status, err.cause or type(err).__name__, err.message,
                   err.trace if err.cause else format_trace(err), err.sequence)


def note_failure(scope: dict, status: int, err: BaseException) -> None:
    """Keep a 5xx's failure on the request for the guard to log and count once (below 500: nothing)."""
    if status >= 500:
        keep(scope.setdefault("state", {}), failure_of(status, err))


def envelope(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error shape. The request id travels in the X-Request-Id header (and a 500's message)."""
    # a message may quote client input: lone surrogates are escaped so the envelope always encodes as UTF-8
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": status}}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None,
                   request_id: str | None = None):
    if request_id is not None:
        headers = {**(headers or {}), "X-Request-Id": request_id}
    return JSONResponse(envelope(status, message, param), status_code=status, headers=headers)


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def as_api_error(err: Exception, request_id: str | None = None) -> APIError:
    """Map library exceptions to HTTP statuses; anything unknown is a 500 naming the request id."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, Overloaded):
        return APIError(429, str(err), None, {"Retry-After": "1"})
    if isinstance(err, ModelUnavailable):
        return APIError(503, str(err), "model", {"Retry-After": str(max(1, round(err.retry_after)))})
    if isinstance(err, InvalidRequest):
        return APIError(400, str(err), err.param)
    if isinstance(err, UnknownName):
        return APIError(404, str(err), err.param)
    if isinstance(err, Unavailable):
        return APIError(503, str(err))
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        return APIError(400, f"{_loc(first['loc'])}: {first['msg']}", _loc(first["loc"]))
    rid = request_id or uuid.uuid4().hex  # the exception is logged with it where the 500 is answered
    return APIError(500, f"internal server error (request id {rid}): {type(err).__name__}")


_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _loc(loc) -> str:
    """The field path of a validation error, without pydantic's union-member tags (`prompt.str` -> `prompt`)."""
    parts = [str(p) for p in loc if p != "body" and not isinstance(p, int)]
    parts = [p for p in parts if p.split("[")[0] not in _TAGS and not p.startswith(("function-", "literal["))]
    return ".".join(parts) or "body"


def _validation_message(err: RequestValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    param = _loc(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", "body"
    if first.get("type") == "lone_surrogate":
        return first["msg"], first["ctx"]["field"]
    if first.get("type") == "missing":
        return f"{param}: field required", param
    if first.get("type") == "unknown_field":  # logitfuse/config/field_names.py: the path ends at the unknown key
        where = "" if param == "body" else f"{param}: "
        return where + first["msg"], first["ctx"]["field"] if param == "body" else f"{param}.{first['ctx']['field']}"
    value = first.get("input")
    shown = json.dumps(value, default=str)[:80]
    return f"{param}: {first['msg']} (got {shown})", param


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        message, param = _validation_message(err)
        return error_response(400, message, param, request_id=request_id_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail), None, getattr(err, "headers", None),
                              request_id_of(request))

    async def _mapped(request: Request, err: Exception):
        api = as_api_error(err, request_id_of(request))
        note_failure(request.scope, api.status, err)
        return error_response(api.status, api.message, api.param, api.headers, request_id_of(request))

    for kind in (APIError, InvalidRequest, UnknownName, Unavailable, ValidationError, Overloaded, ModelUnavailable,
                 Exception):
        app.add_exception_handler(kind, _mapped)
