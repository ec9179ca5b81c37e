"""The uv.lock every baked service ships (one per combination of the options that change its
pyproject.toml, from `make lock`), how uv gets onto a machine without it, the image's install
steps, and the SBOM made from the lock (`make sbom`).

`make lock` keeps existing pins, so run on an unchanged pyproject.toml it must give back the same
file: when it does not, pyproject.toml changed without a new lock (run `make lock` at the template
root). That check, the owner's dependency and the newest-releases check ask PyPI, the only network
access here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from bake import FULLY_TESTED, UV, hook_constant, report, run, template_choices
from conftest import BakedProject

VENV = Path(sys.executable).parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", re.MULTILINE)
OWNER_DEPENDENCY = "python-slugify>=8"

variants = pytest.mark.parametrize("name", FULLY_TESTED)


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return normalized(match.group(0))


def lock_packages(project: Path) -> list[dict[str, Any]]:
    packages: list[dict[str, Any]] = tomllib.loads((project / "uv.lock").read_text())["package"]
    return packages


def locked_package(project: Path, name: str) -> dict[str, Any]:
    (package,) = [package for package in lock_packages(project) if package["name"] == name]
    return package


def runtime_set(project: Path) -> set[tuple[str, str]]:
    """(name, version) of every package the service and the owner's requirements need at run time,
    walked through uv.lock (dependencies and the extras they ask for; no dependency groups)."""
    packages = lock_packages(project)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for package in packages:
        by_name.setdefault(package["name"], []).append(package)
    project_name = tomllib.loads((project / "pyproject.toml").read_text())["project"]["name"]
    roots = [(project_name, None, ()), (f"{project_name}-service-requirements", None, ())]
    seen: set[tuple[str, str, tuple[str, ...]]] = set()
    found: set[tuple[str, str]] = set()
    while roots:
        name, version, extras = roots.pop()
        candidates = [package for package in by_name[name] if version in (None, package["version"])]
        for package in candidates:
            key = (name, package["version"], extras)
            if key in seen:
                continue
            seen.add(key)
            if "registry" in package["source"]:
                found.add((name, package["version"]))
            dependencies = list(package.get("dependencies", []))
            for extra in extras:
                dependencies += package.get("optional-dependencies", {}).get(extra, [])
            for dependency in dependencies:
                roots.append((dependency["name"], dependency.get("version"), tuple(dependency.get("extra", ()))))
    return found


@variants
def test_every_dependency_is_locked_with_hashes(baked: BakedProject, name: str) -> None:
    project = baked(name)
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    locked = {package["name"] for package in lock_packages(project)}
    declared = [*pyproject["project"]["dependencies"]]
    for group in ("dev", "build", "bench"):
        declared += pyproject["dependency-groups"][group]
    missing = [requirement for requirement in declared if requirement_name(requirement) not in locked]
    assert not missing, f"not in uv.lock: {missing}"
    unhashed = [
        package["name"]
        for package in lock_packages(project)
        if "registry" in package["source"]
        and not all("hash" in artifact for artifact in [*package.get("wheels", []), package.get("sdist", {})] if artifact)
    ]
    assert not unhashed, f"locked without hashes: {unhashed}"
    assert {"hatchling", "editables", "uv"} <= locked


def test_each_database_locks_only_its_own_driver(baked: BakedProject) -> None:
    def service_dependencies(project: Path) -> set[str]:
        return {dependency["name"] for dependency in locked_package(project, project.name)["dependencies"]}

    assert "aiosqlite" in service_dependencies(baked("default"))
    assert "asyncpg" not in service_dependencies(baked("default"))
    assert "asyncpg" in service_dependencies(baked("postgresql"))
    assert "aiosqlite" not in service_dependencies(baked("postgresql"))


def test_the_template_keeps_one_lock_per_combination_of_lock_keys() -> None:
    """The hook's LOCK_KEYS name the options that change pyproject.toml; scripts/lock.py makes a
    lock for each combination of their values, and the hook finds it under that name."""
    keys = hook_constant("LOCK_KEYS")
    choices = template_choices()
    assert keys and all(key in choices for key in keys)
    locks = Path(__file__).resolve().parent.parent / "{{cookiecutter.project_slug}}" / "locks"
    names = {path.parent.name for path in locks.glob("*/uv.lock")}
    expected = {""}
    for key in keys:
        expected = {f"{prefix}-{value}" if prefix else value for prefix in expected for value in choices[key]}
    assert names == expected


@variants
def test_the_bake_names_its_project_in_the_lock(baked: BakedProject, name: str) -> None:
    project = baked(name)
    manifest = tomllib.loads((project / "uv.lock").read_text())["manifest"]
    assert manifest["members"] == [project.name, f"{project.name}-service-requirements"]
    assert not (project / "locks").exists()
    assert "cookiecutter" not in (project / "uv.lock").read_text().split("[[package]]", 1)[0]


@variants
def test_make_lock_reproduces_the_shipped_lock(baked: BakedProject, name: str, tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(baked(name), project)
    result = run(["make", "--no-print-directory", "lock", f"VENV={VENV}"], cwd=project, timeout=300)
    assert result.returncode == 0, report(result)
    assert (project / "uv.lock").read_text() == (baked(name) / "uv.lock").read_text(), (
        f"uv.lock is stale for {name}: run `make lock` at the template root"
    )
    assert (project / "requirements" / "pyproject.toml").read_text() == (
        baked(name) / "requirements" / "pyproject.toml"
    ).read_text()


def test_the_owners_dependency_is_locked_apart_from_the_templates(baked: BakedProject, tmp_path: Path) -> None:
    """A line in requirements/service.in (the owner's file): `make lock-check` (pre-commit, CI)
    fails until `make lock` has put it into the requirements/ member and uv.lock, and `make
    install` then installs it; pyproject.toml (the template's) is untouched."""
    project = tmp_path / "project"
    shutil.copytree(baked("default"), project)
    pyproject = (project / "pyproject.toml").read_text()
    service_in = project / "requirements" / "service.in"
    service_in.write_text(service_in.read_text() + OWNER_DEPENDENCY + "\n")
    check = run(["make", "--no-print-directory", "lock-check", f"VENV={VENV}"], cwd=project, timeout=300)
    assert check.returncode != 0 and "make lock" in check.stderr, report(check)
    result = run(["make", "--no-print-directory", "lock", f"VENV={VENV}"], cwd=project, timeout=300)
    assert result.returncode == 0, report(result)
    check = run(["make", "--no-print-directory", "lock-check", f"VENV={VENV}"], cwd=project, timeout=300)
    assert check.returncode == 0, report(check)
    member = tomllib.loads((project / "requirements" / "pyproject.toml").read_text())["project"]
    assert member["dependencies"] == [OWNER_DEPENDENCY]
    assert ("python-slugify", locked_package(project, "python-slugify")["version"]) in runtime_set(project)
    assert (project / "pyproject.toml").read_text() == pyproject
    venv = tmp_path / "venv"
    result = run(
        ["make", "--no-print-directory", "install", f"VENV={venv}", f"PYTHON={sys.executable}"], cwd=project, timeout=600
    )
    assert result.returncode == 0, report(result)
    imported = run([str(venv / "bin" / "python"), "-c", "import slugify"], cwd=project)
    assert imported.returncode == 0, report(imported)


@variants
def test_make_sbom_describes_the_locked_runtime_set(baked: BakedProject, name: str, tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(baked(name), project)
    result = run(["make", "--no-print-directory", "sbom", f"VENV={VENV}"], cwd=project, timeout=300)
    assert result.returncode == 0, report(result)
    sbom = json.loads((project / "build" / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    assert sbom["metadata"]["component"]["name"] == tomllib.loads((project / "pyproject.toml").read_text())["project"]["name"]
    components = [component for component in sbom["components"] if "purl" in component]
    assert {(normalized(component["name"]), component["version"]) for component in components} == runtime_set(project)
    for component in components:
        assert component["purl"].startswith("pkg:pypi/")
        assert all(reference.get("hashes") for reference in component.get("externalReferences", [])), component["name"]
        assert component.get("externalReferences"), component["name"]


def test_locked_uv_installs_the_locks_uv_and_refuses_another_hash(baked: BakedProject, tmp_path: Path) -> None:
    """scripts/locked_uv.py (make install without uv, the image's build stage): uv.lock's uv, its
    wheel's sha256 checked; a lock whose hash does not match the wheel gets no uv."""
    project = baked("default")
    script = project / "scripts" / "locked_uv.py"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = run([sys.executable, str(script), "--install", str(tmp_path / "uv")], cwd=project, env=env, timeout=300)
    assert result.returncode == 0, report(result)
    version = run([str(tmp_path / "uv" / "bin" / "uv"), "--version"], cwd=project)
    assert version.stdout.split()[1] == locked_package(project, "uv")["version"]
    tampered = tmp_path / "uv.lock"
    text = (project / "uv.lock").read_text()
    uv_block = text.index('\nname = "uv"\n')
    wheel_hash = re.compile(r'(uv-[^"]*\.whl", hash = "sha256:)([0-9a-f])')
    head, tail = text[:uv_block], text[uv_block:]
    tampered.write_text(head + wheel_hash.sub(lambda m: m[1] + ("0" if m[2] != "0" else "1"), tail, count=20))
    result = run(
        [sys.executable, str(script), "--install", str(tmp_path / "tampered"), "--lock", str(tampered)],
        cwd=project, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0 and "does not match" in result.stdout + result.stderr, report(result)
    assert not (tmp_path / "tampered" / "bin" / "uv").exists()


@variants
def test_the_image_install_steps_work_from_the_lock(baked: BakedProject, name: str, tmp_path: Path) -> None:
    """The Dockerfile's build stage, run on this machine's Python: the runtime set from uv.lock
    (wheels only), the service's wheel built by the locked hatchling in a venv of its own and
    installed on top, and the entry points `serve` and migrations are started by; no uv, pip or
    hatchling in the runtime venv."""
    project = baked(name)
    dockerfile = (project / "Dockerfile").read_text()
    runtime, build = tmp_path / "venv", tmp_path / "build"
    env = {
        **os.environ,
        "UV_LOCKED": "1",
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_PROJECT_ENVIRONMENT": str(runtime),
    }
    steps = [
        [UV, "sync", "--all-packages", "--no-default-groups", "--no-install-workspace", "--no-build", "--python", sys.executable],
        [UV, "sync", "--only-group", "build", "--no-install-workspace", "--no-build", "--python", sys.executable],
        [UV, "build", "--wheel", "--no-build-isolation", "--python", str(build / "bin/python"), "--out-dir", str(tmp_path / "wheels"), "."],
    ]  # fmt: skip
    for step in steps:
        # The same flags as the Dockerfile's RUN lines.
        assert " ".join(step[1:-2] if "sync" in step else step[1:4]) in dockerfile, step
    for index, command in enumerate(steps):
        step_env = {**env, "UV_PROJECT_ENVIRONMENT": str(build)} if index == 1 else env
        result = run(command, cwd=project, env=step_env, timeout=600)
        assert result.returncode == 0, report(result)
    wheels = [str(path) for path in (tmp_path / "wheels").glob("*.whl")]
    for command in (
        [UV, "pip", "install", "--quiet", "--python", str(runtime / "bin/python"), "--no-deps", *wheels],
        [UV, "pip", "check", "--python", str(runtime / "bin/python")],
        [str(runtime / "bin" / project.name), "serve", "--help"],
        [str(runtime / "bin/alembic"), "--help"],
    ):
        result = run(command, cwd=tmp_path, env=env, timeout=300)
        assert result.returncode == 0, report(result)
    installed = run([UV, "pip", "list", "--python", str(runtime / "bin/python"), "--format", "json"], cwd=tmp_path)
    names = {normalized(package["name"]) for package in json.loads(installed.stdout)}
    assert not names & {"uv", "pip", "hatchling", "editables", "pytest", "ruff"}, names
    pins = {(normalized(package["name"]), package["version"]) for package in json.loads(installed.stdout)}
    assert pins - {(project.name, "0.1.0")} <= runtime_set(project)


@variants
def test_make_install_installs_the_locked_set_with_uv(baked: BakedProject, name: str) -> None:
    """The quick start's `make install` is the locked set, as CI's: `uv sync --locked` (a lock
    behind pyproject.toml fails, hashes are checked), newer releases only by `make lock UPGRADE=1`;
    no pip."""
    result = run(["make", "--no-print-directory", "--dry-run", "install", "VENV=/nonexistent"], cwd=baked(name))
    assert result.returncode == 0, report(result)
    syncs = [line for line in result.stdout.splitlines() if " sync " in line]
    assert syncs and all("--locked" in line and "--all-packages" in line for line in syncs), result.stdout
    assert "pip install" not in result.stdout, result.stdout


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

    def versions(path: Path) -> dict[str, str]:
        return {package["name"]: package["version"] for package in lock_packages(path)}

    for arguments in steps:
        result = run(["make", "--no-print-directory", *arguments], cwd=project, timeout=900)
        old = versions(baked("postgresql"))
        upgraded = {package: f"{old.get(package)} -> {new}" for package, new in versions(project).items() if old.get(package) != new}
        assert result.returncode == 0, f"with the newest allowed releases ({upgraded}):\n{report(result)}"
    freeze = run([UV, "pip", "freeze", "--python", str(venv / "bin" / "python"), "--exclude-editable"], cwd=project)
    installed = {normalized(name): version for name, version in PIN.findall(freeze.stdout)}
    locked: dict[str, set[str]] = {}
    for package in lock_packages(project):
        locked.setdefault(package["name"], set()).add(package["version"])
    unlocked = {package: version for package, version in installed.items() if version not in locked.get(package, ())}
    assert not unlocked, f"make install installed what the lock does not hold: {unlocked}"
    assert installed["redis"] in locked["redis"]
