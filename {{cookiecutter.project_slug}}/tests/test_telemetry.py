"""OpenTelemetry: a server span per request under the audit log's trace, child spans for the
database, Redis and the JWKS fetch, nothing secret in any attribute, and nothing at all when off.

Spans go to the SDK's InMemorySpanExporter; the service runs on the real redis-server and database.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.cli import main
from {{ cookiecutter.package_name }}.config import ConfigError, Settings, tracing_requested
from {{ cookiecutter.package_name }}.db import Statements, create_engine
from {{ cookiecutter.package_name }}.security.stack import installed_layers
from {{ cookiecutter.package_name }}.store.core import RedisStore
from {{ cookiecutter.package_name }}.telemetry import Tracing

from .conftest import DATABASE, TokenFactory, bearer, running
from .jwks_server import LOOPBACK, JwksServer, public_jwk
from .test_audit import GIVEN_TRACE, TRACEPARENT, captured_logs

CALLER_SPAN = "00f067aa0ba902b7"
ORG = "/api/v1/orgs/00000000-0000-0000-0000-000000000000"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


@pytest.fixture
def traced(settings_for: Callable[..., Settings], spans: InMemorySpanExporter) -> Callable[..., FastAPI]:
    """An app that traces every request into `spans`; keyword arguments are settings."""
    return lambda **overrides: create_app(settings_for(**overrides), span_exporter=spans)


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.kind == SpanKind.SERVER]


def children_of(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    return [
        span
        for span in exporter.get_finished_spans()
        if span.parent is not None and span.parent.span_id == parent.context.span_id
    ]


def hex_trace(span: ReadableSpan) -> str:
    return f"{span.context.trace_id:032x}"


def everything_in(exporter: InMemorySpanExporter) -> str:
    """Every name, attribute, event and status text of every span, as one string."""
    parts: list[Any] = []
    for span in exporter.get_finished_spans():
        parts += [span.name, dict(span.attributes or {}), span.status.description]
        parts += [(event.name, dict(event.attributes or {})) for event in span.events]
        parts.append(dict(span.resource.attributes))
    return json.dumps(parts, default=str)


async def test_a_request_is_a_server_span_under_the_audit_trace_with_database_and_redis_children(
    traced: Callable[..., FastAPI], spans: InMemorySpanExporter, make_token: TokenFactory
) -> None:
    token = make_token("alice")
    async with running(traced()) as http:
        created = await http.post("/api/v1/orgs", json={"name": "Secret Org Name"}, headers=bearer(token))
        org_id = created.json()["id"]
        spans.clear()
        with captured_logs() as logs:
            response = await http.get(f"/api/v1/orgs/{org_id}?api_key=query-secret", headers=bearer(token))
    assert response.status_code == 200

    (server,) = server_spans(spans)
    assert server.name == "GET /api/v1/orgs/{org_id}"
    attributes = dict(server.attributes or {})
    assert attributes["http.route"] == "/api/v1/orgs/{org_id}"
    assert attributes["http.request.method"] == "GET"
    assert attributes["http.response.status_code"] == 200
    assert server.parent is None  # no traceparent: a root span
    # The audit log's trace id and span id are the span's.
    line = logs.request_line(response)
    assert hex_trace(server) == response.headers["x-trace-id"] == line["trace_id"]
    assert f"{server.context.span_id:016x}" == line["span_id"]

    children = children_of(spans, server)
    systems = {(child.attributes or {}).get("db.system.name") for child in children}
    assert systems == {"redis", DATABASE}
    database = [child for child in children if (child.attributes or {}).get("db.system.name") != "redis"]
    redis = [child for child in children if (child.attributes or {}).get("db.system.name") == "redis"]
    assert [child.name for child in database] == ["SELECT"]  # the check and the read: one statement
    assert redis and all(child.kind == SpanKind.CLIENT for child in redis)
    assert all(hex_trace(child) == hex_trace(server) for child in children)
    text = everything_in(spans)
    for secret in (token, "query-secret", "api_key", org_id, "alice", "Secret Org Name"):
        assert secret not in text


async def test_the_orm_session_writes_are_sqlalchemy_spans_of_the_request(
    traced: Callable[..., FastAPI], spans: InMemorySpanExporter, make_token: TokenFactory
) -> None:
    async with running(traced()) as http:
        spans.clear()
        response = await http.post("/api/v1/orgs", json={"name": "Secret Org Name"}, headers=bearer(make_token()))
    assert response.status_code == 201
    (server,) = server_spans(spans)
    assert server.name == "POST /api/v1/orgs"
    inserts = [child for child in children_of(spans, server) if child.name.startswith("INSERT")]
    assert inserts, [child.name for child in children_of(spans, server)]
    assert all(hex_trace(child) == response.headers["x-trace-id"] for child in inserts)
    assert "Secret Org Name" not in everything_in(spans)


@pytest.mark.parametrize(("trust", "honoured"), [("always", True), ("never", False)])
async def test_the_callers_traceparent_is_the_parent_exactly_when_the_audit_layer_believes_it(
    traced: Callable[..., FastAPI], spans: InMemorySpanExporter, trust: str, honoured: bool
) -> None:
    async with running(traced(trace_context_trust=trust)) as http:
        spans.clear()
        response = await http.get(ORG, headers={"traceparent": TRACEPARENT})
    assert response.status_code == 401
    (server,) = server_spans(spans)
    assert hex_trace(server) == response.headers["x-trace-id"]
    assert (hex_trace(server) == GIVEN_TRACE) is honoured
    if honoured:
        assert server.parent is not None and server.parent.is_remote
        assert f"{server.parent.span_id:016x}" == CALLER_SPAN
    else:
        assert server.parent is None
    # Refused before routing: no template, so the span is named by its method alone, never the path.
    assert server.name == "GET"
    assert ORG.rsplit("/", 1)[1] not in everything_in(spans)


async def test_health_probes_are_traced_only_when_asked_for(
    traced: Callable[..., FastAPI], spans: InMemorySpanExporter, settings_for: Callable[..., Settings]
) -> None:
    async with running(traced()) as http:
        spans.clear()
        assert (await http.get("/health/live")).status_code == 200
        assert (await http.get("/health/ready")).status_code == 200
    assert spans.get_finished_spans() == ()  # nor the readiness checks' statements and PING
    asked = InMemorySpanExporter()  # the first app's shutdown shut its exporter down
    async with running(create_app(settings_for(log_health_requests=True), span_exporter=asked)) as http:
        await http.get("/health/live")
    assert [span.name for span in server_spans(asked)] == ["GET /health/live"]


async def test_a_redis_outage_is_an_error_span_with_the_type_and_no_message(
    traced: Callable[..., FastAPI], spans: InMemorySpanExporter
) -> None:
    async with running(traced(redis_url="redis://127.0.0.1:1/0"), reset=False) as http:
        spans.clear()
        response = await http.get("/api/v1/orgs/00000000-0000-0000-0000-000000000000")
    assert response.status_code == 503
    (server,) = server_spans(spans)
    assert server.status.status_code == StatusCode.ERROR
    (redis,) = children_of(spans, server)
    assert redis.status.status_code == StatusCode.ERROR and not redis.status.description
    assert (redis.attributes or {})["error.type"] == "StoreUnavailable"
    assert "127.0.0.1:1" not in everything_in(spans)


async def test_the_jwks_fetch_is_an_httpx_client_span(
    settings_for: Callable[..., Settings], spans: InMemorySpanExporter, private_key: Any
) -> None:
    jwks = JwksServer()
    jwks.start()
    try:
        jwks.serve_keys(public_jwk(private_key.public_key(), "a", use="sig", alg="RS256"))
        app = create_app(settings_for(jwt_public_key=None, jwt_jwks_url=jwks.url), span_exporter=spans)
        async with running(app):
            pass
    finally:
        jwks.stop()
    (fetch,) = [span for span in spans.get_finished_spans() if span.kind == SpanKind.CLIENT and span.name == "GET"]
    assert str(jwks.port) in json.dumps(dict(fetch.attributes or {}))
    attributes = dict(fetch.attributes or {})
    assert attributes.get("http.status_code", attributes.get("http.response.status_code")) == 200


async def test_tracing_off_adds_no_layer_and_wraps_nothing(app: FastAPI, client: Any) -> None:
    await client.get("/health/live")
    runtime = app.state.runtime
    assert runtime.tracing is None
    assert "ServerSpan" not in installed_layers(app)  # type: ignore[arg-type]
    assert "fetch" not in vars(runtime.statements) and runtime.statements.fetch.__func__ is Statements.fetch
    assert isinstance(runtime.store, RedisStore) and "run" not in vars(runtime.store)


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_RESOURCE_ATTRIBUTES": "a=b"}, False),
    ],
)
def test_tracing_is_on_only_when_otel_variables_ask_for_it(environ: dict[str, str], on: bool) -> None:
    assert tracing_requested(environ) is on


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ],
)
def test_an_exporter_the_service_does_not_ship_is_refused_by_name(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        tracing_requested(environ)


async def test_a_database_error_span_keeps_its_type_never_the_drivers_message(
    migrated_database: str, spans: InMemorySpanExporter
) -> None:
    tracing = Tracing.create(exporter=spans)
    engine = create_engine(migrated_database)
    tracing.instrument_engine(engine)
    try:
        async with engine.connect() as connection:
            with pytest.raises(DBAPIError):
                await connection.execute(text("SELECT secret_column_named_in_the_message FROM orgs"))
    finally:
        await engine.dispose()
        await tracing.shutdown()
    (failed,) = [span for span in spans.get_finished_spans() if span.status.status_code == StatusCode.ERROR]
    assert failed.name.startswith("SELECT")
    assert not failed.status.description  # the driver's message named the column; the span does not
    assert "secret_column_named_in_the_message" not in json.dumps([failed.status.description, failed.events])


async def test_a_refused_write_on_the_request_path_is_an_error_span_without_the_row(
    traced: Callable[..., FastAPI], spans: InMemorySpanExporter, make_token: TokenFactory
) -> None:
    token = make_token("alice")
    async with running(traced()) as http:
        org_id = (await http.post("/api/v1/orgs", json={"name": "Acme"}, headers=bearer(token))).json()["id"]
        user = {"email": "jane.doe@example.org", "role": "editor"}
        assert (await http.post(f"/api/v1/orgs/{org_id}/users", json=user, headers=bearer(token))).status_code == 201
        spans.clear()
        duplicate = await http.post(f"/api/v1/orgs/{org_id}/users", json=user, headers=bearer(token))
    assert duplicate.status_code == 409
    (server,) = server_spans(spans)
    # The ORM session's statement: its span is named "INSERT <database>" (SQLAlchemy's instrumentation).
    (insert,) = [child for child in children_of(spans, server) if child.name.split(" ", 1)[0] == "INSERT"]
    assert insert.status.status_code == StatusCode.ERROR and not insert.status.description
    assert "jane" not in everything_in(spans)


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: keeps what each POST carried."""

    received: list[tuple[str, str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.received.append((self.path, self.headers.get("Content-Type", ""), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        return None


async def test_otel_variables_alone_export_the_requests_spans_over_otlp_http(
    settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[tuple[str, str, bytes]] = []
    handler = type("Receiver", (Collector,), {"received": received})
    server = ThreadingHTTPServer((LOOPBACK, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{LOOPBACK}:{server.server_address[1]}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "traced-by-env")
    try:
        app = create_app(settings_for())
        async with running(app) as http:
            response = await http.get(ORG)
        # The lifespan's end flushed the batch processor.
    finally:
        server.shutdown()
        server.server_close()
    assert app.state.runtime.tracing is not None
    assert received, "nothing was exported"
    paths = {path for path, _type, _body in received}
    assert paths == {"/v1/traces"}
    assert all(content_type == "application/x-protobuf" for _path, content_type, _body in received)
    exported = b"".join(body for _path, _type, body in received)
    assert bytes.fromhex(response.headers["x-trace-id"]) in exported  # the audit trace id, as OTLP bytes
    assert b"traced-by-env" in exported


def test_check_config_names_an_unshipped_exporter_and_says_when_tracing_is_on(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    assert main(["check-config"]) == 1
    assert "OTEL_TRACES_EXPORTER" in capsys.readouterr().err
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("METRICS_PORT", "9464")
    assert main(["check-config"]) == 0
    assert capsys.readouterr().out == "configuration ok (test, traces, metrics)\n"
