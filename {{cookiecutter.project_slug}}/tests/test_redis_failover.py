"""Redis failover and resharding under traffic, against real redis-server processes on loopback:
nothing revoked is served again, and the declared failure mode lasts no longer than the topology
change itself. Sentinel: `SENTINEL FAILOVER` (planned) and a killed primary (unplanned), timed from
the sentinels' `+switch-master` announcement. Cluster: slots migrating under traffic (`TRYAGAIN`,
`ASK`, `NOSCRIPT` on the importing node) and `redis-cli --cluster reshard`."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis
from redis.crc import key_slot

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.cli import main
from {{ cookiecutter.package_name }}.config import Settings
from {{ cookiecutter.package_name }}.security.admission import ADDRESS_CHECK
from {{ cookiecutter.package_name }}.security.revocation import tag
from {{ cookiecutter.package_name }}.store import redis_store
from {{ cookiecutter.package_name }}.store.cluster import ClusterStore
from {{ cookiecutter.package_name }}.store.core import Script, StoreUnavailable, pack
from {{ cookiecutter.package_name }}.store.sentinel import SentinelStore

from .conftest import AUDIENCE, ISSUER, TokenFactory, bearer, principal, running
from .servers import (
    LOOPBACK,
    SENTINEL_SERVICE,
    RedisCluster,
    SentinelGroup,
    redis_client,
    start_cluster,
    start_sentinel_group,
    wait_for,
)

PROBE = "/api/v1/orgs/00000000-0000-0000-0000-000000000000"  # with a token: 403 once admitted (not a member)
# Nothing refused but what the test is about: no limit reached, no lockout from the revoked tokens.
UNLIMITED = {"rate_limit_ip": "1000000/minute", "rate_limit_subject": "1000000/minute", "lockout_failures": 10_000}
BOUND_SECONDS = 1.0  # the issue's bound: after the announcement, after a revocation, after a lift
DEMOTION_SECONDS = 20  # Sentinel demotes the old primary about 8-10 s after a SENTINEL FAILOVER


@pytest.fixture
def operator_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, public_pem: str) -> Callable[[str], None]:
    """The environment the operators' CLI reads, with REDIS_URL set to `url`."""
    monkeypatch.chdir(tmp_path)  # no .env file

    def use(url: str) -> None:
        base = {"ENVIRONMENT": "test", "JWT_PUBLIC_KEY": public_pem, "JWT_ISSUER": ISSUER, "JWT_AUDIENCE": AUDIENCE}
        # A revocation waits (WAIT 1) up to REDIS_TIMEOUT_SECONDS for a replica's acknowledgement:
        # 5 s, a bound for a replica that is gone, not for a busy machine's slow one (the 0.5 s
        # default failed the revocation after the demotion when `make test` loaded both cores).
        base["REDIS_TIMEOUT_SECONDS"] = "5"
        for name, value in {**base, "REDIS_URL": url}.items():
            monkeypatch.setenv(name, value)

    return use


async def cli(*args: str) -> float:
    """Run the operators' command (its own event loop, in a thread); when it returned."""
    assert await asyncio.to_thread(main, list(args)) == 0
    return time.monotonic()


@asynccontextmanager
async def switch_announcements(group: SentinelGroup) -> AsyncIterator[asyncio.Future[float]]:
    """When any sentinel of the group first announces `+switch-master` (time.monotonic())."""
    announced: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    clients = [Redis(host=LOOPBACK, port=sentinel.port) for sentinel in group.sentinels]

    async def listen(client: Redis) -> None:
        async with client.pubsub() as pubsub:
            await pubsub.subscribe("+switch-master")
            subscribed.release()
            async for message in pubsub.listen():
                if message["type"] == "message" and not announced.done():
                    announced.set_result(time.monotonic())

    subscribed = asyncio.Semaphore(0)
    listeners = [asyncio.ensure_future(listen(client)) for client in clients]
    try:
        for _ in clients:
            await asyncio.wait_for(subscribed.acquire(), 10)
        yield announced
    finally:
        for listener in listeners:
            listener.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        for client in clients:
            await client.aclose()


Answer = tuple[float, str, int]  # sent at (time.monotonic()), token name, status


