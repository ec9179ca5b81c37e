"""Security events and the request's trace id: what every layer uses to log a decision.

Events are metadata: names, reasons, field locations. Never bodies, tokens, cookies or query
strings. The log formatter masks emails and redacts secrets anyway (`security/audit.py`), so a
mistake in a caller does not become a leak.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import socket
from contextvars import ContextVar, Token
from random import getrandbits
from typing import Any
from weakref import WeakKeyDictionary

import fastapi.routing
from starlette.types import Scope

AUDIT_LOGGER = "audit"
audit_logger = logging.getLogger(AUDIT_LOGGER)

# The request's trace: (trace id, this service's own span id). The trace id may come from the
# caller (see AuditContext); the span id is always this service's, so two requests that share a
# trace id stay apart in the log.
Trace = tuple[str, str]
_NO_TRACE: Trace = ("-", "-")
_trace: ContextVar[Trace] = ContextVar("trace", default=_NO_TRACE)
_request: ContextVar[Scope | None] = ContextVar("audit_request", default=None)

# W3C Trace Context: version-traceid-parentid-flags in lowercase hex. Version ff and all-zero ids
# are invalid; versions after 00 may append fields, version 00 may not.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[\x21-\x7e]*)?")
_ZERO_TRACE, _ZERO_PARENT = b"0" * 32, b"0" * 16

# LogRecord attributes an `extra` key must not overwrite (logging raises KeyError for these).
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


# Headers that a layer adds to whatever answer its request gets, outermost layer's first; the
# audit layer writes them (it wraps `send` anyway), so no other layer has to.
LAYER_HEADERS = "layer_headers"


def add_response_headers(scope: Scope, headers: list[tuple[bytes, bytes]]) -> None:
    added: list[tuple[bytes, bytes]] | None = scope.get(LAYER_HEADERS)
    if added is None:
        scope[LAYER_HEADERS] = headers
    else:
        added.extend(headers)


def current_trace_id() -> str:
    return _trace.get()[0]


def current_span_id() -> str:
    return _trace.get()[1]


def new_trace(trace_id: str | None = None) -> Trace:
    """A span id of this service under `trace_id`, or under a new trace id.

    Ids need to be unique, not unguessable, so `random.getrandbits` (seeded from the OS once per process,
    and again in a forked child) costs no system call, unlike `secrets`. W3C forbids all-zero ids.
    """
    return (trace_id or f"{getrandbits(128) or 1:032x}", f"{getrandbits(64) or 1:016x}")


def bind_trace(trace: Trace) -> Token[Trace]:
    return _trace.set(trace)


def unbind_trace(token: Token[Trace]) -> None:
    _trace.reset(token)


def bind_request(scope: Scope) -> Token[Scope | None]:
    """Make the request's scope the context of every event logged while it runs."""
    return _request.set(scope)


def unbind_request(token: Token[Scope | None]) -> None:
    _request.reset(token)


def current_request() -> Scope | None:
    """The scope of the request being served (bound by the audit layer), if any."""
    return _request.get()


def inbound_trace_id(traceparent: bytes) -> str | None:
    """The trace id of a valid W3C traceparent; None for a malformed one (ignored, never an error)."""
    match = _TRACEPARENT.fullmatch(traceparent.strip())
    if match:
        version, trace_id, parent_id, _flags, extension = match.groups()
        valid_version = version != b"ff" and not (version == b"00" and extension)
        if valid_version and trace_id != _ZERO_TRACE and parent_id != _ZERO_PARENT:
            return trace_id.decode("ascii")
    return None


# FastAPI >= 0.137 puts the route as declared in its own router into scope["route"], without the
# include_router() prefixes (fastapi#16051); the full templates come from iter_route_contexts().
# Older versions copy included routes with their full path, so scope["route"].path is enough.
_iter_route_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
_templates: WeakKeyDictionary[Any, dict[int, str]] = WeakKeyDictionary()


def route_template(scope: Scope) -> str | None:
    """The matched route's full path template (`/api/v1/orgs/{org_id}`), never the raw path."""
    route = scope.get("route")
    if route is None:
        return None
    app = scope.get("app")
    if _iter_route_contexts is not None and app is not None:
        templates = _templates.get(app)
        if templates is None:  # once per application
            templates = {}
            for context in _iter_route_contexts(app.routes):
                path = getattr(context, "path_format", None) or getattr(context, "path", None)
                if path:
                    templates.setdefault(id(context.original_route), path)
            _templates[app] = templates
        template = templates.get(id(route))
        if template:
            return template
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(path) if path else None


def request_context(scope: Scope | None = None) -> dict[str, Any]:
    """Route template, client address and subject of the current request, for log lines."""
    scope = scope if scope is not None else _request.get()
    if scope is None:
        return {}
    client = scope.get("client")
    principal = scope.get("state", {}).get("principal")
    return {
        "route": route_template(scope),
        "client": client[0] if client else None,
        "subject": getattr(principal, "subject", None),
    }


def security_event(event: str, level: int = logging.WARNING, **fields: Any) -> None:
    """Log one security decision. Callers pass names and reasons, never secrets; the request's
    trace id, route, client address and subject are added here."""
    extra: dict[str, Any] = {key: value for key, value in request_context().items() if value is not None}
    for key, value in fields.items():
        extra[f"{key}_" if key in _RECORD_ATTRIBUTES else key] = value
    extra["event"] = event
    audit_logger.log(level, event, extra=extra)


class TraceIdFilter(logging.Filter):
    """Puts the current trace id and span id on every log record, whoever logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            record.trace_id, record.span_id = _trace.get()
        return True


def privilege_changed(action: str, **fields: Any) -> None:
    """A privilege that changed (ASVS 5.0 V16.3.3): an INFO `privilege_changed` event naming the
    `action` (`grant_created`, `token_revoked`, ...), the object (`resource_type`, `resource_id`, or
    the key, token or address), whom it concerns (`grantee`, pseudonymized like `subject`) and who
    acted: the request's `subject`, or, from an operator command, the `operator` (`operator()`)."""
    security_event("privilege_changed", logging.INFO, action=action, **fields)


def operator(command: str) -> dict[str, str]:
    """Who runs an operator command, for its events: the `command` (its words joined by `-`, e.g.
    `token-revoke`: the log's masking redacts `token <word>`), the OS user (`operator`) and the
    host (in Kubernetes the pod's name). Holding the service's credentials is the command's only
    authorization, so the log is where the act is attributed (ASVS 5.0 V8.4.2)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry or LOGNAME
        user = f"uid:{os.getuid()}"
    return {"command": command, "operator": user, "operator_host": socket.gethostname()}
