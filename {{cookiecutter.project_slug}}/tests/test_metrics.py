"""Prometheus metrics on their own listener (METRICS_PORT): scraped over HTTP and parsed with the
client library's parser while the service answers real requests on the real Redis and database."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.cli import main
from {{ cookiecutter.package_name }}.config import Settings
from {{ cookiecutter.package_name }}.metrics import MAX_LABEL_VALUES, BoundedLabel
from {{ cookiecutter.package_name }}.security.stack import installed_layers

from .conftest import TokenFactory, bearer, running
from .servers import LOOPBACK, free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
ORG = "/api/v1/orgs/00000000-0000-0000-0000-000000000000"
LABELS = ("route", "method", "status", "policy", "outcome", "reason", "event", "check", "state", "pool", "le")


async def scrape(port: int) -> Samples:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://{LOOPBACK}:{port}/metrics", timeout=10)
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def metrics_app(settings_for: Callable[..., Settings], **overrides: Any) -> tuple[FastAPI, int]:
    port = free_port()
    return create_app(settings_for(metrics_port=port, **overrides)), port


async def test_requests_limits_and_denials_are_counted_without_subjects_or_addresses(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app, port = metrics_app(settings_for, rate_limit_ip="3/minute")
    token = make_token("alice", scope="orgs:read")
    async with running(app) as http:
        before = await scrape(port)
        anonymous = await http.get(ORG)
        no_scope = await http.post("/api/v1/orgs", json={"name": "Acme"}, headers=bearer(token))
        not_granted = await http.get(ORG, headers=bearer(token))
        limited = await http.get(ORG, headers=bearer(token))
        after = await scrape(port)
    assert [r.status_code for r in (anonymous, no_scope, not_granted, limited)] == [401, 403, 403, 429]

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # A 429 from the address limit, the three before it allowed by it.
    assert grew("rate_limit_decisions_total", policy="ip", outcome="limited") == 1
    assert grew("rate_limit_decisions_total", policy="ip", outcome="allowed") == 3
    assert grew("rate_limit_decisions_total", policy="subject", outcome="allowed") == 2
    assert grew("authentication_failures_total", reason="no_credentials") == 1
    assert grew("authorization_denials_total", policy="scopes") == 1
    assert grew("authorization_denials_total", policy="org:viewer") == 1
    assert grew("security_events_total", event="rate_limited") == 1
    # Requests by route template (`none`: answered before routing), method and status.
    histogram = "http_server_request_duration_seconds_count"
    assert grew(histogram, route="/api/v1/orgs/{org_id}", method="GET", status="403") == 1
    assert grew(histogram, route="/api/v1/orgs", method="POST", status="403") == 1
    assert grew(histogram, route="none", method="GET", status="401") == 1
    assert grew(histogram, route="none", method="GET", status="429") == 1
    buckets = "http_server_request_duration_seconds_bucket"
    assert value(after, buckets, route="none", method="GET", status="429", le="+Inf") == 1
    # No label holds who called, from where, or which object.
    labels = {label for _name, pairs in after for label in pairs}
    assert not [pair for pair in labels if pair[1] in ("alice", "203.0.113.7") or "0000-0000" in pair[1]]
    assert {name for name, _value in labels} <= set(LABELS)


async def test_dependency_checks_and_pools_are_reported(settings_for: Callable[..., Settings]) -> None:
    app, port = metrics_app(settings_for, redis_pool_size=7)
    async with running(app) as http:
        await http.get("/health/live")
        samples = await scrape(port)
    for check in ("database", "migrations", "redis", "pipeline", "keys"):
        assert value(samples, "readiness_check_ok", check=check) == 1
    assert value(samples, "redis_pool_connections", state="max") == 7
    assert value(samples, "redis_pool_connections", state="open") >= 1  # the reset, the readiness ping
    assert value(samples, "redis_pool_connections", state="in_use") == 0
    assert value(samples, "database_pool_connections", pool="statements", state="max") >= 1
    assert ("database_pool_connections", frozenset({("pool", "sessions"), ("state", "in_use")})) in samples


async def test_a_failing_dependency_reads_zero(settings_for: Callable[..., Settings]) -> None:
    app, port = metrics_app(settings_for, redis_url="redis://127.0.0.1:1/0")
    async with running(app, reset=False):
        samples = await scrape(port)
    assert value(samples, "readiness_check_ok", check="redis") == 0
    assert value(samples, "readiness_check_ok", check="database") == 1


async def test_the_public_listener_does_not_serve_metrics(settings_for: Callable[..., Settings]) -> None:
    app, port = metrics_app(settings_for)
    async with running(app) as http:
        response = await http.get("/metrics")
        scraped = await scrape(port)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert "http_server_request_duration_seconds" not in response.text
    assert value(scraped, "http_server_request_duration_seconds_count", route="none", method="GET", status="404") == 1


async def test_metrics_off_adds_no_layer_and_no_listener(app: FastAPI, client: httpx.AsyncClient) -> None:
    await client.get("/health/live")
    assert app.state.runtime.metrics is None
    assert "RequestMetrics" not in installed_layers(app)  # type: ignore[arg-type]


def test_the_metrics_port_cannot_be_the_public_port(settings_for: Callable[..., Settings]) -> None:
    try:
        settings_for(metrics_port=8000, port=8000)
    except ValueError as exc:
        assert "METRICS_PORT" in str(exc)
    else:
        raise AssertionError("METRICS_PORT equal to PORT was accepted")


def test_labels_fed_from_events_stay_bounded() -> None:
    label = BoundedLabel()
    assert label("no_credentials") == "no_credentials"
    assert label("has spaces and /slashes/") == "other"  # not a name the service writes
    names = [label(f"reason_{number}") for number in range(MAX_LABEL_VALUES + 50)]
    assert names.count("other") == 51  # 100 distinct values at most, no_credentials among them
    assert label("no_credentials") == "no_credentials"  # a value seen before keeps its label


def test_serve_refuses_metrics_with_several_workers(
    cli_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("METRICS_PORT", str(free_port()))
    assert main(["serve", "--workers", "2"]) == 2
    assert "METRICS_PORT" in capsys.readouterr().err
