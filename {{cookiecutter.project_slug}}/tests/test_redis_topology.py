"""Redis as teams run it: one node, Sentinel or Cluster (REDIS_URL's scheme), with TLS. Against real
redis-server processes on loopback: a three-primary Cluster and a TLS-only server with a throwaway
CA. Failovers and resharding under traffic (Sentinel and Cluster): test_redis_failover.py."""

from __future__ import annotations

import asyncio
import pkgutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, ClassVar

import httpx
import jwt
import pytest
from fastapi import FastAPI
from redis.crc import key_slot

import {{ cookiecutter.package_name }}.security
from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import SERVICE_NAME, ConfigError, Settings
from {{ cookiecutter.package_name }}.security.admission import ADDRESS_CHECK, SUBJECT_CHECK, Admission
from {{ cookiecutter.package_name }}.security.limiter import WINDOW, Policy, RateLimiter, window
from {{ cookiecutter.package_name }}.security.lockout import Lockout
from {{ cookiecutter.package_name }}.security.principal import Principal
from {{ cookiecutter.package_name }}.security.ratelimit import client_bucket
from {{ cookiecutter.package_name }}.security.revocation import Revocations, tag
from {{ cookiecutter.package_name }}.startup import load_settings
from {{ cookiecutter.package_name }}.store import redis_store
from {{ cookiecutter.package_name }}.store.cluster import SLOTS, ClusterStore
from {{ cookiecutter.package_name }}.store.core import Command, NotReplicated, Plain, RedisStore, RemoteStore, Script, pack
from {{ cookiecutter.package_name }}.store.topology import Topology, parse_redis_url

from .conftest import AUDIENCE, ISSUER, TokenFactory, bearer, principal, running
from .servers import (
    RedisCluster,
    TlsFiles,
    make_tls_files,
    redis_client,
    start_cluster,
    start_sentinel_group,
    start_tls_redis,
)

PROBE = "/api/v1/orgs/00000000-0000-0000-0000-000000000000"  # with a token: 403 once admitted (not a member)


