"""`make bench`: bake the default service into build/bench, install it with its bench extra, and
run its own driver (`python -m bench` inside the baked service) with results in build/bench.

Extra arguments go to the driver (`make bench BENCH_ARGS="--duration 2"`); `--update-docs`
also copies the report into docs/benchmarks.md between its markers; `--database postgresql` bakes
and measures the PostgreSQL variant (its report goes between the `postgresql` markers).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "bench"
PROJECT = BUILD / "secure-api"
DOCS = ROOT / "docs" / "benchmarks.md"
MARKERS = {
    "sqlite": ("<!-- bench:results:start -->", "<!-- bench:results:end -->"),
    "postgresql": ("<!-- bench:postgresql:start -->", "<!-- bench:postgresql:end -->"),
}


def run(command: list[str], cwd: Path) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=cwd, check=True)


def bake(database: str) -> None:
    shutil.rmtree(PROJECT, ignore_errors=True)
    BUILD.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cookiecutter", "--no-input", "--output-dir", str(BUILD), str(ROOT)]
    run([*command, f"database={database}"], ROOT)
    # uv from this venv (requirements-dev.txt), into this venv; no build isolation: hatchling and
    # editables come from requirements-dev.txt too, offline-friendly.
    uv = [str(Path(sys.executable).parent / "uv"), "pip", "install", "--quiet", "--python", sys.executable]
    run([*uv, "--no-build-isolation", "--editable", str(PROJECT), "--group", "bench"], PROJECT)


def update_docs(results: Path, database: str) -> None:
    start_marker, end_marker = MARKERS[database]
    text = DOCS.read_text()
    before, start, rest = text.partition(start_marker)
    _, end, after = rest.partition(end_marker)
    if not start or not end:
        raise SystemExit(f"{DOCS} has no {start_marker} ... {end_marker} markers")
    DOCS.write_text(f"{before}{start_marker}\n{results.read_text().strip()}\n{end_marker}{after}")
    print(f"updated {DOCS.relative_to(ROOT)}")


def commit() -> list[str]:
    """`--commit <id>` for the report when this is a git checkout (`-dirty` with local changes)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        return []
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return ["--commit", described.stdout.strip()] if described.returncode == 0 else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update-docs", action="store_true", help="copy the report into docs/benchmarks.md")
    parser.add_argument("--database", choices=sorted(MARKERS), default="sqlite", help="the variant to bake")
    args, driver_args = parser.parse_known_args()
    bake(args.database)
    if "--commit" not in driver_args:
        driver_args += commit()
    run([sys.executable, "-m", "bench", "--out", str(BUILD), *driver_args], PROJECT)
    if args.update_docs:
        update_docs(BUILD / "results.md", args.database)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
