"""Fixtures: a real redis-server, a real database migrated to head, a key pair that signs tokens,
and an app built per test from explicit settings."""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest
from alembic import command
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from {{ cookiecutter.package_name }} import extensions
from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import DEFAULT_DATABASE_URL, Settings
from {{ cookiecutter.package_name }}.migrations import alembic_config
from {{ cookiecutter.package_name }}.runtime import Runtime
from {{ cookiecutter.package_name }}.settings import ServiceSettings
from {{ cookiecutter.package_name }}.store.core import RedisStore

from .servers import (
    APP_ROLE,
    OWNER_ROLE,
    CerbosServer,
    DatabaseRoles,
    RedisServer,
    ServiceProcess,
    create_database_roles,
    start_postgres,
    start_redis,
)

DATABASE = "postgresql" if DEFAULT_DATABASE_URL.startswith("postgresql") else "sqlite"
# A database of the configured kind that cannot be reached, for outage tests.
UNREACHABLE_DATABASE_URL = (
    "postgresql+asyncpg://u@127.0.0.1:1/nonexistent"
    if DATABASE == "postgresql"
    else "sqlite+aiosqlite:////nonexistent/x.db"
)
ISSUER = "https://issuer.test"
AUDIENCE = "{{ cookiecutter.project_slug }}"
ALL_SCOPES = "orgs:read orgs:write users:read users:write"
PSEUDONYM_KEY = "tests-audit-pseudonym-key-0123456789abcdef"
TokenFactory = Callable[..., str]


def pseudonym(subject: str, key: str = PSEUDONYM_KEY) -> str:
    """How the audit log names `subject`: HMAC-SHA256 under AUDIT_PSEUDONYM_KEY, 128 bits in hex.
    Computed here independently of the service's code."""
    return "ps_" + hmac.new(key.encode(), subject.encode(), hashlib.sha256).hexdigest()[:32]


def principal(sub: str, issuer: str = ISSUER) -> str:
    """The principal id of a token of `issuer` with this `sub` (security/principal.py), as grants,
    limits, lockouts, revocations and the audit log key it. Computed here independently."""
    return f"jwt:{hashlib.sha256(issuer.encode()).hexdigest()[:16]}:{sub}"


async def run_sql(url: str, statement: str, rows: list[dict[str, Any]] | None = None) -> list[Any]:
    """`statement` (with `rows` as its parameters) in one transaction of its own engine on `url`;
    the first column of what it returns. For tests that set up or read rows the API does not show."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            result = await connection.execute(text(statement), rows)
            return [row[0] for row in result.all()] if result.returns_rows else []
    finally:
        await engine.dispose()


def service_environment(database_url: str, redis_url: str, public_pem: str) -> dict[str, str]:
    """The settings a service process of the tests starts with: the test environment, the session's
    database and Redis, and the test issuer's key."""
    return {
        "ENVIRONMENT": "test",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "JWT_PUBLIC_KEY": public_pem,
        "JWT_ISSUER": ISSUER,
        "JWT_AUDIENCE": AUDIENCE,
        # authz_engine=cerbos: the session's PDP (the `pdp` fixture)
        **{name: os.environ[name] for name in ("CERBOS_ADDRESS",) if name in os.environ},
    }


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Module | pytest.Class, name: str, obj: object) -> None:
    """Every async test runs under anyio's plugin. Marking here, before anyio's own hook sees the
    function, keeps parametrized async tests intact (marking after collection loses their params)."""
    if collector.istestfunction(obj, name) and inspect.iscoroutinefunction(obj):
        pytest.mark.anyio(obj)


@pytest.fixture(autouse=True)
def option_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The secrets a baked credential option requires in production, which its own settings read
    from the environment (unused by a service baked without the option)."""
    monkeypatch.setenv("API_KEY_PEPPER", "tests-api-key-pepper-0123456789abcdef")


# authz_engine=cerbos: every app of the suite asks a real PDP, one per session (tests/servers.py).
CERBOS_BAKED = "cerbos" in extensions.present()


@pytest.fixture(scope="session")
def pdp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CerbosServer | None]:
    """The session's `cerbos server` with the service's policies; None when baked with authz_engine=table."""
    if not CERBOS_BAKED:
        yield None
        return
    server = CerbosServer(tmp_path_factory.mktemp("cerbos"))
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def pdp_address(pdp: CerbosServer | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if pdp is not None:
        monkeypatch.setenv("CERBOS_ADDRESS", pdp.address)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | None]:
    """A private redis-server (killed and restarted by outage tests), or None with REDIS_URL set."""
    if os.environ.get("REDIS_URL"):
        yield None
        return
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer | None) -> str:
    return redis_server.url if redis_server else os.environ["REDIS_URL"]


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if os.environ.get("TEST_DATABASE_URL"):
        yield os.environ["TEST_DATABASE_URL"]
    elif DATABASE == "postgresql":
        server = start_postgres(tmp_path_factory.mktemp("postgres"))
        yield server.url
        server.stop()
    else:
        yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"


@pytest.fixture(scope="session")
def database_roles(database_url: str) -> DatabaseRoles | None:
    """PostgreSQL: the owner, who migrates, and the app role, which serves (README, Database
    access), made in the session's database. None on SQLite, which has no roles."""
    return create_database_roles(database_url) if DATABASE == "postgresql" else None


