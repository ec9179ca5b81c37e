"""Production refuses to start with unsafe settings, naming each one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from {{ cookiecutter.package_name }}.config import DEFAULT_DATABASE_URL, Settings

from .conftest import DATABASE

SAFE_PRODUCTION = {
    "ENVIRONMENT": "production",
    "JWT_ISSUER": "https://issuer.example.com",
    "JWT_AUDIENCE": "{{ cookiecutter.project_slug }}",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "TRUSTED_HOSTS": "api.example.com",
    "ALLOWED_ORIGINS": "https://app.example.com",
    "TRUSTED_PROXIES": "10.0.0.0/8,2001:db8:ffff::/48",
    "AUDIT_PSEUDONYM_KEY": "production-audit-pseudonym-key-0123456789",
    # Read only by a service baked with the mtls option, which requires it in production.
    "MTLS_IDENTITIES": '{"spiffe://example.org/ns/default/sa/caller": ["orgs:read"]}',
    "MTLS_PROXY_ADDRESSES": "127.0.0.1",  # mtls: the sidecar that forwards client certificates
    "API_KEY_PEPPER": "production-api-key-pepper-0123456789abcdef",  # read only by the api_keys option
    # Not the development default, and (PostgreSQL) a role of its own with a password, over TLS.
    "DATABASE_URL": (
        "postgresql+asyncpg://service:production-db-password@db.example.com:5432/app?ssl=verify-full"
        if DATABASE == "postgresql"
        else "sqlite+aiosqlite:////data/app.db"
    ),
}


@pytest.fixture
def production(public_pem: str) -> dict[str, str]:
    return {**SAFE_PRODUCTION, "JWT_PUBLIC_KEY": public_pem.replace("\n", "\\n")}


def start(env: dict[str, str], code: str = "import {{ cookiecutter.package_name }}.main") -> subprocess.CompletedProcess[str]:
    """Import the ASGI app in a fresh process, as uvicorn would, with `env` as its only settings."""
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )


def test_safe_production_settings_start(production: dict[str, str]) -> None:
    result = start(production)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("change", "named"),
    [
        # No key and no JWKS URL: OIDC discovery, which needs an https:// issuer in production.
        ({"JWT_PUBLIC_KEY": "", "JWT_ISSUER": "http://issuer.example.com"}, "JWT_ISSUER"),
        ({"JWT_PUBLIC_KEY": "", "JWT_ISSUER": "issuer.example.com"}, "JWT_ISSUER"),
        ({"JWT_ISSUER": ""}, "JWT_ISSUER"),
        ({"JWT_AUDIENCE": ""}, "JWT_AUDIENCE"),
        ({"ALLOWED_ORIGINS": "*"}, "ALLOWED_ORIGINS"),
        ({"REDIS_URL": ""}, "REDIS_URL"),
        ({"TRUSTED_HOSTS": ""}, "TRUSTED_HOSTS"),
        ({"JWT_ALGORITHMS": "RS256,HS256"}, "JWT_ALGORITHMS"),
        ({"JWT_JWKS_URL": "http://issuer.example.com/jwks.json"}, "JWT_JWKS_URL"),
        ({"TRUSTED_HOSTS": "*"}, "TRUSTED_HOSTS"),
        ({"TRUSTED_HOSTS": "api.example.com,*"}, "TRUSTED_HOSTS"),
        ({"TRUSTED_PROXIES": "0.0.0.0/0,::/0"}, "TRUSTED_PROXIES"),
        ({"TRUSTED_PROXIES": "::/0"}, "TRUSTED_PROXIES"),
        ({"TRUSTED_PROXIES": "10.0.0.0/8,0.0.0.0/1,128.0.0.0/1"}, "TRUSTED_PROXIES"),
        ({"TRUSTED_PROXIES": "2001:db8::/16"}, "TRUSTED_PROXIES"),
        ({"ALLOWED_ORIGINS": "http://app.example.com"}, "ALLOWED_ORIGINS"),
        ({"ALLOWED_ORIGINS": "https://app.example.com,http://localhost:3000"}, "ALLOWED_ORIGINS"),
        ({"AUDIT_PSEUDONYM_KEY": ""}, "AUDIT_PSEUDONYM_KEY"),
        ({"AUDIT_PSEUDONYM_KEY": "too-short"}, "AUDIT_PSEUDONYM_KEY"),
        ({"DATABASE_URL": ""}, "DATABASE_URL"),  # the development default
        # Sender-constrained tokens: a proof replayed to another replica while Redis is down.
        (
            {
                "REQUIRE_SENDER_CONSTRAINED_TOKENS": "true",
                "RATE_LIMIT_FAILURE_MODE": "open",
                "RATE_LIMIT_FAILURE_MODE_ACKNOWLEDGED": "true",
            },
            "REQUIRE_SENDER_CONSTRAINED_TOKENS",
        ),
        ({"DPOP_ALGORITHMS": "ES256,HS256"}, "DPOP_ALGORITHMS"),
        ({"DPOP_NONCE_SECRET": "too-short"}, "DPOP_NONCE_SECRET"),
    ],
)
def test_production_refuses_unsafe_setting_and_names_it(
    production: dict[str, str], change: dict[str, str], named: str
) -> None:
    env = {k: v for k, v in {**production, **change}.items() if v}
    result = start(env)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()
    assert len(message) == 1, result.stderr
    assert "refusing to start" in message[0]
    assert named in message[0]
    assert "Traceback" not in result.stderr


CHECK_CONFIG = "from {{ cookiecutter.package_name }}.cli import main; raise SystemExit(main(['check-config']))"


def test_check_config_accepts_safe_production_settings(production: dict[str, str]) -> None:
    result = start(production, CHECK_CONFIG)
    assert result.returncode == 0, result.stderr
    assert "configuration ok (production)" in result.stdout


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"TRUSTED_HOSTS": "*"}, "TRUSTED_HOSTS"),
        ({"TRUSTED_PROXIES": "0.0.0.0/0,::/0"}, "TRUSTED_PROXIES"),
        ({"ALLOWED_ORIGINS": "http://app.example.com"}, "ALLOWED_ORIGINS"),
        ({"AUDIT_PSEUDONYM_KEY": ""}, "AUDIT_PSEUDONYM_KEY"),
    ],
)
def test_check_config_refuses_what_production_refuses(
    production: dict[str, str], change: dict[str, str], named: str
) -> None:
    result = start({k: v for k, v in {**production, **change}.items() if v}, CHECK_CONFIG)
    assert result.returncode == 1
    assert "refusing to start" in result.stderr and named in result.stderr
    assert "configuration ok" not in result.stdout


def test_development_keeps_loopback_http_origins_and_any_proxy_range(public_pem: str) -> None:
    development = {
        "JWT_ISSUER": "https://issuer.example.com",
        "JWT_AUDIENCE": "{{ cookiecutter.project_slug }}",
        "JWT_PUBLIC_KEY": public_pem.replace("\n", "\\n"),
        "ALLOWED_ORIGINS": "http://localhost:3000,http://127.0.0.1:5173",
        "TRUSTED_PROXIES": "0.0.0.0/0",
    }
    result = start(development, CHECK_CONFIG)
    assert result.returncode == 0, result.stderr
    assert "configuration ok (development)" in result.stdout


def test_docs_are_off_in_production_unless_enabled(production: dict[str, str]) -> None:
    show = (
        "from {{ cookiecutter.package_name }}.main import app; "
        "paths = (getattr(r, 'path', '') for r in app.routes); "
        "print(*sorted(p for p in paths if p.startswith(('/docs', '/openapi', '/redoc'))))"
    )
    off = start(production, show)
    on = start({**production, "DOCS_ENABLED": "true"}, show)
    assert off.stdout.split() == [], off.stderr
    assert on.stdout.split() == [
        "/docs",
        "/docs/favicon-32x32.png",
        "/docs/swagger-initializer.js",
        "/docs/swagger-ui-bundle.js",
        "/docs/swagger-ui.css",
        "/openapi.json",
    ], on.stderr


# --- Redis: who may write revocations and lockouts; open mode ---------------------------------------


def production_settings(public_pem: str, **changes: str) -> Settings:
    """The safe production settings with `changes` (environment variable names), read in-process."""
    env = {**SAFE_PRODUCTION, "JWT_PUBLIC_KEY": public_pem, **changes}
    return Settings(_env_file=None, **{name.lower(): value for name, value in env.items()})  # type: ignore[arg-type]


REMOTE_WITHOUT_PASSWORD = [
    "redis://redis:6379/0",
    "rediss://redis.internal:6380/0",
    "redis://app@10.1.2.3:6379/0",  # an ACL user name without its password
    "redis+sentinel://127.0.0.1:26379,s2:26379/mymaster",
    "rediss+sentinel://s1,s2,s3/mymaster/0",
    "redis+cluster://10.0.0.5:7000,10.0.0.6:7000",
    "rediss+cluster://n1",
]


@pytest.mark.parametrize("url", REMOTE_WITHOUT_PASSWORD)
def test_production_refuses_a_remote_redis_without_a_password(public_pem: str, url: str) -> None:
    problems = production_settings(public_pem, REDIS_URL=url).production_problems()
    assert [problem.split(":")[0] for problem in problems] == ["REDIS_URL"]
    assert "REDIS_ALLOW_UNAUTHENTICATED=true" in problems[0]
    assert url not in problems[0]


@pytest.mark.parametrize("url", REMOTE_WITHOUT_PASSWORD)
def test_the_owner_may_accept_a_remote_redis_without_a_password_explicitly(public_pem: str, url: str) -> None:
    settings = production_settings(public_pem, REDIS_URL=url, REDIS_ALLOW_UNAUTHENTICATED="true")
    assert settings.production_problems() == []


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://localhost/0",
        "redis://[::1]:6379/0",
        "unix:///run/redis/redis.sock",
        "rediss://:s3cret@redis.internal:6380/0",
        "redis://app:s3cret@redis:6379/0",
        "redis://redis:6379/0?password=s3cret",
        "rediss+sentinel://app:s3cret@s1,s2,s3/mymaster",
        "redis+sentinel://127.0.0.1:26379,[::1]:26380/mymaster",
        "rediss+cluster://:s3cret@n1:7000,n2:7000",
    ],
)
def test_production_accepts_a_loopback_or_password_protected_redis(public_pem: str, url: str) -> None:
    assert production_settings(public_pem, REDIS_URL=url).production_problems() == []


def test_production_refusal_of_an_unprotected_redis_names_the_url_and_the_override(
    production: dict[str, str],
) -> None:
    result = start({**production, "REDIS_URL": "redis://redis:6379/0"}, CHECK_CONFIG)
    assert result.returncode == 1
    assert "REDIS_URL" in result.stderr and "REDIS_ALLOW_UNAUTHENTICATED" in result.stderr
    assert "redis://redis" not in result.stderr  # the URL may hold a password: never repeated


def test_production_refuses_open_failure_mode_unless_acknowledged(production: dict[str, str]) -> None:
    refused = start({**production, "RATE_LIMIT_FAILURE_MODE": "open"}, CHECK_CONFIG)
    assert refused.returncode == 1
    assert "RATE_LIMIT_FAILURE_MODE" in refused.stderr
    assert "RATE_LIMIT_FAILURE_MODE_ACKNOWLEDGED=true" in refused.stderr
    accepted = start(
        {**production, "RATE_LIMIT_FAILURE_MODE": "open", "RATE_LIMIT_FAILURE_MODE_ACKNOWLEDGED": "true"}, CHECK_CONFIG
    )
    assert accepted.returncode == 0, accepted.stderr


CANARY = "db-password-canary-7f3a"


DATABASE_URLS = [
    (DEFAULT_DATABASE_URL, "DATABASE_URL: required in production (the default is a development database)"),
    (f"postgresql+asyncpg://postgres:{CANARY}@db.example.com/app", "connects as the superuser postgres"),
    ("postgresql+asyncpg://db.example.com/app", "names no role"),
    ("postgresql+asyncpg://service@db.example.com/app", "DATABASE_URL: no password for a database reached over"),
    ("postgres+asyncpg:/nonsense", "DATABASE_URL: not a database URL"),
    (f"postgresql+asyncpg://service:{CANARY}@db.example.com/app?sslmode=verify-full", "asyncpg takes ?ssl="),
    # Accepted: a role of its own with a password (TLS as README, Database access shows), a
    # Unix socket (peer authentication needs no password), a SQLite file of production's own.
    (f"postgresql+asyncpg://service:{CANARY}@db.example.com:5432/app?ssl=verify-full", None),
    ("postgresql+asyncpg://service@/app?host=/run/postgresql", None),
    ("sqlite+aiosqlite:////data/app.db", None),
]
# A bake carries only its own database's driver: another database's URL is refused before these
# checks (test_a_database_url_whose_driver_is_not_installed_is_refused_naming_it).
OTHER_DATABASE = "sqlite+" if DATABASE == "postgresql" else "postgresql+"


@pytest.mark.parametrize(
    ("url", "refusal"), [(url, refusal) for url, refusal in DATABASE_URLS if not url.startswith(OTHER_DATABASE)]
)
def test_production_refuses_a_development_or_superuser_database_url(
    public_pem: str, url: str, refusal: str | None
) -> None:
    settings = Settings(
        _env_file=None,
        environment="production",
        database_url=url,
        jwt_public_key=public_pem,
        jwt_issuer=SAFE_PRODUCTION["JWT_ISSUER"],
        jwt_audience=SAFE_PRODUCTION["JWT_AUDIENCE"],
        redis_url=SAFE_PRODUCTION["REDIS_URL"],
        trusted_hosts=["api.example.com"],
        audit_pseudonym_key=SAFE_PRODUCTION["AUDIT_PSEUDONYM_KEY"],
    )
    problems = settings.production_problems()
    assert [p for p in problems if refusal and refusal in p] == ([] if refusal is None else problems)
    assert CANARY not in " ".join(problems)
    development = settings.model_copy(update={"environment": "development"})
    assert development.production_problems() == []


def test_a_database_url_whose_driver_is_not_installed_is_refused_naming_it(production: dict[str, str]) -> None:
    """A bake carries its own database's driver; a URL for another driver is a clear error naming
    the variable and the driver, not a traceback, and never repeats the URL."""
    url = "mysql+aiomysql://service:s3cret-canary@db.example.com/app"
    result = start({**production, "DATABASE_URL": url}, CHECK_CONFIG)
    assert result.returncode == 1
    assert "DATABASE_URL: its driver 'aiomysql' is not installed in this service" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "s3cret-canary" not in result.stderr
