"""The shared store of the rate limits and revocations: Redis, reached in one round trip per request.

`RedisStore` sends a request's commands (a rate-limit window, the revocation check and the subject's
window) as one write and reads their replies in order: one round trip, however many checks. It
keeps its own small pool of redis-py connections (redis-py's protocol, parser and TLS; hiredis
when installed) and skips redis-py's command layer, whose pool checkout, retry wrapper and per-read
timers cost more CPU than the round trip itself (docs/decisions/redis-round-trip.md).

Every command touches keys of one hash slot (one key, or keys sharing a `{...}` hash tag), so the
same commands run unchanged on a Redis Cluster node. REDIS_URL's scheme picks the topology
(topology.py): `RedisStore` is one node, `SentinelStore` (sentinel.py) the primary a group of
sentinels names, `ClusterStore` (cluster.py) a Redis Cluster; all answer as a `RemoteStore`.

The pool is bounded and waits: a burst queues for a connection instead of failing. Waiting longer
than REDIS_POOL_TIMEOUT_SECONDS is `StoreBusy` (this process is overloaded: 503 whatever the failure
mode), never `StoreUnavailable` (Redis refused, timed out or failed: the declared failure mode).
Likewise a round trip's timeout is judged when it fires (`Deadline`): an event loop too busy to
read a reply that may well have arrived is this process's overload, not Redis's silence, so it
never makes `open` mode serve a request unchecked (a flood must not switch revocation off).

`MemoryStore` answers the same commands from process memory, for development without REDIS_URL.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import NoScriptError, RedisError, ResponseError

SWEEP_INTERVAL_SECONDS = 60.0


class StoreUnavailable(Exception):
    """Redis refused the connection, did not answer in time, or failed the command."""


class NotReplicated(StoreUnavailable):
    """A write reached the primary, but no replica acknowledged it within REDIS_TIMEOUT_SECONDS: a
    failover could lose it, so it is not reported as done (`RemoteStore.write_replicated`)."""


class StoreBusy(Exception):
    """This process is overloaded: every connection of its pool stayed in use for
    REDIS_POOL_TIMEOUT_SECONDS, or its event loop was too busy to read Redis's replies in time."""


# A timer that fires this late found the event loop busy: the reply may be waiting unread.
LATE_SECONDS = 0.02
# How many more periods such a round trip waits before it counts as this process's overload.
LATE_EXTENSIONS = 3


