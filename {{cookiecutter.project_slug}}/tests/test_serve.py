"""`serve`: the service under the real uvicorn, started the way operators start it, with the
server's own limits from the SERVER_* settings and the transport layer's read deadline. Slow and
idle clients are played over raw sockets, byte by byte."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from {{ cookiecutter.package_name }}.cli import main

from .conftest import AUDIENCE, ISSUER, PSEUDONYM_KEY, TokenFactory
from .servers import LOOPBACK, free_port, log_tail, stop_process

KEEP_ALIVE_SECONDS = 1
BODY_READ_SECONDS = 1


@dataclass
class Service:
    port: int
    log_path: Path

    def connect(self, timeout: float = 5) -> socket.socket:
        return socket.create_connection((LOOPBACK, self.port), timeout=timeout)


def service_env(database_url: str, redis_url: str, public_pem: str) -> dict[str, str]:
    return {
        "ENVIRONMENT": "test",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "JWT_PUBLIC_KEY": public_pem,
        "JWT_ISSUER": ISSUER,
        "JWT_AUDIENCE": AUDIENCE,
        "AUDIT_PSEUDONYM_KEY": PSEUDONYM_KEY,
    }


@pytest.fixture(scope="module")
def service(
    migrated_database: str, redis_url: str, public_pem: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """`<service> serve` in its own process, on a free port, with short server limits."""
    directory = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")},
        **service_env(migrated_database, redis_url, public_pem),
        "SERVER_TIMEOUT_KEEP_ALIVE_SECONDS": str(KEEP_ALIVE_SECONDS),
        "BODY_READ_TIMEOUT_SECONDS": str(BODY_READ_SECONDS),
    }
    log_path = directory / "serve.log"
    command = [sys.executable, "-m", "{{ cookiecutter.package_name }}.cli", "serve", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, cwd=directory, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("serve did not start:\n" + log_tail(log_path))
            time.sleep(0.1)
        yield Service(port, log_path)
    finally:
        stop_process(process, timeout=15)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1) as sock:
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            return sock.recv(16).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def read_response(sock: socket.socket) -> bytes:
    """One response (head and Content-Length body) from the socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
        0,
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes the connection within `seconds` (the client sends nothing)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_an_idle_keep_alive_connection_is_closed_after_server_timeout_keep_alive(service: Service) -> None:
    with service.connect() as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        assert closed_within(sock, KEEP_ALIVE_SECONDS + 2)  # uvicorn's own default keeps it 5 s


def test_a_body_trickled_byte_by_byte_is_answered_408_at_the_read_deadline(
    service: Service, make_token: TokenFactory
) -> None:
    head = (
        "POST /api/v1/orgs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {make_token()}\r\nContent-Length: 64\r\n\r\n"
    )
    with service.connect() as sock:
        sock.sendall(head.encode())
        started = time.monotonic()
        sock.settimeout(0.2)
        response = b""
        while not response and time.monotonic() - started < BODY_READ_SECONDS + 4:
            try:
                sock.sendall(b" ")  # one byte of body every 0.2 s: never complete, never idle
                response = sock.recv(65536)
            except TimeoutError:
                continue
        elapsed = time.monotonic() - started
        response += read_rest(sock)
    status_line, *header_lines = response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout", response
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in header_lines)}
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert b"body-read-timeout" in response
    assert elapsed < BODY_READ_SECONDS + 2


def read_rest(sock: socket.socket) -> bytes:
    sock.settimeout(2)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def test_a_websocket_handshake_is_answered_403_by_the_real_server(service: Service) -> None:
    handshake = (
        b"GET /api/v1/orgs HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with service.connect() as sock:
        sock.sendall(handshake)
        assert read_response(sock).startswith(b"HTTP/1.1 403")
    assert b"websocket_refused" in service.log_path.read_bytes()


def test_serve_passes_the_server_limits_from_the_settings(
    migrated_database: str, redis_url: str, public_pem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from {{ cookiecutter.package_name }}.shutdown import DrainingServer

    for name, value in service_env(migrated_database, redis_url, public_pem).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SERVER_LIMIT_CONCURRENCY", "300")
    monkeypatch.setenv("SERVER_BACKLOG", "512")
    monkeypatch.setenv("SHUTDOWN_DRAIN_SECONDS", "7")
    monkeypatch.chdir(Path(__file__).parent)  # no .env here
    servers: list[DrainingServer] = []

    def run(self: DrainingServer, sockets: Any = None) -> None:
        servers.append(self)
        self.started = True

    monkeypatch.setattr(DrainingServer, "run", run)
    assert main(["serve"]) == 0
    (server,) = servers
    config = server.config
    assert config.proxy_headers is False and config.server_header is False
    assert config.timeout_keep_alive == 5
    assert config.limit_concurrency == 300
    assert config.backlog == 512
    assert config.timeout_graceful_shutdown == 30
    assert config.h11_max_incomplete_event_size == 16384
    assert server.drain_seconds == 7


def test_serve_with_workers_passes_the_same_limits_to_uvicorns_supervisor(
    migrated_database: str, redis_url: str, public_pem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    for name, value in service_env(migrated_database, redis_url, public_pem).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SERVER_BACKLOG", "512")
    monkeypatch.chdir(Path(__file__).parent)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: calls.append(kwargs))
    assert main(["serve", "--workers", "3"]) == 0
    (options,) = calls
    assert options["workers"] == 3 and options["factory"] is True
    assert options["proxy_headers"] is False and options["backlog"] == 512
