"""`make demo-timing`: how long a fresh clone's `make demo` takes to serve, with uv's package cache
warm and with it empty, and on what machine.

Each run copies this checkout's files (tracked and untracked, not ignored: what a clone of the
commit would hold, uncommitted edits included) into a new directory, runs `make demo` there with a
free PORT, and stops the clock when /health/live answers 200; then it stops the demo. "warm": uv's
cache as it is (a first, unmeasured run fills it). "empty": UV_CACHE_DIR and XDG_CACHE_HOME (the
bootstrap's uv wheel) point at new empty directories, so everything comes from PyPI. uv comes from
PATH when it is there, else from the bootstrap (scripts/locked_uv.py), as on a fresh machine.

Standard library only. Prints a Markdown table (and --out writes it); exits 1 when a median is over
its budget (15 s warm, 30 s empty).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = {"warm": 15.0, "empty": 30.0}
SERVE_TIMEOUT = 300.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def fresh_clone(destination: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    for relative in filter(None, listed.stdout.split("\0")):
        source = ROOT / relative
        if source.is_file():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def live(port: int) -> bool:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/health/live", headers={"Host": "localhost"})
    try:
        with urllib.request.urlopen(request, timeout=1) as response:  # noqa: S310 (loopback)
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def time_demo(workdir: Path, env: dict[str, str], log: Path, clone: Path | None = None) -> float:
    """Seconds from `make demo` to /health/live answering 200 in a fresh clone (or in `clone`,
    made already)."""
    if clone is None:
        clone = workdir / "clone"
        fresh_clone(clone)
    port = free_port()
    started = time.monotonic()
    with log.open("w") as output:
        demo = subprocess.Popen(
            ["make", "--no-print-directory", "demo"],
            cwd=clone, env={**env, "PORT": str(port)}, stdout=output, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            while not live(port):
                if demo.poll() is not None:
                    raise SystemExit(f"make demo exited {demo.returncode} before serving:\n{log.read_text()[-3000:]}")
                if time.monotonic() - started > SERVE_TIMEOUT:
                    raise SystemExit(f"make demo did not serve within {SERVE_TIMEOUT:.0f} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.1)
            return time.monotonic() - started
        finally:
            os.killpg(demo.pid, signal.SIGTERM)
            try:
                demo.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def uv_version(env: dict[str, str]) -> str:
    found = shutil.which("uv", path=env.get("PATH"))
    if not found:
        return "none on PATH: the bootstrap's (scripts/locked_uv.py)"
    return subprocess.run([found, "--version"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="measured runs per cache state (default 1)")
    parser.add_argument("--warm-only", action="store_true", help="skip the empty-cache runs")
    parser.add_argument("--uv", help="ignored: `make demo` in each clone finds uv as a fresh clone would")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MAKE", "MFLAGS", "UV"))}
    results: dict[str, list[float]] = {"warm": [], "empty": []}
    loads: list[tuple[float, float, float]] = [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="demo-timing-") as scratch:
        base = Path(scratch)
        print("priming uv's cache (unmeasured run) ...", flush=True)
        time_demo(base / "prime", env, base / "prime.log")
        states = ["warm"] if args.warm_only else ["warm", "empty"]
        for run in range(args.runs):
            for state in states:
                workdir = base / f"{state}-{run}"
                run_env = dict(env)
                if state == "empty":
                    run_env["UV_CACHE_DIR"] = str(workdir / "uv-cache")
                    run_env["XDG_CACHE_HOME"] = str(workdir / "xdg-cache")
                loads.append(os.getloadavg())
                seconds = time_demo(workdir, run_env, base / f"{state}-{run}.log")
                results[state].append(seconds)
                print(f"{state} cache, run {run + 1}: serving after {seconds:.1f} s", flush=True)
    loads.append(os.getloadavg())
    lines = [
        f"`make demo` in a fresh clone until /health/live answers ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"- machine: {os.cpu_count()} cores, {cpu_model()}, {platform.system()} {platform.release()}",
        f"- load average (1 min) during the runs: {min(load[0] for load in loads):.2f} to "
        f"{max(load[0] for load in loads):.2f} (other work on the machine counts against the demo)",
        f"- Python {platform.python_version()}; uv: {uv_version(env)}",
        "",
        "| package cache | runs | median | slowest | budget | within |",
        "|---|---|---|---|---|---|",
    ]
    over = False
    for state, seconds in results.items():
        if not seconds:
            continue
        median = statistics.median(seconds)
        over |= median > BUDGETS[state]
        lines.append(
            f"| {state} | {len(seconds)} | {median:.1f} s | {max(seconds):.1f} s | {BUDGETS[state]:.0f} s "
            f"| {'yes' if median <= BUDGETS[state] else 'NO'} |"
        )
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.out:
        args.out.write_text(table)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
