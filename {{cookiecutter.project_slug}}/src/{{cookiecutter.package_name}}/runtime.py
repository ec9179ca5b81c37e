"""The long-lived resources of one process, created without I/O and closed at shutdown."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from .config import ConfigError, Settings
from .db import Statements, create_engine, create_sessionmaker, serving_role_problems
from .migrations import alembic_config
from .secret_files import SecretFiles
from .security.admission import Admission
from .security.audit_sink import AuditSink
from .security.authn import TokenVerifier
from .security.deprecation import utc_now
from .security.keys import KeySource, StaticKey, key_source
from .security.limiter import RateLimiter
from .security.lockout import Lockout
from .security.masking import Masker
from .security.ratelimit import client_bucket
from .security.revocation import Revocations
from .store import MemoryStore, RemoteStore, redis_store

if TYPE_CHECKING:
    from .extensions import Extension
    from .metrics import Metrics
    from .security.authz import Authorizer
    from .telemetry import Tracing

logger = logging.getLogger(__name__)
E = TypeVar("E", bound="Extension")


def migration_heads() -> frozenset[str]:
    """The revisions `alembic upgrade heads` leads to, read once from the packaged migrations."""
    return frozenset(ScriptDirectory.from_config(alembic_config()).get_heads())


def watched_secret_files(settings: Settings, keys: KeySource) -> SecretFiles:
    """The secret files re-read while the service runs: JWT_PUBLIC_KEY_FILE (a rotated key is
    trusted within SECRET_FILE_REFRESH_SECONDS). DATABASE_URL, REDIS_URL and AUDIT_PSEUDONYM_KEY
    are read at start: their pools and pseudonyms are built once, so a rollout picks them up."""
    files = SecretFiles(settings.secret_file_refresh_seconds, production=settings.is_production)
    if settings.jwt_public_key_file and settings.jwt_public_key and isinstance(keys, StaticKey):
        files.watch("jwt_public_key", settings.jwt_public_key_file, settings.jwt_public_key, keys.replace)
    return files


GC_YOUNG_THRESHOLD = 10_000


class _ServiceGc:
    """The garbage collector tuned while a service runs in this process, undone when the last
    one stops (a process that builds many apps, like the tests, may run several at once).

    What exists at start (modules, the app, settings, pools) lives as long as the service. Frozen,
    it is out of the collector's way: the full collections that steady traffic triggers no longer
    walk all of it (they cost 180 ms each, the p99's worst spikes). The first generation is
    collected after 10,000 net new objects instead of 700: a request in flight holds a few
    hundred, so at 700 the collector ran every 20 requests or so to find nothing, about 20 µs a
    request (measured with `python -m bench`). Undone, the old apps of a test process can be collected again.
    """

    def __init__(self) -> None:
        self.running = 0
        self.thresholds = gc.get_threshold()

    def enter(self) -> None:
        if self.running == 0:
            self.thresholds = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(GC_YOUNG_THRESHOLD, *self.thresholds[1:])
        self.running += 1

    def exit(self) -> None:
        self.running -= 1
        if self.running == 0:
            gc.set_threshold(*self.thresholds)
            gc.unfreeze()


_service_gc = _ServiceGc()


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    statements: Statements  # the request path's reads (authorization checks, the read routes)
    store: RemoteStore | MemoryStore  # MemoryStore: no REDIS_URL (development only)
    keys: KeySource
    verifier: TokenVerifier
    revocations: Revocations
    limiter: RateLimiter
    admission: Admission
    lockout: Lockout
    migration_heads: frozenset[str]
    secret_files: SecretFiles
    audit_sink: AuditSink | None = None  # AUDIT_DB_ENABLED
    extensions: list[Extension] = field(default_factory=list)  # the baked credential options
    clock: Callable[[], datetime] = utc_now  # read by deprecation sunsets; tests replace it
    tracing: Tracing | None = None  # OTEL_* (telemetry.py)
    metrics: Metrics | None = None  # METRICS_PORT (metrics.py)
    draining: bool = False  # shutting down (shutdown.py): /health/ready answers 503
    authorizer: Authorizer | None = None  # a policy engine that decides layer 7 (authz_engine=cerbos)
    # Production, the database unreachable at start: its role is checked by readiness (health.py).
    role_unchecked: bool = False

    @classmethod
    def create(cls, settings: Settings) -> Runtime:
        """The core's resources; `app.build_runtime` adds the options' extensions, tracing and metrics."""
        engine = create_engine(
            settings.database_url,
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
            statement_timeout_seconds=settings.database_statement_timeout_seconds,
        )
        store = redis_store(settings) if settings.redis_url else MemoryStore()
        keys = key_source(settings)
        limiter = RateLimiter(settings, store)
        revocations = Revocations(settings, store)
        lockout = Lockout(settings, store, client_bucket(settings.rate_limit_ipv6_prefix))
        statements = Statements(
            engine,
            settings.database_read_pool_size,
            statement_timeout_seconds=settings.database_statement_timeout_seconds,
        )
        runtime = cls(
            settings=settings,
            engine=engine,
            sessionmaker=create_sessionmaker(engine),
            statements=statements,
            store=store,
            keys=keys,
            verifier=TokenVerifier(settings, keys),
            revocations=revocations,
            limiter=limiter,
            admission=Admission(settings, limiter, revocations, lockout),
            lockout=lockout,
            migration_heads=migration_heads(),
            secret_files=watched_secret_files(settings, keys),
            audit_sink=AuditSink(engine, Masker(settings.audit_masked_fields)) if settings.audit_db_enabled else None,
        )
        return runtime

    def extension(self, kind: type[E]) -> E:
        """The running extension of one baked option, by its type (e.g. `ApiKeysExtension`)."""
        for extension in self.extensions:
            if isinstance(extension, kind):
                return extension
        raise LookupError(f"{kind.__name__} is not running in this service")

    @asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        if self.settings.is_production:
            problems = await serving_role_problems(self.engine)
            if problems:
                raise ConfigError("; ".join(problems))
            self.role_unchecked = problems is None
        await self.keys.start()
        await self.secret_files.start()
        if self.audit_sink is not None:
            await self.audit_sink.start()
        if self.metrics is not None:
            assert self.settings.metrics_port is not None
            await self.metrics.start(_app, self.settings.metrics_host, self.settings.metrics_port)
        _service_gc.enter()  # the collector tuned for a long-lived service (see _ServiceGc)
        try:
            async with AsyncExitStack() as options_running:
                for extension in self.extensions:
                    if extension.lifespan is not None:
                        await options_running.enter_async_context(extension.lifespan())
                yield
        finally:
            _service_gc.exit()
            if self.metrics is not None:
                await self.metrics.stop()
            if self.audit_sink is not None:
                await self.audit_sink.stop()  # writes what is queued while the engine still works
            await self.secret_files.stop()
            await self.keys.stop()
            if isinstance(self.store, RemoteStore):
                await self.store.aclose()
            await self.statements.aclose()
            await self.engine.dispose()
            if self.tracing is not None:
                await self.tracing.shutdown()
            logger.info("connection pools closed", extra={"event": "shutdown_pools_closed"})
