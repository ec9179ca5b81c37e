"""Each tested variant passes its own lint, type check and test suite (or its part of it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from bake import VARIANTS, report, run

# Each is run as `python <arguments>`, with this venv's tools.
LINT_IMPORTS = ["-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]
CHECKS = {
    "ruff-check": ["-m", "ruff", "check", "."],
    "ruff-format": ["-m", "ruff", "format", "--check", "."],
    "mypy": ["-m", "mypy"],
    "import-contracts": LINT_IMPORTS,
    "pytest": ["-m", "pytest", "-q", "-p", "no:cacheprovider"],
}


@pytest.mark.parametrize("check", CHECKS)
def test_baked_service_passes(
    installed_project: Path, check: str, request: pytest.FixtureRequest
) -> None:
    # The tools of this venv, where the baked service is installed.
    command = CHECKS[check]
    if check == "pytest":
        variant = VARIANTS[request.node.callspec.params["installed_project"]]
        command = [*command, *variant.suite]
    result = run([sys.executable, *command], cwd=installed_project)
    assert result.returncode == 0, report(result)
