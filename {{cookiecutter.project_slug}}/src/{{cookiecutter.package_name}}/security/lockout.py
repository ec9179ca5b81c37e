"""Lockout: an address (or a subject) that keeps failing authentication is refused for a while.

Rate limits count requests; this counts failures. LOCKOUT_FAILURES refused credentials from one
address (its rate-limit bucket) within LOCKOUT_WINDOW_SECONDS lock the address for LOCKOUT_SECONDS,
doubled on each repeat up to LOCKOUT_MAX_SECONDS. A token that verifies but is refused (revoked)
counts for its subject too, which is locked the same way, from whatever address. Successful
requests in between reset nothing, so an attacker cannot interleave a valid token to keep guessing.

The cost stays where the failures are: an address's lock is read by layer 3 inside its address
window script, a subject's inside its revocation script (admission.py); a
failure is recorded (one more round trip) only when layer 4 refuses a credential, which already
cost a signature check. The keys of one address or subject share its hash tag, so each script
touches one Redis Cluster slot; the counts are shared by replicas.

A locked address is refused from this process's memory, without a round trip, until its lock
ends. Every RECHECK_SECONDS while it keeps knocking, one read of its lock (in the background,
not on the request's path) asks Redis whether the lock is still there, so an operator who lifts it
(`lockout lift`, `lift()`) lets it in on every replica within RECHECK_SECONDS and a round trip.
A subject's lock is read from Redis on every request (its revocation script).

While Redis is down and RATE_LIMIT_FAILURE_MODE is `open`, the locks this process has seen (started
here, or read in a reply) still refuse until they end: an address's as always, a subject's from
`_subjects` (admission.py reads it only then).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from starlette.types import Scope

from ..config import Settings
from ..store.core import MemoryStore, RemoteStore, Script, StoreBusy, StoreUnavailable
from .errors import ProblemResponse, problem
from .events import security_event
from .revocation import tag

KEY_PREFIX = "lockout"
WARNING_INTERVAL_SECONDS = 60.0
RECHECK_SECONDS = 0.25  # how long a remembered lock is believed before Redis is asked again
LOCKS_REMEMBERED = 10_000  # of addresses, and of subjects, in process memory

# KEYS: failures, lock, repeats. ARGV: window ms, failures allowed, first lock ms, longest lock ms.
# Returns the lock just started, in ms, or 0.
RECORD_FAILURE = Script("""
local failures = redis.call('INCR', KEYS[1])
if failures == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if failures < tonumber(ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1])
local repeats = redis.call('INCR', KEYS[3])
local ms = math.min(tonumber(ARGV[3]) * 2 ^ (repeats - 1), tonumber(ARGV[4]))
redis.call('SET', KEYS[2], '1', 'PX', ms)
redis.call('PEXPIRE', KEYS[3], ms + tonumber(ARGV[4]))
return ms
""")


class LockedOut(Exception):
    def __init__(self, seconds: int) -> None:
        self.seconds = seconds


def locked_out(exc: LockedOut) -> ProblemResponse:
    return problem(
        429,
        "Too many failed authentication attempts; retry after the number of seconds in Retry-After.",
        name="locked-out",
        headers={"Retry-After": str(max(1, exc.seconds))},
    )


class Lockout:
    """Reads and records the lockouts of client addresses (keyed by `key`, the rate-limit bucket)
    and of subjects."""

    def __init__(self, settings: Settings, store: RemoteStore | MemoryStore, key: Callable[[Scope], str]) -> None:
        self.store = store
        self.key = key
        self.failures = settings.lockout_failures
        self.window_ms = settings.lockout_window_seconds * 1000
        self.first_ms = settings.lockout_seconds * 1000
        self.longest_ms = settings.lockout_max_seconds * 1000
        self._locked: dict[str, tuple[float, float]] = {}  # address -> monotonic end, when to ask again
        self._rechecks: dict[str, asyncio.Task[None]] = {}
        self._subjects: dict[str, float] = {}  # subject -> monotonic end of a lock seen
        self._warned_at = -math.inf

    @staticmethod
    def _keys(address: str, kind: str = "address") -> list[str]:
        tagged = tag(address)
        return [f"{KEY_PREFIX}:{kind}:{part}:{tagged}" for part in ("failures", "lock", "repeats")]

    @classmethod
    def subject_lock_key(cls, subject: str) -> str:
        """The subject's lock, read by its revocation script (same hash tag, admission.py)."""
        return cls._keys(subject, "subject")[1]

    def note_subject(self, subject: str, left_ms: int) -> None:
        """A subject's lock the store reported (or started): remembered until it ends, for open mode."""
        self._subjects.pop(subject, None)
        if len(self._subjects) >= LOCKS_REMEMBERED:
            now = time.monotonic()
            self._subjects = {name: ends for name, ends in self._subjects.items() if ends > now}
            while len(self._subjects) >= LOCKS_REMEMBERED:
                del self._subjects[next(iter(self._subjects))]
        self._subjects[subject] = time.monotonic() + left_ms / 1000

    def subject_remembered_seconds(self, subject: str) -> int:
        """How long a subject lock this process has seen has left (0: none, or over)."""
        ends = self._subjects.get(subject)
        return 0 if ends is None else max(0, math.ceil(ends - time.monotonic()))

    def subject_locked_seconds(self, subject: str) -> int:
        """Without REDIS_URL: how long the subject stays locked."""
        return math.ceil(self._memory_left_ms(self.subject_lock_key(subject)) / 1000)

    # --- layer 3: is the address locked? --------------------------------------------------------

    @classmethod
    def lock_key(cls, address: str) -> str:
        """The address's lock, read by the address-window script (same hash tag, admission.py)."""
        return cls._keys(address)[1]

    def raise_if_locked(self, address: str, reply: Any = None) -> None:
        """LockedOut when the store's reply (the lock's ms left) or, without one, this process's
        memory says so. The store's reply is the truth: a lock it no longer has is forgotten."""
        now = time.monotonic()
        if isinstance(self.store, MemoryStore):
            reply = self._memory_left_ms(self._keys(address)[1])
        if reply is not None:
            self._note(address, int(reply), now)
        remembered = self._locked.get(address)
        if remembered is None:
            return
        ends, recheck_at = remembered
        if ends <= now:
            del self._locked[address]
            return
        if now >= recheck_at and address not in self._rechecks:
            self._rechecks[address] = asyncio.ensure_future(self._recheck(address))
        raise LockedOut(math.ceil(ends - now))

    def _note(self, address: str, left_ms: int, now: float) -> None:
        if left_ms > 0:
            self._remember(address, now + left_ms / 1000)
        else:
            self._locked.pop(address, None)  # expired, or lifted

    async def _recheck(self, address: str) -> None:
        """Ask Redis whether the address is still locked (an operator may have lifted it)."""
        assert not isinstance(self.store, MemoryStore)
        try:
            left_ms = await self.store.execute(b"PTTL", self.lock_key(address).encode())
        except (StoreUnavailable, StoreBusy):  # believe the memory a while longer
            if address in self._locked:
                self._locked[address] = (self._locked[address][0], time.monotonic() + RECHECK_SECONDS)
        else:
            self._note(address, int(left_ms), time.monotonic())
        finally:
            del self._rechecks[address]

    def _remember(self, address: str, ends: float) -> None:
        if len(self._locked) >= LOCKS_REMEMBERED:
            now = time.monotonic()
            self._locked = {key: entry for key, entry in self._locked.items() if entry[0] > now}
            while len(self._locked) >= LOCKS_REMEMBERED:  # bounded, like the rate limiter's blocked keys
                del self._locked[next(iter(self._locked))]
        self._locked[address] = (ends, time.monotonic() + RECHECK_SECONDS)

    # --- operators: lift a lock ---------------------------------------------------------------

    async def lift(self, name: str, kind: str = "address") -> bool:
        """Lift the lock of an address (its rate-limit bucket) or a subject (`kind="subject"`), and
        forget its failures and repeats: the next lock starts from LOCKOUT_SECONDS again. Every
        replica lets it in within RECHECK_SECONDS and a round trip. Whether it was locked."""
        failures, lock, repeats = self._keys(name, kind)
        if kind == "address":
            self._locked.pop(name, None)
        else:
            self._subjects.pop(name, None)
        if isinstance(self.store, MemoryStore):
            locked = self._memory_left_ms(lock) > 0
            for key in (failures, lock, repeats):
                self.store.values.pop(key, None)
            return locked
        locked = int(await self.store.execute(b"DEL", lock.encode())) > 0
        await self.store.execute(b"DEL", failures.encode(), repeats.encode())  # one hash tag: one slot
        return locked

    # --- layer 4: record a refused credential ---------------------------------------------------

    async def failed(self, scope: Scope, subject: str | None = None) -> None:
        """Count one authentication failure of the request's address, and of `subject` (a token
        that verified but was refused); may start their lockouts. Store down: not counted (the
        request is refused with 401 all the same), logged."""
        targets = [("address", self.key(scope))] + ([("subject", subject)] if subject is not None else [])
        if isinstance(self.store, MemoryStore):
            started = [self._memory_record(self._keys(name, kind)) for kind, name in targets]
        else:
            commands = [RECORD_FAILURE.call(self._keys(name, kind), self._args()) for kind, name in targets]
            try:
                started = [int(reply) for reply in await self.store.run(commands)]
            except (StoreUnavailable, StoreBusy):
                now = time.monotonic()
                if now - self._warned_at >= WARNING_INTERVAL_SECONDS:  # once a minute, not per failure
                    self._warned_at = now
                    security_event("lockout_store_unavailable")
                return
        for (kind, name), started_ms in zip(targets, started, strict=True):
            if started_ms > 0:
                if kind == "address":
                    self._remember(name, time.monotonic() + started_ms / 1000)
                else:
                    self.note_subject(name, started_ms)
                security_event("lockout_started", locked=kind, seconds=math.ceil(started_ms / 1000))

    def _args(self) -> list[str | int]:
        return [self.window_ms, self.failures, self.first_ms, self.longest_ms]

    # --- without REDIS_URL (development) ----------------------------------------------------------

    def _memory_left_ms(self, key: str) -> int:
        assert isinstance(self.store, MemoryStore)
        entry = self.store.values.get(key)
        return 0 if entry is None else max(0, math.ceil((entry[1] - time.time()) * 1000))

    def _memory_record(self, keys: list[str]) -> int:
        assert isinstance(self.store, MemoryStore)
        failures_key, lock_key, repeats_key = keys
        failures, _ = self.store.count(failures_key, self.window_ms)
        if failures < self.failures:
            return 0
        self.store.set(failures_key, b"0", 0)
        repeats = int(self.store.get(repeats_key) or b"0") + 1
        ms: int = min(self.first_ms << (repeats - 1), self.longest_ms)
        self.store.set(lock_key, b"1", ms / 1000)
        self.store.set(repeats_key, str(repeats).encode(), (ms + self.longest_ms) / 1000)
        return ms
