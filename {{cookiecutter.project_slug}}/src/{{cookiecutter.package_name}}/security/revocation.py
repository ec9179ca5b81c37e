"""Token revocation: a denylist of token ids (`jti`) and a per-subject "revoked before" mark.

Both live in Redis, so a revocation reaches every replica on its next request, and expire on
their own once no token they could match is still accepted (remaining life plus the clock
leeway). The lookup runs with the subject limit in one script on every authenticated request,
cached tokens included (security/admission.py). Without REDIS_URL (development only) they live in
this process and are lost at restart.

A subject's keys share its hash tag (`{alice}`), so on a Redis Cluster the lookup touches one slot;
this is why revoking a `jti` also takes the token's `sub`.

Service code revokes with `await runtime.revocations.revoke_token(sub, jti, exp)` or
`revoke_subject(sub)`; operators with `token revoke` and `token revoke-subject` (cli.py).

A revocation returns only once Redis has it on at least one replica, where the primary has any
connected (`WAIT 1`, store/core.py `write_replicated`): a failover right after cannot lose what was
reported as done (one gap is left, README "Revocation": a write that reaches an old primary
between a Sentinel promotion and its announcement finds no replica to wait for). When no replica
acknowledges it within REDIS_TIMEOUT_SECONDS it raises NotReplicated (a StoreUnavailable): the
caller reports it as not done (CLI exit 1, API 503, the database rolled back), and the primary
may keep the entry, which refuses early, never late.

This process also keeps a copy of the revocations it has seen (`SeenRevocations`): those it
wrote, and those the store answered "revoked" for. RATE_LIMIT_FAILURE_MODE=open reads it while
Redis is down, so a token or key revoked before the outage is not served again by this process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import SERVICE_NAME, Settings
from ..store.core import MemoryStore, RemoteStore

if TYPE_CHECKING:
    from .principal import Principal

_PREFIX = f"{SERVICE_NAME}:revoked:"
MAX_ID_LENGTH = 255  # longest `sub` or `jti` accepted
SEEN_SIZE = 10_000  # revocations remembered in process memory, of each kind


class RevocationStoreUnavailable(Exception):
    """The revocation store could not answer, and the failure mode is `closed`."""


def tag(subject: str) -> str:
    """The subject as a Redis hash tag; braces inside it would end the tag early, so they are
    replaced (two subjects sharing a tag only share a slot, never a key)."""
    if "{" in subject or "}" in subject:
        subject = subject.replace("{", "(").replace("}", ")")
    return "{" + subject + "}"


class SeenRevocations:
    """The revocations this process has written or read, each until no token it matches could still
    be accepted (its Redis entry's TTL). Bounded (SEEN_SIZE of each kind; past that the expired go
    first, then the oldest). Filled only from what the store already answered: no round trip."""

    def __init__(self, leeway: int, max_lifetime: int) -> None:
        self.leeway = leeway
        self.max_lifetime = max_lifetime
        self.tokens: dict[tuple[str, str], float] = {}  # (sub, jti) -> when it ends (time.time())
        self.marks: dict[str, tuple[float, float]] = {}  # sub -> (revoked-before mark, when it ends)

    def token(self, subject: str, jti: str, ends: float) -> None:
        self.tokens.pop((subject, jti), None)
        _bound(self.tokens, lambda entry: entry)
        self.tokens[(subject, jti)] = ends

    def mark(self, subject: str, mark: float) -> None:
        known = self.marks.pop(subject, None)
        if known is not None and known[0] > mark:
            mark = known[0]
        _bound(self.marks, lambda entry: entry[1])
        self.marks[subject] = (mark, mark + self.max_lifetime + self.leeway + 1)

    def revoked(self, principal: Principal) -> bool:
        now = time.time()
        if principal.token_id is not None:
            ends = self.tokens.get((principal.subject, principal.token_id))
            if ends is not None and ends > now:
                return True
        known = self.marks.get(principal.subject)
        return known is not None and known[1] > now and principal.issued_at - self.leeway < known[0]


def _bound(entries: dict[Any, Any], ends: Callable[[Any], float]) -> None:
    """Room for one more entry: the expired ones go, then the oldest."""
    if len(entries) < SEEN_SIZE:
        return
    now = time.time()
    for key in [key for key, entry in entries.items() if ends(entry) <= now]:
        del entries[key]
    while len(entries) >= SEEN_SIZE:
        del entries[next(iter(entries))]


class Revocations:
    def __init__(self, settings: Settings, store: RemoteStore | MemoryStore) -> None:
        self.store = store
        self.leeway = settings.jwt_leeway_seconds
        self.max_lifetime = settings.jwt_max_token_lifetime_seconds
        self.seen = SeenRevocations(self.leeway, self.max_lifetime)

    @staticmethod
    def keys(principal: Principal) -> tuple[str, str | None]:
        """The subject's mark and, for a token with a `jti`, its denylist entry."""
        subject = tag(principal.subject)
        denied = f"{_PREFIX}jti:{subject}:{principal.token_id}" if principal.token_id is not None else None
        return f"{_PREFIX}sub:{subject}", denied

    async def revoke_token(self, subject: str, jti: str, expires_at: float) -> bool:
        """Refuse the token with this `sub` and `jti` until it expires. False if it has expired already."""
        ttl = math.ceil(expires_at + self.leeway - time.time())
        if ttl <= 0:
            return False
        await self._set(f"{_PREFIX}jti:{tag(subject)}:{jti}", "1", ttl)
        self.seen.token(subject, jti, expires_at + self.leeway)
        return True

    async def revoke_subject(self, subject: str) -> float:
        """Refuse every token of `subject` issued before now. A token's `iat` is compared with the
        mark after taking off the clock leeway the verifier allows, so a token the issuer stamped up
        to JWT_LEEWAY_SECONDS in the future (a fast clock) is refused too. Returns the mark."""
        mark = time.time()
        await self._set(f"{_PREFIX}sub:{tag(subject)}", repr(mark), self.max_lifetime + self.leeway + 1)
        self.seen.mark(subject, mark)
        return mark

    def memory_revoked(self, principal: Principal) -> bool:
        """The lookup against process memory (no REDIS_URL)."""
        assert isinstance(self.store, MemoryStore)
        mark_key, denied = self.keys(principal)
        if denied is not None and self.store.get(denied) is not None:
            return True
        mark = self.store.get(mark_key)
        return mark is not None and principal.issued_at - self.leeway < float(mark)

    async def _set(self, key: str, value: str, ttl: int) -> None:
        if isinstance(self.store, MemoryStore):
            self.store.set(key, value.encode(), ttl)
        else:
            await self.store.write_replicated(b"SET", key.encode(), value.encode(), b"EX", str(ttl).encode())
