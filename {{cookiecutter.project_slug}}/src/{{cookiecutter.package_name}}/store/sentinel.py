"""Redis Sentinel: the same store, its connections made to the one node the sentinels call primary.

`SentinelStore` is `RedisStore` whose connections all go to one address, the primary's. It learns
that address from the sentinels and keeps it current without asking them on the request path:

- It follows every sentinel's `+switch-master` announcements (one subscription per sentinel, in a
  background task). When one names a new primary, new connections go there, the idle connections
  to the old one are closed at once, and each one still in use is closed when its round trip ends:
  from the announcement on no command is sent to the old primary, which a `SENTINEL FAILOVER`
  leaves writable for 8-10 s (until Sentinel demotes it). Writes there would be lost.
- Asking the sentinels (at start, each time a subscription is made, and on READONLY) asks them all
  at once and believes the newest configuration (the highest config epoch) among those that see a
  healthy primary (redis-py's `check_master_state`): a sentinel that has not heard of a failover
  yet cannot send the store back to the old primary.
- A READONLY reply means the node written to has been demoted: the primary moved. The store asks
  the sentinels and sends the round trip again, once, to the primary they name, never to the node
  that answered READONLY (nothing ran there: a replica refuses a script's first write).

Until the sentinels promote a replica after a primary fails, requests get the declared failure
mode (RATE_LIMIT_FAILURE_MODE); no restart. The request path costs what it costs on one node.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, Connection, ConnectionPool, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, ReadOnlyError, RedisError

from .core import RedisStore
from .topology import Address, Topology

SWITCH_CHANNEL = "+switch-master"
RESUBSCRIBE_SECONDS = 0.5  # between two attempts to subscribe to a sentinel that is down


class PrimaryMoved(ConnectionError):
    """The node this connection writes to answered READONLY: it is a replica now."""

    def __init__(self, address: Address) -> None:
        super().__init__("the primary has moved: this node is a replica now")
        self.address = address


class PrimaryConnection(Connection):
    """A connection to the address its store holds as the primary's when it connects."""

    def __init__(self, *, store: SentinelStore, **options: Any) -> None:
        self.store = store
        super().__init__(**options)

    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        # redis-py's command layer would call `connect()`; `RedisStore` lets the first send connect.
        while not self.is_connected:
            self.host, self.port = address = await self.store.primary_address()
            await super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)
            if self.store.primary != address:  # the primary moved while this connected
                await self.disconnect()

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ReadOnlyError as exc:
            raise PrimaryMoved((self.host, self.port)) from exc


class PrimarySSLConnection(PrimaryConnection, SSLConnection):
    pass


