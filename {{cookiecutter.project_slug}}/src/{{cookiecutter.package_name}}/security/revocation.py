"""Token revocation: a denylist of token ids (`jti`) and a per-subject "revoked before" mark.

Both live in Redis, so a revocation reaches every replica on its next request, and expire on
their own once no token they could match is still accepted (remaining life plus the clock
leeway). Every authenticated request costs one Redis round trip (MGET), cached tokens included.
Without REDIS_URL (development only) they live in this process and are lost at restart.

Service code revokes with `await runtime.revocations.revoke_token(jti, exp)` or
`revoke_subject(sub)`; operators with `token revoke` and `token revoke-subject` (cli.py).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from redis.asyncio import Redis

from ..config import SERVICE_NAME, Settings
from .events import security_event

if TYPE_CHECKING:
    from .authn import Principal

_JTI_PREFIX = f"{SERVICE_NAME}:revoked:jti:"
_SUBJECT_PREFIX = f"{SERVICE_NAME}:revoked:sub:"
_WARN_EVERY_SECONDS = 60.0
MAX_ID_LENGTH = 255  # longest `sub` or `jti` accepted


class RevocationStoreUnavailable(Exception):
    """The revocation store could not answer, and the failure mode is `closed`."""


class Revocations:
    def __init__(self, settings: Settings, redis: Redis | None) -> None:
        self.redis = redis
        self.leeway = settings.jwt_leeway_seconds
        self.max_lifetime = settings.jwt_max_token_lifetime_seconds
        self.fail_open = settings.rate_limit_failure_mode == "open"
        self._memory: dict[str, tuple[str, float]] = {}
        self._last_warning = -math.inf

    async def revoke_token(self, jti: str, expires_at: float) -> bool:
        """Refuse the token with this `jti` until it expires. False if it has expired already."""
        ttl = math.ceil(expires_at + self.leeway - time.time())
        if ttl <= 0:
            return False
        await self._set(_JTI_PREFIX + jti, "1", ttl)
        return True

    async def revoke_subject(self, subject: str) -> float:
        """Refuse every token of `subject` issued before now (including this very second,
        since `iat` has whole-second precision). Returns the mark."""
        mark = time.time()
        await self._set(_SUBJECT_PREFIX + subject, repr(mark), self.max_lifetime + self.leeway + 1)
        return mark

    async def is_revoked(self, principal: Principal) -> bool:
        """One round trip. Raises RevocationStoreUnavailable when the store is down and the
        failure mode is `closed`; with `open` the token is served and the outage logged."""
        keys = [_SUBJECT_PREFIX + principal.subject]
        if principal.token_id is not None:
            keys.append(_JTI_PREFIX + principal.token_id)
        try:
            values = await self._get(keys)
        except Exception as exc:  # redis errors and timeouts alike take the declared failure mode
            if not self.fail_open:
                raise RevocationStoreUnavailable from exc
            self._warn_open()
            return False
        revoked_before, *denylisted = values
        if any(value is not None for value in denylisted):
            return True
        return revoked_before is not None and principal.issued_at < float(revoked_before)

    async def _set(self, key: str, value: str, ttl: int) -> None:
        if self.redis is not None:
            await self.redis.set(key, value, ex=ttl)
            return
        now = time.time()
        self._memory = {k: v for k, v in self._memory.items() if v[1] > now}
        self._memory[key] = (value, now + ttl)

    async def _get(self, keys: list[str]) -> list[str | bytes | None]:
        if self.redis is not None:
            values: list[str | bytes | None] = await self.redis.mget(keys)
            return values
        now = time.time()
        entries = [self._memory.get(key) for key in keys]
        return [entry[0] if entry is not None and entry[1] > now else None for entry in entries]

    def _warn_open(self) -> None:
        now = time.monotonic()
        if now - self._last_warning > _WARN_EVERY_SECONDS:
            self._last_warning = now
            security_event("revocation_store_unavailable", failure_mode="open")
