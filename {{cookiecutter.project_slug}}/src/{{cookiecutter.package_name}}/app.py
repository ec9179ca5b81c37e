"""The application factory: one place that assembles settings, resources, pipeline and routes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from . import api, health
from . import extensions as options
from .api import legacy
from .config import SERVICE_NAME, Settings, tracing_requested
from .docs_page import add_docs_page
from .openapi import problem_openapi
from .pipeline import security_pipeline
from .resources import attach
from .runtime import Runtime
from .security.errors import install_error_handlers
from .security.keys import JwksKeys
from .security.logs import configure_logging
from .security.ratelimit import RouteLimitExceeded, route_limit_exceeded
from .security.route_policy import UnguardedRoutes, refuse_unguarded_routes
from .security.stack import SecuredApp
from .startup import load_settings
from .store import RedisStore

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, span_exporter: SpanExporter | None = None) -> FastAPI:
    """`span_exporter`: trace every request and export the spans there (tests), whatever OTEL_* say."""
    settings = settings or load_settings()
    configure_logging(
        settings.log_level,
        masked_fields=settings.audit_masked_fields,
        pseudonym_key=settings.audit_pseudonym_key_bytes,
        client_address=settings.log_client_address,
    )
    runtime = build_runtime(settings, span_exporter=span_exporter)
    docs = settings.effective_docs_enabled
    app = SecuredApp(
        title=SERVICE_NAME,
        pipeline=security_pipeline(runtime),
        lifespan=deny_by_default(runtime),
        # FastAPI's own pages load Swagger UI and ReDoc from a CDN: docs_page.py serves /docs instead.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
        # FastAPI's own OpenTelemetry (recent versions) would start its server span before the
        # audit layer has decided the trace id; telemetry.py makes it inside, with that trace id.
        telemetry=dict(tracing=False, metrics=False, logs=False, auto_configure=False),
    )
    attach(app, runtime)
    install_error_handlers(app)
    app.add_exception_handler(RouteLimitExceeded, route_limit_exceeded)
    app.include_router(health.router)
    app.include_router(api.router)
    app.include_router(legacy.router)  # deprecated aliases until their sunset
    for extension in runtime.extensions:  # the baked credential options' routes
        for router in extension.routers:
            app.include_router(router)
    problem_openapi(app)
    if docs:
        add_docs_page(app)
    refuse_unguarded_routes(app.routes)  # and again at start, on the final route table
    return app


def deny_by_default(runtime: Runtime) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The runtime's lifespan, which refuses to start (before serving any request) when a route has
    no authorization policy and is not public, whatever added it after the factory: a router
    included later, an option's lifespan. `serve` exits 1 with the message (app.state.startup_refused)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with runtime.lifespan(app):
            try:
                refuse_unguarded_routes(app.routes)
            except UnguardedRoutes as refused:
                app.state.startup_refused = str(refused)
                logger.critical("refusing to start: %s", refused, extra={"event": "startup_refused"})
                raise
            yield

    return lifespan


def build_runtime(settings: Settings, *, span_exporter: SpanExporter | None = None) -> Runtime:
    """The process's resources, the baked options' extensions, and tracing and metrics, each only
    when configured: when off, nothing of them is imported or wrapped."""
    runtime = Runtime.create(settings)
    runtime.extensions = options.extensions(runtime)
    for extension in runtime.extensions:  # authz_engine=cerbos: the PDP decides layer 7
        runtime.authorizer = extension.authorizer or runtime.authorizer
    if span_exporter is not None or tracing_requested():
        from .telemetry import Tracing

        tracing = runtime.tracing = Tracing.create(
            exporter=span_exporter, log_health_requests=settings.log_health_requests
        )
        tracing.instrument_engine(runtime.engine)
        tracing.trace_statements(runtime.statements)
        if isinstance(runtime.store, RedisStore):
            tracing.trace_store(runtime.store)
        if isinstance(runtime.keys, JwksKeys):
            runtime.keys.client_hook = tracing.instrument_client
    if settings.metrics_port is not None:
        from .metrics import Metrics

        runtime.metrics = Metrics(runtime)
    return runtime
