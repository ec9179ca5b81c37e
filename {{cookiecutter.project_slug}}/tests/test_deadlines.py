"""Deadlines below the request path (ASVS 5.0 V15.1.3): every database session's statement
timeout (DATABASE_STATEMENT_TIMEOUT_SECONDS; PostgreSQL cancels a statement that exceeds it, and
the answer is a 503 problem that quotes no SQL), and a bounded list `offset` (MAX_OFFSET)."""

from __future__ import annotations
{%- if cookiecutter.database == "postgresql" %}

from collections.abc import Callable
{%- endif %}

import httpx
from fastapi import FastAPI
{%- if cookiecutter.database == "postgresql" %}
from sqlalchemy import func, select, text
{%- else %}
from sqlalchemy import text
{%- endif %}

from {{ cookiecutter.package_name }}.api.schemas import MAX_OFFSET
{%- if cookiecutter.database == "postgresql" %}
from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import Settings

from .conftest import ALL_SCOPES, TokenFactory, bearer, running
from .test_audit import captured_logs
{%- else %}

from .conftest import ALL_SCOPES, TokenFactory, bearer
{%- endif %}

ORGS = "/api/v1/orgs"


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, object] = response.json()
    assert body["status"] == status
    return body


async def test_an_offset_beyond_max_offset_is_a_400_problem(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice = bearer(make_token("alice", ALL_SCOPES))
    org = (await client.post(ORGS, json={"name": "Acme"}, headers=alice)).json()["id"]
    for path in (ORGS, f"{ORGS}/{org}/users"):
        assert (await client.get(path, params={"offset": MAX_OFFSET}, headers=alice)).status_code == 200
        body = assert_problem(await client.get(path, params={"offset": MAX_OFFSET + 1}, headers=alice), 400)
        assert "offset" in str(body)
{%- if cookiecutter.database == "postgresql" %}


SLEEP = "SELECT pg_sleep(60)"  # far beyond the timeout below: the outcome does not depend on timing


def add_slow_routes(app: FastAPI) -> None:
    """Two routes that run a 60 s statement, added once the app runs (a route outside the API has
    no policy and would stop it starting): through an ORM session (the engine's connections) and
    through `Statements` (the request path's own)."""
    runtime = app.state.runtime

    @app.get("/slow-session")
    async def slow_session() -> None:
        async with runtime.sessionmaker() as session:
            await session.execute(text(SLEEP))

    @app.get("/slow-statement")
    async def slow_statement() -> None:
        statements = runtime.statements
        await statements.fetch(statements.query("sleep", lambda: select(func.pg_sleep(60))))

    app.middleware_stack = None  # rebuild with the new routes


async def test_a_statement_beyond_the_timeout_is_cancelled_and_answered_503_without_sql(
    settings_for: Callable[..., Settings],
) -> None:
    app = create_app(settings_for(database_statement_timeout_seconds=1))
    async with running(app) as client:
        add_slow_routes(app)
        with captured_logs() as logs:
            answer = await client.get("/slow-session")
        assert_problem(answer, 503)
        assert answer.headers["retry-after"] == "1"
        assert "pg_sleep" not in answer.text and "SELECT" not in answer.text
        assert "pg_sleep" not in logs.text  # the event names the error's type, never the statement
        assert logs.event(answer, "dependency_unavailable")["dependency"] == "database"
        async with app.state.runtime.engine.connect() as connection:
            assert (await connection.execute(text("SHOW statement_timeout"))).scalar_one() == "1s"


async def test_the_request_paths_own_connections_have_the_statement_timeout_too(
    settings_for: Callable[..., Settings],
) -> None:
    app = create_app(settings_for(database_statement_timeout_seconds=1))
    async with running(app) as client:
        add_slow_routes(app)
        statements = app.state.runtime.statements
        [[timeout]] = await statements._postgres.fetch("SHOW statement_timeout", [], retry=False)
        assert timeout == "1s"
        answer = await client.get("/slow-statement")
        assert_problem(answer, 503)
        assert "pg_sleep" not in answer.text and "SELECT" not in answer.text
{%- else %}


async def test_sqlite_connections_wait_for_the_write_lock_at_most_the_busy_timeout(app: FastAPI) -> None:
    """SQLite has no statement timeout; what bounds a session's wait is its busy timeout (5 s)."""
    async with app.state.runtime.engine.connect() as connection:
        assert (await connection.execute(text("PRAGMA busy_timeout"))).scalar_one() == 5000
{%- endif %}
