"""Real, throwaway Redis and PostgreSQL servers, and the service in its own uvicorn process, for the
test suite.

Plain functions and classes, no pytest: conftest.py decides scopes and when to use
REDIS_URL / TEST_DATABASE_URL instead. A missing server binary is an error that says
how to install it, never a silent skip.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_SECONDS = 15.0
POSTGRES_USER = "postgres"
POSTGRES_DATABASE = "app"
PACKAGE = "{{ cookiecutter.package_name }}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- Redis -------------------------------------------------------------------------


def redis_answers_ping(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server child process on a fixed loopback port.

    ``kill`` simulates an outage; ``restart`` brings the server back on the same
    port, so clients configured with ``url`` can prove they recover.
    """

    def __init__(self, executable: str, directory: Path, port: int) -> None:
        self.executable = executable
        self.directory = directory
        self.port = port
        self.log_path = directory / "redis.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        command = [
            self.executable,
            "--bind", LOOPBACK,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not redis_answers_ping(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n" + log_tail(self.log_path))
            time.sleep(0.05)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


def start_redis(tmp_path: Path) -> RedisServer:
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError(
            "redis-server not found: install it (Debian/Ubuntu: apt-get install -y redis-server) or set REDIS_URL"
        )
    tmp_path.mkdir(parents=True, exist_ok=True)
    server = RedisServer(executable, tmp_path, free_port())
    server.start()
    atexit.register(server.stop)
    return server


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
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.prefix, ignore_errors=True)
