"""The rate limiter the layers count with: fixed windows counted atomically in Redis (a small Lua
script: count, then read the window's time left), so N replicas together admit exactly the limit
and the headers never race the count; without REDIS_URL (development only) the same window in
process memory. The layers are `ratelimit.py`; the address and subject counts travel with the
revocation lookup in one round trip (`admission.py`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from limits import RateLimitItem

from ..config import Settings
from ..store.core import Command, MemoryStore, RemoteStore, Script, StoreUnavailable
from .events import security_event

if TYPE_CHECKING:
    pass


KEY_PREFIX = "ratelimit"
WARNING_INTERVAL_SECONDS = 60.0


# Count this request and read the time left in its window, atomically. The expiry is set only
# when the window opens (or if it was somehow lost), so a client that keeps knocking cannot
# stretch its own window. One key per call, so it runs unchanged on a Redis Cluster shard. The
# subject limit counts with the same steps inside the revocation lookup (admission.py).
def count_in_window(key: str, window_ms: str) -> str:
    """Lua that counts one request in the fixed window at `key` (a KEYS[i]) of `window_ms` (an
    ARGV[j]) and leaves `count` and `ttl` (ms) in locals; the scripts that count build on it."""
    return (
        (
            "local count = redis.call('INCR', KEY)\n"
            "local ttl = redis.call('PTTL', KEY)\n"
            "if ttl < 0 then\n"
            "  redis.call('PEXPIRE', KEY, WINDOW)\n"
            "  ttl = tonumber(WINDOW)\n"
            "end\n"
        )
        .replace("KEY", key)
        .replace("WINDOW", window_ms)
    )


COUNT_SCRIPT = count_in_window("KEYS[1]", "ARGV[1]") + "return {count, ttl}\n"


@dataclass(frozen=True, slots=True)
class Policy:
    """A named limit: `limit` requests per `window` seconds. The name appears in the headers."""

    name: str
    limit: int
    window: int
    key_prefix: str = field(repr=False)
    policy_header: bytes = field(repr=False)

    @classmethod
    def of(cls, name: str, item: RateLimitItem, key_name: str | None = None) -> Policy:
        window = item.get_expiry()
        return cls(
            name=name,
            limit=item.amount,
            window=window,
            # The limit is part of the key, so changing it starts fresh counters instead of
            # judging old counts by the new number.
            key_prefix=f"{KEY_PREFIX}:{key_name or name}:{item.amount}/{window}:",
            policy_header=f'"{name}";q={item.amount};w={window}'.encode(),
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of counting one request against one policy."""

    policy: Policy
    count: int
    reset_in: int  # whole seconds until the window ends

    @property
    def allowed(self) -> bool:
        return self.count <= self.policy.limit

    @property
    def remaining(self) -> int:
        return max(0, self.policy.limit - self.count)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The IETF fields (draft-ietf-httpapi-ratelimit-headers)."""
        return [
            (b"ratelimit-policy", self.policy.policy_header),
            (b"ratelimit", f'"{self.policy.name}";r={self.remaining};t={self.reset_in}'.encode()),
        ]


WINDOW = Script(COUNT_SCRIPT)
BLOCKED_CACHE_SIZE = 10_000


def window(policy: Policy, key: str) -> Command:
    """The store command that counts one request in `key`'s window of `policy`."""
    return WINDOW.call([policy.key_prefix + key], [policy.window * 1000])


def decision(policy: Policy, reply: Any) -> Decision:
    count, ttl_ms = reply
    return Decision(policy, int(count), max(0, math.ceil(int(ttl_ms) / 1000)))


class RateLimiter:
    """Counts requests against policies in the store and applies the declared failure mode.

    It also remembers, in this process, the keys the store has refused until their window ends:
    within a fixed window a count only grows, so such a key is refused again without asking the
    store (and, for the address limit, before any token is verified).
    """

    def __init__(self, settings: Settings, store: RemoteStore | MemoryStore) -> None:
        self.store = store
        self.fail_open = settings.rate_limit_failure_mode == "open"
        self._blocked: dict[str, tuple[float, Decision]] = {}  # key -> (monotonic end, decision)
        self._warned_at = -math.inf

    async def hit(self, policy: Policy, key: str) -> Decision | None:
        """Count one request: one round trip. None: the store is down and the failure mode is
        `open`. Raises StoreUnavailable (mode `closed`) or StoreBusy (this process overloaded)."""
        known = self.blocked(policy, key)
        if known is not None:
            return known
        if isinstance(self.store, MemoryStore):
            count, ttl_ms = self.store.count(policy.key_prefix + key, policy.window * 1000)
            return self.note(decision(policy, (count, ttl_ms)), key)
        try:
            (reply,) = await self.store.run([window(policy, key)])
        except StoreUnavailable as exc:
            self.unavailable(exc)
            return None
        return self.note(decision(policy, reply), key)

    def blocked(self, policy: Policy, key: str) -> Decision | None:
        """The refusal the store gave this key earlier in the same window, if any."""
        entry = self._blocked.get(policy.key_prefix + key)
        if entry is None:
            return None
        ends, refused = entry
        left = ends - time.monotonic()
        if left <= 0:
            del self._blocked[policy.key_prefix + key]
            return None
        return Decision(policy, refused.count, math.ceil(left))

    def note(self, result: Decision, key: str) -> Decision:
        """Remember a refusal until its window ends."""
        if not result.allowed:
            if len(self._blocked) >= BLOCKED_CACHE_SIZE:
                now = time.monotonic()
                self._blocked = {k: v for k, v in self._blocked.items() if v[0] > now}
                while len(self._blocked) >= BLOCKED_CACHE_SIZE:
                    del self._blocked[next(iter(self._blocked))]
            self._blocked[result.policy.key_prefix + key] = (time.monotonic() + result.reset_in, result)
        return result

    def unavailable(self, exc: Exception) -> None:
        """The store is down: raises StoreUnavailable in `closed` mode; in `open` mode the check is
        skipped, logged once a minute."""
        if not self.fail_open:
            raise StoreUnavailable from exc
        now = time.monotonic()
        if now - self._warned_at >= WARNING_INTERVAL_SECONDS:
            self._warned_at = now
            security_event(
                "rate_limit_store_unavailable",
                failure_mode="open",
                error=type(exc.__cause__ or exc).__name__,
                repeats_suppressed_for_seconds=WARNING_INTERVAL_SECONDS,
            )
