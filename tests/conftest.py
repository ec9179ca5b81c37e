"""Session-wide bakes: each variant is baked once and shared by every test."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from bake import FULLY_TESTED, SUITE_TESTED, UV, VARIANTS, bake, report, run, variant_python

BakedProject = Callable[[str], Path]
# With these in this venv, editable installs skip the isolated build environment.
BUILD_BACKEND_MODULES = ("hatchling", "editables")


@pytest.fixture(scope="session")
def baked(tmp_path_factory: pytest.TempPathFactory) -> BakedProject:
    """Bake a variant on first use; return the baked project directory."""
    outcomes: dict[str, tuple[Path, str | None]] = {}

    def baked_project(name: str) -> Path:
        if name not in outcomes:
            variant = VARIANTS[name]
            output_dir = tmp_path_factory.mktemp(f"bake-{name}")
            result = bake(output_dir, variant.answers)
            failure = None if result.returncode == 0 else report(result)
            outcomes[name] = (output_dir / variant.slug, failure)
        project, failure = outcomes[name]
        assert failure is None, failure
        return project

    return baked_project


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """One xdist group per venv that variants take turns in (`--dist loadgroup`): the tests of one
    venv's variants run on one worker, in pytest's order (one variant after the other)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "installed_project" in callspec.params:
            database = VARIANTS[callspec.params["installed_project"]].database
            item.add_marker(pytest.mark.xdist_group(f"venv-{database}"))


@pytest.fixture(scope="session", params=FULLY_TESTED + SUITE_TESTED)
def installed_project(
    request: pytest.FixtureRequest, baked: BakedProject
) -> Iterator[Path]:
    """A variant that runs its own checks, installed with its dev and docs groups (uv pip) into
    its venv (`variant_python`).

    The variants of one venv share a distribution name, so they take turns: pytest runs all the
    tests of one parameter, tears it down (uninstalls), then installs the next.
    """
    variant = VARIANTS[request.param]
    project = baked(variant.name)
    python = variant_python(variant.name)
    command = [UV, "pip", "install", "--quiet", "--python", str(python)]
    if python != Path(sys.executable):
        # The service's locked build backend first (its `build` group), as its `make install` does.
        backend = run([*command, "--group", "build"], cwd=project)
        assert backend.returncode == 0, report(backend)
        command.append("--no-build-isolation")
    elif all(importlib.util.find_spec(name) for name in BUILD_BACKEND_MODULES):
        command.append("--no-build-isolation")
    result = run([*command, "--editable", str(project), "--group", "dev", "--group", "docs"], cwd=project)
    assert result.returncode == 0, report(result)
    if (project / "policies").is_dir():  # authz_engine=cerbos: the pinned PDP binary (npm)
        installed = run(["make", "--no-print-directory", "cerbos"], cwd=project)
        assert installed.returncode == 0, report(installed)
    yield project
    run([UV, "pip", "uninstall", "--quiet", "--python", str(python), variant.slug], cwd=project)