# --- REDIS_URL: the scheme picks the topology --------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", Topology("single", tls=False, addresses=(("127.0.0.1", 6379),))),
        ("rediss://redis.internal:6380/1", Topology("single", tls=True, addresses=(("redis.internal", 6380),))),
        (
            "redis://app:s%3Acret@redis/0",
            Topology("single", False, (("redis", 6379),), username="app", password="s:cret"),
        ),
        ("redis://[::1]/0?password=pw", Topology("single", False, (("::1", 6379),), password="pw")),
        ("unix:///run/redis.sock", Topology("single", tls=False)),
        (
            "redis+sentinel://s1:26380,s2,[::1]:26381/mymaster",
            Topology("sentinel", False, (("s1", 26380), ("s2", 26379), ("::1", 26381)), "mymaster"),
        ),
        (
            "rediss+sentinel://user:p%40ss@s1:26379/mymaster/2",
            Topology("sentinel", True, (("s1", 26379),), "mymaster", 2, "user", "p@ss"),
        ),
        (
            "redis+cluster://:secret@n1:7000,n2:7001",
            Topology("cluster", False, (("n1", 7000), ("n2", 7001)), password="secret"),
        ),
        ("rediss+cluster://n1/", Topology("cluster", True, (("n1", 6379),))),
    ],
)
def test_the_scheme_of_redis_url_picks_the_topology(url: str, expected: Topology) -> None:
    assert parse_redis_url(url) == expected


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, public_pem: str) -> Callable[..., Settings]:
    """load_settings() with these variables (and the required ones), as the service reads them."""
    monkeypatch.chdir(tmp_path)  # no .env file

    def load(**variables: str) -> Settings:
        base = {"ENVIRONMENT": "test", "JWT_PUBLIC_KEY": public_pem, "JWT_ISSUER": ISSUER, "JWT_AUDIENCE": AUDIENCE}
        for name, value in {**base, **variables}.items():
            monkeypatch.setenv(name, value)
        return load_settings()

    return load


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"REDIS_URL": "http://:hunter2@n1:6379"}, "REDIS_URL: the scheme must be one of"),
        ({"REDIS_URL": "redis+sentinel://:hunter2@s1:26379"}, "REDIS_URL: redis+sentinel:// needs the service name"),
        ({"REDIS_URL": "redis+cluster://:hunter2@n1:6379/3"}, "REDIS_URL: redis+cluster:// has no database"),
        ({"REDIS_URL": "redis+cluster://:hunter2@n1:x"}, "REDIS_URL: each port must be a number"),
        ({"REDIS_URL": "redis+cluster://:hunter2@"}, "REDIS_URL: redis+cluster:// needs at least one host"),
        ({"REDIS_URL": "redis://:hunter2@n1:6379/0", "REDIS_TLS_CA_FILE": "/ca.pem"}, "REDIS_TLS_CA_FILE: only with"),
        (
            {"REDIS_URL": "rediss://:hunter2@n1:6379/0", "REDIS_TLS_CERT_FILE": "/client.pem"},
            "REDIS_TLS_CERT_FILE and REDIS_TLS_KEY_FILE: set both",
        ),
    ],
)
def test_a_redis_url_that_names_no_topology_is_refused_naming_the_setting_never_its_password(
    environment: Callable[..., Settings], variables: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        environment(**variables)
    assert message in str(refused.value)
    assert "hunter2" not in str(refused.value)


def test_each_scheme_builds_its_store(environment: Callable[..., Settings]) -> None:
    kinds = {
        "redis://127.0.0.1:6379/0": "RedisStore",
        "redis+sentinel://127.0.0.1:26379/mymaster": "SentinelStore",
        "redis+cluster://127.0.0.1:7000": "ClusterStore",
    }
    for url, kind in kinds.items():
        assert type(redis_store(environment(REDIS_URL=url))).__name__ == kind


# --- CROSSSLOT is impossible by construction ----------------------------------------------------


class Recorder(RemoteStore):
    """Answers like Redis would and keeps every command the service sends."""

    REPLIES: ClassVar[dict[Script, Any]] = {
        ADDRESS_CHECK: [1, 60_000, 0],
        SUBJECT_CHECK: [1, 60_000],
        WINDOW: [1, 60_000],
    }

    def __init__(self) -> None:
        self.sent: list[Command | Plain] = []

    async def run(self, commands: Sequence[Command]) -> list[Any]:
        self.sent.extend(commands)
        return [self.REPLIES.get(command.script, 0) for command in commands]

    async def execute(self, *parts: bytes) -> Any:
        self.sent.append(Plain(parts))
        return b"OK"

    async def write_replicated(self, *parts: bytes) -> Any:
        return await self.execute(*parts)  # the WAIT that follows has no key


def scripts_of_the_service() -> set[Script]:
    """Every Script object defined in the security package's modules."""
    package = {{ cookiecutter.package_name }}.security
    for module in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        __import__(module.name)
    return {
        value
        for name, module in list(sys.modules.items())
        if name.startswith(package.__name__)
        for value in vars(module).values()
        if isinstance(value, Script)
    }


async def test_every_command_the_service_sends_touches_one_hash_slot(settings_for: Callable[..., Settings]) -> None:
    settings = settings_for()
    store = Recorder()
    limiter = RateLimiter(settings, store)
    revocations = Revocations(settings, store)
    lockout = Lockout(settings, store, client_bucket(64))
    admission = Admission(settings, limiter, revocations, lockout)
    now = int(time.time())
    # Addresses and subjects as they come, braces included (they would end a hash tag early).
    addresses = ["203.0.113.7", "2001:db8::/64", "unknown", "{10.0.0.1}", "a}b{c"]
    subjects = ["alice", "{bob}", "x}y", "}{", "user@example.com"]
    for address, subject in zip(addresses, subjects, strict=True):
        scope: dict[str, Any] = {"type": "http", "client": (address, 1)}
        for token_id in ("jti-1", None):
            principal = Principal(subject, frozenset(), token_id, now, now + 60)
            await admission.address(scope, address, principal)  # the address check and the subject's, together
            scope.pop("state")
            await admission.subject(scope, principal)  # the subject's check alone (a token not seen before)
        await limiter.hit(Policy.of("create_org", settings.ip_limit, key_name="create_org_post"), subject)  # limit()
        await lockout.failed(scope, subject)  # the address's failures and the subject's
        await revocations.revoke_token(subject, "jti-1", now + 60)
        await revocations.revoke_subject(subject)

    assert {command.script for command in store.sent if isinstance(command, Command)} == scripts_of_the_service()
    for command in store.sent:
        assert len({key_slot(key) for key in command.keys}) == 1, command.keys
    # The keys one script reads together really do belong together: one subject, or one address.
    assert len({key_slot(key) for command in store.sent for key in command.keys}) > 1


# --- Cluster ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def on_cluster(cluster: RedisCluster, settings_for: Callable[..., Settings]) -> Callable[..., Settings]:
    """Settings for an app on the (emptied) cluster."""
    cluster.flush()

    def build(**overrides: Any) -> Settings:
        return settings_for(**{"redis_url": cluster.url, "redis_timeout_seconds": 10, **overrides})

    return build


async def replicas(stack: AsyncExitStack, apps: list[FastAPI], address: str) -> list[httpx.AsyncClient]:
    return [await stack.enter_async_context(running(app, client=(address, 4711), reset=False)) for app in apps]


@pytest.mark.parametrize("limited", ["ip", "subject"])
async def test_three_replicas_on_a_cluster_admit_exactly_the_limit(
    on_cluster: Callable[..., Settings], make_token: TokenFactory, limited: str
) -> None:
    limits = {"rate_limit_ip": "100000/minute", "rate_limit_subject": "100000/minute"}
    settings = on_cluster(**{**limits, f"rate_limit_{limited}": "10/minute"})
    apps = [create_app(settings) for _ in range(3)]
    callers = [(f"198.51.100.{index}", f"caller-{index}") for index in range(1, 10)]  # keys on every primary
    async with AsyncExitStack() as stack:
        clients = {address: await replicas(stack, apps, address) for address, _ in callers}
        tokens = {subject: make_token(subject) for _, subject in callers}
        sent = [
            (address, clients[address][attempt % 3].get(PROBE, headers=bearer(tokens[subject])))
            for attempt in range(20)
            for address, subject in callers
        ]
        responses = await asyncio.gather(*(request for _, request in sent))
        store = apps[0].state.runtime.store
    assert isinstance(store, ClusterStore)
    for address, _ in callers:
        statuses = [r.status_code for (sent_by, _), r in zip(sent, responses, strict=True) if sent_by == address]
        assert statuses.count(429) == 10, (address, statuses)
        assert set(statuses) == {403, 429}, statuses  # admitted, or refused by the limit: never 5xx
    keys = [tag(name).encode() for caller in callers for name in caller]  # the hash tags of their keys
    assert len({id(store._slots[key_slot(key)]) for key in keys}) == 3  # every primary took part


async def test_revocations_and_lockouts_reach_every_replica_on_a_cluster(
    on_cluster: Callable[..., Settings], make_token: TokenFactory
) -> None:
    settings = on_cluster(lockout_failures=3, lockout_seconds=60)
    apps = [create_app(settings) for _ in range(3)]
    old = int(time.time()) - 5
    by_subject, by_jti, kept = make_token("dave", iat=old), make_token("erin"), make_token("frank")
    async with AsyncExitStack() as stack:
        clients = await replicas(stack, apps, "192.0.2.10")
        for token in (by_subject, by_jti, kept):
            assert [(await c.get(PROBE, headers=bearer(token))).status_code for c in clients] == [403] * 3
        revocations = apps[0].state.runtime.revocations
        await revocations.revoke_subject(principal("dave"))
        claims = jwt.decode(by_jti, options={"verify_signature": False})
        assert await revocations.revoke_token(principal("erin"), claims["jti"], claims["exp"])
        for index, (token, status) in enumerate(((by_subject, 401), (by_jti, 401), (kept, 403))):
            # from an address of its own: the refusals count as failures (lockout) of their address
            others = await replicas(stack, apps, f"192.0.2.{20 + index}")
            assert [(await c.get(PROBE, headers=bearer(token))).status_code for c in others] == [status] * 3

        attacker = await replicas(stack, apps, "192.0.2.66")
        for client in attacker:  # one failure on each replica: three in all
            assert (await client.get(PROBE, headers=bearer(kept + "x"))).status_code == 401
        locked = [await client.get(PROBE, headers=bearer(kept)) for client in attacker]
        assert [r.status_code for r in locked] == [429] * 3
        assert all(r.json()["type"].endswith(":problem:locked-out") for r in locked)
        assert (await clients[0].get(PROBE, headers=bearer(kept))).status_code == 403  # other addresses are not

        ready = [await client.get("/health/ready") for client in clients]
        assert [r.json()["checks"]["redis"] for r in ready] == ["ok"] * 3


async def test_a_stale_slot_map_follows_moved_and_ask_redirections(
    on_cluster: Callable[..., Settings], cluster: RedisCluster
) -> None:
    store = redis_store(on_cluster())
    assert isinstance(store, ClusterStore)
    try:
        await store.ping()  # learns the slot map
        nodes = list(store.primaries)
        # A slot being migrated: the source answers ASK for keys it does not hold; the target takes
        # the command after ASKING.
        key = b"{migrating}"
        slot = key_slot(key)
        source = store._slots[slot]
        assert source is not None
        target = next(node for node in nodes if node is not source)
        ids = {node: await node.execute(b"CLUSTER", b"MYID") for node in nodes}
        await target.execute(b"CLUSTER", b"SETSLOT", str(slot).encode(), b"IMPORTING", ids[source])
        await source.execute(b"CLUSTER", b"SETSLOT", str(slot).encode(), b"MIGRATING", ids[target])
        assert await store.execute(b"SET", key, b"moved", b"EX", b"60") == b"OK"
        asked = await target._round_trip(pack(b"ASKING") + pack(b"EXISTS", key), 2)
        assert asked == [b"OK", 1]  # written on the importing node
        stable(cluster, slot)

        policy = Policy.of("ip", on_cluster().ip_limit)
        names = [tag(f"k{index}") for index in range(30)]
        store._slots = [nodes[0]] * SLOTS  # every slot wrongly on the first primary: MOVED from it
        assert [count for count, _ in await store.run([window(policy, name) for name in names])] == [1] * 30
        assert [count for count, _ in await store.run([window(policy, name) for name in names])] == [2] * 30
    finally:
        await store.aclose()
        stable(cluster, key_slot(b"{migrating}"))


async def test_a_cluster_primary_down_is_the_failure_mode_and_not_ready(
    tmp_path: Path, settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    cluster = start_cluster(tmp_path)
    try:
        app = create_app(settings_for(redis_url=cluster.url, redis_timeout_seconds=2))
        async with running(app, reset=False) as client:
            assert (await client.get("/health/ready")).json()["checks"]["redis"] == "ok"
            cluster.servers[2].kill()  # the primary of the last third of the slots (redis-cli's split)
            await asyncio.sleep(1.1)  # readiness answers from its one-second cache until then
            ready = await client.get("/health/ready")
            # A subject whose keys were on the dead primary: its checks fail, the declared way.
            subject = next(f"user-{n}" for n in range(100) if key_slot(tag(f"user-{n}").encode()) > 10922)
            statuses = {(await client.get(PROBE, headers=bearer(make_token(subject)))).status_code for _ in range(3)}
        assert ready.status_code == 503 and ready.json()["checks"]["redis"] == "fail"
        assert statuses == {503}, statuses  # RATE_LIMIT_FAILURE_MODE closed, never a 500
    finally:
        cluster.stop()


def stable(cluster: RedisCluster, slot: int) -> None:
    """The slot back where it was, neither migrating nor importing."""
    for server in cluster.servers:
        with redis_client(server.port) as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")


# --- Sentinel: see test_redis_failover.py (a planned and an unplanned failover, READONLY) ---------


# --- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis_url(tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles) -> Iterator[str]:
    """A TLS-only redis-server that also requires a client certificate from the CA."""
    server = start_tls_redis(tmp_path_factory.mktemp("redis-tls"), tls_files)
    yield f"rediss://127.0.0.1:{server.port}/0"
    server.stop()


@pytest.fixture
def tls_app(settings_for: Callable[..., Settings], tls_redis_url: str, tls_files: TlsFiles) -> Callable[..., FastAPI]:
    def build(**overrides: Any) -> FastAPI:
        defaults: dict[str, Any] = {
            "redis_timeout_seconds": 5,  # a TLS handshake on a busy machine; this is not about latency
            "redis_tls_ca_file": str(tls_files.ca),
            "redis_tls_cert_file": str(tls_files.client_cert),
            "redis_tls_key_file": str(tls_files.client_key),
        }
        return create_app(settings_for(redis_url=tls_redis_url, **{**defaults, **overrides}))

    return build


async def test_rediss_with_the_ca_and_a_client_certificate_counts_in_redis(
    tls_app: Callable[..., FastAPI], make_token: TokenFactory
) -> None:
    async with running(tls_app(rate_limit_ip="3/minute")) as client:
        statuses = [(await client.get(PROBE, headers=bearer(make_token()))).status_code for _ in range(4)]
        ready = await client.get("/health/ready")
    assert statuses == [403, 403, 403, 429]
    assert ready.json()["checks"]["redis"] == "ok"


async def test_rediss_refuses_a_server_outside_the_ca_and_sends_the_client_certificate(
    tls_app: Callable[..., FastAPI], tmp_path: Path
) -> None:
    stranger = make_tls_files(tmp_path / "other-ca")
    for overrides in (
        {"redis_tls_ca_file": str(stranger.ca)},  # the server's certificate is not from this CA
        {"redis_tls_cert_file": None, "redis_tls_key_file": None},  # the server requires a client certificate
    ):
        async with running(tls_app(**overrides), reset=False) as client:
            ready = await client.get("/health/ready")
            limited = await client.get(PROBE)
        assert ready.json()["checks"]["redis"] == "fail", overrides
        assert limited.status_code == 503  # RATE_LIMIT_FAILURE_MODE closed


# --- one node -----------------------------------------------------------------------------------


async def test_a_batch_with_one_script_redis_has_not_seen_runs_each_call_once(redis_url: str) -> None:
    store = RedisStore(redis_url, timeout=1, pool_size=2, pool_timeout=1)
    seen = Script("return redis.call('INCR', KEYS[1])")
    unseen = Script(f"return redis.call('INCR', KEYS[1]) -- {uuid.uuid4()}")
    first, second = f"test:{uuid.uuid4()}", f"test:{uuid.uuid4()}"
    try:
        assert await store.run([seen.call([first], [])]) == [1]
        # `seen` runs by its SHA1; `unseen` gets NOSCRIPT and alone is sent again with its source.
        assert await store.run([seen.call([first], []), unseen.call([second], [])]) == [2, 1]
    finally:
        await store.execute(b"DEL", first.encode(), second.encode())
        await store.aclose()


# --- a revocation reported done is on a replica, whatever the topology ------------------------------


async def test_on_sentinel_a_revocation_waits_for_the_replica_and_fails_without_it(
    settings_for: Callable[..., Settings], tmp_path: Path
) -> None:
    group = start_sentinel_group(tmp_path)
    store = redis_store(settings_for(redis_url=group.url))
    try:
        revocations = Revocations(settings_for(), store)
        await revocations.revoke_subject("gina")
        with redis_client(group.replica.port) as replica:  # reported done: the replica has it
            assert replica.exists(f"{SERVICE_NAME}:revoked:sub:{tag('gina')}") == 1
        with group.replica.paused():  # connected to the primary, acknowledging nothing
            with pytest.raises(NotReplicated):
                await revocations.revoke_subject("hank")
            with pytest.raises(NotReplicated):
                await revocations.revoke_token("hank", "jti-1", time.time() + 60)
    finally:
        await store.aclose()
        group.stop()


async def test_on_a_cluster_a_revocation_follows_moved_to_the_slots_primary(
    on_cluster: Callable[..., Settings],
) -> None:
    store = redis_store(on_cluster())
    assert isinstance(store, ClusterStore)
    try:
        await store.ping()  # learns the slot map
        store._slots = [store.primaries[0]] * SLOTS  # every slot wrongly on the first primary: MOVED from it
        revocations = Revocations(on_cluster(), store)
        subjects = [f"moved-{index}" for index in range(12)]  # hash tags on every primary
        for subject in subjects:
            await revocations.revoke_subject(subject)
        keys = [f"{SERVICE_NAME}:revoked:sub:{tag(subject)}".encode() for subject in subjects]
        assert [await store.execute(b"EXISTS", key) for key in keys] == [1] * len(keys)
        assert len({store._slots[key_slot(key)] for key in keys}) == len(store.primaries)
    finally:
        await store.aclose()
