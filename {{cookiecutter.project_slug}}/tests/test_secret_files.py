"""Secrets from mounted files (`<NAME>_FILE`): refused when ambiguous or exposed, re-read when
rotated, and never shown in logs, problem documents, `check-config` output or readiness."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from redis.asyncio import Redis

from .conftest import AUDIENCE, DATABASE, ISSUER, TokenFactory, bearer, principal, pseudonym
from .servers import ServiceProcess
from .test_settings import SAFE_PRODUCTION, start

CANARY = "canary-secret-5f2b9c0e7d1a4e3b8c6f"
SECRETS = ["JWT_PUBLIC_KEY", "DATABASE_URL", "REDIS_URL", "AUDIT_PSEUDONYM_KEY"]
ServiceFactory = Callable[..., ServiceProcess]


def secret_file(directory: Path, name: str, content: str, mode: int = 0o400) -> str:
    path = directory / name
    if path.exists():
        path.chmod(0o600)
    path.write_text(content + "\n")
    path.chmod(mode)
    return str(path)


def remove(path: str) -> None:
    Path(path).unlink()


def expose(paths: Iterable[str]) -> None:
    """Make the files readable by every user of the host."""
    for path in paths:
        Path(path).chmod(0o444)


def log_of(process: ServiceProcess) -> str:
    return Path(process.log_path).read_text()


def check_config(env: dict[str, str]) -> tuple[int, str]:
    result = start(env, "import sys; from {{ cookiecutter.package_name }}.cli import main; sys.exit(main(['check-config']))")
    return result.returncode, result.stdout + result.stderr


def pem(key: rsa.RSAPrivateKey) -> str:
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return public.decode()


@pytest.fixture
def production_files(public_pem: str, tmp_path: Path) -> dict[str, str]:
    """The safe production settings, every secret from a file (the canary in each that can hold it)."""
    env = {name: value for name, value in SAFE_PRODUCTION.items() if name not in SECRETS}
    values = {
        "JWT_PUBLIC_KEY": public_pem,
        # The baked database's driver (check-config builds the app, and with it the engine).
        "DATABASE_URL": (
            f"postgresql+asyncpg://service:{CANARY}@db.example.com:5432/app?ssl=verify-full"
            if DATABASE == "postgresql"
            else f"sqlite+aiosqlite:///./{CANARY}.db"
        ),
        "REDIS_URL": f"redis://canary:{CANARY}@127.0.0.1:6379/0",
        "AUDIT_PSEUDONYM_KEY": f"{CANARY}-audit-pseudonym-key",
    }
    for name, value in values.items():
        env[f"{name}_FILE"] = secret_file(tmp_path, name.lower(), value)
    return env


def test_production_starts_with_every_secret_from_a_file(production_files: dict[str, str]) -> None:
    assert check_config(production_files) == (0, "configuration ok (production)\n")


@pytest.mark.parametrize("name", SECRETS)
def test_a_secret_and_its_file_together_are_refused_naming_the_pair(
    production_files: dict[str, str], name: str
) -> None:
    code, output = check_config({**production_files, name: "also-set-directly-0123456789abcdefghij"})
    assert code == 1
    assert f"set {name} or {name}_FILE, not both" in output


@pytest.mark.parametrize("problem", ["missing", "empty", "world-readable"])
@pytest.mark.parametrize("name", SECRETS)
def test_a_missing_empty_or_world_readable_file_is_refused_in_production_naming_it(
    production_files: dict[str, str], tmp_path: Path, name: str, problem: str
) -> None:
    path = production_files[f"{name}_FILE"]
    if problem == "missing":
        path = str(tmp_path / "nowhere")
    elif problem == "empty":
        path = secret_file(tmp_path, "empty", "")
    else:
        expose([path])
    code, output = check_config({**production_files, f"{name}_FILE": path})
    assert code == 1
    assert f"{name}_FILE: {path}" in output


def test_a_world_readable_file_is_accepted_outside_production(production_files: dict[str, str]) -> None:
    expose([production_files["AUDIT_PSEUDONYM_KEY_FILE"]])
    assert check_config({**production_files, "ENVIRONMENT": "development"})[0] == 0


# --- rotation in the running service ------------------------------------------------------------


@pytest.fixture
def service(tmp_path: Path, migrated_database: str, redis_url: str) -> Iterator[ServiceFactory]:
    started: list[ServiceProcess] = []

    def start_service(**settings: str) -> ServiceProcess:
        env = {
            "ENVIRONMENT": "test",
            "DATABASE_URL": migrated_database,
            "REDIS_URL": redis_url,
            "JWT_ISSUER": ISSUER,
            "JWT_AUDIENCE": AUDIENCE,
            "RATE_LIMIT_IP": "100000/minute",
            "RATE_LIMIT_SUBJECT": "100000/minute",
            "SECRET_FILE_REFRESH_SECONDS": "1",
            **settings,
        }
        process = ServiceProcess(env, tmp_path / f"service-{len(started)}.log")
        started.append(process)
        return process

    yield start_service
    for process in started:
        process.stop()


async def status(http: httpx.AsyncClient, token: str) -> int:
    response = await http.post("/api/v1/orgs", json={"name": "rotated"}, headers=bearer(token))
    return response.status_code


async def eventually(http: httpx.AsyncClient, token: str, expected: int, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while (code := await status(http, token)) != expected and time.monotonic() < deadline:  # noqa: ASYNC110  # polls the service
        await asyncio.sleep(0.2)
    assert code == expected


async def test_a_rotated_public_key_file_is_trusted_without_a_restart(
    service: ServiceFactory, tmp_path: Path, private_key: rsa.RSAPrivateKey, make_token: TokenFactory
) -> None:
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = secret_file(tmp_path, "jwt.pem", pem(private_key), 0o600)
    process = service(JWT_PUBLIC_KEY_FILE=key_file)
    old_token, new_token = make_token("alice"), make_token("alice", key=new_key)
    async with httpx.AsyncClient(base_url=process.base_url, timeout=10) as http:
        assert await status(http, old_token) == 201  # verified, and now in the verified-token cache
        assert await status(http, new_token) == 401
        secret_file(tmp_path, "jwt.pem", pem(new_key), 0o600)
        await eventually(http, new_token, 201)
        assert await status(http, old_token) == 401  # the cached verification went with the old key

        remove(key_file)  # the mount disappears: the last good key keeps serving
        await asyncio.sleep(3.5)
        assert await status(http, new_token) == 201
    log = log_of(process)
    assert log.count("secret_file_unusable") == 1, log
    assert "JWT_PUBLIC_KEY_FILE" in log


# --- the canary ---------------------------------------------------------------------------------


@pytest.fixture
async def canary_redis_url(redis: Redis, redis_url: str) -> AsyncIterator[str]:
    """The test Redis reached as a user whose password is the canary."""
    await redis.execute_command("ACL", "SETUSER", "canary", "on", f">{CANARY}", "~*", "&*", "+@all")  # type: ignore[no-untyped-call]
    yield redis_url.replace("redis://", f"redis://canary:{CANARY}@")
    await redis.execute_command("ACL", "DELUSER", "canary")  # type: ignore[no-untyped-call]


async def test_a_canary_secret_never_reaches_logs_problems_check_config_or_readiness(
    service: ServiceFactory,
    tmp_path: Path,
    public_pem: str,
    canary_redis_url: str,
    make_token: TokenFactory,
    production_files: dict[str, str],
) -> None:
    pseudonym_key = f"{CANARY}-audit-pseudonym-key"
    process = service(
        JWT_PUBLIC_KEY=public_pem,
        REDIS_URL="",
        REDIS_URL_FILE=secret_file(tmp_path, "redis_url", canary_redis_url),
        AUDIT_PSEUDONYM_KEY_FILE=secret_file(tmp_path, "pseudonym", pseudonym_key),
        LOG_LEVEL="DEBUG",
    )
    seen: list[str] = []
    async with httpx.AsyncClient(base_url=process.base_url, timeout=10) as http:
        token = make_token("alice")
        requests = [
            http.post("/api/v1/orgs", json={"name": "canary"}, headers=bearer(token)),
            http.post("/api/v1/orgs", json={"name": "canary", "extra": 1}, headers=bearer(token)),
            http.get("/api/v1/orgs", headers=bearer(token + "x")),
            http.get("/api/v1/nowhere"),
            http.get("/health/ready"),
            http.get("/health/live"),
        ]
        responses = [await request for request in requests]
        seen += [f"{response.status_code} {response.headers} {response.text}" for response in responses]
        assert responses[0].status_code == 201, seen[0]
        assert responses[4].json()["checks"]["redis"] == "ok"  # REDIS_URL came from its file
    process.stop()
    log = log_of(process)
    assert pseudonym(principal("alice"), pseudonym_key) in log  # and the audit pseudonyms are keyed by the file's key
    seen.append(log)
    # check-config, accepting and refusing production environments whose secret files hold the canary
    seen.append(check_config(production_files)[1])
    seen.append(check_config({**production_files, "TRUSTED_HOSTS": "*"})[1])
    seen.append(check_config({**production_files, "AUDIT_PSEUDONYM_KEY": pseudonym_key})[1])
    expose(production_files[f"{name}_FILE"] for name in SECRETS)
    seen.append(check_config(production_files)[1])
    assert "refusing to start" in seen[-1]
    leaks = [text for text in seen if CANARY in text]
    assert not leaks, leaks
