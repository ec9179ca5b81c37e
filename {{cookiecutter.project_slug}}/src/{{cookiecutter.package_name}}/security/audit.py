"""Layer 2, audit context: a trace id for every request, one JSON log line per request, and
security events as structured metadata. Never bodies, tokens, cookies or query strings."""

from __future__ import annotations

import logging
import sys
import time

from pythonjsonlogger.json import JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import problem
from .events import TraceIdFilter, bind_trace_id, trace_id_from, unbind_trace_id

TRACE_HEADER = "X-Trace-Id"
request_logger = logging.getLogger("audit.request")


def configure_logging(level: str = "INFO") -> None:
    """One JSON shape for the service, uvicorn and libraries, on stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(TraceIdFilter())
    handler.setFormatter(
        JsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            timestamp=False,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers[:] = []
        uvicorn_logger.propagate = True
    # The audit layer writes its own request line with the trace id; uvicorn's would duplicate it.
    logging.getLogger("uvicorn.access").disabled = True


class AuditContext:
    """Sets the trace id, returns it in a header, logs one line per request, and is the last
    guard: an exception that escapes everything inside becomes a logged 500 problem."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        traceparent = next((v for k, v in scope["headers"] if k == b"traceparent"), None)
        trace_id = trace_id_from(traceparent)
        token = bind_trace_id(trace_id)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_trace(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (TRACE_HEADER.lower().encode(), trace_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_trace)
        except Exception as exc:
            logging.getLogger(__name__).error(
                "unhandled exception", exc_info=exc, extra={"event": "unhandled_exception"}
            )
            if not response_started:
                await problem(500, "An unexpected error occurred. Quote the trace id when reporting it.")(
                    scope, receive, send_with_trace
                )
        finally:
            self._log_request(scope, status, started)
            unbind_trace_id(token)

    @staticmethod
    def _log_request(scope: Scope, status: int, started: float) -> None:
        route = scope.get("route")
        principal = scope.get("state", {}).get("principal")
        client = scope.get("client")
        request_logger.info(
            "request",
            extra={
                "event": "request",
                "method": scope["method"],
                "route": getattr(route, "path", None),
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                "client": client[0] if client else None,
                "subject": getattr(principal, "subject", None),
            },
        )
