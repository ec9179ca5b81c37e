"""Redis Sentinel: the same store, its connections made to whichever node the sentinels call primary.

`SentinelStore` is `RedisStore` with another connection factory: redis-py's sentinel-managed
connections ask the sentinels for the service's primary each time they connect. After a failover
the old primary's connections fail (refused, reset, or a READONLY reply once it is back as a
replica, which redis-py turns into a connection error); `RedisStore` closes them, retries a pooled
connection once, and the new connection asks the sentinels again. Until the sentinels have
promoted a replica, requests get the declared failure mode (RATE_LIMIT_FAILURE_MODE); no restart.
The request path costs what it costs on one node: the sentinels are asked only on connect.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.connection import ConnectionPool, SSLConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

from .core import RedisStore
from .topology import Topology


class PrimaryConnection(SentinelManagedConnection):
    """A connection to the primary the sentinels name now. redis-py asks the sentinels in
    `connect()`, which its command layer calls; `RedisStore` lets the first send connect, so the
    asking happens here."""

    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if not self.is_connected:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)


class PrimarySSLConnection(PrimaryConnection, SSLConnection):
    pass


class SentinelStore(RedisStore):
    def __init__(
        self, topology: Topology, *, timeout: float, pool_size: int, pool_timeout: float, **connection: Any
    ) -> None:
        self.topology = topology
        super().__init__("", timeout=timeout, pool_size=pool_size, pool_timeout=pool_timeout, **connection)

    def _connections(self, url: str, **options: Any) -> ConnectionPool:
        topology = self.topology
        # The sentinels are asked with the round trip's timeout, over TLS when the nodes are.
        timeout = self.timeout
        sentinel_options: dict[str, Any] = {"socket_connect_timeout": timeout, "socket_timeout": timeout}
        if topology.tls:
            sentinel_options |= {"ssl": True} | {
                name: value for name, value in options.items() if name.startswith("ssl_")
            }
        manager = Sentinel(list(topology.addresses), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
        self.sentinels = manager
        return SentinelConnectionPool(  # type: ignore[no-untyped-call]
            topology.service,
            manager,
            connection_class=PrimarySSLConnection if topology.tls else PrimaryConnection,
            db=topology.db,
            username=topology.username,
            password=topology.password,
            **options,
        )

    async def aclose(self) -> None:
        await super().aclose()
        await self.sentinels.aclose()
