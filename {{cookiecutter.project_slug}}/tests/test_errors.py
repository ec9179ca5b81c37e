"""Every rejection is an RFC 9457 problem document, and nothing internal leaks into it."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import exc as sa_exc

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import SERVICE_NAME, Settings

from .conftest import UNREACHABLE_DATABASE_URL, TokenFactory, bearer, running

PROBLEM_FIELDS = {"type", "title", "status", "detail", "trace_id"}


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body.keys() >= PROBLEM_FIELDS
    assert body["status"] == status
    assert body["trace_id"] == response.headers["x-trace-id"]
    return body


async def test_unknown_route_is_a_404_problem(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/nope"), 404)


async def test_wrong_method_is_a_405_problem_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.post("/health/live")
    assert_problem(response, 405)
    assert response.headers["allow"] == "GET"


async def test_unexpected_exception_is_a_bare_500_problem(app: FastAPI, client: httpx.AsyncClient) -> None:
    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret connection string postgresql://u:p@db/x")

    app.middleware_stack = None  # rebuild with the new route
    response = await client.get("/boom")
    body = assert_problem(response, 500)
    assert "postgresql" not in response.text and "RuntimeError" not in response.text
    assert "Traceback" not in response.text
    assert body["title"] == "Internal Server Error"
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_openapi_documents_400_problems_and_no_422(app: FastAPI, client: httpx.AsyncClient) -> None:
    @app.get("/outside/{item_id}")  # a route outside the API router still documents its 400
    async def outside(item_id: int) -> None: ...

    schema = (await client.get("/openapi.json")).json()
    assert '"422"' not in str(schema).replace("'", '"')
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert "ValidationError" not in schema["components"]["schemas"]
    validating = 0
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if "requestBody" not in operation and not operation.get("parameters"):
                continue
            validating += 1
            documented = operation["responses"].get("400", {}).get("content", {})
            assert documented == {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}, (
                f"{method.upper()} {path} does not document its 400 problem"
            )
    assert validating >= 8
    assert "/outside/{item_id}" in schema["paths"]
    errors = schema["components"]["schemas"]["Problem"]["properties"]["errors"]
    assert "FieldError" in str(errors)
    assert set(schema["components"]["schemas"]["FieldError"]["properties"]) == {"loc", "msg"}


async def test_openapi_keeps_non_problem_error_bodies_as_json(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    not_ready = schema["paths"]["/health/ready"]["get"]["responses"]["503"]["content"]
    assert not_ready == {"application/json": {"schema": {"$ref": "#/components/schemas/Ready"}}}


async def test_database_outage_is_a_503_problem_not_a_500(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(database_url=UNREACHABLE_DATABASE_URL))
    token = bearer(make_token("alice"))
    async with running(app, reset=False) as http:
        created = await http.post("/api/v1/orgs", json={"name": "Acme"}, headers=token)
        read = await http.get(f"/api/v1/orgs/{uuid.uuid4()}", headers=token)
    for response in (created, read):
        body = assert_problem(response, 503)
        assert body["type"] == f"urn:{SERVICE_NAME}:problem:dependency-unavailable"
        assert response.headers["retry-after"] == "1"
        assert "nonexistent" not in response.text and "Error" not in response.text


class DriverError(Exception):
    """What a driver raises, as SQLAlchemy's asyncpg adapter exposes it (with its SQLSTATE)."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "status"),
    [
        ("53300", 503),  # too_many_connections
        ("57P01", 503),  # admin_shutdown
        ("57P03", 503),  # cannot_connect_now
        ("08006", 503),  # connection_failure
        ("23505", 500),  # unique_violation: a bug, not an outage
        ("42P01", 500),  # undefined_table
    ],
)
async def test_database_errors_answer_503_only_when_the_database_cannot_serve(
    app: FastAPI, client: httpx.AsyncClient, sqlstate: str, status: int
) -> None:
    @app.get("/database-error")
    async def database_error() -> None:
        raise sa_exc.DBAPIError("SELECT secret FROM t", None, DriverError(sqlstate))

    app.middleware_stack = None  # rebuild with the new route
    response = await client.get("/database-error")
    assert_problem(response, status)
    assert "secret" not in response.text and sqlstate not in response.text
