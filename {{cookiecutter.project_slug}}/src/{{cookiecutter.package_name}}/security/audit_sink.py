"""The audit table (AUDIT_DB_ENABLED): security events, masked, written off the request path in
batches to the append-only `audit_events` table.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from ..tables import AuditEvent
from .events import (
    AUDIT_LOGGER,
    current_span_id,
    current_trace_id,
)
from .logs import RECORD_ATTRIBUTES
from .masking import Masker

logger = logging.getLogger(__name__)


class AuditSink:
    """Appends security events to the `audit_events` table without slowing requests down: the log
    handler only enqueues, a background task inserts in batches. It only ever INSERTs; the
    table's triggers refuse UPDATE and DELETE (migration 0002). A full queue drops events (counted
    and reported), it never blocks a request; stdout keeps every event either way."""

    BATCH = 100

    def __init__(self, engine: AsyncEngine, masker: Masker, *, max_queued: int = 10_000) -> None:
        self.engine = engine
        self.masker = masker
        self.max_queued = max_queued
        self.dropped = 0
        self._reported_at = -60.0
        self.handler = _SinkHandler(self)
        self._queue: asyncio.Queue[dict[str, Any] | None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(self.max_queued)
        self._task = asyncio.create_task(self._drain(), name="audit-sink")
        logging.getLogger(AUDIT_LOGGER).addHandler(self.handler)

    async def stop(self) -> None:
        """Stop listening, then write what is queued before returning."""
        logging.getLogger(AUDIT_LOGGER).removeHandler(self.handler)
        if self._queue is None or self._task is None:
            return
        await self._queue.put(None)
        await self._task
        self._queue = self._task = None

    def offer(self, row: dict[str, Any]) -> None:
        if self._queue is None:
            return
        try:
            self._queue.put_nowait(row)
        except asyncio.QueueFull:
            self.dropped += 1
            now = time.monotonic()
            if now - self._reported_at >= 60:  # one line a minute, not one per lost event
                self._reported_at = now
                logger.error(
                    "audit sink queue full, events dropped",
                    extra={"event": "audit_sink_failed", "dropped_total": self.dropped, "error": "QueueFull"},
                )

    def enqueue(self, record: logging.LogRecord) -> None:
        """Called by the log handler, on any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        row = self.row(record)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.offer(row)
        else:
            loop.call_soon_threadsafe(self.offer, row)

    def row(self, record: logging.LogRecord) -> dict[str, Any]:
        fields = self.masker.mapping(_extra_fields(record))
        details = {k: v for k, v in fields.items() if k not in {"event", "subject", "client", "route", "trace_id"}}
        details["span_id"] = current_span_id()
        return {
            "occurred_at": datetime.fromtimestamp(record.created, UTC),
            "trace_id": current_trace_id()[:32],
            "event": str(fields.get("event", record.getMessage()))[:64],
            "level": record.levelname[:16],
            "subject": _bounded(fields.get("subject"), 255),
            "client": _bounded(fields.get("client"), 64),
            "route": _bounded(fields.get("route"), 255),
            "details": _json_safe(details),
        }

    async def _drain(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            item = await queue.get()
            batch: list[dict[str, Any]] = []
            while item is not None:
                batch.append(item)
                if len(batch) >= self.BATCH or queue.empty():
                    break
                item = queue.get_nowait()
            if batch:
                await self._insert(batch)
            if item is None:  # stop() asked, everything before it is written
                return

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        try:
            async with self.engine.begin() as connection:
                await connection.execute(insert(AuditEvent), rows)
        except Exception as exc:
            self.dropped += len(rows)
            # Not the audit logger: a failing sink must not feed itself.
            logger.error(
                "audit sink could not write events",
                extra={"event": "audit_sink_failed", "rows": len(rows), "error": type(exc).__name__},
            )


class _SinkHandler(logging.Handler):
    def __init__(self, sink: AuditSink) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != AUDIT_LOGGER:  # security events only, not the request lines
            return
        try:
            self.sink.enqueue(record)
        except Exception:
            self.handleError(record)


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in RECORD_ATTRIBUTES}


def _bounded(value: Any, length: int) -> str | None:
    return None if value is None else str(value)[:length]


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
