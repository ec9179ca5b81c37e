"""OpenTelemetry traces, off unless the standard OTEL_* variables ask for them (config.tracing_requested,
README "Observability"); imported only then.

When on: a server span per request (named after the route template, never the raw path), under the
audit layer's trace id and span id, so a trace and the log lines of its request share both; child
spans for SQLAlchemy (the maintained instrumentation), outbound httpx calls (the JWKS fetch, the
maintained instrumentation) and, made here, the request path's own round trips that bypass both
(`Statements` on the database driver, `RedisStore` on redis-py connections).

When off nothing of this runs: no layer is added to the pipeline and no method is wrapped, so a
request costs exactly what it cost without this module.

No span carries a token, a header value, a body, a query string, a path with its ids, Redis keys
or SQL parameters; error statuses carry the exception type only, never its message.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from random import getrandbits
from typing import Any, TypeVar

import httpx
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.instrumentation.utils import is_instrumentation_enabled, suppress_instrumentation
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import SERVICE_NAME
from .security.audit import is_health_request
from .security.events import current_span_id, current_trace_id, route_template

TRACER_NAME = __name__
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
T = TypeVar("T")

# --- Ids: the audit layer's ----------------------------------------------------------------------

# The span id the next span started in this context takes: the audit layer's, for the server span.
_server_span_id: ContextVar[int] = ContextVar("server_span_id", default=0)


class AuditIds(IdGenerator):
    """Trace ids and span ids as the audit layer decided them: a root span started while a request
    runs takes the request's trace id (events.new_trace: the caller's when TRACE_CONTEXT_TRUST
    believes its traceparent, else a new one), and the server span takes the request's own span
    id. Every other span gets a random one."""

    def generate_trace_id(self) -> int:
        trace_id = current_trace_id()
        return int(trace_id, 16) if trace_id != "-" else getrandbits(128) or 1

    def generate_span_id(self) -> int:
        span_id = _server_span_id.get()
        if span_id:
            _server_span_id.set(0)
            return span_id
        return getrandbits(64) or 1


class ErrorTypeOnly(SpanProcessor):
    """Runs before export: an error status keeps its code and loses its description, which for the
    SQLAlchemy instrumentation is the driver's message (it may quote the values of a row)."""

    def on_end(self, span: ReadableSpan) -> None:
        status = span.status
        if status.description:
            span._status = Status(status.status_code)  # the SDK has no public setter once ended


# --- Setup -----------------------------------------------------------------------------------------


@dataclass
class Tracing:
    provider: TracerProvider
    tracer: trace.Tracer
    log_health_requests: bool = False

    @classmethod
    def create(cls, *, exporter: SpanExporter | None = None, log_health_requests: bool = False) -> Tracing:
        """The SDK as OTEL_* configure it (sampler, resource, OTLP endpoint and headers, batch
        sizes), with the audit layer's ids. `exporter`: export there instead, synchronously
        (tests, with the SDK's InMemorySpanExporter)."""
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME})
        provider = TracerProvider(resource=resource, id_generator=AuditIds())
        provider.add_span_processor(ErrorTypeOnly())
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # Export runs on the batch processor's thread, never on the event loop.
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
                trace.set_tracer_provider(provider)  # for spans the service's own code may add
        return cls(provider, provider.get_tracer(TRACER_NAME), log_health_requests)

    def instrument_engine(self, engine: AsyncEngine) -> None:
        """SQLAlchemy's spans (the ORM sessions: writes, migrations' checks, readiness) on this
        engine only, with this provider: the instrumentation's per-engine tracer, not its
        process-wide patch of create_engine."""
        tracer = trace.get_tracer("opentelemetry.instrumentation.sqlalchemy", tracer_provider=self.provider)
        usage = NoOpMeterProvider().get_meter(TRACER_NAME).create_up_down_counter("db.client.connections.usage")
        EngineTracer(tracer, engine.sync_engine, usage)  # type: ignore[no-untyped-call]

    def instrument_client(self, client: httpx.AsyncClient) -> None:
        """Spans for one httpx client's requests (the JWKS fetch)."""
        HTTPXClientInstrumentor.instrument_client(client, tracer_provider=self.provider)

    def trace_statements(self, statements: Any) -> None:
        """Client spans around `Statements.fetch` and `.write` (one round trip each on the driver)."""
        system = "postgresql" if statements.dialect.name == "postgresql" else statements.dialect.name
        for name in ("fetch", "write"):
            method = getattr(statements, name)
            setattr(statements, name, self._database_span(method, system))

    def _database_span(self, method: Callable[..., Awaitable[T]], system: str) -> Callable[..., Awaitable[T]]:
        tracer = self.tracer

        @functools.wraps(method)
        async def traced(query: Any, **values: Any) -> T:
            if not is_instrumentation_enabled():  # a probe's readiness check
                return await method(query, **values)
            operation = query.sql.split(None, 1)[0].upper()
            attributes = {"db.system.name": system, "db.operation.name": operation, "db.query.text": query.sql}
            with tracer.start_as_current_span(
                operation, kind=SpanKind.CLIENT, attributes=attributes, record_exception=False
            ) as span:
                return await _with_error_type(span, method(query, **values))

        return traced

    def trace_store(self, store: Any) -> None:
        """Client spans around `RedisStore.run` (a request's script calls, one round trip) and
        `.execute`. The command names only: never keys (they hold subjects and addresses) or arguments."""
        tracer = self.tracer
        run, execute = store.run, store.execute

        @functools.wraps(run)
        async def traced_run(commands: Any) -> Any:
            if not is_instrumentation_enabled():
                return await run(commands)
            operation = "EVALSHA" if len(commands) == 1 else "PIPELINE"
            attributes: dict[str, Any] = {"db.system.name": "redis", "db.operation.name": operation}
            if len(commands) > 1:
                attributes["db.operation.batch.size"] = len(commands)
            with tracer.start_as_current_span(
                operation, kind=SpanKind.CLIENT, attributes=attributes, record_exception=False
            ) as span:
                return await _with_error_type(span, run(commands))

        @functools.wraps(execute)
        async def traced_execute(*parts: bytes) -> Any:
            if not is_instrumentation_enabled():  # a probe's readiness check
                return await execute(*parts)
            operation = parts[0].decode("ascii", "replace").upper() if parts else "COMMAND"
            attributes = {"db.system.name": "redis", "db.operation.name": operation}
            with tracer.start_as_current_span(
                operation, kind=SpanKind.CLIENT, attributes=attributes, record_exception=False
            ) as span:
                return await _with_error_type(span, execute(*parts))

        store.run, store.execute = traced_run, traced_execute

    async def shutdown(self) -> None:
        """Export what is queued (bounded by OTEL_BSP_EXPORT_TIMEOUT), off the event loop."""
        await asyncio.to_thread(self.provider.shutdown)


