"""Prometheus metrics on a listener of their own (METRICS_PORT), never on the public one.

Off unless METRICS_PORT is set; then the service exposes, in its own registry (README
"Observability"):

- `http_server_request_duration_seconds{route,method,status}`: a histogram per route template
  (`none` for a request answered before routing or that matched none), its `_count` the requests;
- `rate_limit_decisions_total{policy,outcome}`: `allowed` counted from the `RateLimit` headers of
  the response, `limited` from the `rate_limited` security event;
- `authentication_failures_total{reason}`, `authorization_denials_total{policy}` and
  `security_events_total{event}`, derived from the security events the layers log already (one
  log handler, no counter in the layers, so the counts cannot drift from the audit log);
- `readiness_check_ok{check}`: the readiness checks' last result (1 ok, 0 fail), refreshed when a
  scrape finds it older than READINESS_MAX_AGE_SECONDS;
- `redis_pool_connections{state}` and `database_pool_connections{pool,state}`: `in_use`, `open`
  and `max` connections of the Redis pool and of the database pools, read at scrape time.

No label holds a subject, an address, a path or anything else a client chooses: methods outside
the standard ones are `other`, and every label fed from an event has a bounded set of values.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from opentelemetry.instrumentation.utils import suppress_instrumentation
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .security.events import AUDIT_LOGGER, LAYER_HEADERS, current_request, route_template

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .runtime import Runtime

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
NO_ROUTE = "none"
OTHER = "other"
REFUSED_POLICY = "ratelimit_refused_policy"  # scope state: the policy whose rate_limited event this request logged
READINESS_MAX_AGE_SECONDS = 5.0
READINESS_SCRAPE_TIMEOUT_SECONDS = 3.0
MAX_LABEL_VALUES = 100  # per label fed from events; beyond it values count as `other`
_LABEL_VALUE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
T = TypeVar("T")


class BoundedLabel:
    """A label fed from event fields: at most MAX_LABEL_VALUES distinct, well-formed values."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, value: Any) -> str:
        text = str(value)
        if text in self.seen:
            return text
        if len(self.seen) < MAX_LABEL_VALUES and _LABEL_VALUE.fullmatch(text):
            self.seen.add(text)
            return text
        return OTHER


class Metrics:
    """The service's metrics in a registry of its own (one per application, so tests can run many)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "http_server_request_duration_seconds",
            "Requests by route template, method and status, and how long they took (seconds).",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.rate_limit = Counter(
            "rate_limit_decisions", "Rate limit decisions by policy and outcome.", ["policy", "outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.authentication_failures = Counter(
            "authentication_failures", "Refused credentials by reason.", ["reason"], registry=self.registry
        )
        self.authorization_denials = Counter(
            "authorization_denials", "Authorization denials (403) by policy.", ["policy"], registry=self.registry
        )
        self.security_events = Counter(
            "security_events", "Security events logged, by event.", ["event"], registry=self.registry
        )
        self.registry.register(Pools(runtime))
        self.readiness = ReadinessCollector(runtime)
        self.registry.register(self.readiness)
        self._children: dict[tuple[str, str, int], Any] = {}
        self._reasons, self._policies, self._events = BoundedLabel(), BoundedLabel(), BoundedLabel()
        self.handler = SecurityEventCounter(self)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle (Runtime.lifespan) ------------------------------------------------------------

    async def start(self, app: Any, host: str, port: int) -> None:
        """Count security events and serve the registry on host:port, on a thread of its own."""
        self.readiness.watch(app, asyncio.get_running_loop())
        logging.getLogger(AUDIT_LOGGER).addHandler(self.handler)
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)

    async def stop(self) -> None:
        logging.getLogger(AUDIT_LOGGER).removeHandler(self.handler)
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()
        self.readiness.watch(None, None)

    # --- per request -----------------------------------------------------------------------------

    def request(self, scope: Scope, status: int, seconds: float, limits: list[bytes]) -> None:
        method = scope["method"] if scope["method"] in HTTP_METHODS else OTHER
        route = route_template(scope) or NO_ROUTE
        key = (route, method, status)
        child = self._children.get(key)
        if child is None:
            child = self.requests.labels(route, method, str(status))
            if len(self._children) < 10_000:
                self._children[key] = child
        child.observe(seconds)
        if limits:
            refused = scope.get("state", {}).get(REFUSED_POLICY)
            for value in limits:
                policy = _policy_name(value)
                if policy is not None and policy != refused:
                    self.rate_limit.labels(self._policies(policy), "allowed").inc()

    # --- from security events --------------------------------------------------------------------

    def event(self, record: logging.LogRecord) -> None:
        fields = record.__dict__
        name = fields.get("event")
        if not isinstance(name, str):
            return
        self.security_events.labels(self._events(name)).inc()
        if name == "authentication_failed":
            self.authentication_failures.labels(self._reasons(fields.get("reason", OTHER))).inc()
        elif name == "rate_limited":
            policy = str(fields.get("policy", OTHER))
            self.rate_limit.labels(self._policies(policy), "limited").inc()
            scope = current_request()
            if scope is not None:
                scope.setdefault("state", {})[REFUSED_POLICY] = policy
        elif name == "scope_denied":
            self.authorization_denials.labels("scopes").inc()
        elif name == "object_denied":
            policy = f"{fields.get('resource_type', OTHER)}:{fields.get('required', OTHER)}"
            self.authorization_denials.labels(self._policies(policy)).inc()


def _policy_name(value: bytes) -> str | None:
    """`"ip";r=4;t=60` -> `ip` (the IETF RateLimit field this service writes)."""
    if value[:1] != b'"':
        return None
    end = value.find(b'"', 1)
    return value[1:end].decode("ascii", "replace") if end > 1 else None


class SecurityEventCounter(logging.Handler):
    """On the `audit` logger while the metrics listener runs: each security event counted once.
    Events of another application in the same process (tests) are not this one's."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        try:
            scope = current_request()
            app = self.metrics.readiness.app
            if scope is not None and app is not None and scope.get("app") not in (None, app):
                return
            self.metrics.event(record)
        except Exception:
            self.handleError(record)


