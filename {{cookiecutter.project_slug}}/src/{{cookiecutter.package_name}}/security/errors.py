"""RFC 9457 problem documents: the one shape of every rejection the service sends.

Nothing from an exception reaches the client: no message, stack trace, SQL or path.
Details for operators go to the audit log, keyed by the same trace id.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from redis import exceptions as redis_exc
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from ..config import SERVICE_NAME
from .events import current_trace_id, security_event

PROBLEM_MEDIA_TYPE = "application/problem+json"
logger = logging.getLogger(__name__)


def problem_type(name: str) -> str:
    return f"urn:{SERVICE_NAME}:problem:{name}"


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str


class Problem(BaseModel):
    """The body of every error response (RFC 9457)."""

    type: str = Field(examples=[problem_type("validation")])
    title: str
    status: int
    detail: str
    trace_id: str
    errors: list[FieldError] | None = None


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_MEDIA_TYPE


def problem(
    status: int,
    detail: str,
    *,
    name: str | None = None,
    title: str | None = None,
    errors: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> ProblemResponse:
    """Build a problem response. `name` selects a specific problem type; else about:blank."""
    body: dict[str, Any] = {
        "type": problem_type(name) if name else "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "trace_id": current_trace_id(),
    }
    if errors is not None:
        body["errors"] = list(errors)
    return ProblemResponse(body, status_code=status, headers=dict(headers or {}))


_DETAILS = {
    400: "The request is not valid.",
    401: "Authentication is required.",
    403: "You are not allowed to do this.",
    404: "No such resource.",
    405: "This method is not allowed on this resource.",
    406: "This resource cannot produce an acceptable representation.",
    410: "This resource is gone.",
    413: "The request body is too large.",
    415: "The request content type is not supported.",
    429: "Too many requests.",
    503: "A dependency of this service is unavailable; retry later.",
}


class ProblemDetail(str):
    """A `detail` text that is safe to show to clients: raise HTTPException(404, ProblemDetail("..."))."""


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    # HTTPException.detail may hold text written for developers; the client gets a fixed sentence
    # unless the raiser marked its text as safe.
    if isinstance(exc.detail, ProblemDetail):
        detail = str(exc.detail)
    else:
        detail = _DETAILS.get(exc.status_code) or HTTPStatus(exc.status_code).phrase
    # A subclass may name its problem type (transport.BodyTooLarge: `problem_name = "body-too-large"`).
    return problem(exc.status_code, detail, name=getattr(exc, "problem_name", None), headers=exc.headers)


MAX_REPORTED_ERRORS = 20
# A location part that is a field name or index is shown; anything else (a dict key or unknown
# field name sent by the client that does not look like a name) is shown as "*".
_LOCATION_PART = re.compile(r"^[A-Za-z0-9_.:\[\]-]{1,64}$")
# Pydantic messages are templates filled with the schema's constraints, except the ones whose
# context carries a parser's own text about the input ({error}, {reason}): "Input should be a
# valid UUID, invalid character: ... found `x`". Those keep their fixed prefix only.
_FREE_TEXT_CONTEXT = frozenset({"error", "reason"})
_FREE_TEXT_START = re.compile(r"[:,]")


def validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Field locations and messages only: the offending input is never echoed back."""
    return [
        {"loc": [_location_part(part) for part in error.get("loc", ())], "msg": _message(error)}
        for error in exc.errors()[:MAX_REPORTED_ERRORS]
    ]


def _location_part(part: object) -> str | int:
    if isinstance(part, int):
        return part
    text = str(part)
    return text if _LOCATION_PART.match(text) else "*"


def _message(error: Mapping[str, Any]) -> str:
    message = str(error.get("msg", ""))
    context = error.get("ctx")
    if isinstance(context, Mapping) and not _FREE_TEXT_CONTEXT.isdisjoint(context):
        message = _FREE_TEXT_START.split(message, maxsplit=1)[0]
    return message.strip()[:200] or "Invalid value"


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = validation_errors(exc)
    security_event(
        "validation_failed",
        count=len(exc.errors()),
        locations=[".".join(map(str, e["loc"])) for e in errors],
    )
    return problem(400, "The request is not valid.", name="validation", title="Validation failed", errors=errors)


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.error("unhandled exception", exc_info=exc, extra={"event": "unhandled_exception"})
    return problem(500, "An unexpected error occurred. Quote the trace id when reporting it.")


# A dependency that is down or too slow is a known failure mode: 503, never 500. SQLAlchemy wraps
# driver errors in OperationalError/InterfaceError, but a refused connection (asyncpg) or a pool
# timeout can surface as a plain OSError/TimeoutError or SQLAlchemy's own TimeoutError.
DEPENDENCY_ERRORS: dict[type[Exception], str] = {
    sa_exc.OperationalError: "database",
    sa_exc.InterfaceError: "database",
    sa_exc.TimeoutError: "database",
    ConnectionError: "network",
    TimeoutError: "network",
    redis_exc.ConnectionError: "redis",
    redis_exc.TimeoutError: "redis",
}


# SQLSTATE classes that mean "the database cannot serve now" (connection exception, insufficient
# resources such as too many clients, operator intervention such as a shutdown, a statement
# cancelled by DATABASE_STATEMENT_TIMEOUT_SECONDS: 57014), whatever DBAPIError subclass the
# driver's error was translated to.
UNAVAILABLE_SQLSTATES = ("08", "53", "57P", "57014")


def database_unavailable(exc: sa_exc.DBAPIError) -> bool:
    state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return exc.connection_invalidated or (isinstance(state, str) and state.startswith(UNAVAILABLE_SQLSTATES))


def store_busy(layer: str) -> ProblemResponse:
    """Every Redis connection of this process stayed busy for REDIS_POOL_TIMEOUT_SECONDS: the
    process is overloaded, Redis is not down. 503 in either failure mode, because a check that
    was not made is never a check that passed."""
    security_event("dependency_busy", dependency="redis", layer=layer)
    return problem(503, "The service is overloaded; retry later.", name="overloaded", headers={"Retry-After": "1"})


async def _database_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, sa_exc.DBAPIError)
    if database_unavailable(exc):
        return await _dependency_unavailable(request, exc)
    return await _unexpected(request, exc)


async def _dependency_unavailable(request: Request, exc: Exception) -> Response:
    dependency = next((name for kind, name in DEPENDENCY_ERRORS.items() if isinstance(exc, kind)), "database")
    security_event("dependency_unavailable", dependency=dependency, error=type(exc).__name__)
    return problem(503, _DETAILS[503], name="dependency-unavailable", headers={"Retry-After": "1"})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for kind in DEPENDENCY_ERRORS:
        app.add_exception_handler(kind, _dependency_unavailable)
    app.add_exception_handler(sa_exc.DBAPIError, _database_error)
    app.add_exception_handler(Exception, _unexpected)


# Documented on every API route; openapi.py moves them to application/problem+json.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": HTTPStatus(status).phrase}
    for status in (400, 401, 403, 404, 413, 429, 503)
}
