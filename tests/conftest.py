"""Session-wide bakes: each variant is baked once and shared by every test."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


# The modules whose tests use `installed_project` (tests/test_bake.py checks this list).
INSTALLED_PROJECT_MODULES = ("tests/test_baked_service.py", "tests/test_demo.py", "tests/test_scan.py")


def venv_group(nodeid: str) -> str | None:
    """`venv-<database>` for a test of a variant installed in that database's venv (named in its
    parameters' id), None for any other test."""
    module, _, rest = nodeid.partition("::")
    if module not in INSTALLED_PROJECT_MODULES or "[" not in rest:
        return None
    tokens = rest.split("[", 1)[1].rstrip("]").split("-")
    # The longest variant name that is a run of whole tokens of the id ("api-keys" in "api-keys-mypy").
    found = [
        name
        for name in FULLY_TESTED + SUITE_TESTED
        for start in range(len(tokens))
        if "-".join(tokens[start : start + name.count("-") + 1]) == name
    ]
    return f"venv-{VARIANTS[max(found, key=len)].database}" if found else None


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make test`'s two workers (pytest-xdist): the tests of the variants that take turns in one
    venv (`variant_python`: one per database) are one unit of work, run on one worker in pytest's
    order, one variant after the other; every other test is a unit of its own, for whichever
    worker is free. (pytest-xdist's own `--dist loadgroup` cannot be used: it renames the tests'
    node ids, which pytest 9.2 no longer lets a plugin do.)"""
    from xdist.scheduler import LoadScopeScheduling

    class VenvGroups(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return venv_group(nodeid) or nodeid

    return VenvGroups(config, log)


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
