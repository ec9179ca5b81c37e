"""Redis Cluster: each command goes to the primary that holds its keys' hash slot.

Every command the service sends touches keys of one slot (one key, or keys sharing a `{...}` hash
tag: tests/test_redis_topology.py checks each one), so a command never crosses slots and
CROSSSLOT cannot happen. A batch (`run`) is split by node: one round trip per node, the nodes
asked at the same time, the replies put back in order. Each primary has its own bounded pool
(`RedisStore`: REDIS_POOL_SIZE connections per primary).

The slot map comes from CLUSTER SLOTS, asked of the known primaries and then the seed nodes in
REDIS_URL. A MOVED reply (a failover, a resharding) points the slot at the node it names, resends
the command there and refreshes the whole map before the next batch; an ASK reply resends the
command once to the importing node after ASKING (and, if that node does not know the script yet,
sends its source after ASKING too: without ASKING it would answer MOVED, back to the source).

While a slot migrates (`redis-cli --cluster reshard`), a command on several keys of that slot
(the address window and its lock; the subject's revocation, window and lock) is answered TRYAGAIN
unless one node holds all its keys: on the source once one of them has moved, on the importing
node until all have. TRYAGAIN means nothing ran, so those calls are sent again after a short
pause (TRYAGAIN_FIRST_SECONDS, doubling up to TRYAGAIN_LONGEST_SECONDS) until the slot is done;
if it is not done within REDIS_TIMEOUT_SECONDS of the first TRYAGAIN, the request gets the
declared failure mode. A node that fails (connection refused, timeout) is StoreUnavailable for
that request and marks the map stale, so later requests find the promoted replica without a
restart.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from typing import Any

from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, NoScriptError, TryAgainError

from .core import Command, NotReplicated, Plain, RedisStore, RemoteStore, StoreBusy, StoreUnavailable, pack
from .topology import Address, Topology

SLOTS = 16384
MAX_REDIRECTS = 3  # MOVED and ASK replies followed for one call between two TRYAGAIN pauses
TRYAGAIN_FIRST_SECONDS = 0.005
TRYAGAIN_LONGEST_SECONDS = 0.1
REFRESH_INTERVAL_SECONDS = 0.25  # the least time between two refreshes after failures
ASKING = pack(b"ASKING")

Call = Command | Plain


class ClusterStore(RemoteStore):
    def __init__(
        self, topology: Topology, *, timeout: float, pool_size: int, pool_timeout: float, **connection: Any
    ) -> None:
        self.topology = topology
        self._scheme = "rediss://" if topology.tls else "redis://"
        self._options: dict[str, Any] = dict(
            timeout=timeout,
            pool_size=pool_size,
            pool_timeout=pool_timeout,
            username=topology.username,
            password=topology.password,
            **connection,
        )
        self.timeout = timeout
        self._nodes: dict[Address, RedisStore] = {}
        self._slots: list[RedisStore | None] = [None] * SLOTS
        self.primaries: list[RedisStore] = []
        self._stale = True
        self._refreshed_at = -math.inf
        self._refreshing = asyncio.Lock()

    def _node(self, address: Address) -> RedisStore:
        node = self._nodes.get(address)
        if node is None:
            host, port = address  # as options, not in the URL: an IPv6 host needs no brackets
            node = self._nodes[address] = RedisStore(self._scheme, host=host, port=port, **self._options)
        return node

    # --- the slot map -----------------------------------------------------------------------

    async def _refresh(self) -> None:
        async with self._refreshing:
            now = time.monotonic()
            if not self._stale or (self.primaries and now - self._refreshed_at < REFRESH_INTERVAL_SECONDS):
                return  # refreshed while this task waited, or just now
            self._refreshed_at = now
            known = [address for address, node in self._nodes.items() if node in self.primaries]
            for address in dict.fromkeys([*known, *self.topology.addresses]):
                try:
                    reply = await self._node(address).execute(b"CLUSTER", b"SLOTS")
                except (StoreUnavailable, StoreBusy):
                    continue
                self._apply(reply, address)
                self._stale = False
                return
            raise StoreUnavailable("no Redis Cluster node answered CLUSTER SLOTS")

    def _apply(self, reply: Any, asked: Address) -> None:
        """CLUSTER SLOTS: [start, end, [host, port, id, ...], replicas...] per range of slots."""
        slots: list[RedisStore | None] = [None] * SLOTS
        primaries: dict[Address, RedisStore] = {}
        for start, end, primary, *_replicas in reply:
            host = primary[0].decode() or asked[0]  # an empty host: the node that answered
            node = primaries[(host, int(primary[1]))] = self._node((host, int(primary[1])))
            slots[int(start) : int(end) + 1] = [node] * (int(end) - int(start) + 1)
        self._slots = slots
        self.primaries = list(primaries.values())

    def _owner(self, call: Call) -> RedisStore:
        node = self._slots[key_slot(call.keys[0])] if call.keys else self._any_primary()
        if node is None:
            self._stale = True
            raise StoreUnavailable("no Redis Cluster node serves this slot")
        return node

    def _any_primary(self) -> RedisStore | None:
        """Where a command without a key (PING, FLUSHDB) goes."""
        return self.primaries[0] if self.primaries else None

    # --- round trips ------------------------------------------------------------------------

    async def run(self, commands: Sequence[Command]) -> list[Any]:
        replies = await self._dispatch(commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise StoreUnavailable from reply
        return replies

    async def execute(self, *parts: bytes) -> Any:
        (reply,) = await self._dispatch([Plain(parts)])
        if isinstance(reply, Exception):
            raise StoreUnavailable from reply
        return reply

    async def write_replicated(self, *parts: bytes) -> Any:
        """On the primary of the key's slot, with its replicas (`RedisStore.write_replicated`); a
        MOVED reply points the slot elsewhere and the write is sent there."""
        call = Plain(parts)
        for _ in range(MAX_REDIRECTS + 1):
            if self._stale:
                await self._refresh()
            node = self._owner(call)
            try:
                return await node.write_replicated(*parts)
            except StoreUnavailable as exc:
                moved = exc.__cause__
                if isinstance(moved, MovedError):
                    self._slots[moved.slot_id] = self._node(moved.node_addr)
                    self._stale = True
                    continue
                if not isinstance(exc, NotReplicated):
                    self._stale = True  # a node failed: perhaps a failover; look again next time
                raise
        raise StoreUnavailable("too many Redis Cluster redirections")

    async def ping(self) -> None:
        if self._stale:
            await self._refresh()
        try:
            await asyncio.gather(*(node.ping() for node in self.primaries))
        except StoreUnavailable:
            self._stale = True
            raise

    async def aclose(self) -> None:
        for node in self._nodes.values():
            await node.aclose()

    async def _dispatch(self, calls: Sequence[Call]) -> list[Any]:
        """Each call to the node of its slot, one round trip per node, the nodes at once; MOVED
        and ASK replies resent where they point, TRYAGAIN replies after a pause."""
        if self._stale:
            await self._refresh()
        replies: list[Any] = [None] * len(calls)
        pending: dict[int, RedisStore | None] = dict.fromkeys(range(len(calls)))  # index -> ASK target
        redirects, pause, give_up_at = 0, TRYAGAIN_FIRST_SECONDS, math.inf
        while True:
            batches: dict[RedisStore, list[tuple[int, bool]]] = {}
            for index, asking in pending.items():
                batches.setdefault(asking or self._owner(calls[index]), []).append((index, asking is not None))
            try:
                if len(batches) == 1:
                    ((node, items),) = batches.items()
                    answers = [await self._send(node, calls, items)]
                else:
                    answers = await asyncio.gather(*(self._send(node, calls, items) for node, items in batches.items()))
            except StoreUnavailable:
                self._stale = True  # a node failed: perhaps a failover; look again next time
                raise
            pending, again = {}, False
            for items, answer in zip(batches.values(), answers, strict=True):
                for (index, _), reply in zip(items, answer, strict=True):
                    if isinstance(reply, MovedError):  # the slot has moved for good
                        self._slots[reply.slot_id] = self._node(reply.node_addr)
                        self._stale = True
                        pending[index] = None
                    elif isinstance(reply, AskError):  # this once, ask the importing node
                        pending[index] = self._node(reply.node_addr)
                    elif isinstance(reply, TryAgainError):  # the slot is migrating; nothing ran
                        pending[index] = None
                        again = True
                    else:
                        replies[index] = reply
            if not pending:
                return replies
            if again:
                now = time.monotonic()
                give_up_at = min(give_up_at, now + self.timeout)
                if now + pause > give_up_at:
                    raise StoreUnavailable("a Redis Cluster slot stayed migrating for REDIS_TIMEOUT_SECONDS")
                await asyncio.sleep(pause)
                pause = min(pause * 2, TRYAGAIN_LONGEST_SECONDS)
                redirects = 0
            else:
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise StoreUnavailable("too many Redis Cluster redirections")

    @staticmethod
    async def _send(node: RedisStore, calls: Sequence[Call], items: list[tuple[int, bool]]) -> list[Any]:
        """One round trip to `node`: the calls at `items` (ASKING before those redirected by ASK).
        Calls answered NOSCRIPT go once more with their source, after ASKING where they had it."""
        batch = [(calls[index], asking) for index, asking in items]
        replies = await ClusterStore._exchange(node, batch)
        unknown = [position for position, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown:
            resent = await ClusterStore._exchange(node, [batch[position] for position in unknown], by_sha=False)
            for position, reply in zip(unknown, resent, strict=True):
                replies[position] = reply
        return replies

    @staticmethod
    async def _exchange(node: RedisStore, batch: list[tuple[Call, bool]], *, by_sha: bool = True) -> list[Any]:
        payload = b"".join((ASKING if asking else b"") + call.packed(by_sha=by_sha) for call, asking in batch)
        raw = await node._round_trip(payload, len(batch) + sum(asking for _, asking in batch))
        replies, position = [], 0
        for _, asking in batch:
            position += asking  # skip ASKING's +OK
            replies.append(raw[position])
            position += 1
        return replies
