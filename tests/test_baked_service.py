"""Each tested variant passes its own lint, type check and test suite (or its part of it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from bake import VARIANTS, report, run

CHECKS = {
    "ruff-check": ["ruff", "check", "."],
    "ruff-format": ["ruff", "format", "--check", "."],
    "mypy": ["mypy"],
    "pytest": ["pytest", "-q", "-p", "no:cacheprovider"],
}


@pytest.mark.parametrize("check", CHECKS)
def test_baked_service_passes(
    installed_project: Path, check: str, request: pytest.FixtureRequest
) -> None:
    # python -m: the tools of this venv, where the baked service is installed.
    command = CHECKS[check]
    if check == "pytest":
        variant = VARIANTS[request.node.callspec.params["installed_project"]]
        command = [*command, *variant.suite]
    result = run([sys.executable, "-m", *command], cwd=installed_project)
    assert result.returncode == 0, report(result)
