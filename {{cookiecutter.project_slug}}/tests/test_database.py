"""Database access: an error's text never carries a statement's bound values into the logs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from sqlalchemy import text

from {{ cookiecutter.package_name }}.db import create_engine

from .conftest import DATABASE, ServiceFactory, TokenFactory, bearer, owner_url

SUBJECT = "auth0|6651f0c2-alice"
REFUSAL = "orgs refused by the test"

if DATABASE == "postgresql":
    REFUSE = [
        "CREATE FUNCTION test_refuse_orgs() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN RAISE EXCEPTION '{REFUSAL}'; END $$",
        "CREATE TRIGGER test_refuse_orgs BEFORE INSERT ON orgs FOR EACH ROW EXECUTE FUNCTION test_refuse_orgs()",
    ]
    ALLOW = ["DROP TRIGGER IF EXISTS test_refuse_orgs ON orgs", "DROP FUNCTION IF EXISTS test_refuse_orgs()"]
else:
    REFUSE = [f"CREATE TRIGGER test_refuse_orgs BEFORE INSERT ON orgs BEGIN SELECT RAISE(ABORT, '{REFUSAL}'); END"]
    ALLOW = ["DROP TRIGGER IF EXISTS test_refuse_orgs"]


async def run_as_owner(database_url: str, statements: list[str]) -> None:
    engine = create_engine(owner_url(database_url))
    try:
        async with engine.begin() as connection:
            for statement in statements:
                await connection.execute(text(statement))
    finally:
        await engine.dispose()


@pytest.fixture
async def orgs_refused(migrated_database: str) -> AsyncIterator[None]:
    """Every INSERT into orgs fails in the database (a trigger), an error the service does not expect."""
    await run_as_owner(migrated_database, REFUSE)
    try:
        yield
    finally:
        await run_as_owner(migrated_database, ALLOW)


async def test_a_database_error_logs_no_bound_parameters(
    orgs_refused: None, start_service: ServiceFactory, make_token: TokenFactory
) -> None:
    """The INSERT binds the caller's subject (created_by); its error is logged with the traceback,
    and the subject must not be in it: the log names subjects by pseudonym only."""
    process = start_service(AUDIT_PSEUDONYM_KEY="tests-audit-pseudonym-key-0123456789abcdef")
    async with httpx.AsyncClient(base_url=process.base_url, timeout=10) as http:
        response = await http.post("/api/v1/orgs", json={"name": "Acme"}, headers=bearer(make_token(SUBJECT)))
    process.stop()
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert SUBJECT not in response.text and REFUSAL not in response.text
    log = await anyio.Path(process.log_path).read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    (error,) = [line for line in lines if line.get("event") == "unhandled_exception"]
    assert REFUSAL in error["exc_info"], "the database's own error is what was logged"
    assert "INSERT INTO orgs" in error["exc_info"]
    assert SUBJECT not in json.dumps(error)
    assert "hide_parameters" in error["exc_info"]
    assert not [line for line in lines if SUBJECT in json.dumps(line)]