@pytest.fixture(scope="session")
def migrated_database(database_url: str, database_roles: DatabaseRoles | None) -> str:
    """The session's database at the migrations' head, as the service connects to it: on
    PostgreSQL migrated by the owner and served by the app role, as the shipped deployment does."""
    if database_roles is None:
        command.upgrade(alembic_config(database_url), "heads")
        return database_url
    command.upgrade(alembic_config(database_roles.owner_url, app_role=database_roles.app_role), "heads")
    return database_roles.app_url


def owner_url(url: str) -> str:
    """The owner's URL for a database the app role's `url` names (the same URL on SQLite): for a
    test that reads what the service may only append (audit_events)."""
    parsed = make_url(url)
    if DATABASE != "postgresql" or parsed.username != APP_ROLE:
        return url
    return parsed.set(username=OWNER_ROLE, password=f"{OWNER_ROLE}-password").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def public_pem(private_key: rsa.RSAPrivateKey) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="session")
def make_token(private_key: rsa.RSAPrivateKey) -> TokenFactory:
    """Sign a token; keyword arguments override claims (None removes one)."""

    def make(
        sub: str = "alice",
        scope: str = ALL_SCOPES,
        *,
        headers: dict[str, Any] | None = None,
        key: Any = None,
        algorithm: str = "RS256",
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": sub,
            "scope": scope,
            "iat": now,
            "exp": now + 600,
            "jti": uuid.uuid4().hex,
        }
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not None}
        return jwt.encode(payload, key if key is not None else private_key, algorithm=algorithm, headers=headers)

    return make


@pytest.fixture
def settings_for(migrated_database: str, redis_url: str, public_pem: str) -> Callable[..., Settings]:
    """Settings for a test app (the service's own, `ServiceSettings`, as the service reads them);
    keyword arguments override any field."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "environment": "test",
            "database_url": migrated_database,
            "redis_url": redis_url,
            "jwt_public_key": public_pem,
            "jwt_issuer": ISSUER,
            "jwt_audience": AUDIENCE,
            "rate_limit_ip": "10000/minute",
            "rate_limit_subject": "10000/minute",
            "allowed_origins": ["https://app.example.com"],
            "audit_pseudonym_key": PSEUDONYM_KEY,
        }
        values.update(overrides)
        return ServiceSettings(_env_file=None, **values)

    return build


@pytest.fixture
def settings(settings_for: Callable[..., Settings]) -> Settings:
    return settings_for()


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


async def reset_state(runtime: Runtime) -> None:
    """Each test starts with empty tables and an empty Redis database."""
    async with runtime.engine.begin() as connection:
        for table in ("org_users", "permissions", "orgs"):
            await connection.execute(text(f"DELETE FROM {table}"))  # noqa: S608  # fixed table names
    if isinstance(runtime.store, RedisStore):
        await runtime.store.execute(b"FLUSHDB")


@asynccontextmanager
async def running(
    app: FastAPI, client: tuple[str, int] = ("203.0.113.7", 4711), *, reset: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """Start the app (lifespan included), reset its state, and give an HTTP client speaking to it in-process."""
    async with app.router.lifespan_context(app):
        if reset:
            await reset_state(app.state.runtime)
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            yield http


class ThreadBridge(httpx.BaseTransport):
    """A synchronous client's transport (the self-scan's, run in a worker thread) speaking to the
    app in-process, on the test's event loop."""

    def __init__(self, app: FastAPI) -> None:
        self.inner = httpx.ASGITransport(app=app, client=("203.0.113.9", 4711))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send() -> httpx.Response:
            response = await self.inner.handle_async_request(request)
            content = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=content)

        return anyio.from_thread.run(send)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with running(app) as http:
        yield http


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def audit_events() -> Iterator[list[logging.LogRecord]]:
    """The security events (`audit` logger) the service logs during the test."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.DEBUG)
    audit = logging.getLogger("audit")
    audit.addHandler(handler)
    yield records
    audit.removeHandler(handler)


@pytest.fixture(scope="session")
def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


ServiceFactory = Callable[..., ServiceProcess]


@pytest.fixture
def start_service(tmp_path: Path, migrated_database: str, redis_url: str, public_pem: str) -> Iterator[ServiceFactory]:
    """Start the service in its own uvicorn process on the session's database and redis-server
    (`serve=True`: through the `serve` command); other keyword arguments are settings (environment
    variables) on top of the test defaults. Every process started is stopped after the test."""
    started: list[ServiceProcess] = []

    def start(*, serve: bool = False, **settings: str) -> ServiceProcess:
        env = {**service_environment(migrated_database, redis_url, public_pem), **settings}
        process = ServiceProcess(env, tmp_path / f"service-{len(started)}.log", serve=serve)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, redis_url: str, public_pem: str) -> None:
    """The environment the operators' commands (`token revoke`, ...) read, pointing at the
    session's redis-server."""
    for name, value in {
        "ENVIRONMENT": "test",
        "REDIS_URL": redis_url,
        "JWT_PUBLIC_KEY": public_pem,
        "JWT_ISSUER": ISSUER,
        "JWT_AUDIENCE": AUDIENCE,
    }.items():
        monkeypatch.setenv(name, value)
