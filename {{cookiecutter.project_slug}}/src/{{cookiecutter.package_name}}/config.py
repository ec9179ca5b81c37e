"""Settings from the environment. The variable names are part of the service's contract."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Annotated, Any, Literal, TypeVar

from limits import RateLimitItem, parse
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from .secret_files import values_from_files
from .store.topology import Topology, parse_redis_url

DEFAULT_DATABASE_URL = "{{ cookiecutter.__database_url }}"
SERVICE_NAME = "{{ cookiecutter.project_slug }}"

# Algorithms with a public verification key. HS*, and "none", can never be configured.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
CommaList = Annotated[list[str], NoDecode]

# TRUSTED_PROXIES entries wider than these are refused in production: a proxy fleet lives in one
# private range (10.0.0.0/8 is the widest), and a wider entry believes forwarding headers from
# most of the internet, i.e. lets clients choose their own address.
MIN_TRUSTED_PROXY_PREFIX = {4: 8, 6: 32}
# An `acr` value as STEP_UP_ACR_VALUES may list it (RFC 9470's acr_values is space-separated, quoted).
_ACR_VALUE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,255}")


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class ConfigError(Exception):
    """The environment describes a service that must not start. The message names the variable."""


def _none_if_empty(cls: type, value: object) -> object:
    return None if value == "" else value


def empty_is_unset(*fields: str) -> Any:
    """A validator for a settings class: an empty variable (`NAME=`, as compose and Kubernetes
    write an unset one) counts as unset for `fields`."""
    return field_validator(*fields, mode="before")(_none_if_empty)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    environment: Literal["development", "test", "production"] = "development"
    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str | None = None  # its scheme picks the topology: one node, Sentinel or Cluster (topology.py)
    redis_tls_ca_file: str | None = None
    redis_tls_cert_file: str | None = None
    redis_tls_key_file: str | None = None
    # `<NAME>_FILE`: a file holding the secret (secret_files.py); read instead of NAME, never with it.
    database_url_file: str | None = None
    redis_url_file: str | None = None
    jwt_public_key_file: str | None = None
    audit_pseudonym_key_file: str | None = None
    secret_file_refresh_seconds: float = Field(10, ge=1, le=3600)

    jwt_public_key: str | None = None
    jwt_jwks_url: str | None = None
    jwt_issuer: str = Field(min_length=1)
    jwt_audience: str = Field(min_length=1)
    jwt_algorithms: CommaList = ["RS256"]
    jwt_leeway_seconds: int = Field(30, ge=0, le=300)
    jwt_max_token_lifetime_seconds: int = Field(900, ge=60, le=86400)
    jwt_jwks_refresh_seconds: int = Field(300, ge=10)
    jwt_jwks_min_refetch_seconds: int = Field(30, ge=1)

    allowed_origins: CommaList = []
    trusted_hosts: CommaList = []
    trusted_proxies: CommaList = []
    forwarded_header: Literal["X-Forwarded-For", "Forwarded"] = "X-Forwarded-For"

    rate_limit_ip: str = "100/15minutes"
    rate_limit_subject: str = "1000/15minutes"
    rate_limit_ipv6_prefix: int = Field(64, ge=32, le=128)
    rate_limit_failure_mode: Literal["closed", "open"] = "closed"
    lockout_failures: int = Field(20, ge=1, le=10_000)
    lockout_window_seconds: int = Field(300, ge=1, le=86400)
    lockout_seconds: int = Field(60, ge=1, le=86400)
    lockout_max_seconds: int = Field(3600, ge=1, le=604800)
    redis_timeout_seconds: float = Field(0.5, gt=0, le=10)
    database_read_pool_size: int = Field(4, ge=1, le=1000)
    database_pool_size: int = Field(10, ge=1, le=1000)  # PostgreSQL: the engine's (db.create_engine)
    database_max_overflow: int = Field(10, ge=0, le=1000)
    redis_pool_size: int = Field(50, ge=1, le=10_000)
    redis_pool_timeout_seconds: float = Field(5.0, gt=0, le=60)

    max_body_bytes: int = Field(1_048_576, ge=1024)
    body_read_timeout_seconds: float = Field(30, gt=0, le=600)
    docs_enabled: bool | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    trace_context_trust: Literal["always", "proxies", "never"] = "proxies"
    audit_db_enabled: bool = False
    audit_masked_fields: CommaList = ["email", "phone"]
    audit_pseudonym_key: SecretStr | None = Field(None, min_length=32)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # uvicorn's own limits, passed by `serve` (a reverse proxy in front does the rest, deploy/nginx/).
    server_timeout_keep_alive_seconds: int = Field(5, ge=1, le=300)
    server_limit_concurrency: int = Field(1000, ge=10)
    server_backlog: int = Field(2048, ge=16)
    server_timeout_graceful_shutdown_seconds: int = Field(30, ge=1, le=600)
    # SIGTERM: not ready, still serving, for this long before the graceful shutdown (shutdown.py).
    shutdown_drain_seconds: float = Field(5, ge=0, le=300)
    server_h11_max_incomplete_event_size: int = Field(16384, ge=4096, le=1_048_576)
    # Observability (README "Observability"); OpenTelemetry is configured by the standard OTEL_* variables.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    metrics_host: str = "127.0.0.1"
    log_health_requests: bool = False
    # Production refuses these unless the owner says so (README "Redis topology", "Rate limiting").
    redis_allow_unauthenticated: bool = False  # a remote REDIS_URL without a password
    rate_limit_failure_mode_acknowledged: bool = False  # RATE_LIMIT_FAILURE_MODE=open
    # How the logs and the audit table write a client address (README "Audit logging"): in full,
    # truncated (IPv4 /24, IPv6 /48) or as a keyed pseudonym (AUDIT_PSEUDONYM_KEY). Rate limits and
    # lockouts always use the real address; only what is written changes.
    log_client_address: Literal["full", "truncated", "pseudonym"] = "pseudonym"
    # Sender-constrained tokens (README "Authentication"): DPoP (RFC 9449) and certificate-bound
    # (RFC 8705, the `mtls` option) tokens, and whether plain bearer tokens are refused on /api/.
    require_sender_constrained_tokens: bool = False
    dpop_algorithms: CommaList = ["ES256", "ES384", "EdDSA", "PS256", "RS256"]
    dpop_proof_max_age_seconds: int = Field(60, ge=5, le=300)
    dpop_nonce_secret: SecretStr | None = Field(None, min_length=32)  # set: proofs carry a server nonce

    _dpop_unset = empty_is_unset("dpop_nonce_secret")

    @field_validator("dpop_algorithms", mode="before")
    @classmethod
    def _dpop_comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("dpop_algorithms")
    @classmethod
    def _dpop_asymmetric_only(cls, value: list[str]) -> list[str]:
        unsafe = [alg for alg in value if alg not in ASYMMETRIC_ALGORITHMS]
        if unsafe or not value:
            raise ValueError(f"list asymmetric algorithms only ({', '.join(sorted(ASYMMETRIC_ALGORITHMS))})")
        return value

    # Access-token hygiene (README "Authentication", security/claims.py): `typ` must be at+jwt (RFC
    # 9068; recommended in production); the RFC 9396 authorization_details types a policy reads.
    jwt_require_typ: bool = False
    jwt_authorization_details_types: CommaList = []
    # Step-up (README "Step-up", RFC 9470): what a route declaring the configured step-up
    # (authz.CONFIGURED_STEP_UP; the grant routes) requires of the user's authentication.
    step_up_max_age_seconds: int | None = Field(None, ge=1, le=604_800)
    step_up_acr_values: CommaList = []
    # ASVS 5.0 gaps (issue 32; docs: authorization.md, audit.md, database-access.md). Every
    # authorization decision is an `authz_decision` event; allows too when AUDIT_AUTHZ_ALLOWS.
    audit_authz_allows: bool = False
    # Business limits, checked in the transaction of the insert (quotas.py); 409 beyond them.
    quota_orgs_per_subject: int = Field(100, ge=1, le=1_000_000)
    quota_users_per_org: int = Field(10_000, ge=1, le=10_000_000)
    # Deadlines below the request path: every database session's statement timeout (PostgreSQL).
    database_statement_timeout_seconds: float = Field(10, gt=0, le=3600)

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: object) -> object:
        return values_from_files(data) if isinstance(data, dict) else data

    @field_validator("jwt_algorithms", "allowed_origins", "trusted_hosts", "trusted_proxies", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("audit_masked_fields", mode="before")
    @classmethod
    def _masked_fields(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("forwarded_header", mode="before")
    @classmethod
    def _header_name(cls, value: object) -> object:
        # Header names are case-insensitive: x-forwarded-for and FORWARDED name the same headers.
        if isinstance(value, str):
            return {"x-forwarded-for": "X-Forwarded-For", "forwarded": "Forwarded"}.get(value.strip().lower(), value)
        return value

    _empty_is_unset = empty_is_unset("metrics_port", "audit_pseudonym_key")

    _step_up_empty_is_unset = empty_is_unset("step_up_max_age_seconds")

    @field_validator("jwt_authorization_details_types", "step_up_acr_values", mode="before")
    @classmethod
    def _claim_value_lists(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("step_up_acr_values")
    @classmethod
    def _acr_values(cls, value: list[str]) -> list[str]:
        # Each one is sent back in a WWW-Authenticate header (acr_values="a b"): no space, quote or backslash.
        unusable = [item for item in value if not _ACR_VALUE.fullmatch(item)]
        if unusable:
            raise ValueError(f"{unusable[0]!r}: an acr value is printable ASCII without spaces, quotes or backslashes")
        return value

    @field_validator("jwt_public_key")
    @classmethod
    def _unescape_pem(cls, value: str | None) -> str | None:
        # Container platforms often pass multi-line values with literal "\n".
        return value.replace("\\n", "\n").strip() if value else None

    @field_validator("jwt_algorithms")
    @classmethod
    def _asymmetric_only(cls, value: list[str]) -> list[str]:
        unsafe = [alg for alg in value if alg not in ASYMMETRIC_ALGORITHMS]
        if unsafe:
            raise ValueError(f"only asymmetric algorithms are allowed, not {', '.join(unsafe)}")
        if not value:
            raise ValueError("at least one algorithm is required")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR") from None
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_topology(cls, value: str | None) -> str | None:
        if value:
            parse_redis_url(value)  # ValueError names what is wrong, never the URL (it may hold a password)
        return value or None

    @field_validator("database_url")
    @classmethod
    def _database_driver(cls, value: str) -> str:
        """The URL's driver is installed here (a bake carries its own database's): otherwise the
        engine would fail at start with a traceback. Never names the URL (it holds a password)."""
        try:
            dialect = make_url(value).get_dialect()
        except ArgumentError:
            return value  # not a URL: production names it (database_problems); elsewhere the engine will
        except NoSuchModuleError:
            raise ValueError("names a database SQLAlchemy does not know (README, Database access)") from None
        try:
            dialect.import_dbapi()
        except ImportError as exc:
            raise ValueError(
                f"its driver {exc.name or 'module'!r} is not installed in this service, which is baked for "
                f"{DEFAULT_DATABASE_URL.split(':', 1)[0]} (README, Database access)"
            ) from None
        return value

    @field_validator("rate_limit_ip", "rate_limit_subject")
    @classmethod
    def _limit_notation(cls, value: str) -> str:
        try:
            parse(value)
        except ValueError:
            raise ValueError(f"{value!r} is not in 'limits' notation, e.g. 100/15minutes") from None
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _exact_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and ("://" not in origin or origin.endswith("/")):
                raise ValueError(f"{origin!r} is not an origin such as https://app.example.com")
        return value

    @model_validator(mode="after")
    def _key_source(self) -> Settings:
        if self.jwt_public_key and self.jwt_jwks_url:
            raise ValueError("set JWT_PUBLIC_KEY or JWT_JWKS_URL, not both")
        if self.uses_discovery and not self.jwt_issuer.startswith(("https://", "http://")):
            raise ValueError(
                "JWT_ISSUER: with neither JWT_PUBLIC_KEY nor JWT_JWKS_URL the keys are found by OIDC discovery, "
                "which needs the issuer's URL (e.g. https://login.example.com/realms/main)"
            )
        return self

    @model_validator(mode="after")
    def _metrics_listener_apart(self) -> Settings:
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError("METRICS_PORT must differ from PORT: metrics are never served on the public listener")
        return self

    @model_validator(mode="after")
    def _redis_tls(self) -> Settings:
        tls_files = [
            name for name in ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file") if getattr(self, name)
        ]
        if tls_files and not (self.redis_url and self.redis_topology.tls):
            raise ValueError(
                f"{tls_files[0].upper()}: only with a TLS REDIS_URL (rediss://, rediss+sentinel://, rediss+cluster://)"
            )
        if bool(self.redis_tls_cert_file) != bool(self.redis_tls_key_file):
            raise ValueError("REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE: set both (a client certificate) or neither")
        return self

    @cached_property
    def redis_topology(self) -> Topology:
        """What REDIS_URL describes (validated above); only with REDIS_URL set."""
        assert self.redis_url
        return parse_redis_url(self.redis_url)

    @property
    def uses_discovery(self) -> bool:
        """No key and no JWKS URL: JWT_ISSUER's discovery document names the JWKS (keys.py)."""
        return not self.jwt_public_key and not self.jwt_jwks_url

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    @property
    def effective_trusted_hosts(self) -> list[str]:
        if self.trusted_hosts:
            return self.trusted_hosts
        return [] if self.is_production else ["localhost", "127.0.0.1", "::1"]

    @property
    def effective_docs_enabled(self) -> bool:
        return (not self.is_production) if self.docs_enabled is None else self.docs_enabled

    @cached_property
    def trusted_proxy_networks(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(item, strict=False) for item in self.trusted_proxies)

    @cached_property
    def ip_limit(self) -> RateLimitItem:
        return parse(self.rate_limit_ip)

    @cached_property
    def subject_limit(self) -> RateLimitItem:
        return parse(self.rate_limit_subject)

    def production_problems(self) -> list[str]:
        """Each unsafe setting, named by its environment variable."""
        if not self.is_production:
            return []
        problems = []
        if "*" in self.allowed_origins:
            problems.append("ALLOWED_ORIGINS: '*' is not allowed in production; list exact origins")
        plain = [origin for origin in self.allowed_origins if origin.lower().startswith("http://")]
        if plain:
            problems.append(f"ALLOWED_ORIGINS: http:// origins are not allowed in production ({', '.join(plain)})")
        if not self.redis_url:
            problems.append("REDIS_URL: required in production (rate limits and revocation are shared)")
        if not self.trusted_hosts:
            problems.append("TRUSTED_HOSTS: required in production")
        elif "*" in self.trusted_hosts:
            problems.append("TRUSTED_HOSTS: '*' is not allowed in production; list the service's host names")
        wide = [str(network) for network in self.trusted_proxy_networks if _too_wide(network)]
        if wide:
            problems.append(
                "TRUSTED_PROXIES: networks wider than /8 (IPv4) or /32 (IPv6) are not allowed in production "
                f"({', '.join(wide)}); list the proxies' own addresses or ranges"
            )
        if self.jwt_jwks_url and not self.jwt_jwks_url.startswith("https://"):
            problems.append("JWT_JWKS_URL: must use https:// in production")
        if self.uses_discovery and not self.jwt_issuer.startswith("https://"):
            problems.append("JWT_ISSUER: must use https:// in production (its discovery document names the keys)")
        if self.audit_pseudonym_key is None:
            problems.append("AUDIT_PSEUDONYM_KEY: required in production (at least 32 characters, kept secret)")
        problems += self.database_problems()
        problems.extend(self._redis_trust_problems())
        problems.extend(self._sender_constraint_problems())
        return problems

    def _sender_constraint_problems(self) -> list[str]:
        """A DPoP proof is refused a second time only where the store that spends it is shared."""
        if self.require_sender_constrained_tokens and self.rate_limit_failure_mode == "open":
            return [
                "REQUIRE_SENDER_CONSTRAINED_TOKENS: with RATE_LIMIT_FAILURE_MODE=open a DPoP proof replayed "
                "to another replica while Redis is down is accepted there; use RATE_LIMIT_FAILURE_MODE=closed"
            ]
        return []

    def _redis_trust_problems(self) -> list[str]:
        """Whoever can write to Redis can delete revocations and lift lockouts; open mode serves
        requests unchecked while Redis is down. Both need the owner's explicit word."""
        problems = []
        if self.redis_url and self.redis_topology.remote_without_password and not self.redis_allow_unauthenticated:
            problems.append(
                "REDIS_URL: names a host other than loopback without a password (anyone who reaches it can "
                "delete revocations and lift lockouts); put the password (or ACL user:password) in the URL, "
                "preferably with rediss:// (TLS), or set REDIS_ALLOW_UNAUTHENTICATED=true if the network "
                "alone protects it"
            )
        if self.rate_limit_failure_mode == "open" and not self.rate_limit_failure_mode_acknowledged:
            problems.append(
                "RATE_LIMIT_FAILURE_MODE: 'open' serves requests without rate limits (and revocations and "
                "lockouts only from this process's memory) while Redis is down; set "
                "RATE_LIMIT_FAILURE_MODE_ACKNOWLEDGED=true to accept that, or use 'closed'"
            )
        return problems

    def database_problems(self) -> list[str]:
        """What production refuses of DATABASE_URL as written; the role it connects as is checked
        against the database at start (db.serving_role_problems). Never quotes the URL."""
        if self.database_url == DEFAULT_DATABASE_URL:
            return ["DATABASE_URL: required in production (the default is a development database)"]
        try:
            url = make_url(self.database_url)
        except ArgumentError:
            return ["DATABASE_URL: not a database URL (README, Database access shows the forms)"]
        if not url.get_backend_name().startswith("postgresql"):
            return []
        if url.username in (None, "", "postgres"):
            return [
                "DATABASE_URL: connects as the superuser postgres (or names no role); production serves as a "
                "role with only the service's privileges (README, Database access)"
            ]
        host = url.query.get("host") or url.host or ""
        if not url.password and not str(host).startswith("/"):
            return ["DATABASE_URL: no password for a database reached over the network"]
        if "sslmode" in url.query and url.get_driver_name() == "asyncpg":
            return ["DATABASE_URL: asyncpg takes ?ssl=verify-full, not libpq's ?sslmode= (README, Database access)"]
        return []

    @property
    def audit_pseudonym_key_bytes(self) -> bytes | None:
        return self.audit_pseudonym_key.get_secret_value().encode() if self.audit_pseudonym_key else None


