"""The uv that uv.lock pins, for a machine without uv: its wheel from PyPI (the URL and sha256 the
lock records), the hash checked, its `uv` and `uvx` put in DIR/bin.

    python3 scripts/locked_uv.py --install build/uv [--lock uv.lock]

No pip and no venv needed (a fresh Debian has neither): standard library only, Python 3.11+. The
wheel is kept in ~/.cache/secure-api-uv (XDG_CACHE_HOME), checked again on every use. The Makefile
runs it when no uv is in the venv or on PATH; the Dockerfile's build stage runs it too.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import sys
import tempfile
import tomllib
import urllib.request
import zipfile
from pathlib import Path

ARCHES = {"amd64": "x86_64", "arm64": "aarch64"}
MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_(\w+)$")
MANYLINUX_LEGACY = {"manylinux2014": (2, 17), "manylinux2010": (2, 12), "manylinux1": (2, 5)}
MUSLLINUX = re.compile(r"^musllinux_(\d+)_(\d+)_(\w+)$")
MACOS = re.compile(r"^macosx_(\d+)_(\d+)_(\w+)$")


def platform_matches(tag: str) -> bool:
    """Whether a wheel's platform tag runs here (Linux glibc or musl, macOS)."""
    machine = platform.machine().lower()
    machine = ARCHES.get(machine, machine) if sys.platform != "darwin" else machine
    if sys.platform.startswith("linux"):
        libc, version = platform.libc_ver()
        if libc == "glibc":
            have = tuple(int(part) for part in version.split(".")[:2])
            if match := MANYLINUX.match(tag):
                return match[3] == machine and (int(match[1]), int(match[2])) <= have
            for legacy, needs in MANYLINUX_LEGACY.items():
                if tag == f"{legacy}_{machine}":
                    return needs <= have
            return False
        match = MUSLLINUX.match(tag)
        return match is not None and match[3] == machine
    if sys.platform == "darwin":
        match = MACOS.match(tag)
        return match is not None and match[3] in (machine, "universal2")
    return False


def locked_wheel(lock: Path) -> dict[str, str]:
    packages = tomllib.loads(lock.read_text())["package"]
    (uv,) = [package for package in packages if package["name"] == "uv"]
    for wheel in uv["wheels"]:
        tags = wheel["url"].rsplit("/", 1)[1].removesuffix(".whl").split("-")[-1].split(".")
        if any(platform_matches(tag) for tag in tags):
            return {"url": wheel["url"], "hash": wheel["hash"], "version": uv["version"]}
    raise SystemExit(f"uv {uv['version']} has no wheel for {sys.platform} {platform.machine()}: install uv yourself")


def fetched(wheel: dict[str, str]) -> Path:
    """The wheel, from the cache or PyPI, its sha256 checked either way."""
    algorithm, expected = wheel["hash"].split(":", 1)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "secure-api-uv"
    path = cache / wheel["url"].rsplit("/", 1)[1]
    if not (path.is_file() and hashlib.new(algorithm, path.read_bytes()).hexdigest() == expected):
        cache.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(wheel["url"], timeout=60) as response:  # noqa: S310 (https, from the lock)
            data = response.read()
        if hashlib.new(algorithm, data).hexdigest() != expected:
            raise SystemExit(f"{wheel['url']}: the download does not match uv.lock's {wheel['hash']}")
        with tempfile.NamedTemporaryFile(dir=cache, delete=False) as partial:
            partial.write(data)
        Path(partial.name).replace(path)
    return path


def install(lock: Path, target: Path) -> None:
    wheel = locked_wheel(lock)
    bin_dir = target / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(fetched(wheel)) as archive:
        for name in archive.namelist():
            if re.fullmatch(r"uv-[^/]+\.data/scripts/uvx?", name):
                destination = bin_dir / Path(name).name
                with archive.open(name) as source, open(destination, "wb") as out:
                    shutil.copyfileobj(source, out)
                destination.chmod(0o755)
    print(f"uv {wheel['version']} (uv.lock's, sha256 checked) in {bin_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install", type=Path, required=True, metavar="DIR", help="put uv and uvx in DIR/bin")
    parser.add_argument("--lock", type=Path, default=Path("uv.lock"))
    args = parser.parse_args()
    install(args.lock, args.install)


if __name__ == "__main__":
    main()
