"""Real, throwaway Redis and PostgreSQL servers, and the service in its own uvicorn process, for the
test suite.

Plain functions and classes, no pytest: conftest.py decides scopes and when to use
REDIS_URL / TEST_DATABASE_URL instead. A missing server binary is an error that says
how to install it, never a silent skip.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime
import importlib
import ipaddress
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy.engine import make_url

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_SECONDS = 15.0
POSTGRES_USER = "postgres"
POSTGRES_DATABASE = "app"
PACKAGE = "{{ cookiecutter.package_name }}"
# The PostgreSQL roles of the test database (create_database_roles).
OWNER_ROLE = f"{PACKAGE}_owner"
APP_ROLE = f"{PACKAGE}_app"


def _listening_ports() -> range:
    """Ports for the servers the tests start: below the kernel's ephemeral range, which it hands
    out to outgoing connections (every client socket of the suite, and of anything else on the
    machine). A port taken from that range is free when asked, but may be some connection's local
    port by the time the server binds it ("Address already in use")."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(10000, max(low, 10001))


_given_ports: set[int] = set()


def free_port() -> int:
    """A port no server listens on, outside the ephemeral range, never the same twice in a run."""
    ports = _listening_ports()
    rng = random.Random()  # noqa: S311 (a port, not a secret)
    for _ in range(1000):
        port = rng.choice(ports)
        if port in _given_ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        _given_ports.add(port)
        return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- Redis -------------------------------------------------------------------------


