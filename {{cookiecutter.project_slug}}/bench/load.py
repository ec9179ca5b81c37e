"""Load generators: wrk when installed (Debian: `apt-get install -y wrk`), else a Python asyncio client.

Both keep `connections` keep-alive connections busy for `duration` seconds and report the same
fields. The Python client is slower than wrk and shares the machine with the service, so its
numbers are a floor; the report says which one ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# With two or more cores the service runs on core 0 and the load generator on core 1, so the
# two never compete for one core and CPU time per request is the service's alone.
SERVICE_CPU, LOAD_CPU = "0", "1"


def pinned(command: list[str], cpu: str) -> list[str]:
    """`command` under `taskset -c cpu` when the machine has a second core and taskset exists."""
    taskset = shutil.which("taskset")
    if taskset is None or (os.cpu_count() or 1) < 2:
        return command
    return [taskset, "-c", cpu, *command]


@dataclass(frozen=True)
class Target:
    """One kind of request. `unique_emails`: the body is a new org user each time."""

    method: str
    path: str
    token: str | None = None
    unique_emails: bool = False
    # DPoP: makes `n` fresh proofs for one run, each sent once (a replayed proof is refused); the
    # token then goes in `Authorization: DPoP`.
    proofs: Callable[[int], list[str]] | None = None

    @property
    def scheme(self) -> str:
        return "DPoP" if self.proofs is not None else "Bearer"

    def fresh_proofs(self, duration: float) -> list[str] | None:
        """Enough proofs for `duration` seconds at PROOFS_PER_SECOND (past them, proofs repeat)."""
        return None if self.proofs is None else self.proofs(int(duration * PROOFS_PER_SECOND) + 100)


PROOFS_PER_SECOND = 4000


@dataclass(frozen=True)
class Sample:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_path() -> str | None:
    return shutil.which("wrk")


# wrk runs one Lua state per thread; setup() numbers them so generated emails never collide.
WRK_SCRIPT = """
wrk.method = "METHOD"
wrk.headers["Content-Type"] = "application/json"
AUTHORIZATION
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
local n = 0
UNIQUE
PROOFS
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH-RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
    .. '"non_2xx": %d, "socket_errors": %d}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
"""

UNIQUE_REQUEST = """
function request()
  n = n + 1
  local body = '{"email": "TAG-' .. tid .. '-' .. n .. '@bench.example.com", "role": "viewer"}'
  return wrk.format(nil, nil, nil, body)
end
"""


PROOF_REQUEST = """
local proofs = {LIST}
function request()
  n = n + 1
  wrk.headers["DPoP"] = proofs[(n - 1) % #proofs + 1]
  return wrk.format()
end
"""


def wrk_script(target: Target, proofs: list[str] | None = None) -> str:
    authorization = f'wrk.headers["Authorization"] = "{target.scheme} {target.token}"' if target.token else ""
    unique = UNIQUE_REQUEST.replace("TAG", secrets.token_hex(4)) if target.unique_emails else ""
    listed = PROOF_REQUEST.replace("LIST", ",".join(f'"{proof}"' for proof in proofs)) if proofs else ""
    script = WRK_SCRIPT.replace("METHOD", target.method).replace("AUTHORIZATION", authorization)
    return script.replace("UNIQUE", unique).replace("PROOFS", listed)


def run_wrk(wrk: str, url: str, target: Target, duration: float, connections: int, scratch: Path) -> Sample:
    script = scratch / f"wrk-{target.method.lower()}-{secrets.token_hex(4)}.lua"
    script.write_text(wrk_script(target, target.fresh_proofs(duration)))
    wrk_command = [wrk, "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s", "-s", str(script), url]
    command = pinned(wrk_command, LOAD_CPU)
    result = subprocess.run(command, capture_output=True, text=True, timeout=duration + 30, check=False)
    script.unlink()
    line = next((line for line in result.stdout.splitlines() if line.startswith("BENCH-RESULT ")), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stdout}{result.stderr}")
    fields = json.loads(line.removeprefix("BENCH-RESULT "))
    return Sample(
        requests=fields["requests"],
        seconds=fields["duration_us"] / 1e6,
        p50_ms=fields["p50_us"] / 1000,
        p99_ms=fields["p99_us"] / 1000,
        non_2xx=fields["non_2xx"],
        socket_errors=fields["socket_errors"],
    )


def _request_bytes(target: Target, host: str, number: int, tag: str, proof: str | None = None) -> bytes:
    email = f"{tag}-{number}@bench.example.com"
    body = ('{"email": "' + email + '", "role": "viewer"}').encode() if target.unique_emails else b""
    lines = [f"{target.method} {target.path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    if target.token:
        lines.append(f"Authorization: {target.scheme} {target.token}")
    if proof is not None:
        lines.append(f"DPoP: {proof}")
    if body or target.method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _python_load(host: str, port: int, target: Target, duration: float, connections: int) -> Sample:
    latencies: list[float] = []
    counts = {"non_2xx": 0, "socket_errors": 0, "sent": 0}
    tag = secrets.token_hex(4)
    proofs = target.fresh_proofs(duration)
    static = _request_bytes(target, f"{host}:{port}", 0, tag)
    started = time.perf_counter()
    deadline = started + duration

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                counts["sent"] += 1
                if proofs:
                    proof = proofs[counts["sent"] % len(proofs)]
                    request = _request_bytes(target, f"{host}:{port}", counts["sent"], tag, proof)
                elif target.unique_emails:
                    request = _request_bytes(target, f"{host}:{port}", counts["sent"], tag)
                else:
                    request = static
                sent = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - sent)
                if head[9:10] != b"2":
                    counts["non_2xx"] += 1
        except (OSError, asyncio.IncompleteReadError):
            counts["socket_errors"] += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies) or [0.0]
    return Sample(
        requests=len(latencies),
        seconds=elapsed,
        p50_ms=statistics.median(ordered) * 1000,
        p99_ms=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        non_2xx=counts["non_2xx"],
        socket_errors=counts["socket_errors"],
    )


def run_python(host: str, port: int, target: Target, duration: float, connections: int) -> Sample:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_python_load(host, port, target, duration, connections))
    return uvloop.run(_python_load(host, port, target, duration, connections))
