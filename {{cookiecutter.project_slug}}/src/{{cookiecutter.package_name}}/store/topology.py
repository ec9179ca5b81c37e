"""REDIS_URL names the Redis topology by its scheme; this reads it (no I/O, no Redis import).

- `redis://host:6379/0`, `rediss://...` (TLS), `unix:///path.sock`: one node (`RedisStore`).
- `redis+sentinel://s1:26379,s2:26379,s3:26379/mymaster` (optionally `/mymaster/0` for the
  database): the primary the sentinels name for the service `mymaster` (`SentinelStore`).
- `redis+cluster://n1:6379,n2:6379`: a Redis Cluster found from these seed nodes (`ClusterStore`).

`rediss+sentinel://` and `rediss+cluster://` use TLS to every node (and to the sentinels). A user
name and password before the hosts (`redis+cluster://:secret@n1:6379`) authenticate to the data
nodes; sentinels are asked without credentials. `Topology.remote_without_password` is what
production refuses (config.py): anyone who reaches such a Redis can delete revocations and lift
lockouts.

Errors never repeat the URL: it may hold a password.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

SINGLE_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_PORTS = {"sentinel": 26379, "cluster": 6379}
SCHEMES_HELP = (
    "redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, redis+cluster:// or rediss+cluster://"
)

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Topology:
    kind: Literal["single", "sentinel", "cluster"]
    tls: bool
    addresses: tuple[Address, ...] = ()  # the node, the sentinels, or the cluster's seed nodes
    service: str = ""  # Sentinel: the primary's service name
    db: int = 0
    username: str | None = None
    password: str | None = None

    @property
    def remote_without_password(self) -> bool:
        """No password (nor ACL user's password) and a host other than this machine's loopback:
        whoever reaches that address may write to it. A unix socket is local."""
        return self.password is None and any(not is_loopback(host) for host, _ in self.addresses)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: resolved elsewhere, perhaps to another machine


def parse_redis_url(url: str) -> Topology:
    """The topology REDIS_URL describes; ValueError (without the URL) when it describes none."""
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme in SINGLE_SCHEMES and rest:
        return _single(scheme, rest)
    base, _, kind = scheme.partition("+")
    if base not in ("redis", "rediss") or kind not in ("sentinel", "cluster") or not rest:
        raise ValueError(f"the scheme must be one of {SCHEMES_HELP}")
    parts = urlsplit(f"{scheme}://{rest}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    addresses = tuple(_address(host, DEFAULT_PORTS[kind]) for host in hosts.split(",") if host.strip())
    if not addresses:
        raise ValueError(f"{scheme}:// needs at least one host:port")
    path = [segment for segment in parts.path.split("/") if segment]
    service, db = "", 0
    if kind == "sentinel":
        if not path or len(path) > 2:
            raise ValueError("redis+sentinel:// needs the service name as its path: .../mymaster or .../mymaster/0")
        service = unquote(path[0])
        db = _db(path[1]) if len(path) == 2 else 0
    elif path and path != ["0"]:
        raise ValueError("redis+cluster:// has no database path: a Redis Cluster has database 0 only")
    return Topology(
        kind,  # type: ignore[arg-type]  # checked above
        tls=base == "rediss",
        addresses=addresses,
        service=service,
        db=db,
        username=unquote(username) or None,
        password=unquote(password) or None,
    )


def _single(scheme: str, rest: str) -> Topology:
    """One node: redis-py reads the URL itself (store/core.py); its host and credentials are kept
    here for the production checks (a password may also be a `?password=` query parameter)."""
    if scheme == "unix":
        return Topology("single", tls=False)
    parts = urlsplit(f"{scheme}://{rest}")
    query = parse_qs(parts.query)
    password = parts.password or (query.get("password") or [""])[0]
    username = parts.username or (query.get("username") or [""])[0]
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("the port must be a number between 1 and 65535") from None
    return Topology(
        "single",
        tls=scheme == "rediss",
        addresses=((parts.hostname or "localhost", port),),
        username=unquote(username) or None,
        password=unquote(password) or None,
    )


def _address(text: str, default_port: int) -> Address:
    text = text.strip()
    if text.startswith("["):  # [::1]:26379
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError("each host must be host or host:port")
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise ValueError("each port must be a number") from None
    if not 0 < number < 65536:
        raise ValueError("each port must be between 1 and 65535")
    return host, number


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError("the database after the service name must be a number")
    return int(text)
