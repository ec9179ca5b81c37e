"""PostgreSQL roles (README, Database access): the owner migrates, the app role serves with only
what the service needs, and `audit_events` is append-only for it by privilege, not only by
trigger. Production refuses to serve as a superuser or as the owner. The session's database is
migrated by the owner with DATABASE_APP_ROLE (conftest.migrated_database), so every other test
module serves as the app role too."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import ConfigError, Settings
from {{ cookiecutter.package_name }}.db import create_engine
from {{ cookiecutter.package_name }}.health import readiness_of
from {{ cookiecutter.package_name }}.migrations import alembic_config

from .certificates import make_ca, server_certificate
from .conftest import TokenFactory, bearer, running
from .servers import DatabaseRoles, PostgresServer, give_to_postgres_user, start_postgres
from .test_audit import captured_logs

SUPERUSER = "{{ cookiecutter.package_name }}_super"


async def execute(url: str, statement: str) -> Any:
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            result = await connection.execute(text(statement))
            return result.all() if result.returns_rows else None
    finally:
        await engine.dispose()


@pytest.fixture
def roles(database_roles: DatabaseRoles | None, migrated_database: str) -> DatabaseRoles:
    assert database_roles is not None and migrated_database == database_roles.app_url
    return database_roles


@pytest.fixture
def production(monkeypatch: pytest.MonkeyPatch, settings_for: Callable[..., Settings]) -> Callable[..., FastAPI]:
    """An app with production's settings (everything production requires of the baked options too)."""
    monkeypatch.setenv("MTLS_IDENTITIES", '{"spiffe://example.org/ns/default/sa/caller": ["orgs:read"]}')

    def build(database_url: str) -> FastAPI:
        return create_app(
            settings_for(environment="production", trusted_hosts=["localhost"], database_url=database_url)
        )

    return build


async def test_the_app_role_serves_orgs_grants_and_audit_rows(
    roles: DatabaseRoles, settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(audit_db_enabled=True))
    assert make_url(app.state.runtime.settings.database_url).username == roles.app_role
    async with running(app) as client:
        created = await client.post("/api/v1/orgs", json={"name": "Acme"}, headers=bearer(make_token("ann")))
        assert created.status_code == 201, created.text
        org = created.json()["id"]
        granted = await client.put(
            f"/api/v1/orgs/{org}/grants/bob", json={"relation": "viewer"}, headers=bearer(make_token("ann"))
        )
        assert granted.status_code == 201, granted.text
        read = await client.get(f"/api/v1/orgs/{org}", headers=bearer(make_token("bob")))
        assert read.status_code == 200
        denied = await client.get(f"/api/v1/orgs/{org}", headers=bearer(make_token("eve")))
        assert denied.status_code == 403
    # Leaving `running` stopped the audit sink, which wrote what was queued; only the owner reads it.
    rows = await execute(roles.owner_url, "SELECT event, trace_id FROM audit_events ORDER BY id")
    events = [row.event for row in rows if row.trace_id == denied.headers["x-trace-id"]]
    assert events == ["authz_decision", "object_denied"]


@pytest.mark.parametrize(
    ("statement", "refusal"),
    [
        ("UPDATE audit_events SET subject = 'someone else'", "permission denied"),
        ("DELETE FROM audit_events", "permission denied"),
        ("TRUNCATE audit_events", "permission denied"),
        ("SELECT subject, client, details FROM audit_events", "permission denied"),
        ("DROP TRIGGER audit_events_no_change ON audit_events", "must be owner"),
        ("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_truncate", "must be owner"),
        ("DROP TABLE audit_events", "must be owner"),
        ("CREATE TABLE intruder (id int)", "permission denied"),
        ("ALTER TABLE permissions ADD COLUMN intruder int", "must be owner"),
        ("UPDATE alembic_version SET version_num = 'x'", "permission denied"),
    ],
)
async def test_the_app_role_can_only_append_to_audit_events_and_change_no_schema(
    roles: DatabaseRoles, statement: str, refusal: str
) -> None:
    with pytest.raises(DBAPIError, match=refusal):
        await execute(roles.app_url, statement)


async def test_the_app_role_appends_to_audit_events(roles: DatabaseRoles) -> None:
    await execute(
        roles.app_url,
        "INSERT INTO audit_events (occurred_at, trace_id, event, level, details) "
        "VALUES (now(), 'roles-test', 'appended', 'INFO', '{}')",
    )
    rows = await execute(roles.owner_url, "SELECT event FROM audit_events WHERE trace_id = 'roles-test'")
    assert [row.event for row in rows] == ["appended"]


def test_migrations_refuse_to_grant_the_role_that_runs_them(roles: DatabaseRoles) -> None:
    owner = make_url(roles.owner_url).username
    assert owner
    with pytest.raises(ValueError, match=f"DATABASE_APP_ROLE: {owner} is the role running the migrations"):
        command.upgrade(alembic_config(roles.owner_url, app_role=owner), "heads")


@pytest.fixture
async def superuser_url(database_url: str, roles: DatabaseRoles) -> AsyncIterator[str]:
    """A superuser other than `postgres`, with a password: what only the start-up check can tell."""
    await execute(database_url, f"CREATE ROLE {SUPERUSER} SUPERUSER LOGIN PASSWORD 'super-password'")
    try:
        yield make_url(roles.app_url).set(username=SUPERUSER, password="super-password").render_as_string(False)
    finally:
        await execute(database_url, f"DROP ROLE {SUPERUSER}")