def _too_wide(network: IPNetwork) -> bool:
    return network.prefixlen < MIN_TRUSTED_PROXY_PREFIX[network.version]


S = TypeVar("S", bound=Settings)


def config_error(exc: ValidationError, variable: Callable[[str], str]) -> ConfigError:
    """One line per invalid setting, named by its environment `variable` (given the field name)."""
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        message = "required" if error["type"] == "missing" else error["msg"].removeprefix("Value error, ")
        lines.append(f"{variable(field)}: {message}" if field else message)
    return ConfigError("; ".join(lines))


def read_settings(kind: type[S]) -> S:
    """The core's settings from the environment, or ConfigError with one line per invalid variable.
    Its unsafe ones are `production_problems()`; `startup.load_settings` refuses them together with
    the baked options'."""
    try:
        return kind()  # required fields come from the environment
    except ValidationError as exc:
        raise config_error(exc, lambda field: field.upper() if field else "configuration") from None


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() == "true"


def tracing_requested(environ: Mapping[str, str] | None = None) -> bool:
    """The rule (README "Observability"): on when OTEL_TRACES_EXPORTER is `otlp`, or is unset and an
    OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set; off
    when OTEL_SDK_DISABLED=true, OTEL_TRACES_EXPORTER=none, or nothing is set. Raises ConfigError,
    naming the variable, for an exporter or protocol this service does not ship."""
    environ = os.environ if environ is None else environ
    if _flag(environ, "OTEL_SDK_DISABLED"):
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    if exporter not in ("", "otlp"):
        raise ConfigError(f"OTEL_TRACES_EXPORTER: only 'otlp' or 'none' are supported, not {exporter!r}")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(name, "").strip()
        if protocol and protocol != "http/protobuf":
            raise ConfigError(f"{name}: only 'http/protobuf' is supported, not {protocol!r}")
    if exporter == "otlp":
        return True
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