class RequestMetrics:
    """The per-request part: status, duration and the rate limit decisions of each request. In
    the pipeline only when METRICS_PORT is set (pipeline.py), right inside the audit layer."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        limits: list[bytes] = []

        async def send_with_metrics(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # The address and subject limits' fields are added by the audit layer, outside.
                headers = (*scope.get(LAYER_HEADERS, ()), *message.get("headers", ()))
                limits.extend(value for key, value in headers if key == b"ratelimit")
            await send(message)

        try:
            await self.app(scope, receive, send_with_metrics)
        finally:
            self.metrics.request(scope, status, time.perf_counter() - started, limits)


# --- read at scrape time ---------------------------------------------------------------------------


class Pools(Collector):
    """Connections in use, open and at most, of the Redis pool and the database pools."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[GaugeMetricFamily]:
        redis = GaugeMetricFamily("redis_pool_connections", "Redis connections of this process.", labels=["state"])
        usage: Callable[[], tuple[int, int, int]] | None = getattr(self.runtime.store, "pool_usage", None)
        if usage is not None:
            for state, value in zip(("in_use", "open", "max"), usage(), strict=True):
                redis.add_metric([state], value)
        yield redis
        database = GaugeMetricFamily(
            "database_pool_connections",
            "Database connections of this process: `sessions` (SQLAlchemy's pool), `statements` (the request path).",
            labels=["pool", "state"],
        )
        pool: Any = self.runtime.engine.pool
        if hasattr(pool, "checkedout"):
            in_use = pool.checkedout()
            database.add_metric(["sessions", "in_use"], in_use)
            database.add_metric(["sessions", "open"], in_use + pool.checkedin())
            database.add_metric(["sessions", "max"], pool.size() + max(0, getattr(pool, "_max_overflow", 0)))
        statements_in_use, statements_open, statements_max = self.runtime.statements.pool_usage()
        if statements_in_use is not None:  # SQLite's connections serve statements in turn: no "in use"
            database.add_metric(["statements", "in_use"], statements_in_use)
        database.add_metric(["statements", "open"], statements_open)
        database.add_metric(["statements", "max"], statements_max)
        yield database


class ReadinessCollector(Collector):
    """The readiness checks' results. A scrape that finds them older than READINESS_MAX_AGE_SECONDS
    runs them on the service's event loop (single-flight and cached, as for the probes)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.app: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def watch(self, app: Any, loop: asyncio.AbstractEventLoop | None) -> None:
        self.app, self.loop = app, loop

    def collect(self) -> Iterable[GaugeMetricFamily]:
        from .health import readiness_of

        gauge = GaugeMetricFamily("readiness_check_ok", "Readiness checks: 1 ok, 0 failed.", labels=["check"])
        app, loop = self.app, self.loop
        if app is None or loop is None:
            return [gauge]
        readiness = readiness_of(app)
        answer = readiness.answer
        fresh = answer is not None and time.monotonic() - readiness.checked_at <= READINESS_MAX_AGE_SECONDS
        if not fresh and not _on_loop(loop):
            future = asyncio.run_coroutine_threadsafe(_untraced(readiness.get(app, self.runtime)), loop)
            try:
                answer = future.result(READINESS_SCRAPE_TIMEOUT_SECONDS)
            except Exception:
                future.cancel()
        if answer is not None:
            for check, status in answer.checks.items():
                if status != "not_configured":
                    gauge.add_metric([check], 1.0 if status == "ok" else 0.0)
        return [gauge]


async def _untraced(check: Awaitable[T]) -> T:
    """A scrape's readiness run makes no spans, as a probe's does not (telemetry.py)."""
    with suppress_instrumentation():
        return await check


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
