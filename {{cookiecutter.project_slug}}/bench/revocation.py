"""`python -m bench.revocation`: what waiting for a replica (WAIT 1) costs one revocation, on loopback.

Starts a redis-server alone and a primary with one replica, and times `revoke_subject` on each, the
way it is written now (INFO replication, then SET, with WAIT 1 when the primary has a replica) and
as one plain SET (before). Prints the median and 95th percentile of `--runs` revocations each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from {{ cookiecutter.package_name }}.config import Settings
from {{ cookiecutter.package_name }}.security.revocation import Revocations
from {{ cookiecutter.package_name }}.store.core import RedisStore
from tests.servers import start_redis, start_replicated_redis

WARMUP = 20


async def timed(runs: int, revoke: Callable[[int], Awaitable[Any]]) -> tuple[float, float]:
    """Median and 95th percentile, in microseconds."""
    for number in range(WARMUP):
        await revoke(-1 - number)
    samples = []
    for number in range(runs):
        started = time.perf_counter()
        await revoke(number)
        samples.append((time.perf_counter() - started) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.95)]


async def measure(url: str, runs: int) -> dict[str, tuple[float, float]]:
    settings = Settings(_env_file=None, jwt_issuer="bench", jwt_audience="bench", jwt_public_key="unused")
    store = RedisStore(url, timeout=0.5, pool_size=4, pool_timeout=1.0)
    revocations = Revocations(settings, store)

    async def now(number: int) -> None:
        await revocations.revoke_subject(f"now-{number}")

    async def before(number: int) -> None:  # the write without its INFO and WAIT
        await store.execute(b"SET", f"before-{number}".encode(), repr(time.time()).encode(), b"EX", b"960")

    try:
        return {"SET alone (before)": await timed(runs, before), "revocation now": await timed(runs, now)}
    finally:
        await store.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.revocation", description=__doc__)
    parser.add_argument("--runs", type=int, default=500)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as directory:
        alone = start_redis(Path(directory) / "alone")
        pair = start_replicated_redis(Path(directory) / "pair")
        try:
            for name, url in (("one node, no replica", alone.url), ("primary + 1 replica", pair.primary.url)):
                for what, (median, p95) in (await measure(url, runs)).items():
                    print(f"{name:22} {what:20} median {median:6.0f} µs   p95 {p95:6.0f} µs")
        finally:
            alone.stop()
            pair.stop()


if __name__ == "__main__":
    asyncio.run(main())
