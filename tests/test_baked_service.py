"""Each fully tested variant passes its own lint, type check and test suite."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from bake import report, run

CHECKS = {
    "ruff-check": ["ruff", "check", "."],
    "ruff-format": ["ruff", "format", "--check", "."],
    "mypy": ["mypy"],
    "pytest": ["pytest", "-q", "-p", "no:cacheprovider"],
}


@pytest.mark.parametrize("check", CHECKS)
def test_baked_service_passes(installed_project: Path, check: str) -> None:
    # python -m: the tools of this venv, where the baked service is installed.
    result = run([sys.executable, "-m", *CHECKS[check]], cwd=installed_project)
    assert result.returncode == 0, report(result)
