"""Layer 2, audit: a trace id for every request, one JSON log line per request, security events as
structured metadata, and an optional append-only table of those events.

Masking happens in one place, the formatter (and the table sink), not in the callers: `subject`
fields become keyed pseudonyms (`security/pseudonyms.py`), other emails and the AUDIT_MASKED_FIELDS
are masked (`j***@example.org`), secrets are redacted, whoever logs them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, date, datetime
from datetime import time as dt_time
from typing import IO, Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..models import AuditEvent
from . import pseudonyms
from .deprecation import response_headers as deprecation_headers
from .errors import problem
from .events import (
    AUDIT_LOGGER,
    LAYER_HEADERS,
    TraceIdFilter,
    bind_request,
    bind_trace,
    current_span_id,
    current_trace_id,
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

REDACTED = "[REDACTED]"
# Keys whose values are never logged, whatever they hold.
SECRET_KEYS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "set_cookie",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "password",
        "secret",
        "client_secret",
        "api_key",
        "apikey",
        "signature",
        "private_key",
        "query",
        "query_string",
        "body",
        "request_body",
        "response_body",
    }
)
SECRET_SUFFIXES = ("_token", "_secret", "_password", "_key")
# Keys whose values name who acted: logged as keyed pseudonyms, stable per subject.
SUBJECT_KEYS = frozenset({"subject"})

# Compiled once: these run on every log line.
_EMAIL = re.compile(r"(?<![\w.%+-])([A-Za-z0-9])[A-Za-z0-9._%+-]*@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_CREDENTIALS = re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{8,}")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")
_URL_QUERY = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s?#\"']*)\?[^\s#\"']*")


_SECRET, _SUBJECT, _PERSONAL, _VALUE = "secret", "subject", "personal", "value"
_MAX_RULES = 1024  # field names remembered; callers choose field names, not clients
_PLAIN = frozenset({int, float, bool})


class Masker:
    """Pseudonymizes subjects, masks personal data and redacts secrets in any log value, recursively.

    `pseudonymize` defaults to the process's installed key (`pseudonyms.install`), so the log and
    the audit table give a subject the same pseudonym."""

    def __init__(
        self, masked_fields: Iterable[str] = ("email",), *, pseudonymize: Callable[[str], str] | None = None
    ) -> None:
        self.masked_fields = frozenset(field.lower() for field in masked_fields)
        self._pseudonymize = pseudonymize
        self._rules: dict[str, str] = {}

    def pseudonym(self, subject: Any) -> str:
        return (self._pseudonymize or pseudonyms.installed())(str(subject))

    def text(self, value: str) -> str:
        if "@" in value:
            value = _URL_USERINFO.sub(r"\1[REDACTED]@", value)
            value = _EMAIL.sub(r"\1***@\2", value)
        if "eyJ" in value:
            value = _JWT.sub(REDACTED, value)
        if "://" in value and "?" in value:
            value = _URL_QUERY.sub(r"\1?[REDACTED]", value)
        return _CREDENTIALS.sub(r"\1 [REDACTED]", value) if " " in value else value

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return self.mapping(value)
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(item) for item in value]
        return value

    def mapping(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        masked: dict[Any, Any] = {}
        for key, value in data.items():
            rule = self._rules.get(key)
            if rule is None:
                rule = self._rule(key)
            if value is None or (rule == _VALUE and value.__class__ in _PLAIN):
                masked[key] = value  # nothing to mask in a number
            elif rule == _SECRET:
                masked[key] = REDACTED
            elif rule == _SUBJECT:
                masked[key] = self.pseudonym(value)
            elif rule == _PERSONAL:
                masked[key] = self.personal(value)
            else:
                masked[key] = self.value(value)
        return masked

    def _rule(self, key: Any) -> str:
        """What to do with a field's value, decided once per field name (log lines repeat them)."""
        name = str(key).lower()
        if name in SECRET_KEYS or name.endswith(SECRET_SUFFIXES):
            rule = _SECRET
        elif name in SUBJECT_KEYS:
            rule = _SUBJECT
        elif name in self.masked_fields:
            rule = _PERSONAL
        else:
            rule = _VALUE
        if len(self._rules) < _MAX_RULES and isinstance(key, str):
            self._rules[key] = rule
        return rule

    def personal(self, value: Any) -> str:
        text = str(value)
        if "@" in text:
            masked = _EMAIL.sub(r"\1***@\2", text)
            if masked != text:
                return masked
        return f"{text[:1]}***" if text else ""


# LogRecord attributes (and what formatters add) that are not extra fields of a line.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "trace_id",
    "span_id",
    "color_message",  # uvicorn's copy of the message with terminal colours
}


class AuditJsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, trace_id, span_id,
    then the record's extra fields (and exc_info / stack_info as text), all through the Masker.

    Written here rather than taken from python-json-logger: it runs on every request, and this
    builds the line in one pass for about a third of that library's cost (docs/benchmarks.md).
    """

    def __init__(self, masker: Masker) -> None:
        super().__init__()
        self.masker = masker

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        mapping = record.msg if isinstance(record.msg, Mapping) else None
        extra = {key: value for key, value in fields.items() if key not in _RECORD_ATTRIBUTES}
        if mapping is not None:  # logger.info({...}): the mapping's fields
            extra.update(mapping)
        if record.exc_info:
            extra["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            extra["stack_info"] = self.formatStack(record.stack_info)
        # The first six are the formatter's own and hold nothing to mask; the rest is masked.
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": "" if mapping is not None else self.masker.text(record.getMessage()),
            "trace_id": fields.get("trace_id"),
            "span_id": fields.get("span_id"),
            **self.masker.mapping(extra),
        }
        return json.dumps(line, default=_json_default, ensure_ascii=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date | dt_time):
        return value.isoformat()
    return str(value)


class ServiceLogHandler(logging.StreamHandler[IO[str]]):
    """The service's handler on the root logger; configure_logging replaces only its own."""


