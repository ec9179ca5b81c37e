"""The baked service's security self-scan passes against a correctly configured instance
and fails, naming the check, against deliberately broken ones.

Every instance is the default bake run as a real uvicorn process on a free loopback
port, with a real redis-server and a migrated SQLite file; the broken ones are built by
a small module (written below) that calls the service's `create_app` and then removes
or replaces one piece, without editing the service's code.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from bake import VARIANTS, report, run

VARIANT = VARIANTS["default"]
PACKAGE = VARIANT.package
ISSUER = "https://issuer.scan.test"
AUDIENCE = VARIANT.slug
SCOPES = "orgs:read orgs:write users:read users:write"
ALLOWED_ORIGIN = "https://app.example.com"
STARTUP_SECONDS = 30.0
CHECK_NAMES = {"headers", "cors", "authn", "sender-constraint", "bola", "errors", "health", "ratelimit"}
# Skipped unless asked: a deployment that serves plain bearer tokens by choice passes.
OPT_IN = {"sender-constraint"}

# The default variant only: it is installed once for this module and for
# test_baked_service.py's default run alike (pytest groups tests by this parameter).
pytestmark = pytest.mark.parametrize("installed_project", ["default"], indirect=True)

BROKEN_INSTANCES = f'''
"""Deliberately broken instances of the baked service, each one factory."""

import inspect
import os
import time
import uuid

import jwt
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError

from {PACKAGE}.api import deps
from {PACKAGE}.app import create_app
from {PACKAGE}.security.ratelimit import RateLimit
from {PACKAGE}.security.transport import SecurityHeaders


def _without(layer):
    app = create_app()
    app.pipeline = [m for m in app.pipeline if m.cls is not layer]
    return app


def without_security_headers():
    return _without(SecurityHeaders)


def without_rate_limits():
    return _without(RateLimit)


def accepting_unverified_tokens():
    """Believes any readable token's claims: never checks its signature, algorithm or expiry.

    The claims are re-signed with the real private key and handed to the real verifier, so the
    principal is built exactly as the service builds it.
    """
    app = create_app()
    verifier = app.state.runtime.verifier
    real_verify = verifier.verify
    with open(os.environ["SCAN_PRIVATE_KEY_FILE"], "rb") as key_file:
        key = key_file.read()

    async def believe_any(token):
        try:
            claims = jwt.decode(token, options={{"verify_signature": False}})
        except jwt.PyJWTError:
            return await real_verify(token)  # the real refusal, for what cannot even be read
        now = int(time.time())
        resigned = jwt.encode({{**claims, "iat": now, "exp": now + 60}}, key, algorithm="RS256")
        return await real_verify(resigned.encode() if isinstance(token, bytes) else resigned)

    verifier.verify = believe_any
    return app


async def _any_org(org_id: uuid.UUID) -> uuid.UUID:
    return org_id


def without_object_authorization():
    """Every route policy that takes an org id is overridden to let anyone in."""
    app = create_app()
    for alias in vars(deps).values():
        for marker in getattr(alias, "__metadata__", ()):
            check = getattr(marker, "dependency", None)
            if check is not None and "org_id" in inspect.signature(check).parameters:
                app.dependency_overrides[check] = _any_org
    return app


def with_library_validation_errors():
    app = create_app()
    app.add_exception_handler(RequestValidationError, request_validation_exception_handler)
    return app
'''


def load_servers(project: Path) -> ModuleType:
    """The baked suite's tests/servers.py (redis-server and free ports), by file path."""
    spec = importlib.util.spec_from_file_location(
        "baked_servers", project / "tests" / "servers.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclasses look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


@dataclass
class Bench:
    """What every instance shares: keys, tokens, a migrated database and a Redis server."""

    project: Path
    workdir: Path
    servers: ModuleType
    redis_port: int
    public_key: str
    database_url: str
    alice: str
    bob: str
    redis_databases: Iterator[int]

    def env(self, **overrides: str) -> dict[str, str]:
        base = {
            key: value
            for key, value in os.environ.items()
            if key in ("PATH", "HOME", "LANG", "VIRTUAL_ENV", "SYSTEMROOT")
        }
        # Each instance its own Redis database: a burst's quota must not leak into the next.
        redis_url = f"redis://127.0.0.1:{self.redis_port}/{next(self.redis_databases)}"
        settings = {
            "ENVIRONMENT": "development",
            "DATABASE_URL": self.database_url,
            "REDIS_URL": redis_url,
            "JWT_PUBLIC_KEY": self.public_key,
            "JWT_ISSUER": ISSUER,
            "JWT_AUDIENCE": AUDIENCE,
            "ALLOWED_ORIGINS": ALLOWED_ORIGIN,
            "AUDIT_PSEUDONYM_KEY": "scan-test-audit-pseudonym-key-0123456789",
            "LOG_LEVEL": "WARNING",
            "SCAN_PRIVATE_KEY_FILE": str(self.workdir / "keys" / "private.pem"),
        }
        return {**base, **settings, **overrides}

    @contextmanager
    def serving(self, factory: str | None = None, **settings: str) -> Iterator[str]:
        """Run an instance (the service's own `serve`, or a broken factory); its URL."""
        port = self.servers.free_port()
        if factory is None:
            command = python(
                "-m",
                f"{PACKAGE}.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            )
        else:
            command = python(
                "-m", "uvicorn", f"broken_instances:{factory}", "--factory",
                "--app-dir", str(self.workdir), "--host", "127.0.0.1", "--port", str(port),
                "--no-proxy-headers", "--no-server-header", "--log-level", "warning",
            )  # fmt: skip
        log_path = self.workdir / f"serve-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=self.env(**settings),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_live(url, process, log_path)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_until_live(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"{url}/health/live", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"the instance at {url} did not start:\n{log.read_text()}")


def checked(command: list[str], cwd: Path, env: Mapping[str, str] | None = None) -> str:
    result = subprocess.run(
        command,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, report(result)
    return result.stdout.strip()


@pytest.fixture(scope="module")
def bench(
    installed_project: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bench]:
    workdir = tmp_path_factory.mktemp("scan")
    servers = load_servers(installed_project)
    redis = servers.start_redis(workdir / "redis")
    cli = python("-m", f"{PACKAGE}.cli")
    checked([*cli, "keys", "generate", "--out", str(workdir / "keys")], cwd=workdir)
    database_url = f"sqlite+aiosqlite:///{workdir / 'scan.db'}"
    migrate_env = {**os.environ, "DATABASE_URL": database_url}
    checked(python("-m", "alembic", "upgrade", "heads"), installed_project, migrate_env)
    mint = [
        *cli, "token", "mint", "--private-key", str(workdir / "keys" / "private.pem"),
        "--issuer", ISSUER, "--audience", AUDIENCE, "--scope", SCOPES, "--sub",
    ]  # fmt: skip
    (workdir / "broken_instances.py").write_text(BROKEN_INSTANCES)
    yield Bench(
        project=installed_project,
        workdir=workdir,
        servers=servers,
        redis_port=redis.port,
        public_key=(workdir / "keys" / "public.pem").read_text(),
        database_url=database_url,
        alice=checked([*mint, "alice"], cwd=workdir),
        bob=checked([*mint, "bob"], cwd=workdir),
        redis_databases=itertools.count(1),
    )
    redis.stop()


def scan(
    bench: Bench, url: str, *extra: str, second_token: bool = True
) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, object]], dict]:
    """Run the console script with --json; the process, the checks by name, the report."""
    script = Path(sys.executable).parent / f"{PACKAGE}-scan"
    command = [str(script), "--url", url, "--token", bench.alice, "--json", *extra]
    if second_token:
        command += ["--second-token", bench.bob]
    result = run(command, cwd=bench.workdir, timeout=180)
    try:
        document = json.loads(result.stdout)
    except ValueError:
        raise AssertionError(report(result)) from None
    checks = {check["name"]: check for check in document["checks"]}
    return result, checks, document


