"""The locked dependency sets every baked service ships (requirements/*.txt, from `make lock`), and
the SBOM made from them (`make sbom`).

`make lock` keeps existing pins, so run on an unchanged pyproject.toml it must give back the same
files: when it does not, pyproject.toml changed without a new lock (run `make lock` at the
template root). That check asks PyPI for metadata, the one network access here.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tomllib
from pathlib import Path

import pytest
from bake import FULLY_TESTED, report, run
from conftest import BakedProject

LOCKS = ("main.txt", "dev.txt", "build.txt")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", re.MULTILINE)
VENV = Path(sys.executable).parent.parent

variants = pytest.mark.parametrize("name", FULLY_TESTED)


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return normalized(match.group(0))


def pins(path: Path) -> dict[str, str]:
    return {normalized(name): version for name, version in PIN.findall(path.read_text())}


@variants
def test_every_dependency_is_pinned_with_hashes(baked: BakedProject, name: str) -> None:
    project = baked(name)
    metadata = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    locked = {lock: pins(project / "requirements" / lock) for lock in LOCKS}
    for requirement in metadata["dependencies"]:
        assert requirement_name(requirement) in locked["main.txt"], requirement
        assert requirement_name(requirement) in locked["dev.txt"], requirement
    for requirement in metadata["optional-dependencies"]["dev"]:
        assert requirement_name(requirement) in locked["dev.txt"], requirement
    assert {"hatchling", "editables"} <= set(locked["build.txt"])
    for lock in LOCKS:
        blocks = re.split(r"\n(?=[A-Za-z0-9])", (project / "requirements" / lock).read_text())
        unhashed = [block.split()[0] for block in blocks if PIN.match(block) and "--hash=sha256:" not in block]
        assert not unhashed, f"{lock}: pinned without hashes: {unhashed}"


def test_each_database_locks_only_its_own_driver(baked: BakedProject) -> None:
    sqlite = pins(baked("default") / "requirements" / "main.txt")
    postgresql = pins(baked("postgresql") / "requirements" / "main.txt")
    assert "aiosqlite" in sqlite and "asyncpg" not in sqlite
    assert "asyncpg" in postgresql and "aiosqlite" not in postgresql


@variants
def test_make_lock_reproduces_the_shipped_lock(baked: BakedProject, name: str, tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(baked(name), project)
    result = run(["make", "--no-print-directory", "lock", f"VENV={VENV}"], cwd=project, timeout=300)
    assert result.returncode == 0, report(result)
    for lock in LOCKS:
        shipped = (baked(name) / "requirements" / lock).read_text()
        assert (project / "requirements" / lock).read_text() == shipped, (
            f"requirements/{lock} is stale for {name}: run `make lock` at the template root"
        )


@variants
def test_make_sbom_describes_the_locked_runtime_set(baked: BakedProject, name: str, tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(baked(name), project)
    result = run(["make", "--no-print-directory", "sbom", f"VENV={VENV}"], cwd=project, timeout=300)
    assert result.returncode == 0, report(result)
    sbom = json.loads((project / "build" / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    assert sbom["metadata"]["component"]["name"] == tomllib.loads((project / "pyproject.toml").read_text())["project"]["name"]
    components = {normalized(component["name"]): component for component in sbom["components"]}
    assert {name: component["version"] for name, component in components.items()} == pins(
        project / "requirements" / "main.txt"
    )
    for component in components.values():
        assert component["purl"].startswith("pkg:pypi/")
        assert component.get("hashes") or any(
            reference.get("hashes") for reference in component.get("externalReferences", [])
        ), component["name"]


@variants
def test_the_image_install_steps_work_from_the_locks(baked: BakedProject, name: str, tmp_path: Path) -> None:
    """The Dockerfile's build stage, run on this machine's Python: hatchling from build.txt, the
    runtime set from main.txt (hashes checked, wheels only), the service's wheel on top, and the
    entry point `serve` is started by."""
    project = baked(name)
    build, runtime = tmp_path / "build", tmp_path / "venv"
    steps = [
        [sys.executable, "-m", "venv", str(build)],
        [str(build / "bin/pip"), "install", "--quiet", "--require-hashes", "--no-deps", "--only-binary=:all:",
         "-r", "requirements/build.txt"],
        [sys.executable, "-m", "venv", str(runtime)],
        [str(runtime / "bin/pip"), "install", "--quiet", "--require-hashes", "--no-deps", "--only-binary=:all:",
         "-r", "requirements/main.txt"],
        [str(build / "bin/pip"), "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir",
         str(tmp_path / "wheels"), "."],
    ]  # fmt: skip
    for command in steps:
        result = run(command, cwd=project, timeout=600)
        assert result.returncode == 0, report(result)
    wheels = [str(path) for path in (tmp_path / "wheels").glob("*.whl")]
    for command in (
        [str(runtime / "bin/pip"), "install", "--quiet", "--no-deps", *wheels],
        [str(runtime / "bin/pip"), "check"],
        [str(runtime / "bin" / project.name), "serve", "--help"],
        [str(runtime / "bin/alembic"), "--help"],
    ):
        result = run(command, cwd=tmp_path, timeout=300)
        assert result.returncode == 0, report(result)


@variants
def test_make_install_installs_the_locked_set_with_hashes(baked: BakedProject, name: str) -> None:
    """The quick start's `make install` is the locked set, as CI's: newer releases come only by
    `make lock UPGRADE=1`."""
    result = run(["make", "--no-print-directory", "--dry-run", "install", "VENV=/nonexistent"], cwd=baked(name))
    assert result.returncode == 0, report(result)
    installs = [line for line in result.stdout.splitlines() if " install " in line and "--upgrade pip" not in line]
    assert installs and all("--no-deps" in line for line in installs), result.stdout
    assert any("--require-hashes" in line and "-r requirements/dev.txt" in line for line in installs), result.stdout


def test_the_newest_allowed_releases_pass_the_baked_lint(baked: BakedProject, tmp_path: Path) -> None:
    """What Dependabot will propose: `make lock UPGRADE=1` (the newest releases pyproject.toml
    allows), installed by `make install`, then `make lint` (ruff, strict mypy, import contracts).
    On the all-options PostgreSQL bake, the most code; redis 8.2's typed Sentinel once turned a
    `type: ignore` in store/sentinel.py into an error here."""
    project = tmp_path / "project"
    shutil.copytree(baked("postgresql"), project)
    venv = tmp_path / "venv"
    steps = (
        ["lock", "UPGRADE=1", f"VENV={VENV}"],
        ["install", f"VENV={venv}", f"PYTHON={sys.executable}"],
        ["lint", f"VENV={venv}"],
    )
    for arguments in steps:
        result = run(["make", "--no-print-directory", *arguments], cwd=project, timeout=900)
        upgraded = {
            package: f"{old} -> {new}"
            for package, new in pins(project / "requirements" / "dev.txt").items()
            if (old := pins(baked("postgresql") / "requirements" / "dev.txt").get(package)) != new
        }
        assert result.returncode == 0, f"with the newest allowed releases ({upgraded}):\n{report(result)}"
    freeze = run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"], cwd=project)
    installed = {normalized(name): version for name, version in PIN.findall(freeze.stdout)}
    # A universal lock may list a package twice, under markers for different Pythons.
    locked: dict[str, set[str]] = {}
    lock_text = "".join((project / "requirements" / lock).read_text() for lock in ("dev.txt", "build.txt"))
    for package, version in PIN.findall(lock_text):
        locked.setdefault(normalized(package), set()).add(version)
    unlocked = {package: version for package, version in installed.items() if version not in locked.get(package, ())}
    assert not unlocked, f"make install installed what the lock does not hold: {unlocked}"
    assert installed["redis"] in locked["redis"]
