"""The shipped reverse proxy (deploy/nginx/nginx.conf), run for real: Debian's nginx on loopback in
front of a real `{{ cookiecutter.project_slug }} serve` with TRUSTED_PROXIES=127.0.0.1.

Clients connect from other loopback addresses (127.0.0.2, 127.0.0.3), so the address nginx
forwards is distinguishable from the proxy's own. nginx runs in the foreground with every path it
writes under a temporary prefix (servers.NginxProxy), so the test needs no privileges, and stops
with the module.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from {{ cookiecutter.package_name }}.config import Settings

from .servers import LOOPBACK, NginxProxy, free_port, log_tail, stop_process

PROJECT = Path(__file__).resolve().parent.parent
NGINX_DIR = PROJECT / "deploy" / "nginx"
NGINX_CONF = NGINX_DIR / "nginx.conf"
SPOOFING_CLIENT = "127.0.0.2"
OTHER_CLIENT = "127.0.0.3"
IP_LIMIT = 5
STARTUP_TIMEOUT_SECONDS = 20.0
UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def nginx_directive(name: str) -> str:
    """The value of a directive in the shipped nginx.conf (the first occurrence)."""
    match = re.search(rf"^\s*{name}\s+([^;]+);", NGINX_CONF.read_text(), re.MULTILINE)
    assert match, f"{name} is not set in {NGINX_CONF}"
    return match.group(1).strip()


def nginx_size(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value).groups()  # type: ignore[union-attr]
    return int(number) * UNITS[unit.lower()]


def nginx_seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[unit]


def wait_until_answering(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args!r} exited with {process.returncode}:\n{log_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, headers={"Host": "localhost"}, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    pytest.fail(f"{url} did not answer in {STARTUP_TIMEOUT_SECONDS}s:\n{log_tail(log)}")


@dataclass
class ProxiedService:
    url: str
    service_log: Path
    nginx_port: int

    def client(self, source: str) -> httpx.Client:
        transport = httpx.HTTPTransport(local_address=source)
        return httpx.Client(transport=transport, base_url=self.url, headers={"Host": "localhost"}, timeout=15)

    def audit_lines(self) -> list[dict[str, object]]:
        lines = []
        for line in self.service_log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == "request":
                    lines.append(record)
        return lines

    def audit_count_reaching(self, expected: int) -> int:
        """The number of request lines once `expected` are written (the service logs a request
        after answering it), or what there is after a few seconds."""
        deadline = time.monotonic() + 5
        while len(self.audit_lines()) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(self.audit_lines())


@pytest.fixture(scope="module")
def proxied_service(
    migrated_database: str, redis_url: str, public_pem: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxiedService]:
    service_port = free_port()
    service_log = tmp_path_factory.mktemp("proxied") / "service.log"
    environment = {
        **os.environ,
        "ENVIRONMENT": "test",
        "DATABASE_URL": migrated_database,
        # A database of its own, so the rate-limit buckets here start empty.
        "REDIS_URL": redis_url.rsplit("/", 1)[0] + "/3",
        "JWT_PUBLIC_KEY": public_pem,
        "JWT_ISSUER": "https://issuer.test",
        "JWT_AUDIENCE": "{{ cookiecutter.project_slug }}",
        "TRUSTED_PROXIES": LOOPBACK,
        "TRUSTED_HOSTS": "localhost",
        "RATE_LIMIT_IP": f"{IP_LIMIT}/minute",
        # The tests count the request lines of the probes they send through nginx too.
        "LOG_HEALTH_REQUESTS": "true",
        "HOST": LOOPBACK,
        "PORT": str(service_port),
    }
    with service_log.open("wb") as out:
        service = subprocess.Popen(
            [sys.executable, "-m", "{{ cookiecutter.package_name }}.cli", "serve"],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_answering(f"http://{LOOPBACK}:{service_port}/health/live", service, service_log)
        proxy = NginxProxy(NGINX_CONF, [service_port])
        try:
            wait_until_answering(f"{proxy.url}/health/live", proxy.process, proxy.log_path)
            yield ProxiedService(proxy.url, service_log, proxy.port)
        finally:
            proxy.stop()
    finally:
        stop_process(service)


def test_nginx_body_limit_is_max_body_bytes() -> None:
    assert nginx_size(nginx_directive("client_max_body_size")) == Settings.model_fields["max_body_bytes"].default


def test_nginx_sets_header_and_body_timeouts() -> None:
    for directive in ("client_header_timeout", "client_body_timeout", "send_timeout", "keepalive_timeout"):
        assert nginx_seconds(nginx_directive(directive)) <= 30, directive


def test_a_client_cannot_choose_its_address_with_forwarding_headers(proxied_service: ProxiedService) -> None:
    before = len(proxied_service.audit_lines())
    spoofs = [
        {"X-Forwarded-For": "203.0.113.9"},
        {"X-Forwarded-For": "203.0.113.9, 127.0.0.1"},
        {"Forwarded": "for=198.51.100.4"},
        {"X-Real-IP": "198.51.100.5", "X-Forwarded-For": "127.0.0.1"},
        {"X-Forwarded-For": "203.0.113.10", "Forwarded": 'for="[2001:db8::1]"'},
    ]
    with proxied_service.client(SPOOFING_CLIENT) as http:
        statuses = [http.get("/api/v1/orgs/spoof", headers=headers).status_code for headers in spoofs]
        over_limit = http.get("/api/v1/orgs/spoof", headers={"X-Forwarded-For": "203.0.113.11"})
    assert statuses == [401] * IP_LIMIT
    # Every spoofed request counted against the one bucket of the real address ...
    assert over_limit.status_code == 429
    # ... which another client does not share.
    with proxied_service.client(OTHER_CLIENT) as http:
        assert http.get("/api/v1/orgs/spoof").status_code == 401
    assert proxied_service.audit_count_reaching(before + IP_LIMIT + 2) == before + IP_LIMIT + 2
    # The service logged only real addresses (127.0.0.1: the test's own readiness probes).
    clients = {line["client"] for line in proxied_service.audit_lines()}
    assert SPOOFING_CLIENT in clients
    assert clients <= {SPOOFING_CLIENT, OTHER_CLIENT, LOOPBACK}


def test_the_host_header_reaches_the_service_for_its_check(proxied_service: ProxiedService) -> None:
    with proxied_service.client(OTHER_CLIENT) as http:
        assert http.get("/health/live").status_code == 200
        refused = http.get("/health/live", headers={"Host": "evil.example"})
    assert refused.status_code == 400
    assert refused.json()["type"].endswith("host-not-allowed")


def test_a_body_over_the_limit_is_refused_by_nginx_with_413(proxied_service: ProxiedService) -> None:
    limit = Settings.model_fields["max_body_bytes"].default
    before = len(proxied_service.audit_lines())
    headers = {"Content-Type": "application/json"}
    with proxied_service.client(OTHER_CLIENT) as http:
        too_large = http.post("/api/v1/orgs", content=b" " * (limit + 1), headers=headers)
        chunked = http.post("/api/v1/orgs", content=iter([b" " * limit, b" "]), headers=headers)
        at_limit = http.post("/api/v1/orgs", content=b" " * limit, headers=headers)
    for response in (too_large, chunked):
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.json()["status"] == 413
    # Only the request at the limit reached the service (which refuses it without a token).
    assert at_limit.status_code == 401
    assert proxied_service.audit_count_reaching(before + 1) == before + 1


def test_a_malformed_request_is_answered_by_nginx(proxied_service: ProxiedService) -> None:
    before = len(proxied_service.audit_lines())
    with socket.create_connection((LOOPBACK, proxied_service.nginx_port), timeout=5) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\nBroken header line\r\n\r\n")
        answer = sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"application/problem+json" in head
    assert json.loads(body)["status"] == 400
    # A request after it is the only one the service logs.
    with proxied_service.client(OTHER_CLIENT) as http:
        assert http.get("/health/live").status_code == 200
    assert proxied_service.audit_count_reaching(before + 1) == before + 1


def test_a_slow_header_sender_is_cut_off(proxied_service: ProxiedService) -> None:
    timeout = nginx_seconds(nginx_directive("client_header_timeout"))
    started = time.monotonic()
    closed_after = None
    with socket.create_connection((LOOPBACK, proxied_service.nginx_port), timeout=1) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n")
        # One more header byte every half second: always sending, never finishing.
        while time.monotonic() - started < timeout + 5:
            try:
                sock.sendall(b"X")
                time.sleep(0.5)
                sock.setblocking(False)
                try:
                    if sock.recv(1024) == b"":
                        closed_after = time.monotonic() - started
                        break
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
            except OSError:
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None, f"still connected after {timeout + 5:.0f}s"
    assert timeout - 1 <= closed_after <= timeout + 3