async def steady_traffic(client: httpx.AsyncClient, tokens: dict[str, str], stop: asyncio.Event) -> list[Answer]:
    answers: list[Answer] = []
    while not stop.is_set():
        for name, token in tokens.items():
            sent = time.monotonic()
            answers.append((sent, name, (await client.get(PROBE, headers=bearer(token))).status_code))
        await asyncio.sleep(0.02)
    return answers


def script_calls(port: int) -> int:
    """How many script calls (EVALSHA, EVAL) a node has run; sentinels and replication send none."""
    with redis_client(port) as client:
        stats: dict[str, Any] = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


def is_replica(port: int) -> bool:
    with redis_client(port) as client:
        return bool(client.execute_command("ROLE")[0] == "slave")


def replica_synced(port: int) -> bool:
    with redis_client(port) as client:
        return bool(client.info("replication").get("master_link_status") == "up")


async def sentinel_replicas(
    stack: AsyncExitStack, settings: Settings, count: int = 2
) -> tuple[list[FastAPI], list[httpx.AsyncClient]]:
    apps = [create_app(settings) for _ in range(count)]
    clients = [
        await stack.enter_async_context(running(app, client=(f"192.0.2.{index + 1}", 4711), reset=False))
        for index, app in enumerate(apps)
    ]
    return apps, clients


# --- Sentinel: a planned failover -------------------------------------------------------------


async def test_after_sentinel_failover_no_command_reaches_the_old_primary_and_revocations_hold(
    tmp_path: Path,
    settings_for: Callable[..., Settings],
    make_token: TokenFactory,
    operator_env: Callable[[str], None],
) -> None:
    group = start_sentinel_group(tmp_path)
    old = group.primary
    operator_env(group.url)
    names = ["kept", "at-announcement", "two-seconds-later", "after-demotion"]
    tokens = {name: make_token(name) for name in names}
    try:
        async with AsyncExitStack() as stack:
            _, clients = await sentinel_replicas(
                stack, settings_for(redis_url=group.url, redis_timeout_seconds=2, **UNLIMITED)
            )
            for client in clients:
                assert (await client.get(PROBE, headers=bearer(tokens["kept"]))).status_code == 403
            announced_at = await stack.enter_async_context(switch_announcements(group))
            stop = asyncio.Event()
            traffic = [asyncio.ensure_future(steady_traffic(client, tokens, stop)) for client in clients]
            await asyncio.sleep(0.3)
            with redis_client(group.sentinels[0].port) as sentinel:
                assert sentinel.execute_command("SENTINEL", "FAILOVER", SENTINEL_SERVICE)
            announced = await asyncio.wait_for(announced_at, 10)
            revoked = {"at-announcement": await cli("token", "revoke-subject", "--sub", "at-announcement")}
            await asyncio.sleep(max(0.0, announced + BOUND_SECONDS - time.monotonic()))
            calls_on_old = await asyncio.to_thread(script_calls, old.port)
            await asyncio.sleep(max(0.0, announced + 2 - time.monotonic()))
            revoked["two-seconds-later"] = await cli("token", "revoke-subject", "--sub", "two-seconds-later")
            await asyncio.to_thread(
                wait_for, lambda: is_replica(old.port), "the old primary's demotion", DEMOTION_SECONDS
            )
            demoted = time.monotonic()
            # A revocation waits for a replica (WAIT 1): the demoted node acknowledges once it has synced.
            await asyncio.to_thread(wait_for, lambda: replica_synced(old.port), "the demoted node to sync")
            revoked["after-demotion"] = await cli("token", "revoke-subject", "--sub", "after-demotion")
            await asyncio.sleep(BOUND_SECONDS + 0.5)
            stop.set()
            answers = await asyncio.gather(*traffic)
        assert group.primary_port() == group.replica.port
        assert await asyncio.to_thread(script_calls, old.port) == calls_on_old  # nothing after the announcement
    finally:
        group.stop()

    for replica in answers:
        late = [
            (round(sent - announced, 2), status) for sent, name, status in replica if sent > announced + BOUND_SECONDS
        ]
        assert late, "no traffic after the announcement"
        kept = {status for sent, name, status in replica if name == "kept" and sent > announced + BOUND_SECONDS}
        assert kept == {403}, [answer for answer in late if answer[1] != 403]  # no 503 after the bound
        for name, at in revoked.items():
            served = [
                round(sent - at, 2)
                for sent, token, status in replica
                if token == name and sent > at + BOUND_SECONDS and status != 401
            ]
            assert not served, (name, served)  # refused by every replica within the bound, and from then on
    assert demoted - announced < DEMOTION_SECONDS


