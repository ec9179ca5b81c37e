"""The Redis client behind rate limits, revocation and lockout: one round trip per request.

`core` is the contract (`RemoteStore`, its errors, the round trip's deadline) with the single-node
client and the in-process fallback; `sentinel` and `cluster` are the other topologies REDIS_URL
can name (`topology`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cluster import ClusterStore
from .core import MemoryStore, NotReplicated, RedisStore, RemoteStore, StoreBusy, StoreUnavailable
from .sentinel import SentinelStore

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["MemoryStore", "NotReplicated", "RedisStore", "RemoteStore", "StoreBusy", "StoreUnavailable", "redis_store"]


def redis_store(settings: Settings) -> RemoteStore:
    """REDIS_URL (one node, Sentinel or Cluster, by its scheme) behind bounded pools that wait
    (REDIS_POOL_SIZE per node, REDIS_POOL_TIMEOUT_SECONDS); REDIS_TIMEOUT_SECONDS bounds each round
    trip, so an unreachable Redis fails fast. REDIS_TLS_* are the CA and client certificate files."""
    assert settings.redis_url
    options: dict[str, Any] = dict(
        timeout=settings.redis_timeout_seconds,
        pool_size=settings.redis_pool_size,
        pool_timeout=settings.redis_pool_timeout_seconds,
    )
    for option, value in (
        ("ssl_ca_certs", settings.redis_tls_ca_file),
        ("ssl_certfile", settings.redis_tls_cert_file),
        ("ssl_keyfile", settings.redis_tls_key_file),
    ):
        if value:
            options[option] = value
    topology = settings.redis_topology
    if topology.kind == "sentinel":
        return SentinelStore(topology, **options)
    if topology.kind == "cluster":
        return ClusterStore(topology, **options)
    return RedisStore(settings.redis_url, **options)
