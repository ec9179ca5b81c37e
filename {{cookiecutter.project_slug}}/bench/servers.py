"""The service under test: uvicorn child processes, one per app variant, sharing one Redis and one
database, started and stopped by the bench itself."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.servers import LOOPBACK, free_port, log_tail

from .load import SERVICE_CPU, pinned

# Generous: the variants boot at once on the service's one core, and a busy machine slows imports.
STARTUP_SECONDS = 120.0
LOG_TAIL_BYTES = 64 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Service:
    """`uvicorn bench.apps:create` with BENCH_VARIANT=`variant`, run the way production runs it:
    one worker, uvloop and httptools, no access log, no Server header, no proxy headers."""

    def __init__(self, variant: str, env: dict[str, str], log_dir: Path, project: Path | None = None) -> None:
        """`project`: another baked service directory (its .venv and its bench/), run the same way."""
        self.variant = variant
        self.port = free_port()
        self.log_path = log_dir / f"{variant.replace(':', '-')}.log"
        python = str(project / ".venv" / "bin" / "python") if project else sys.executable
        command = pinned(
            [
                python,
                "-m",
                "uvicorn",
                "bench.apps:create",
                "--factory",
                f"--host={LOOPBACK}",
                f"--port={self.port}",
                "--loop=uvloop",
                "--http=httptools",
                "--no-access-log",
                "--no-server-header",
                "--no-proxy-headers",
            ],
            SERVICE_CPU,
        )
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                env={**os.environ, **env, "BENCH_VARIANT": variant},
                cwd=project,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health/live", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"service variant {self.variant!r} did not start:\n{log_tail(self.log_path, 40)}")

    def peak_rss_mb(self) -> float:
        """VmHWM: the most resident memory the process has had since it started."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("VmHWM not found in /proc/<pid>/status")

    def cpu_seconds(self) -> float:
        """User and system CPU time of the process so far, all its threads included."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._trim_log()

    def _trim_log(self) -> None:
        # One JSON line per request adds up; keep the end, where a failure would show.
        if self.log_path.exists() and self.log_path.stat().st_size > LOG_TAIL_BYTES:
            with self.log_path.open("rb") as log:
                log.seek(-LOG_TAIL_BYTES, os.SEEK_END)
                tail = log.read()
            self.log_path.write_bytes(tail[tail.find(b"\n") + 1 :])


def start_all(
    variants: list[str], env: dict[str, str], log_dir: Path, overrides: dict[str, dict[str, str]] | None = None
) -> dict[str, Service]:
    """Start every variant at once (they boot in parallel), then wait for each."""
    overrides = overrides or {}
    services = {variant: Service(variant, {**env, **overrides.get(variant, {})}, log_dir) for variant in variants}
    try:
        for service in services.values():
            service.wait_ready()
    except RuntimeError:
        stop_all(services)
        raise
    return services


def stop_all(services: dict[str, Service]) -> None:
    for service in services.values():
        service.stop()