# --- Sentinel: the announcement missed, the old primary demoted ----------------------------------


async def test_a_readonly_reply_asks_the_sentinels_and_resends_to_the_primary_never_the_same_node(
    tmp_path: Path, settings_for: Callable[..., Settings]
) -> None:
    group = start_sentinel_group(tmp_path)
    store = redis_store(settings_for(redis_url=group.url, redis_timeout_seconds=2, **UNLIMITED))
    assert isinstance(store, SentinelStore)
    try:
        await store.ping()
        primary = store.primary
        assert primary is not None and primary[1] == group.primary.port
        key = b"test:readonly"
        # As if an announcement had been missed and the store still wrote to a node now demoted: its
        # connections go to the replica, which answers READONLY.
        await store._follow((LOOPBACK, group.replica.port), store._epoch)
        assert await store.execute(b"SET", key, b"1") == b"OK"  # resent to the primary the sentinels name
        assert store.primary == primary
        with redis_client(group.primary.port) as client:
            assert client.get(key) == "1"
    finally:
        await store.aclose()
        group.stop()


# --- Sentinel: an unplanned failover ------------------------------------------------------------


@pytest.mark.parametrize(("mode", "in_between"), [("closed", 503), ("open", 403)])
async def test_a_killed_primary_gives_the_failure_mode_until_the_announcement_only(
    tmp_path: Path, settings_for: Callable[..., Settings], make_token: TokenFactory, mode: str, in_between: int
) -> None:
    group = start_sentinel_group(tmp_path)
    tokens = {"kept": make_token("kept")}
    try:
        settings = settings_for(redis_url=group.url, rate_limit_failure_mode=mode, redis_timeout_seconds=2, **UNLIMITED)
        async with AsyncExitStack() as stack:
            _, clients = await sentinel_replicas(stack, settings)
            for client in clients:
                assert (await client.get(PROBE, headers=bearer(tokens["kept"]))).status_code == 403
            announced_at = await stack.enter_async_context(switch_announcements(group))
            stop = asyncio.Event()
            traffic = [asyncio.ensure_future(steady_traffic(client, tokens, stop)) for client in clients]
            await asyncio.sleep(0.3)
            group.primary.kill()  # SIGKILL
            killed = time.monotonic()
            announced = await asyncio.wait_for(announced_at, 15)
            await asyncio.sleep(BOUND_SECONDS + 0.5)
            stop.set()
            answers = await asyncio.gather(*traffic)
            counted = [(await client.get(PROBE, headers=bearer(tokens["kept"]))).headers for client in clients]
            ready = [(await client.get("/health/ready")).json()["checks"]["redis"] for client in clients]
        assert group.primary_port() == group.replica.port  # the sentinels promoted the replica
    finally:
        group.stop()
    assert all("ratelimit" in headers for headers in counted)  # counted in Redis again, not served open
    assert ready == ["ok", "ok"]
    for replica in answers:
        assert {status for sent, _, status in replica if sent < killed} == {403}
        # Between the kill and the announcement: the declared failure mode, never a 500.
        assert {status for sent, _, status in replica if killed < sent < announced} <= {403, in_between}
        late = [(round(sent - announced, 2), status) for sent, _, status in replica if sent > announced + BOUND_SECONDS]
        assert late and {status for _, status in late} == {403}, late


# --- Cluster: a slot migrating ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


def node_id(port: int) -> str:
    with redis_client(port) as client:
        return str(client.execute_command("CLUSTER", "MYID"))


def owner_port(cluster: RedisCluster, slot: int) -> int:
    with redis_client(cluster.servers[0].port) as client:
        ranges = client.execute_command("CLUSTER", "SLOTS")
    return next(int(primary[1]) for start, end, primary, *_ in ranges if start <= slot <= end)