class Deadline:
    """`asyncio.timeout(seconds)`, except that expiry is judged when the timer fires. On a busy
    event loop a timer and the reply it guards become ready in the same turn, and the timer runs
    first: a plain timeout would cancel a round trip whose reply is already in. A timer that fires
    more than LATE_SECONDS late therefore waits one more period (at most LATE_EXTENSIONS times),
    then expires with `overloaded` set; one that fires on time expires as Redis's timeout."""

    __slots__ = ("_due", "_extensions", "_handle", "_loop", "_timeout", "overloaded", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.overloaded = False

    async def __aenter__(self) -> Deadline:
        self._loop = asyncio.get_running_loop()
        self._timeout = asyncio.timeout(None)
        await self._timeout.__aenter__()
        self._extensions = 0
        self._arm()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._handle.cancel()
        await self._timeout.__aexit__(*exc_info)

    def _arm(self) -> None:
        self._due = self._loop.time() + self.seconds
        self._handle = self._loop.call_at(self._due, self._fire)

    def _fire(self) -> None:
        if self._loop.time() - self._due > LATE_SECONDS:
            if self._extensions < LATE_EXTENSIONS:
                self._extensions += 1
                self._arm()
                return
            self.overloaded = True
        self._timeout.reschedule(self._loop.time())  # expires now: the round trip is cancelled


class Script:
    """A Lua script sent by its SHA1 (EVALSHA), and in full only when Redis does not know it yet."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source, usedforsecurity=False).hexdigest().encode()

    def call(self, keys: Sequence[str], args: Sequence[str | int]) -> Command:
        return Command(self, [key.encode() for key in keys], [str(arg).encode() for arg in args])


class Command:
    """One script call: what a check asks of the store."""

    __slots__ = ("args", "keys", "script")

    def __init__(self, script: Script, keys: list[bytes], args: list[bytes]) -> None:
        self.script = script
        self.keys = keys
        self.args = args

    def packed(self, *, by_sha: bool = True) -> bytes:
        """RESP: `EVALSHA sha numkeys key... arg...` (or EVAL with the source)."""
        head = (b"EVALSHA", self.script.sha) if by_sha else (b"EVAL", self.script.source)
        return pack(*head, str(len(self.keys)).encode(), *self.keys, *self.args)


class Plain:
    """One plain command (SET, PING), packed like a script call; its key, if any, is `parts[1]`."""

    __slots__ = ("keys", "parts")

    def __init__(self, parts: Sequence[bytes]) -> None:
        self.parts = parts
        self.keys = list(parts[1:2])

    def packed(self, *, by_sha: bool = True) -> bytes:
        return pack(*self.parts)


def pack(*parts: bytes) -> bytes:
    """RESP encoding of one plain command."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class RemoteStore:
    """What the checks ask of Redis, whatever its topology."""

    async def run(self, commands: Sequence[Command]) -> list[Any]:
        """Run script calls (in one round trip per node); their replies in order. Raises
        StoreUnavailable (Redis down, or an error reply) or StoreBusy (this process's pool)."""
        raise NotImplementedError

    async def execute(self, *parts: bytes) -> Any:
        """One plain command on the node that holds its key (`parts[1]`): not on the request path."""
        raise NotImplementedError

    async def write_replicated(self, *parts: bytes) -> Any:
        """One write (a revocation) on the node that holds its key, returned once at least one
        replica of that node has it too: `WAIT 1`, where the node has replicas connected (a node
        without any, alone, needs none). Raises NotReplicated when none acknowledged it within
        REDIS_TIMEOUT_SECONDS: then the primary may keep the write (it refuses early, never late)
        but the caller reports it as not done. Not on the request path."""
        raise NotImplementedError

    async def ping(self) -> None:
        """PING every primary the service writes to (readiness); raises StoreUnavailable."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class RedisStore(RemoteStore):
    """Commands in one round trip over a bounded pool of connections that waits when all are busy."""

    def __init__(self, url: str, *, timeout: float, pool_size: int, pool_timeout: float, **connection: Any) -> None:
        # redis-py parses the URL (redis://, rediss:// with its TLS options, unix://) and builds
        # connections; neither connecting nor reading has a timer of its own: the whole round trip,
        # a first one's connect included, has one (`timeout`, judged by `Deadline`).
        # `connection`: more connection options (the REDIS_TLS_* files).
        self.timeout = timeout
        self._factory = self._connections(url, socket_connect_timeout=None, socket_timeout=None, **connection)
        self.pool_size = pool_size
        self.pool_timeout = pool_timeout
        self._idle: list[AbstractConnection] = []
        self._slots = asyncio.Semaphore(pool_size)
        self._all: set[AbstractConnection] = set()

    def _connections(self, url: str, **options: Any) -> ConnectionPool:
        """The factory of this store's connections (redis-py's pool, used only to make them)."""
        return ConnectionPool.from_url(url, **options)

    # --- the pool ---------------------------------------------------------------------------

    async def _acquire(self) -> AbstractConnection:
        if self._slots.locked():
            try:
                async with asyncio.timeout(self.pool_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise StoreBusy from None
        else:
            await self._slots.acquire()  # returns at once: a slot is free
        if self._idle:
            return self._idle.pop()
        connection: AbstractConnection = self._factory.make_connection()  # type: ignore[no-untyped-call]
        self._all.add(connection)
        return connection

    def _release(self, connection: AbstractConnection) -> None:
        self._idle.append(connection)
        self._slots.release()

    async def _discard(self, connection: AbstractConnection) -> None:
        """A connection whose replies may be out of step: closed, its slot given back."""
        self._all.discard(connection)
        try:
            await connection.disconnect(nowait=True)
        finally:
            self._slots.release()

    def pool_usage(self) -> tuple[int, int, int]:
        """Connections (in use, open, at most), for the metrics listener (metrics.py)."""
        return len(self._all) - len(self._idle), len(self._all), self.pool_size

    async def aclose(self) -> None:
        for connection in list(self._all):
            await connection.disconnect(nowait=True)
        self._all.clear()
        self._idle.clear()

    # --- round trips ------------------------------------------------------------------------

    async def run(self, commands: Sequence[Command]) -> list[Any]:
        """Run script calls in one round trip; their replies in order."""
        replies = await self._round_trip(b"".join(command.packed() for command in commands), len(commands))
        if any(isinstance(reply, NoScriptError) for reply in replies):
            replies = await self.resend_unknown_scripts(commands, replies)
        for reply in replies:
            if isinstance(reply, Exception):
                raise StoreUnavailable from reply
        return replies

    async def resend_unknown_scripts(self, commands: Sequence[Command | Plain], replies: list[Any]) -> list[Any]:
        """Send once more, with their source, the calls answered NOSCRIPT (a restart or a
        SCRIPT FLUSH, or a script it has not seen yet). Those did not run; the others did and are
        not sent again, so nothing is counted twice."""
        unknown = [index for index, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        payload = b"".join(commands[index].packed(by_sha=False) for index in unknown)
        replies = list(replies)
        for index, reply in zip(unknown, await self._round_trip(payload, len(unknown)), strict=True):
            replies[index] = reply
        return replies

    async def execute(self, *parts: bytes) -> Any:
        """One plain command (writes of revocations, PING): not on the request path."""
        (reply,) = await self._round_trip(pack(*parts), 1)
        if isinstance(reply, Exception):
            raise StoreUnavailable from reply
        return reply

    async def write_replicated(self, *parts: bytes) -> Any:
        # Asked per write (a revocation is rare): a replica added or gone is seen at once.
        if not has_replicas(await self.execute(b"INFO", b"replication")):
            return await self.execute(*parts)
        # WAIT counts the writes of its own connection: it travels with the write, in one round trip
        # (and with it when the write is sent again to a primary that moved meanwhile).
        wait_ms = str(math.ceil(self.timeout * 1000)).encode()
        reply, acknowledged = await self._round_trip(
            pack(*parts) + pack(b"WAIT", b"1", wait_ms), 2, seconds=2 * self.timeout
        )
        if isinstance(reply, Exception):
            raise StoreUnavailable from reply
        if isinstance(acknowledged, Exception) or int(acknowledged) < 1:
            raise NotReplicated("no replica acknowledged the write within REDIS_TIMEOUT_SECONDS")
        return reply

    async def ping(self) -> None:
        await self.execute(b"PING")

    async def _round_trip(self, payload: bytes, count: int, *, seconds: float | None = None) -> list[Any]:
        connection = await self._acquire()
        retried = False
        while True:
            fresh = not connection.is_connected
            deadline = Deadline(seconds or self.timeout)
            try:
                async with deadline:
                    await connection.send_packed_command(payload, check_health=False)
                    replies = [await self._reply(connection) for _ in range(count)]
            except (RedisError, OSError, TimeoutError) as exc:
                await self._discard(connection)
                if deadline.overloaded:
                    raise StoreBusy from exc
                if retried or not await self._worth_retrying(exc, fresh):
                    raise StoreUnavailable from exc
                retried = True
                connection = await self._acquire()
                continue
            except BaseException:
                await self._discard(connection)  # cancelled mid-read: the replies are out of step
                raise
            self._release(connection)
            return replies

    async def _worth_retrying(self, exc: Exception, fresh: bool) -> bool:
        """Whether a round trip that failed with `exc` is tried once more. A pooled connection that
        Redis closed (a restart, an idle timeout) fails on first use: one more try on a new
        connection. A new connection that fails, or a reply not back in time, is an outage."""
        return not fresh and not isinstance(exc, TimeoutError)

    @staticmethod
    async def _reply(connection: AbstractConnection) -> Any:
        try:
            return await connection.read_response(disable_decoding=True)
        except ResponseError as error:  # an error reply: the stream is still in step
            return error


def has_replicas(info: Any) -> bool:
    """From INFO replication: whether a write there must wait for a replica. A primary says how many
    are connected; a node that is not a primary (demoted since the store last looked: the write
    will go to the new primary) is answered "yes", so the write never goes without its WAIT."""
    text = info.decode() if isinstance(info, bytes) else str(info)
    fields = dict(line.strip().partition(":")[::2] for line in text.splitlines() if ":" in line)
    return fields.get("role") != "master" or int(fields.get("connected_slaves", "0")) > 0


class MemoryStore:
    """The same scripts' effects in process memory (development without REDIS_URL). Nothing here
    awaits, so on one event loop each call is as atomic as a script. Each process counts alone."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[bytes, float]] = {}  # key -> value, expiry (time.time())
        self.next_sweep = 0.0

    def _sweep(self, now: float) -> None:
        if now >= self.next_sweep:
            self.values = {key: entry for key, entry in self.values.items() if entry[1] > now}
            self.next_sweep = now + SWEEP_INTERVAL_SECONDS

    def get(self, key: str) -> bytes | None:
        entry = self.values.get(key)
        return entry[0] if entry is not None and entry[1] > time.time() else None

    def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        now = time.time()
        self._sweep(now)
        self.values[key] = (value, now + ttl_seconds)

    def count(self, key: str, window_ms: int) -> tuple[int, int]:
        """INCR in a fixed window: the count and the milliseconds left."""
        now = time.time()
        self._sweep(now)
        value, ends = self.values.get(key, (b"0", 0.0))
        count = int(value) + 1 if ends > now else 1
        if ends <= now:
            ends = now + window_ms / 1000
        self.values[key] = (str(count).encode(), ends)
        return count, math.ceil((ends - now) * 1000)
