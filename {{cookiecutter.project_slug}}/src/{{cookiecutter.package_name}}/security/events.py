"""Security events and the request's trace id: what every layer uses to log a decision.

Events are metadata: names, reasons, field locations. Never bodies, tokens, cookies or query strings.
"""

from __future__ import annotations

import logging
import re
import secrets
from contextvars import ContextVar, Token
from typing import Any

_trace_id: ContextVar[str] = ContextVar("trace_id", default="-")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")

audit_logger = logging.getLogger("audit")


def current_trace_id() -> str:
    return _trace_id.get()


def bind_trace_id(trace_id: str) -> Token[str]:
    return _trace_id.set(trace_id)


def unbind_trace_id(token: Token[str]) -> None:
    _trace_id.reset(token)


def trace_id_from(traceparent: bytes | None) -> str:
    """The trace id of a valid W3C traceparent, else a new one. A malformed header is ignored."""
    if traceparent:
        match = _TRACEPARENT.match(traceparent.decode("latin-1").strip())
        if match and not traceparent.startswith(b"ff") and match.group(1) != "0" * 32:
            return match.group(1)
    return secrets.token_hex(16)


def security_event(event: str, level: int = logging.WARNING, **fields: Any) -> None:
    """Log one security decision. Callers pass names and reasons, never secrets."""
    audit_logger.log(level, event, extra={"event": event, **fields})


class TraceIdFilter(logging.Filter):
    """Puts the current trace id on every log record, whoever logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.trace_id = _trace_id.get()
        return True