def failing(checks: Mapping[str, Mapping[str, object]]) -> set[str]:
    return {name for name, check in checks.items() if check["status"] == "FAIL"}


def test_scan_passes_every_check_against_a_correctly_configured_service(
    bench: Bench,
) -> None:
    with bench.serving() as url:
        result, checks, document = scan(
            bench, url, "--origin", ALLOWED_ORIGIN, "--allow-burst"
        )

    assert result.returncode == 0, report(result)
    assert set(checks) == CHECK_NAMES
    assert {name: check["status"] for name, check in checks.items()} == {
        **dict.fromkeys(CHECK_NAMES - OPT_IN, "PASS"),
        **dict.fromkeys(OPT_IN, "SKIP"),
    }, report(result)
    assert checks["headers"]["details"]["lowest_score"] >= 100
    assert "429 with Retry-After" in checks["ratelimit"]["reason"]
    assert document["requests"] <= 400


def test_scan_prints_one_line_per_check(bench: Bench) -> None:
    with bench.serving() as url:
        script = Path(sys.executable).parent / f"{PACKAGE}-scan"
        result = run(
            [str(script), "--url", url, "--token", bench.alice], cwd=bench.workdir
        )

    assert result.returncode == 0, report(result)
    lines = result.stdout.splitlines()
    for name in CHECK_NAMES - {"bola"} - OPT_IN:
        assert sum(line.split()[:2] == ["PASS", name] for line in lines) == 1, lines
    assert ["SKIP", "bola"] in [line.split()[:2] for line in lines]