class Migration:
    """One slot between its source and another primary, as `redis-cli --cluster reshard` moves
    it: IMPORTING on the target, MIGRATING on the source, MIGRATE of its keys, then SETSLOT NODE."""

    def __init__(self, cluster: RedisCluster, slot: int) -> None:
        self.cluster = cluster
        self.slot = slot
        self.source = owner_port(cluster, slot)
        self.target = next(server.port for server in cluster.servers if server.port != self.source)

    def start(self) -> None:
        self._setslot(self.target, "IMPORTING", node_id(self.source))
        self._setslot(self.source, "MIGRATING", node_id(self.target))

    def move(self, *keys: str) -> None:
        with redis_client(self.source) as client:
            client.execute_command("MIGRATE", LOOPBACK, self.target, "", 0, 5000, "KEYS", *keys)

    def finish(self) -> None:
        for port in (self.target, self.source):
            self._setslot(port, "NODE", node_id(self.target))

    def abandon(self) -> None:
        """Back to no migration (the keys stay where they are)."""
        for server in self.cluster.servers:
            self._setslot(server.port, "STABLE")

    def _setslot(self, port: int, *args: str) -> None:
        with redis_client(port) as client:
            client.execute_command("CLUSTER", "SETSLOT", self.slot, *args)


def address_check(address: str) -> Any:
    """The address window and lock in one script, as layer 3 sends it (two keys, one slot)."""
    return ADDRESS_CHECK.call([f"test:window:{tag(address)}", f"test:lock:{tag(address)}"], [60_000])


async def test_a_call_answered_tryagain_while_its_slot_migrates_runs_once_the_slot_has_moved(
    cluster: RedisCluster, settings_for: Callable[..., Settings]
) -> None:
    cluster.flush()
    store = redis_store(settings_for(redis_url=cluster.url, redis_timeout_seconds=5))
    address = "198.51.100.77"
    migration = Migration(cluster, key_slot(tag(address).encode()))
    try:
        [(count, _, _)] = await store.run([address_check(address)])
        assert count == 1  # the window exists on the source; the lock does not
        migration.start()
        # The source holds one of the two keys: TRYAGAIN, and again after each pause.
        pending = asyncio.ensure_future(store.run([address_check(address)]))
        await asyncio.sleep(0.3)
        assert not pending.done()
        migration.move(f"test:window:{tag(address)}")
        migration.finish()
        [(count, _, _)] = await asyncio.wait_for(pending, 10)
        assert count == 2  # counted once: a call answered TRYAGAIN did not run
    finally:
        migration.abandon()
        await store.aclose()


async def test_a_slot_that_stays_migrating_is_the_failure_mode_after_the_round_trips_deadline(
    cluster: RedisCluster, settings_for: Callable[..., Settings]
) -> None:
    cluster.flush()
    store = redis_store(settings_for(redis_url=cluster.url, redis_timeout_seconds=0.3))
    address = "198.51.100.78"
    migration = Migration(cluster, key_slot(tag(address).encode()))
    try:
        await store.run([address_check(address)])
        migration.start()
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(store.run([address_check(address)]), 10)
    finally:
        migration.abandon()
        await store.aclose()


async def test_a_script_the_importing_node_does_not_know_is_resent_after_asking(
    cluster: RedisCluster, settings_for: Callable[..., Settings]
) -> None:
    cluster.flush()
    store = redis_store(settings_for(redis_url=cluster.url, redis_timeout_seconds=5))
    assert isinstance(store, ClusterStore)
    unseen = Script(f"return redis.call('INCR', KEYS[1]) -- {uuid.uuid4()}")  # no node has it cached
    key = "test:{asked}"
    migration = Migration(cluster, key_slot(key.encode()))
    try:
        await store.ping()
        migration.start()
        # The source has no such key: ASK; the importing node answers NOSCRIPT, then runs the source.
        assert await store.run([unseen.call([key], [])]) == [1]
        assert await store.run([unseen.call([key], [])]) == [2]
        target = next(node for node in store.primaries if node is not store._slots[migration.slot])
        assert await target._round_trip(pack(b"ASKING") + pack(b"GET", key.encode()), 2) == [b"OK", b"2"]
    finally:
        migration.abandon()
        await store.aclose()


