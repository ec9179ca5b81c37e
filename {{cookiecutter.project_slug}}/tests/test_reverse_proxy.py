"""The shipped reverse proxy (deploy/nginx/nginx.conf), run for real: Debian's nginx on loopback in
front of a real `{{ cookiecutter.project_slug }} serve` with TRUSTED_PROXIES=127.0.0.1.

Clients connect from other loopback addresses (127.0.0.2, 127.0.0.3), so the address nginx
forwards is distinguishable from the proxy's own. nginx runs in the foreground with every path it
writes under a temporary prefix (servers.NginxProxy), so the test needs no privileges, and stops
with the module.

Which requests reached the service is read from its request log by trace id: every request a test
sends carries a traceparent of its own, which the service honours from nginx (TRUSTED_PROXIES,
TRACE_CONTEXT_TRUST=proxies) and logs as the line's trace_id. Counting all the lines instead is a
race: the service writes a request's line after answering it, so the line of a request already
answered (the fixture's readiness probe, the previous test's last request) can land after a
count was taken.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Iterator
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
# How long a request's line may take to appear after its answer before the test fails.
LOG_LINE_TIMEOUT_SECONDS = 10.0
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

    def lines_of(self, answered: Collection[str]) -> dict[str, list[dict[str, object]]]:
        """The request lines of the `answered` trace ids (requests the service answered), once each
        has its line: the service writes a line after sending the answer, so it can come later."""
        deadline = time.monotonic() + LOG_LINE_TIMEOUT_SECONDS
        while True:
            lines: dict[str, list[dict[str, object]]] = {}
            for record in self.audit_lines():
                lines.setdefault(str(record.get("trace_id")), []).append(record)
            missing = [trace_id for trace_id in answered if trace_id not in lines]
            if not missing:
                return lines
            if time.monotonic() > deadline:
                pytest.fail(f"no request line for traces {missing} after {LOG_LINE_TIMEOUT_SECONDS}s")
            time.sleep(0.05)


def traced() -> tuple[str, dict[str, str]]:
    """A new trace id and the traceparent header that puts a request into it."""
    trace_id = secrets.token_hex(16)
    return trace_id, {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}


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
        # The tests look for the request lines of the probes they send through nginx too.
        "LOG_HEALTH_REQUESTS": "true",
        "LOG_CLIENT_ADDRESS": "full",  # the tests read the address the service resolved in its log
        "TRACE_CONTEXT_TRUST": "proxies",
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
    spoofs = [
        {"X-Forwarded-For": "203.0.113.9"},
        {"X-Forwarded-For": "203.0.113.9, 127.0.0.1"},
        {"Forwarded": "for=198.51.100.4"},
        {"X-Real-IP": "198.51.100.5", "X-Forwarded-For": "127.0.0.1"},
        {"X-Forwarded-For": "203.0.113.10", "Forwarded": 'for="[2001:db8::1]"'},
        {"X-Forwarded-For": "203.0.113.11"},  # over the limit
    ]
    sent: dict[str, str] = {}  # trace id -> the address the service must have logged
    statuses = []
    with proxied_service.client(SPOOFING_CLIENT) as http:
        for headers in spoofs:
            trace_id, traceparent = traced()
            response = http.get("/api/v1/orgs/spoof", headers={**headers, **traceparent})
            assert response.headers["x-trace-id"] == trace_id
            statuses.append(response.status_code)
            sent[trace_id] = SPOOFING_CLIENT
    # Every spoofed request counted against the one bucket of the real address ...
    assert statuses == [401] * IP_LIMIT + [429]
    # ... which another client does not share.
    with proxied_service.client(OTHER_CLIENT) as http:
        trace_id, traceparent = traced()
        assert http.get("/api/v1/orgs/spoof", headers=traceparent).status_code == 401
        sent[trace_id] = OTHER_CLIENT
    # Each request has one line, under the address nginx saw.
    lines = proxied_service.lines_of(sent)
    assert {trace_id: [line["client"] for line in lines[trace_id]] for trace_id in sent} == {
        trace_id: [client] for trace_id, client in sent.items()
    }
    # No line of the whole log names an address a client chose (127.0.0.1: the readiness probes).
    clients = {line["client"] for line in proxied_service.audit_lines()}
    assert clients <= {SPOOFING_CLIENT, OTHER_CLIENT, LOOPBACK}


def test_the_host_header_reaches_the_service_for_its_check(proxied_service: ProxiedService) -> None:
    with proxied_service.client(OTHER_CLIENT) as http:
        assert http.get("/health/live").status_code == 200
        refused = http.get("/health/live", headers={"Host": "evil.example"})
    assert refused.status_code == 400
    assert refused.json()["type"].endswith("host-not-allowed")


def test_a_body_over_the_limit_is_refused_by_nginx_with_413(proxied_service: ProxiedService) -> None:
    limit = Settings.model_fields["max_body_bytes"].default
    (too_large_id, too_large_trace), (chunked_id, chunked_trace), (at_limit_id, at_limit_trace) = (
        traced() for _ in range(3)
    )
    headers = {"Content-Type": "application/json"}
    with proxied_service.client(OTHER_CLIENT) as http:
        too_large = http.post("/api/v1/orgs", content=b" " * (limit + 1), headers={**headers, **too_large_trace})
        chunked = http.post("/api/v1/orgs", content=iter([b" " * limit, b" "]), headers={**headers, **chunked_trace})
        at_limit = http.post("/api/v1/orgs", content=b" " * limit, headers={**headers, **at_limit_trace})
    for response in (too_large, chunked):
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.json()["status"] == 413
    # Only the request at the limit reached the service (which refuses it without a token); it
    # was sent after nginx had answered the two others.
    assert at_limit.status_code == 401
    lines = proxied_service.lines_of([at_limit_id])
    assert [line["status"] for line in lines[at_limit_id]] == [401]
    assert too_large_id not in lines and chunked_id not in lines


def test_a_malformed_request_is_answered_by_nginx(proxied_service: ProxiedService) -> None:
    malformed_id, malformed_trace = traced()
    with socket.create_connection((LOOPBACK, proxied_service.nginx_port), timeout=5) as sock:
        sock.sendall(
            b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n"
            + f"traceparent: {malformed_trace['traceparent']}\r\n".encode()
            + b"Broken header line\r\n\r\n"
        )
        answer = sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"application/problem+json" in head
    assert json.loads(body)["status"] == 400
    # A request after it reaches the service; the malformed one did not.
    after_id, after_trace = traced()
    with proxied_service.client(OTHER_CLIENT) as http:
        assert http.get("/health/live", headers=after_trace).status_code == 200
    lines = proxied_service.lines_of([after_id])
    assert [line["status"] for line in lines[after_id]] == [200]
    assert malformed_id not in lines


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
