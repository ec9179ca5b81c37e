"""Graceful shutdown of the real `serve` process under load (shutdown.py): on SIGTERM readiness turns
503 at once, the process keeps accepting and answering for SHUTDOWN_DRAIN_SECONDS, then stops
accepting, lets every request in flight finish, closes its pools and exits 0.

Bodies trickled over the whole shutdown keep requests in flight from before the signal until after
the listener has closed; fresh connections during the drain prove it still accepts.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from {{ cookiecutter.package_name }}.config import Settings

from .conftest import ServiceFactory, TokenFactory, bearer
from .servers import LOOPBACK, ServiceProcess

DRAIN_SECONDS = 3.0
UPLOAD_SECONDS = 4.5  # longer than the drain: the uploads end during uvicorn's graceful shutdown
UPLOADS = 4
LOAD_WORKERS = 4
PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture
def service(start_service: ServiceFactory) -> ServiceFactory:
    def start(**settings: str) -> ServiceProcess:
        defaults = {
            "RATE_LIMIT_IP": "100000/minute",
            "RATE_LIMIT_SUBJECT": "100000/minute",
            "SHUTDOWN_DRAIN_SECONDS": str(DRAIN_SECONDS),
            "SERVER_TIMEOUT_GRACEFUL_SHUTDOWN_SECONDS": "10",
        }
        return start_service(serve=True, **{**defaults, **settings})

    return start


async def trickle(payload: bytes, seconds: float) -> AsyncIterator[bytes]:
    """The body a few bytes at a time over `seconds` (chunked): a request in flight all along."""
    pieces = 10
    step = -(-len(payload) // pieces)
    for start in range(0, len(payload), step):
        yield payload[start : start + step]
        await asyncio.sleep(seconds / pieces)


async def slow_upload(base_url: str, token: str, number: int) -> int:
    body = json.dumps({"name": f"drain-{number}"}).encode() + b" " * 30
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        response = await http.post(
            "/api/v1/orgs",
            content=trickle(body, UPLOAD_SECONDS),
            headers={**bearer(token), "Content-Type": "application/json"},
        )
    return response.status_code


async def ready_status(base_url: str) -> tuple[int, dict[str, object]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as http:
        response = await http.get("/health/ready")
    return response.status_code, response.json()


async def load(base_url: str, path: str, token: str, until: float, *, fresh: bool) -> list[int | str]:
    """Requests one after another, at least two, until `until` (monotonic); fresh: a new
    connection for each."""
    outcomes: list[int | str] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        while len(outcomes) < 2 or time.monotonic() < until:
            headers = {**bearer(token), **({"Connection": "close"} if fresh else {})}
            try:
                outcomes.append((await http.get(path, headers=headers)).status_code)
            except httpx.HTTPError as exc:
                outcomes.append(type(exc).__name__)
    return outcomes


def accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


async def listener_closed_at(port: int, limit: float) -> float | None:
    """The monotonic time the port stops accepting connections, or None if it still does at `limit`."""
    while time.monotonic() < limit:
        if not await asyncio.to_thread(accepts, port):
            return time.monotonic()
        await asyncio.sleep(0.05)
    return None


async def exit_status(process: ServiceProcess, seconds: float) -> int | None:
    try:
        return await asyncio.to_thread(process.process.wait, seconds)
    except subprocess.TimeoutExpired:
        return None


def events(process: ServiceProcess) -> list[str]:
    return re.findall(r'"event": ?"(shutdown_[a-z_]+)"', process.log_path.read_text(errors="replace"))


async def create_org(base_url: str, token: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        response = await http.post("/api/v1/orgs", json={"name": "drain"}, headers=bearer(token))
    assert response.status_code == 201, response.text
    return f"/api/v1/orgs/{response.json()['id']}"


async def test_sigterm_drains_then_finishes_every_request_and_exits_0(
    service: ServiceFactory, make_token: TokenFactory
) -> None:
    process = service()
    token = make_token("alice")
    org = await create_org(process.base_url, token)
    uploads = [asyncio.ensure_future(slow_upload(process.base_url, token, n)) for n in range(UPLOADS)]
    # Ready, and the answer cached (Readiness keeps it a second): the drain must not wait for it.
    assert (await ready_status(process.base_url))[0] == 200
    await asyncio.sleep(0.3)  # the uploads are under way

    process.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    await asyncio.sleep(0.1)
    status, body = await ready_status(process.base_url)
    assert (status, body) == (503, {"status": "fail", "checks": {"shutdown": "fail"}})
    assert await asyncio.to_thread(process.process.poll) is None

    # During the drain: new connections and keep-alive ones are all answered.
    until = signalled + DRAIN_SECONDS - 1
    loads = [load(process.base_url, org, token, until, fresh=worker % 2 == 0) for worker in range(LOAD_WORKERS)]
    served = [outcome for outcomes in await asyncio.gather(*loads) for outcome in outcomes]
    assert served and set(served) == {200}, f"during the drain: {sorted(set(map(str, served)))}"
    assert time.monotonic() - signalled < DRAIN_SECONDS, "the machine is too slow for this test's timing"

    # Then the listener closes, not before the drain has ended ...
    closed = await listener_closed_at(process.port, signalled + DRAIN_SECONDS + 3)
    assert closed is not None, "still accepting connections 3 s after the drain"
    assert closed - signalled >= DRAIN_SECONDS - 0.2
    # ... while the uploads sent since before the signal are still in flight, and all complete.
    assert not all(upload.done() for upload in uploads)
    assert await asyncio.gather(*uploads) == [201] * UPLOADS

    assert await exit_status(process, 10) == 0
    assert events(process) == ["shutdown_draining", "shutdown_pools_closed"]


async def test_a_second_signal_ends_the_drain_at_once(service: ServiceFactory, make_token: TokenFactory) -> None:
    """SIGINT (Ctrl+C, or a second SIGTERM) during the drain: the drain ends, uvicorn's graceful
    shutdown still lets the requests in flight finish, and the pools are closed."""
    process = service(SHUTDOWN_DRAIN_SECONDS="60")
    token = make_token("alice")
    uploads = [asyncio.ensure_future(slow_upload(process.base_url, token, n)) for n in range(2)]
    await asyncio.sleep(0.3)
    process.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    assert (await ready_status(process.base_url))[0] == 503
    assert accepts(process.port)
    process.process.send_signal(signal.SIGINT)
    interrupted = time.monotonic()

    closed = await listener_closed_at(process.port, interrupted + 2)
    assert closed is not None and closed - interrupted < 1
    assert await asyncio.gather(*uploads) == [201, 201]
    assert await exit_status(process, 10) == 0
    assert events(process) == ["shutdown_draining", "shutdown_pools_closed"]


async def test_sigint_without_sigterm_skips_the_drain(service: ServiceFactory) -> None:
    process = service(SHUTDOWN_DRAIN_SECONDS="60")
    process.process.send_signal(signal.SIGINT)
    assert await exit_status(process, 10) == 0
    assert events(process) == ["shutdown_pools_closed"]


def manifest_seconds(path: str, key: str) -> float:
    match = re.search(rf"^\s*{key}:\s*\"?(\d+)s?\"?\s*$", (PROJECT / path).read_text(), re.MULTILINE)
    assert match, f"{key} is not set in {path}"
    return float(match.group(1))


def test_the_grace_periods_shipped_cover_the_drain_and_the_graceful_shutdown() -> None:
    """The orchestrator's SIGKILL must come after drain + graceful shutdown + closing the pools."""
    drain = Settings.model_fields["shutdown_drain_seconds"].default
    graceful = Settings.model_fields["server_timeout_graceful_shutdown_seconds"].default
    assert manifest_seconds("deploy/kubernetes/configmap.yaml", "SHUTDOWN_DRAIN_SECONDS") == drain
    assert manifest_seconds("deploy/kubernetes/configmap.yaml", "SERVER_TIMEOUT_GRACEFUL_SHUTDOWN_SECONDS") == graceful
    needed = drain + graceful + 10  # closing the pools, and a margin
    assert manifest_seconds("deploy/kubernetes/deployment.yaml", "terminationGracePeriodSeconds") >= needed
    assert manifest_seconds("compose.yaml", "stop_grace_period") >= needed
    # No preStop pause on top: the drain is the pause, and a pause would eat into the grace period.
    assert "preStop" not in (PROJECT / "deploy/kubernetes/deployment.yaml").read_text()
