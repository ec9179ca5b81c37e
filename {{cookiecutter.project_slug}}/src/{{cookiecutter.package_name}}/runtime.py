"""The long-lived resources of one process, created without I/O and closed at shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from alembic.config import Config
from alembic.script import ScriptDirectory
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from .config import Settings
from .db import create_engine, create_sessionmaker
from .security.audit import AuditSink, Masker
from .security.authn import TokenVerifier
from .security.deprecation import utc_now
from .security.keys import KeySource, key_source
from .security.ratelimit import RateLimiter
from .security.revocation import Revocations

MIGRATIONS = f"{__package__}:migrations"


def migration_heads() -> frozenset[str]:
    """The revisions `alembic upgrade head` leads to, read once from the packaged migrations."""
    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    return frozenset(ScriptDirectory.from_config(config).get_heads())


@dataclass
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    redis: Redis | None
    keys: KeySource
    verifier: TokenVerifier
    revocations: Revocations
    limiter: RateLimiter
    migration_heads: frozenset[str]
    audit_sink: AuditSink | None = None  # AUDIT_DB_ENABLED
    clock: Callable[[], datetime] = utc_now  # read by deprecation sunsets; tests replace it

    @classmethod
    def create(cls, settings: Settings) -> Runtime:
        engine = create_engine(settings.database_url)
        redis = None
        if settings.redis_url:
            # Timeouts make an unreachable Redis fail fast instead of hanging requests.
            redis = Redis.from_url(
                settings.redis_url,
                socket_timeout=settings.redis_timeout_seconds,
                socket_connect_timeout=settings.redis_timeout_seconds,
                # One immediate retry replaces a pooled connection a restarted Redis dropped;
                # redis-py's default (10 retries with backoff) would hold requests for seconds.
                retry=Retry(NoBackoff(), 1),
            )
        keys = key_source(settings)
        return cls(
            settings=settings,
            engine=engine,
            sessionmaker=create_sessionmaker(engine),
            redis=redis,
            keys=keys,
            verifier=TokenVerifier(settings, keys),
            revocations=Revocations(settings, redis),
            limiter=RateLimiter(settings, redis),
            migration_heads=migration_heads(),
            audit_sink=AuditSink(engine, Masker(settings.audit_masked_fields)) if settings.audit_db_enabled else None,
        )

    @asynccontextmanager
    async def lifespan(self, _app: Any) -> AsyncIterator[None]:
        await self.keys.start()
        if self.audit_sink is not None:
            await self.audit_sink.start()
        try:
            yield
        finally:
            if self.audit_sink is not None:
                await self.audit_sink.stop()  # writes what is queued while the engine still works
            await self.keys.stop()
            if self.redis is not None:
                await self.redis.aclose()
            await self.engine.dispose()
