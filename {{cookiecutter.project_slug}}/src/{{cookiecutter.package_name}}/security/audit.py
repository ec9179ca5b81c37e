"""Layer 2, audit: a trace id for every request and one JSON log line per request; security events
are structured metadata (`events.py`). The lines are formatted and masked by `logs.py` and
`masking.py`, and the events optionally kept in the append-only table by `audit_sink.py`.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .deprecation import response_headers as deprecation_headers
from .errors import problem
from .events import (
    LAYER_HEADERS,
    bind_request,
    bind_trace,
    inbound_trace_id,
    new_trace,
    request_context,
    unbind_request,
    unbind_trace,
)

TRACE_HEADER = "X-Trace-Id"
REQUEST_LOGGER = "audit.request"
request_logger = logging.getLogger(REQUEST_LOGGER)
logger = logging.getLogger(__name__)


class AuditContext:
    """Sets the trace (the trace id, from the caller's `traceparent` when TRACE_CONTEXT_TRUST allows,
    and this service's own span id), returns the trace id in a header, logs one line per request,
    and is the last guard: an exception that escapes everything inside becomes a logged 500 problem.

    TRACE_CONTEXT_TRUST: `always` honours any caller's traceparent, `proxies` (default) only one
    that arrived through a peer in TRUSTED_PROXIES (see ClientAddress), `never` none. A caller
    outside the trust therefore cannot put its requests into another request's trace.
    """

    def __init__(self, app: ASGIApp, *, trust_trace_context: str = "proxies", log_health_requests: bool = True) -> None:
        self.app = app
        self.header = TRACE_HEADER.lower().encode()
        self.trust_always = trust_trace_context == "always"
        self.trust_proxies = trust_trace_context == "proxies"
        self.log_health_requests = log_health_requests  # LOG_HEALTH_REQUESTS

    def _inbound_trace_id(self, scope: Scope) -> str | None:
        if not (self.trust_always or (self.trust_proxies and scope.get("state", {}).get("via_trusted_proxy"))):
            return None
        traceparents = [value for key, value in scope["headers"] if key == b"traceparent"]
        return inbound_trace_id(traceparents[0]) if len(traceparents) == 1 else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        trace = new_trace(self._inbound_trace_id(scope))
        trace_id = trace[0]
        trace_token = bind_trace(trace)
        request_token = bind_request(scope)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_trace(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [
                    *scope.get(LAYER_HEADERS, ()),  # the rate limits' (events.add_response_headers)
                    *message.get("headers", []),
                    (self.header, trace_id.encode()),
                    *deprecation_headers(scope),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_trace)
        except Exception as exc:
            # A started 500 was sent (and logged) by the application's error handler.
            if not (response_started and status == 500):
                logger.error("unhandled exception", exc_info=exc, extra={"event": "unhandled_exception"})
            if not response_started:
                await problem(500, "An unexpected error occurred. Quote the trace id when reporting it.")(
                    scope, receive, send_with_trace
                )
        finally:
            if self.log_health_requests or not is_health_request(scope):
                _log_request(scope, status, started)
            unbind_request(request_token)
            unbind_trace(trace_token)


HEALTH_PREFIX = "/health/"


def is_health_request(scope: Scope) -> bool:
    """A probe (`/health/live`, `/health/ready`): kept out of the request log and of traces unless
    LOG_HEALTH_REQUESTS; its security events and errors are logged as any other's."""
    path: str = scope["path"]
    root = scope.get("root_path")
    return path.startswith(HEALTH_PREFIX, len(root) if root and path.startswith(root) else 0)


def _log_request(scope: Scope, status: int, started: float) -> None:
    """The request line: never the path's query string, headers or body; the route template, not the path.

    Made and handled directly rather than through `Logger.log`, which would walk the stack for the
    caller's file and line (unused in these lines) on every request."""
    level = logging.ERROR if status >= 500 else logging.INFO
    if not request_logger.isEnabledFor(level):
        return
    fields = {
        "event": "request",
        "method": scope["method"],
        **request_context(scope),
        "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    record = request_logger.makeRecord(REQUEST_LOGGER, level, __file__, 0, "request", (), None, extra=fields)
    request_logger.handle(record)