class SentinelStore(RedisStore):
    def __init__(
        self, topology: Topology, *, timeout: float, pool_size: int, pool_timeout: float, **connection: Any
    ) -> None:
        self.topology = topology
        self.primary: Address | None = None  # where every connection goes
        self._epoch = -1  # the config epoch of the sentinels' configuration that named it
        self._asked = 0  # how many times the sentinels have answered
        self._asking = asyncio.Lock()
        self._watchers: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Task[None]] = set()
        super().__init__("", timeout=timeout, pool_size=pool_size, pool_timeout=pool_timeout, **connection)

    def _connections(self, url: str, **options: Any) -> ConnectionPool:
        topology = self.topology
        # The sentinels are asked over TLS when the nodes are, with the round trip's timeout.
        self._sentinel_options: dict[str, Any] = {"socket_connect_timeout": self.timeout}
        if topology.tls:
            self._sentinel_options |= {"ssl": True} | {
                name: value for name, value in options.items() if name.startswith("ssl_")
            }
        # Called through Any: redis-py types Sentinel.__init__ from 8.2 on only (mypy is clean on both).
        self.sentinels: Sentinel = cast(Any, Sentinel)(
            list(topology.addresses), sentinel_kwargs={"socket_timeout": self.timeout, **self._sentinel_options}
        )
        return ConnectionPool(
            connection_class=PrimarySSLConnection if topology.tls else PrimaryConnection,
            store=self,
            db=topology.db,
            username=topology.username,
            password=topology.password,
            **options,
        )

    # --- the pool: connections to the current primary only --------------------------------------

    def _release(self, connection: AbstractConnection) -> None:
        if (connection.host, connection.port) == self.primary:  # type: ignore[attr-defined]
            super()._release(connection)
            return
        # Its round trip began before the primary moved: never used again.
        self._all.discard(connection)
        self._slots.release()
        self._close_later(connection)

    def _close_later(self, connection: AbstractConnection) -> None:
        task = asyncio.ensure_future(connection.disconnect(nowait=True))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _worth_retrying(self, exc: Exception, fresh: bool) -> bool:
        if isinstance(exc, PrimaryMoved):
            with contextlib.suppress(RedisError):
                await self.ask_sentinels()
            return self.primary != exc.address  # never again to the node that answered READONLY
        return await super()._worth_retrying(exc, fresh)

    # --- where the primary is -------------------------------------------------------------------

    async def primary_address(self) -> Address:
        """The primary's address, from the sentinels the first time (when connecting)."""
        if not self._watchers:
            self._watchers = [asyncio.ensure_future(self._watch(address)) for address in self.topology.addresses]
        if self.primary is None:
            await self.ask_sentinels()
        assert self.primary is not None
        return self.primary

    async def ask_sentinels(self) -> None:
        """Ask every sentinel at once and follow the newest configuration among those that name a
        healthy primary. Callers that wait while another asks take its answer. Raises
        MasterNotFoundError when no sentinel names one (they may be promoting a replica)."""
        asked = self._asked
        async with self._asking:
            if self._asked != asked:
                return
            service = self.topology.service
            states = await asyncio.gather(
                *(sentinel.sentinel_master(service) for sentinel in self.sentinels.sentinels), return_exceptions=True
            )
            healthy = [
                state
                for state in states
                if isinstance(state, dict) and self.sentinels.check_master_state(state, service)
            ]
            if not healthy:
                raise MasterNotFoundError(f"no sentinel names a healthy primary for {service!r}")
            newest = max(healthy, key=lambda state: int(state["config-epoch"]))
            await self._follow((newest["ip"], int(newest["port"])), int(newest["config-epoch"]))
            self._asked += 1

    async def _follow(self, address: Address, epoch: int) -> None:
        """Send every later command to `address`, unless an older configuration names it."""
        if epoch < self._epoch:
            return
        self._epoch = epoch
        if address == self.primary:
            return
        self.primary = address
        stale, self._idle = self._idle, []  # before any await: no round trip can take one
        for connection in stale:
            self._all.discard(connection)
        for connection in stale:
            await connection.disconnect(nowait=True)

    async def _announced(self, data: bytes) -> None:
        """`+switch-master <service> <old ip> <old port> <new ip> <new port>`, from one sentinel
        (each sentinel announces the switch it learns of; the first one counts)."""
        service, old_host, old_port, new_host, new_port = data.decode().split()
        if service != self.topology.service:
            return
        old, new = (old_host, int(old_port)), (new_host, int(new_port))
        if new == self.primary:
            return  # another sentinel said so first
        if old == self.primary:
            # A failover takes a newer epoch than the configuration it replaces: at least one more.
            await self._follow(new, self._epoch + 1)
        else:  # a switch this store did not see: ask which configuration is the newest
            with contextlib.suppress(RedisError):
                await self.ask_sentinels()

    async def _watch(self, address: Address) -> None:
        """Hold a subscription to one sentinel's `+switch-master`, made again when it breaks; each
        time it is made, ask the sentinels (an announcement may have been missed meanwhile)."""
        host, port = address
        # Its own client: no read timeout (announcements are rare), no silent reconnects.
        client = Redis(host=host, port=port, retry=Retry(NoBackoff(), 0), **self._sentinel_options)
        try:
            while True:
                try:
                    async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                        await pubsub.subscribe(SWITCH_CHANNEL)
                        if self.primary is not None:
                            with contextlib.suppress(RedisError):
                                await self.ask_sentinels()
                        async for message in pubsub.listen():
                            if message["type"] == "message":
                                await self._announced(message["data"])
                except (RedisError, OSError, ValueError):
                    pass
                await asyncio.sleep(RESUBSCRIBE_SECONDS)
        finally:
            await client.aclose()

    async def aclose(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
        for watcher in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        self._watchers = []
        await super().aclose()
        await self.sentinels.aclose()
