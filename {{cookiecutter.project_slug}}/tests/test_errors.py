"""Every rejection is an RFC 9457 problem document, and nothing internal leaks into it."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

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


async def test_openapi_documents_400_problems_and_no_422(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert '"422"' not in str(schema).replace("'", '"')
    create = schema["paths"]["/api/v1/orgs"]["post"]["responses"]
    assert "application/problem+json" in create["400"]["content"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