# --- Cluster: redis-cli --cluster reshard under traffic -----------------------------------------

RESHARDED_SLOTS = 300  # redis-cli takes them from the start of the source's range: slots 0-299
FILLER_KEYS = 1000  # per live slot: each slot's migration lasts long enough to meet the traffic


def in_resharded_slots(names: Iterator[str], count: int) -> list[str]:
    return [name for name in names if key_slot(tag(name).encode()) < RESHARDED_SLOTS][:count]


async def test_resharding_under_traffic_from_two_replicas_keeps_counts_exact_and_revocations(
    tmp_path: Path, settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    cluster = start_cluster(tmp_path)  # its own: resharding changes it for good
    source, target = cluster.servers[0], cluster.servers[1]  # redis-cli gives the first primary slots 0-5460
    addresses = in_resharded_slots((f"10.0.{n // 256}.{n % 256}" for n in range(65536)), 2)
    # A token's keys are tagged with its principal id (jwt:<issuer key>:<sub>): chosen by that.
    ids = in_resharded_slots((principal(f"user-{n}") for n in range(100_000)), 3)
    subjects = [principal_id.removeprefix(principal("")) for principal_id in ids]
    kept, revoked = subjects[:2], subjects[2]
    with redis_client(source.port) as client:
        for name in addresses + ids:
            with client.pipeline(transaction=False) as pipeline:
                for index in range(FILLER_KEYS):
                    pipeline.set(f"filler:{tag(name)}:{index}", "x")
                pipeline.execute()
    settings = settings_for(redis_url=cluster.url, redis_timeout_seconds=2, **UNLIMITED)
    try:
        async with AsyncExitStack() as stack:
            apps = [create_app(settings) for _ in range(2)]
            clients = {
                (replica, address): await stack.enter_async_context(running(app, client=(address, 4711), reset=False))
                for replica, app in enumerate(apps)
                for address in addresses
            }
            runtime = apps[0].state.runtime
            await runtime.revocations.revoke_subject(principal(revoked))
            await asyncio.sleep(0.01)  # tokens issued after the mark's second
            tokens = {subject: make_token(subject, iat=int(time.time()) - 5) for subject in subjects}
            stop = asyncio.Event()
            traffic = {
                where: asyncio.ensure_future(steady_traffic(client, tokens, stop)) for where, client in clients.items()
            }
            await asyncio.sleep(0.3)
            redis_cli = shutil.which("redis-cli")
            assert redis_cli is not None
            command = [
                redis_cli, "--cluster", "reshard", f"{LOOPBACK}:{source.port}",
                "--cluster-from", node_id(source.port), "--cluster-to", node_id(target.port),
                "--cluster-slots", str(RESHARDED_SLOTS), "--cluster-yes",
            ]  # fmt: skip
            resharded = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=120)
            await asyncio.sleep(0.5)
            stop.set()
            answers = {where: await task for where, task in traffic.items()}
            moved = {owner_port(cluster, key_slot(tag(name).encode())) for name in addresses + ids}
            policies = runtime.admission
            with redis_client(target.port) as client:
                counted = {
                    name: int(client.get(prefix + tag(principal(name) if name in kept else name)) or 0)
                    for prefix, names in ((policies.address_policy.key_prefix, addresses),
                                          (policies.subject_policy.key_prefix, kept))
                    for name in names
                }  # fmt: skip
    finally:
        cluster.stop()
    assert resharded.returncode == 0, resharded.stdout + resharded.stderr
    assert moved == {target.port}
    statuses = [status for replica in answers.values() for _, _, status in replica]
    assert {status for status in statuses if status >= 500} == set(), statuses.count(503)
    for replica in answers.values():
        assert {status for _, name, status in replica if name == revoked} == {401}
        assert {status for _, name, status in replica if name in kept} == {403}
    # Each request counted exactly once: in its address's window, and (admitted) in its subject's.
    for address in addresses:
        assert counted[address] == sum(len(replica) for (_, at), replica in answers.items() if at == address)
    for subject in kept:
        assert counted[subject] == sum(1 for replica in answers.values() for _, name, _ in replica if name == subject)