async def _with_error_type(span: trace.Span, awaitable: Awaitable[T]) -> T:
    try:
        return await awaitable
    except Exception as exc:
        span.set_attribute("error.type", type(exc).__name__)
        span.set_status(Status(StatusCode.ERROR))
        raise


# --- The server span -------------------------------------------------------------------------------

_propagator = TraceContextTextMapPropagator()


class ServerSpan:
    """A SERVER span for each HTTP request, started inside the audit layer (pipeline.py) so it
    takes the trace the audit layer decided: its trace id, its span id, and as parent the caller's
    span when (and only when) the audit layer believed the caller's `traceparent`.

    Attributes: `http.request.method`, `http.route` (the template), `http.response.status_code`,
    `url.scheme`. Probes (/health/) are left out, with the spans of their checks, unless
    LOG_HEALTH_REQUESTS."""

    def __init__(self, app: ASGIApp, *, tracing: Tracing) -> None:
        self.app = app
        self.tracer = tracing.tracer
        self.log_health_requests = tracing.log_health_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.log_health_requests and is_health_request(scope):
            with suppress_instrumentation():  # nor the spans of the readiness checks it runs
                await self.app(scope, receive, send)
            return
        method = scope["method"] if scope["method"] in HTTP_METHODS else "_OTHER"
        token = _server_span_id.set(int(current_span_id(), 16))
        try:
            span = self.tracer.start_span(
                method,
                context=_caller_context(scope),
                kind=SpanKind.SERVER,
                attributes={"http.request.method": method, "url.scheme": scope.get("scheme", "http")},
                record_exception=False,
            )
        finally:
            _server_span_id.reset(token)
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        attached = otel_context.attach(trace.set_span_in_context(span))
        try:
            await self.app(scope, receive, send_with_status)
        except Exception as exc:
            span.set_attribute("error.type", type(exc).__name__)
            raise
        finally:
            otel_context.detach(attached)
            route = route_template(scope)
            if route:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()


def _caller_context(scope: Scope) -> otel_context.Context | None:
    """The caller's span as the remote parent, if the audit layer took the trace id from its
    traceparent (then the trace ids agree); else None: a root span under the audit trace id."""
    traceparents = [value for key, value in scope["headers"] if key == b"traceparent"]
    if len(traceparents) != 1:
        return None
    carrier = {"traceparent": traceparents[0].decode("latin-1")}
    states = [value for key, value in scope["headers"] if key == b"tracestate"]
    if len(states) == 1:
        carrier["tracestate"] = states[0].decode("latin-1")
    caller = _propagator.extract(carrier, context=otel_context.Context())
    span_context = trace.get_current_span(caller).get_span_context()
    if span_context.is_valid and f"{span_context.trace_id:032x}" == current_trace_id():
        return caller
    return None