def test_scan_checks_that_a_plain_bearer_token_is_refused_where_sender_constraint_is_required(
    bench: Bench,
) -> None:
    with bench.serving(REQUIRE_SENDER_CONSTRAINED_TOKENS="true") as url:
        _, required, _ = scan(bench, url, "--plain-token", bench.alice)
    with bench.serving() as url:
        _, served, _ = scan(bench, url, "--plain-token", bench.alice)
    assert required["sender-constraint"]["status"] == "PASS", required["sender-constraint"]
    assert served["sender-constraint"]["status"] == "FAIL"
    assert "not 401" in str(served["sender-constraint"]["reason"])


def test_scan_passes_against_production_with_docs_off_given_the_openapi_file(
    bench: Bench,
) -> None:
    with (
        bench.serving() as url,
        urllib.request.urlopen(f"{url}/openapi.json", timeout=5) as response,
    ):
        (bench.workdir / "openapi.json").write_bytes(response.read())
    openapi = str(bench.workdir / "openapi.json")

    with bench.serving(ENVIRONMENT="production", TRUSTED_HOSTS="127.0.0.1") as url:
        result, checks, _ = scan(bench, url, "--openapi", openapi)

    assert result.returncode == 0, report(result)
    assert checks["bola"]["details"]["source"] == openapi
    assert not failing(checks), report(result)


# factory (None: the service's own `serve`), settings, {failing check: words of its reason}
BROKEN = [
    pytest.param(
        None, {"ALLOWED_ORIGINS": "*"}, {"cors": "wildcard"}, id="cors-wildcard"
    ),
    pytest.param(
        "without_security_headers",
        {},
        {"headers": "csp-not-implemented"},
        id="no-headers-layer",
    ),
    pytest.param(
        "accepting_unverified_tokens",
        {},
        {"authn": "alg none: answered"},
        id="unverified-tokens",
    ),
    pytest.param(
        "without_object_authorization",
        {},
        {"bola": "the second token got 200"},
        id="authz-bypassed",
    ),
    pytest.param(
        "without_rate_limits", {}, {"ratelimit": "no RateLimit"}, id="no-rate-limits"
    ),
    pytest.param(
        "with_library_validation_errors",
        {},
        {"errors": "not a problem document"},
        id="library-error-bodies",
    ),
    # Redis gone, failing open: not ready, and no RateLimit fields while the store is down.
    pytest.param(
        None,
        {"REDIS_URL": "redis://127.0.0.1:9/0", "RATE_LIMIT_FAILURE_MODE": "open"},
        {"health": "redis fail", "ratelimit": "no RateLimit"},
        id="redis-down",
    ),
]


@pytest.mark.parametrize(("factory", "settings", "expected"), BROKEN)
def test_scan_fails_the_named_check_against_a_broken_instance(
    bench: Bench,
    factory: str | None,
    settings: dict[str, str],
    expected: dict[str, str],
) -> None:
    with bench.serving(factory, **settings) as url:
        result, checks, _ = scan(bench, url)

    assert result.returncode == 1, report(result)
    assert failing(checks) == set(expected), report(result)
    for name, words in expected.items():
        assert words in str(checks[name]["reason"]), report(result)


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://127.0.0.1/", "redis://127.0.0.1:6379/0", "/health"],
)
def test_scan_refuses_a_url_that_is_not_http(bench: Bench, url: str) -> None:
    script = Path(sys.executable).parent / f"{PACKAGE}-scan"
    result = run([str(script), "--url", url, "--token", bench.alice], cwd=bench.workdir)

    assert result.returncode == 2, report(result)
    assert "http" in result.stderr
    assert result.stdout == ""