def stop_process(process: subprocess.Popen[Any], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; waits for the exit either way."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def redis_answers_ping(port: int, tls: ssl.SSLContext | None = None) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as plain:
            sock = tls.wrap_socket(plain, server_hostname=LOOPBACK) if tls else plain
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server child process on a fixed loopback port.

    ``kill`` simulates an outage; ``restart`` brings the server back on the same
    port, so clients configured with ``url`` can prove they recover. ``args`` are more
    redis-server options (cluster, replica, TLS: then ``tls`` is how to reach it); ``config``,
    a configuration file to start from (a sentinel's: `redis-server <file> --sentinel`).
    """

    def __init__(
        self,
        executable: str,
        directory: Path,
        port: int,
        args: Sequence[str] = (),
        *,
        config: Path | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.executable = executable
        self.directory = directory
        self.port = port
        self.args = list(args)
        self.config = config
        self.tls = tls
        self.log_path = directory / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        command = [
            self.executable,
            *([str(self.config)] if self.config else []),
            "--bind", LOOPBACK,
            "--port", "0" if self.tls else str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            *self.args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not redis_answers_ping(self.port, self.tls):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n" + log_tail(self.log_path))
            time.sleep(0.05)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, timeout=5)

    def kill(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The process stopped (SIGSTOP) and resumed after: its connections stay open, and it
        answers nothing meanwhile (a replica acknowledges no write)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._process.send_signal(signal.SIGCONT)


def redis_executable() -> str:
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError(
            "redis-server not found: install it (Debian/Ubuntu: apt-get install -y redis-server) or set REDIS_URL"
        )
    return executable


def start_redis(
    tmp_path: Path,
    args: Sequence[str] = (),
    *,
    config: Path | None = None,
    tls: ssl.SSLContext | None = None,
    port: int | None = None,
) -> RedisServer:
    tmp_path.mkdir(parents=True, exist_ok=True)
    server = RedisServer(redis_executable(), tmp_path, port or free_port(), args, config=config, tls=tls)
    server.start()
    atexit.register(server.stop)
    return server


def redis_client(port: int) -> redis.Redis:
    """A plain redis-py client to a loopback redis-server or sentinel (for the checks here)."""
    return redis.Redis(host=LOOPBACK, port=port, socket_timeout=2, decode_responses=True)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class RedisCluster:
    """Three primaries, no replicas: every slot has exactly one owner."""

    servers: list[RedisServer]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{LOOPBACK}:{server.port}" for server in self.servers[:2])

    def flush(self) -> None:
        for server in self.servers:
            with redis_client(server.port) as client:
                client.flushall()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def cluster_node_args() -> list[str]:
    # The cluster bus listens on port + 10000 unless given a port: a free one of its own.
    return [
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", "1000",
        "--cluster-port", str(free_port()),
    ]  # fmt: skip


def start_cluster(tmp_path: Path, primaries: int = 3) -> RedisCluster:
    """`redis-cli --cluster create` over `primaries` fresh cluster-enabled redis-servers."""
    servers = [start_redis(tmp_path / f"node-{index}", cluster_node_args()) for index in range(primaries)]
    cluster = RedisCluster(servers)
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        raise RuntimeError("redis-cli not found: install redis-tools (Debian/Ubuntu: apt-get install -y redis-tools)")
    result = subprocess.run(
        [redis_cli, "--cluster", "create", *(f"{LOOPBACK}:{s.port}" for s in servers), "--cluster-yes"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        cluster.stop()
        raise RuntimeError(f"redis-cli --cluster create failed:\n{result.stdout}{result.stderr}")
    for server in servers:
        wait_for(partial(_cluster_ok, server.port), "cluster_state:ok")
    return cluster


def _cluster_ok(port: int) -> bool:
    with redis_client(port) as client:
        info: dict[str, Any] = client.cluster("info")
    return bool(info["cluster_state"] == "ok")


SENTINEL_SERVICE = "primary"
SENTINEL_CONFIG = """port {port}
bind 127.0.0.1
dir {directory}
sentinel monitor {service} 127.0.0.1 {primary} 2
sentinel down-after-milliseconds {service} 1000
sentinel failover-timeout {service} 3000
sentinel parallel-syncs {service} 1
"""


@dataclass
class SentinelGroup:
    """One primary, one replica, three sentinels (quorum 2) watching them."""

    primary: RedisServer
    replica: RedisServer
    sentinels: list[RedisServer]

    @property
    def url(self) -> str:
        addresses = ",".join(f"{LOOPBACK}:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{addresses}/{SENTINEL_SERVICE}"

    def primary_port(self) -> int:
        """The port the sentinels name as primary now."""
        with redis_client(self.sentinels[0].port) as client:
            _host, port = client.sentinel_get_master_addr_by_name(SENTINEL_SERVICE)
        return int(port)

    def stop(self) -> None:
        for server in (*self.sentinels, self.replica, self.primary):
            server.stop()


def start_sentinel_group(tmp_path: Path) -> SentinelGroup:
    primary = start_redis(tmp_path / "primary")
    replica = start_redis(tmp_path / "replica", ["--replicaof", LOOPBACK, str(primary.port)])
    sentinels = []
    for index in range(3):
        directory = tmp_path / f"sentinel-{index}"
        directory.mkdir(parents=True)
        port = free_port()
        config = directory / "sentinel.conf"  # sentinels rewrite their file: one each, writable
        config.write_text(
            SENTINEL_CONFIG.format(port=port, directory=directory, service=SENTINEL_SERVICE, primary=primary.port)
        )
        sentinels.append(start_redis(directory, ["--sentinel"], config=config, port=port))
    group = SentinelGroup(primary, replica, sentinels)
    # Ready for a failover: the replica has synced, every sentinel sees it and the two others.
    with redis_client(replica.port) as client:
        wait_for(lambda: client.info("replication").get("master_link_status") == "up", "the replica to sync")
    for sentinel in sentinels:
        wait_for(partial(_sees_group, sentinel.port), "the sentinels to see the replica and each other")
    return group


@dataclass
class ReplicatedRedis:
    """One primary and one replica that has synced with it."""

    primary: RedisServer
    replica: RedisServer

    def stop(self) -> None:
        self.replica.stop()
        self.primary.stop()


def start_replicated_redis(tmp_path: Path) -> ReplicatedRedis:
    primary = start_redis(tmp_path / "primary")
    replica = start_redis(tmp_path / "replica", ["--replicaof", LOOPBACK, str(primary.port)])
    with redis_client(replica.port) as client:
        wait_for(lambda: client.info("replication").get("master_link_status") == "up", "the replica to sync")
    return ReplicatedRedis(primary, replica)


def _sees_group(port: int) -> bool:
    with redis_client(port) as client:
        state: dict[str, Any] = client.sentinel_master(SENTINEL_SERVICE)
    return int(state["num-slaves"]) == 1 and int(state["num-other-sentinels"]) == 2


@dataclass
class TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, all PEM."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


def make_tls_files(directory: Path) -> TlsFiles:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def write_key(name: str, key: ec.EllipticCurvePrivateKey) -> Path:
        path = directory / name
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.write_bytes(pem)
        return path

    def issue(
        name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey, **kind: bool
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=kind.get("ca", False), path_length=None), critical=True)
        )
        if kind.get("server"):
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        if kind.get("client"):
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def write_cert(name: str, cert: x509.Certificate) -> Path:
        path = directory / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "throwaway test CA")])
    ca = issue("throwaway test CA", ca_key, ca_name, ca_key, ca=True)
    return TlsFiles(
        ca=write_cert("ca.pem", ca),
        server_cert=write_cert("server.pem", issue("redis", server_key, ca_name, ca_key, server=True)),
        server_key=write_key("server-key.pem", server_key),
        client_cert=write_cert("client.pem", issue("service", client_key, ca_name, ca_key, client=True)),
        client_key=write_key("client-key.pem", client_key),
    )


def start_tls_redis(tmp_path: Path, files: TlsFiles, *, client_certificates: str = "yes") -> RedisServer:
    """redis-server on TLS only (`--port 0`), trusting `files.ca` for client certificates."""
    port = free_port()
    args = [
        "--tls-port", str(port),
        "--tls-cert-file", str(files.server_cert),
        "--tls-key-file", str(files.server_key),
        "--tls-ca-cert-file", str(files.ca),
        "--tls-auth-clients", client_certificates,
    ]  # fmt: skip
    return start_redis(tmp_path, args, tls=files.client_context(), port=port)


# --- PostgreSQL --------------------------------------------------------------------

POSTGRES_TOOLS = ("initdb", "pg_ctl", "createdb")
# Appended to postgresql.conf, so a restart keeps them. No Unix socket: clients use
# TCP, and a socket path under a deep temporary directory can exceed the OS limit.
POSTGRES_CONFIG = """
# Throwaway test cluster: loopback TCP only, durability off.
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = ''
fsync = off
full_page_writes = off
synchronous_commit = off
"""


def postgres_version_key(bin_dir: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,)
    return tuple(int(part) for part in re.findall(r"\d+", bin_dir.parent.name))


def find_postgres_bin_dir() -> Path:
    """The directory holding initdb, pg_ctl and createdb.

    PATH first (following symlinks, since Debian links only some tools there),
    then the newest /usr/lib/postgresql/*/bin.
    """
    candidates: list[Path] = []
    for tool in ("initdb", "pg_ctl"):
        found = shutil.which(tool)
        if found is not None:
            candidates += [Path(found).parent, Path(found).resolve().parent]
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=postgres_version_key,
        reverse=True,
    )
    for bin_dir in candidates:
        if all((bin_dir / tool).is_file() for tool in POSTGRES_TOOLS):
            return bin_dir
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install them "
        "(Debian/Ubuntu: apt-get install -y postgresql) or set TEST_DATABASE_URL"
    )


def unprivileged_prefix() -> list[str]:
    """How to run a command as the postgres user: PostgreSQL refuses to run as root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser"):
        return ["runuser", "-u", POSTGRES_USER, "--"]
    if shutil.which("setpriv"):
        return [
            "setpriv",
            f"--reuid={POSTGRES_USER}",
            f"--regid={POSTGRES_USER}",
            "--init-groups",
        ]
    raise RuntimeError("running as root needs runuser or setpriv to start PostgreSQL")


def give_to_postgres_user(path: Path) -> None:
    if os.geteuid() == 0:
        try:
            shutil.chown(path, user=POSTGRES_USER, group=POSTGRES_USER)
        except LookupError as error:
            raise RuntimeError(
                f"running as root needs a '{POSTGRES_USER}' system user "
                "(Debian/Ubuntu: apt-get install -y postgresql creates it)"
            ) from error


class PostgresServer:
    """A throwaway PostgreSQL cluster with trust authentication on a loopback port."""

    def __init__(self, bin_dir: Path, base_dir: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.log_path = base_dir / "postgres.log"
        self.port = port
        self._prefix = unprivileged_prefix()
        self._running = False

    @property
    def url(self) -> str:
        address = f"{POSTGRES_USER}@{LOOPBACK}:{self.port}"
        return f"postgresql+asyncpg://{address}/{POSTGRES_DATABASE}"

    def _run(self, *command: str, as_postgres: bool = True) -> None:
        prefix = self._prefix if as_postgres else []
        # cwd: the postgres user may not be allowed to enter the caller's directory.
        result = subprocess.run(
            [*prefix, *command],
            cwd=self.base_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{Path(command[0]).name} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n{log_tail(self.log_path)}"
            )

    def create_cluster(self) -> None:
        self._run(
            str(self.bin_dir / "initdb"),
            "--auth=trust",
            f"--username={POSTGRES_USER}",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
            f"--pgdata={self.data_dir}",
        )
        config = POSTGRES_CONFIG.format(port=self.port)
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(config)

    def start(self) -> None:
        self._run(
            str(self.bin_dir / "pg_ctl"),
            f"--pgdata={self.data_dir}",
            f"--log={self.log_path}",
            f"--timeout={int(STARTUP_TIMEOUT_SECONDS)}",
            "--wait",
            "start",
        )
        self._running = True

    def create_database(self) -> None:
        self._run(
            str(self.bin_dir / "createdb"),
            f"--host={LOOPBACK}",
            f"--port={self.port}",
            f"--username={POSTGRES_USER}",
            POSTGRES_DATABASE,
            as_postgres=False,
        )

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self._run(
            str(self.bin_dir / "pg_ctl"),
            f"--pgdata={self.data_dir}",
            "--mode=immediate",
            "--wait",
            "stop",
        )

    def stop_quietly(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


def start_postgres(tmp_path: Path) -> PostgresServer:
    bin_dir = find_postgres_bin_dir()
    if os.geteuid() == 0:
        # The cluster runs as the postgres user, who cannot enter pytest's
        # tmp_path (it sits in a 0700 directory of root's): give it its own.
        base_dir = Path(tempfile.mkdtemp(prefix="pg-"))
        atexit.register(shutil.rmtree, base_dir, ignore_errors=True)
        give_to_postgres_user(base_dir)
    else:
        base_dir = tmp_path
        base_dir.mkdir(parents=True, exist_ok=True)
    server = PostgresServer(bin_dir, base_dir, free_port())
    server.create_cluster()
    server.start()
    atexit.register(server.stop_quietly)
    server.create_database()
    return server


@dataclass(frozen=True)
class DatabaseRoles:
    """The two roles a PostgreSQL deployment uses (README, Database access): the owner migrates,
    the app role serves. Trust authentication ignores the passwords; the URLs carry them as a
    deployment's would (production refuses a passwordless network URL)."""

    owner_url: str
    app_url: str
    app_role: str


def create_database_roles(admin_url: str) -> DatabaseRoles:
    """Make (or find) the owner and app roles in the database `admin_url` names, as its
    superuser: the owner may create tables in the public schema, the app role may only log in
    (the migrations grant it the rest)."""
    url = make_url(admin_url)
    owner, app = OWNER_ROLE, APP_ROLE
    statements = [
        f"""DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                CREATE ROLE {role} LOGIN PASSWORD '{role}-password';
            END IF;
        END $$"""
        for role in (owner, app)
    ]
    statements.append(f"GRANT CREATE, USAGE ON SCHEMA public TO {owner}")

    async def create() -> None:
        asyncpg = importlib.import_module("asyncpg")  # the PostgreSQL bake's driver
        connection = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False))
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(create())

    def as_role(role: str) -> str:
        return url.set(username=role, password=f"{role}-password").render_as_string(hide_password=False)

    return DatabaseRoles(owner_url=as_role(owner), app_url=as_role(app), app_role=app)


# --- the service itself --------------------------------------------------------------------


class ServiceProcess:
    """The service in its own process, with `env` as its settings (nothing inherited from a .env
    file): `uvicorn <package>.app:create_app --factory`, or with `serve` the operators' command
    `<service> serve` (its uvicorn settings and its drain on SIGTERM, shutdown.py)."""

    def __init__(
        self, env: dict[str, str], log_path: Path, *, extra_args: tuple[str, ...] = (), serve: bool = False
    ) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.env = env
        if serve:
            command = [sys.executable, "-m", f"{PACKAGE}.cli", "serve", f"--host={LOOPBACK}", f"--port={self.port}"]
        else:
            command = [
                sys.executable,
                "-m",
                "uvicorn",
                f"{PACKAGE}.app:create_app",
                "--factory",
                f"--host={LOOPBACK}",
                f"--port={self.port}",
                "--no-access-log",
                "--no-server-header",
            ]
        command += extra_args
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                env={name: os.environ[name] for name in ("PATH", "PYTHONPATH") if name in os.environ} | env,
                cwd=log_path.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the service did not start:\n{log_tail(log_path, 40)}")

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --- nginx -----------------------------------------------------------------------------------------


def nginx_executable() -> str:
    found = shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(path, os.X_OK)), None
    )
    if found is None:
        raise RuntimeError("nginx not found: install it (Debian/Ubuntu: apt-get install -y nginx)")
    return found


class NginxProxy:
    """Debian's nginx in the foreground with the shipped nginx.conf itself (a symlink): only the
    two per-environment includes beside it are written here, listen.conf (a loopback port) and
    upstream.conf (the replicas' ports). Every path nginx writes is under a temporary prefix, so
    it needs no privileges."""

    def __init__(self, shipped_conf: Path, upstream_ports: list[int]) -> None:
        self.port = free_port()
        # nginx started as root runs its workers as `nobody`: they must reach the prefix.
        self.prefix = Path(tempfile.mkdtemp(prefix="nginx-test-"))
        self.prefix.chmod(0o755)
        conf = self.prefix / "conf"
        conf.mkdir(mode=0o755)
        (conf / "nginx.conf").symlink_to(shipped_conf)
        (conf / "listen.conf").write_text(f"listen {LOOPBACK}:{self.port};\n")
        (conf / "upstream.conf").write_text("".join(f"server {LOOPBACK}:{port};\n" for port in upstream_ports))
        self.log_path = self.prefix / "nginx.log"
        command = [nginx_executable(), "-p", f"{self.prefix}/", "-c", str(conf / "nginx.conf"), "-g", "daemon off;"]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.prefix, ignore_errors=True)


def wait_until_answering(url: str, process: subprocess.Popen[Any], log_path: Path, timeout: float = 30) -> None:
    """Until `url` answers 200 (Host `localhost`), failing with the log's end if `process` exits
    first or `timeout` seconds pass (a bound for a broken start, not a busy machine's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: {process.args!r} exited with {process.returncode}:\n{log_tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, headers={"Host": "localhost"}, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout:g} s:\n{log_tail(log_path)}")


@contextlib.contextmanager
def replicas_behind_nginx(
    env: dict[str, str], directory: Path, count: int, shipped_conf: Path
) -> Iterator[tuple[list[ServiceProcess], NginxProxy]]:
    """`count` replicas (`serve`, settings `env`, logs in `directory`) behind the shipped nginx,
    each answering directly and through the proxy; all stopped on exit."""
    replicas: list[ServiceProcess] = []
    proxy = None
    try:
        for number in range(count):
            replicas.append(ServiceProcess(env, directory / f"replica-{number}.log", serve=True))
        proxy = NginxProxy(shipped_conf, [replica.port for replica in replicas])
        for replica in replicas:
            wait_until_answering(f"{replica.base_url}/health/live", replica.process, replica.log_path)
        wait_until_answering(f"{proxy.url}/health/live", proxy.process, proxy.log_path)
        yield replicas, proxy
    finally:
        if proxy is not None:
            proxy.stop()
        for replica in replicas:
            replica.stop()


# --- Cerbos (authz_engine=cerbos) -------------------------------------------------------------------

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CERBOS_BINARY = PROJECT_ROOT / "build/cerbos/node_modules/@cerbos/cerbos-linux-x64/cerbos-linux-x64"


def cerbos_executable() -> str:
    """The pinned PDP binary `make cerbos` installs from npm (or CERBOS_BINARY)."""
    found = os.environ.get("CERBOS_BINARY") or str(CERBOS_BINARY)
    if not Path(found).is_file():
        raise RuntimeError(f"no Cerbos binary at {found}: run `make cerbos` (npm install of @cerbos/cerbos-linux-x64)")
    return found


class CerbosServer:
    """A real `cerbos server` on loopback with the service's deploy/cerbos/config.yaml and its
    policies/ (telemetry off); `kill` is a PDP outage."""

    def __init__(self, tmp_path: Path, policies: Path = PROJECT_ROOT / "policies") -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        self.log_path = tmp_path / "cerbos.log"
        command = [
            cerbos_executable(),
            "server",
            f"--config={PROJECT_ROOT / 'deploy/cerbos/config.yaml'}",
            f"--set=server.grpcListenAddr={LOOPBACK}:{self.grpc_port}",
            f"--set=server.httpListenAddr={LOOPBACK}:{self.http_port}",
            f"--set=storage.disk.directory={policies}",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                env={"PATH": os.environ.get("PATH", ""), "CERBOS_NO_TELEMETRY": "1"},
                cwd=tmp_path,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(self._answers, "cerbos server")
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"cerbos server did not start:\n{log_tail(self.log_path, 40)}") from None

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"cerbos server exited:\n{log_tail(self.log_path, 40)}")
        try:
            with socket.create_connection((LOOPBACK, self.http_port), timeout=0.5) as sock:
                sock.sendall(b"GET /_cerbos/health HTTP/1.0\r\n\r\n")
                return b"SERVING" in sock.recv(4096)
        except OSError:
            return False

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        stop_process(self.process)
