"""Health probes: liveness without I/O, readiness per dependency and for the pipeline itself."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from fastapi import FastAPI

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import Settings

from .conftest import CERBOS_BAKED, UNREACHABLE_DATABASE_URL, running
from .servers import RedisServer


async def test_live_answers_200(client: httpx.AsyncClient) -> None:
    response = await client.get("/health/live")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ready_reports_every_check_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/health/ready")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {
            "database": "ok",
            "migrations": "ok",
            "redis": "ok",
            "pipeline": "ok",
            "keys": "ok",
            # authz_engine=cerbos: the policy decision point (test_cerbos.py: not ready when it is down)
            "authorizer": "ok" if CERBOS_BAKED else "not_configured",
        },
    }


async def test_ready_reports_redis_not_configured_without_redis_url(settings_for: Callable[..., Settings]) -> None:
    app = create_app(settings_for(redis_url=None))
    async with running(app) as http:
        response = await http.get("/health/ready")
    assert response.status_code == 200
    assert response.json()["checks"]["redis"] == "not_configured"


async def test_ready_is_503_when_redis_is_down_and_leaks_nothing(settings_for: Callable[..., Settings]) -> None:
    app = create_app(settings_for(redis_url="redis://127.0.0.1:1/0"))
    async with running(app, reset=False) as http:
        response = await http.get("/health/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail"
    assert body["checks"]["redis"] == "fail"
    assert body["checks"]["database"] == "ok"
    assert "127.0.0.1" not in response.text and "Error" not in response.text


async def test_ready_is_503_when_database_is_unreachable(
    settings_for: Callable[..., Settings],
) -> None:
    app = create_app(settings_for(database_url=UNREACHABLE_DATABASE_URL))
    async with running(app, reset=False) as http:
        response = await http.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["database"] == "fail"
    assert "nonexistent" not in response.text


async def test_ready_fails_when_the_pipeline_is_not_installed_in_order(app: FastAPI, client: httpx.AsyncClient) -> None:
    assert (await client.get("/health/ready")).json()["checks"]["pipeline"] == "ok"
    app.middleware_stack = FastAPI.build_middleware_stack(app)  # FastAPI's own stack, no pipeline
    app.state.readiness = None
    response = await client.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["pipeline"] == "fail"


async def test_ready_result_is_cached_for_a_second(
    client: httpx.AsyncClient, redis_server: RedisServer | None, app: FastAPI
) -> None:
    first = await client.get("/health/ready")
    cached = app.state.readiness
    second = await client.get("/health/ready")
    assert first.json() == second.json()
    assert app.state.readiness is cached