def configure_logging(
    level: str = "INFO",
    *,
    masked_fields: Iterable[str] = ("email",),
    pseudonym_key: bytes | None = None,
    stream: IO[str] | None = None,
) -> ServiceLogHandler:
    """One JSON shape for the service, uvicorn and libraries, on stdout (or `stream`). Subjects are
    pseudonymized with `pseudonym_key`, or with a key generated for this process (development)."""
    pseudonyms.install(pseudonym_key)
    handler = ServiceLogHandler(stream or sys.stdout)
    handler.addFilter(TraceIdFilter())
    handler.setFormatter(AuditJsonFormatter(Masker(masked_fields)))
    root = logging.getLogger()
    # Handlers installed by others (a collector's, pytest's) stay; a previous service handler goes.
    for old in [h for h in root.handlers if isinstance(h, ServiceLogHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers[:] = []
        uvicorn_logger.propagate = True
    # The audit layer writes its own request line, without the query string; uvicorn's would
    # duplicate it and log the query string.
    logging.getLogger("uvicorn.access").disabled = True
    if pseudonym_key is None:
        logger.warning(
            "AUDIT_PSEUDONYM_KEY is not set: subjects are logged under a key generated for this process, "
            "so their pseudonyms change at every restart and differ between replicas",
            extra={"event": "audit_pseudonym_key_generated"},
        )
    return handler


def service_log_handler() -> ServiceLogHandler | None:
    return next((h for h in logging.getLogger().handlers if isinstance(h, ServiceLogHandler)), None)


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


class AuditSink:
    """Appends security events to the `audit_events` table without slowing requests down: the log
    handler only enqueues, a background task inserts in batches. It only ever INSERTs; the
    table's triggers refuse UPDATE and DELETE (migration 0002). A full queue drops events (counted
    and reported), it never blocks a request; stdout keeps every event either way."""

    BATCH = 100

    def __init__(self, engine: AsyncEngine, masker: Masker, *, max_queued: int = 10_000) -> None:
        self.engine = engine
        self.masker = masker
        self.max_queued = max_queued
        self.dropped = 0
        self._reported_at = -60.0
        self.handler = _SinkHandler(self)
        self._queue: asyncio.Queue[dict[str, Any] | None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(self.max_queued)
        self._task = asyncio.create_task(self._drain(), name="audit-sink")
        logging.getLogger(AUDIT_LOGGER).addHandler(self.handler)

    async def stop(self) -> None:
        """Stop listening, then write what is queued before returning."""
        logging.getLogger(AUDIT_LOGGER).removeHandler(self.handler)
        if self._queue is None or self._task is None:
            return
        await self._queue.put(None)
        await self._task
        self._queue = self._task = None

    def offer(self, row: dict[str, Any]) -> None:
        if self._queue is None:
            return
        try:
            self._queue.put_nowait(row)
        except asyncio.QueueFull:
            self.dropped += 1
            now = time.monotonic()
            if now - self._reported_at >= 60:  # one line a minute, not one per lost event
                self._reported_at = now
                logger.error(
                    "audit sink queue full, events dropped",
                    extra={"event": "audit_sink_failed", "dropped_total": self.dropped, "error": "QueueFull"},
                )

    def enqueue(self, record: logging.LogRecord) -> None:
        """Called by the log handler, on any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        row = self.row(record)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.offer(row)
        else:
            loop.call_soon_threadsafe(self.offer, row)

    def row(self, record: logging.LogRecord) -> dict[str, Any]:
        fields = self.masker.mapping(_extra_fields(record))
        details = {k: v for k, v in fields.items() if k not in {"event", "subject", "client", "route", "trace_id"}}
        details["span_id"] = current_span_id()
        return {
            "occurred_at": datetime.fromtimestamp(record.created, UTC),
            "trace_id": current_trace_id()[:32],
            "event": str(fields.get("event", record.getMessage()))[:64],
            "level": record.levelname[:16],
            "subject": _bounded(fields.get("subject"), 255),
            "client": _bounded(fields.get("client"), 64),
            "route": _bounded(fields.get("route"), 255),
            "details": _json_safe(details),
        }

    async def _drain(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            item = await queue.get()
            batch: list[dict[str, Any]] = []
            while item is not None:
                batch.append(item)
                if len(batch) >= self.BATCH or queue.empty():
                    break
                item = queue.get_nowait()
            if batch:
                await self._insert(batch)
            if item is None:  # stop() asked, everything before it is written
                return

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        try:
            async with self.engine.begin() as connection:
                await connection.execute(insert(AuditEvent), rows)
        except Exception as exc:
            self.dropped += len(rows)
            # Not the audit logger: a failing sink must not feed itself.
            logger.error(
                "audit sink could not write events",
                extra={"event": "audit_sink_failed", "rows": len(rows), "error": type(exc).__name__},
            )


class _SinkHandler(logging.Handler):
    def __init__(self, sink: AuditSink) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != AUDIT_LOGGER:  # security events only, not the request lines
            return
        try:
            self.sink.enqueue(record)
        except Exception:
            self.handleError(record)


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES}


def _bounded(value: Any, length: int) -> str | None:
    return None if value is None else str(value)[:length]


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