async def test_production_serves_as_the_app_role(roles: DatabaseRoles, production: Callable[..., FastAPI]) -> None:
    async with running(production(roles.app_url), reset=False) as client:
        assert (await client.get("/health/ready")).status_code == 200


async def test_production_refuses_to_start_as_the_owner_of_audit_events(
    roles: DatabaseRoles, production: Callable[..., FastAPI]
) -> None:
    owner = make_url(roles.owner_url).username
    with pytest.raises(ConfigError, match=f"DATABASE_URL: connects as {owner}, the owner of audit_events"):
        async with running(production(roles.owner_url), reset=False):
            pass


async def test_production_refuses_to_start_as_a_superuser(
    superuser_url: str, production: Callable[..., FastAPI]
) -> None:
    with pytest.raises(ConfigError, match=f"DATABASE_URL: connects as {SUPERUSER}, a superuser"):
        async with running(production(superuser_url), reset=False):
            pass


async def test_a_role_unchecked_at_start_is_checked_by_readiness_and_a_superuser_never_ready(
    tmp_path: Path, production: Callable[..., FastAPI]
) -> None:
    """The database down at start: the role cannot be asked, so the replica starts but is not
    ready; once the database answers, readiness asks, and a superuser keeps it unready."""
    server = start_postgres(tmp_path / "postgres")
    try:
        await execute(server.url, f"CREATE ROLE {SUPERUSER} SUPERUSER LOGIN PASSWORD 'super-password'")
        await execute(server.url, "CHECKPOINT")  # the test cluster's commits are not flushed; stop is immediate
        url = make_url(server.url).set(username=SUPERUSER, password="super-password").render_as_string(False)
        server.stop()
        app = production(url)
        with captured_logs() as logs:
            async with running(app, reset=False) as client:
                down = await client.get("/health/ready")
                assert down.status_code == 503 and down.json()["checks"]["database"] == "fail"
                server.start()
                readiness_of(app).checked_at = float("-inf")  # the next probe checks again
                refused = await client.get("/health/ready")
                assert refused.status_code == 503 and refused.json()["checks"]["database"] == "fail"
        records = logs.records()
        assert "database_role_unchecked" in [record.get("event") for record in records]
        refusal = next(record for record in records if record.get("event") == "database_role_refused")
        assert f"connects as {SUPERUSER}, a superuser" in refusal["message"]
    finally:
        server.stop()


async def test_a_role_unchecked_at_start_serves_once_readiness_has_checked_it(
    roles: DatabaseRoles, production: Callable[..., FastAPI]
) -> None:
    """The same start with the app role: ready as soon as the database answers and the role passes."""
    app = production(roles.app_url)
    async with running(app, reset=False) as client:
        runtime = app.state.runtime
        assert runtime.role_unchecked is False  # the database was up: checked at start
        runtime.role_unchecked = True  # as a start with the database down leaves it
        ready = await client.get("/health/ready")
        assert ready.status_code == 200, ready.text
        assert runtime.role_unchecked is False


# --- TLS: the URL form README "Database access" shows --------------------------------------------


@pytest.fixture(scope="module")
def tls_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostgresServer, Path, Path]]:
    """A throwaway cluster that speaks TLS with a certificate for 127.0.0.1 from its own CA; the
    CA's file, and another CA's."""
    certificates = tmp_path_factory.mktemp("database-ca")
    ca, other = make_ca("Database CA"), make_ca("Another CA")
    ca_file, other_file = certificates / "ca.pem", certificates / "other.pem"
    ca_file.write_bytes(ca.cert_pem)
    other_file.write_bytes(other.cert_pem)
    server = start_postgres(tmp_path_factory.mktemp("postgres-tls"))
    cert, key = server_certificate(ca).write(server.data_dir, "server")
    for path in (cert, key):
        give_to_postgres_user(path)
    with (server.data_dir / "postgresql.conf").open("a") as conf:
        conf.write(f"ssl = on\nssl_cert_file = '{cert}'\nssl_key_file = '{key}'\n")
    server.restart()
    yield server, ca_file, other_file
    server.stop()


async def encrypted(url: str) -> bool:
    """Whether the service's engine reaches the database over TLS with `url`."""
    rows = await execute(url, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    return bool(rows[0].ssl)


async def test_the_documented_tls_url_verifies_the_server_certificate(
    tls_postgres: tuple[PostgresServer, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, ca_file, other_file = tls_postgres
    url = f"{server.url}?ssl=verify-full"
    monkeypatch.setenv("PGSSLROOTCERT", str(ca_file))
    assert await encrypted(url)
    # The same URL against a server whose certificate another CA signed is refused ...
    monkeypatch.setenv("PGSSLROOTCERT", str(other_file))
    with pytest.raises(ssl.SSLCertVerificationError):
        await encrypted(url)
    # ... which asyncpg's default (`prefer`: TLS if offered, nothing verified) never notices.
    assert await encrypted(server.url)
    # libpq's form is not asyncpg's: it fails at the first connection (production refuses it at start).
    monkeypatch.setenv("PGSSLROOTCERT", str(ca_file))
    with pytest.raises(TypeError, match="sslmode"):
        await encrypted(f"{server.url}?sslmode=verify-full")
