"""The uvicorn server `serve` runs: on SIGTERM it drains before it stops.

uvicorn alone stops accepting connections the moment SIGTERM arrives, while a load balancer may
still send this replica new connections for a few seconds (Kubernetes removes a terminating pod
from its endpoints asynchronously; an external balancer notices only through /health/ready). So:

1. SIGTERM: `/health/ready` answers 503 at once (Runtime.draining, read before readiness's
   cache), and the process keeps accepting and serving everything for SHUTDOWN_DRAIN_SECONDS.
2. Then uvicorn's own graceful shutdown: stop accepting, close idle keep-alive connections, let
   requests in flight finish for up to SERVER_TIMEOUT_GRACEFUL_SHUTDOWN_SECONDS.
3. The lifespan's shutdown closes the pools (Redis, the database's statements and engine), and
   the process exits 0.

SIGINT (Ctrl+C, or a second SIGTERM) during the drain ends the drain at once and goes on to
step 2; SIGINT during step 2 is uvicorn's force quit (requests in flight are cut off, the pools
are not closed). SIGINT before any SIGTERM skips the drain: a developer's Ctrl+C stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Generator
from types import FrameType

import uvicorn
from uvicorn.server import HANDLED_SIGNALS

from .runtime import Runtime

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime, drain_seconds: float) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.drain_seconds = drain_seconds
        self.drain_until: float | None = None  # monotonic time the drain ends, once SIGTERM came
        self._drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: set state only; on_tick (in the event loop) logs and decides.
        draining = self.drain_until is not None and not self.should_exit
        if sig == signal.SIGTERM and self.drain_seconds > 0 and self.drain_until is None and self.started:
            self.runtime.draining = True
            self.drain_until = time.monotonic() + self.drain_seconds
        elif draining:
            self.should_exit = True  # a second signal: the drain ends now
        else:
            self.runtime.draining = True
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_until is not None and not self._drain_logged:
            self._drain_logged = True
            logger.info(
                "draining: not ready, still serving for %.1f s",
                self.drain_seconds,
                extra={"event": "shutdown_draining", "drain_seconds": self.drain_seconds},
            )
        if self.drain_until is not None and time.monotonic() >= self.drain_until:
            self.should_exit = True
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises the signal once it has shut down, so a graceful stop would end with
        # the signal's status (143) instead of 0: install the handlers, restore them, no more.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
