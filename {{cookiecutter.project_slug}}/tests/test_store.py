"""The store's round-trip timeout tells Redis's silence from this process's own overload.

On a busy event loop a reply can arrive and sit unread while the timeout's timer runs first; a
plain timeout would then call Redis unreachable, and `open` mode would serve the request without
its revocation check: a flood would switch revocation off. These run against the session's real
redis-server, and a real socket that accepts and never answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from {{ cookiecutter.package_name }}.store.core import RedisStore, StoreBusy, StoreUnavailable

TIMEOUT = 0.2


@pytest.fixture
async def silent_redis_url() -> AsyncIterator[str]:
    """A TCP server that accepts connections, reads what is sent and never answers."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.close()


async def test_a_reply_that_arrived_while_the_loop_was_busy_is_read(redis_url: str) -> None:
    store = RedisStore(redis_url, timeout=TIMEOUT, pool_size=1, pool_timeout=1.0)
    try:
        assert await store.execute(b"PING") == b"PONG"  # the connection is open: only the reply is timed
        pending = asyncio.create_task(store.execute(b"PING"))
        await asyncio.sleep(0)  # the command is sent; its reply comes while the loop is blocked
        time.sleep(TIMEOUT * 2.5)  # noqa: ASYNC251 - blocking the loop is the point
        assert await pending == b"PONG"
    finally:
        await store.aclose()


async def test_silence_on_an_idle_loop_is_unavailable_after_the_timeout(silent_redis_url: str) -> None:
    store = RedisStore(silent_redis_url, timeout=TIMEOUT, pool_size=1, pool_timeout=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable):
            await store.execute(b"PING")
    finally:
        await store.aclose()
    assert time.monotonic() - started < TIMEOUT * 2  # no extension: the timer fired on time


async def test_silence_on_a_loop_that_stays_busy_is_overload_not_an_outage(silent_redis_url: str) -> None:
    store = RedisStore(silent_redis_url, timeout=TIMEOUT / 4, pool_size=1, pool_timeout=1.0)
    stop = asyncio.Event()

    async def hog() -> None:  # every turn of the loop blocks it longer than the timeout
        while not stop.is_set():
            time.sleep(TIMEOUT / 2)  # noqa: ASYNC251 - blocking the loop is the point
            await asyncio.sleep(0)

    hogging = asyncio.create_task(hog())
    try:
        with pytest.raises(StoreBusy):
            await store.execute(b"PING")
    finally:
        stop.set()
        await hogging
        await store.aclose()
