"""Each tested variant passes its own lint, type check and test suite (or its part of it)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bake import VARIANTS, report, run, variant_python

# Each is run as `python <arguments>` with the tools of the variant's venv.
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
    # The tools of the venv the baked service is installed in (its dev group brings them).
    variant = VARIANTS[request.node.callspec.params["installed_project"]]
    command = CHECKS[check]
    if check == "pytest":
        command = [*command, *variant.suite]
    result = run([str(variant_python(variant.name)), *command], cwd=installed_project)
    assert result.returncode == 0, report(result)
