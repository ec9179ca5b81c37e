"""The baked service's layout is a checked contract: an import that breaks it fails `make lint`.

Each test copies a baked service, adds one import that breaks one of the import-linter contracts
in its pyproject.toml, and runs the same check its lint step and CI run (`lint-imports`)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from bake import report, run
from conftest import BakedProject
from test_baked_service import LINT_IMPORTS


def lint_imports(project: Path) -> str:
    """The check's output; fails the test unless the check failed."""
    env = {**os.environ, "PYTHONPATH": str(project / "src")}
    result = run([sys.executable, *LINT_IMPORTS], cwd=project, env=env, timeout=300)
    assert result.returncode != 0, report(result)
    return result.stdout + result.stderr


def with_import(baked: Path, tmp_path: Path, module: str, line: str) -> Path:
    project = tmp_path / baked.name
    shutil.copytree(baked, project, ignore=shutil.ignore_patterns(".venv", "__pycache__", "*.db"))
    path = project / "src" / "secure_api" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    return project


def test_the_untouched_layout_keeps_every_contract(baked: BakedProject) -> None:
    project = baked("postgresql")
    env = {**os.environ, "PYTHONPATH": str(project / "src")}
    result = run([sys.executable, *LINT_IMPORTS], cwd=project, env=env, timeout=300)
    assert result.returncode == 0, report(result)
    assert "broken" in result.stdout and " 0 broken" in result.stdout, report(result)


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # A layer reaching up: the pipeline's layers must not know the app that assembles them.
        ("security/events.py", "from secure_api import app", "secure_api.security is not allowed to import secure_api.app"),
        # A circle back up from the lowest resources module.
        ("resources.py", "from secure_api import runtime", "secure_api.resources is not allowed to import secure_api.runtime"),
        # Template code reading the owner's routes.
        ("runtime.py", "from secure_api.api import deps", "secure_api.runtime is not allowed to import secure_api.api"),
        # One option using another's code.
        (
            "options/webhooks/outbound.py",
            "from secure_api.options.api_keys import settings",
            "secure_api.options.webhooks is not allowed to import secure_api.options.api_keys",
        ),
        # The core naming an option instead of finding it through extensions.py.
        ("health.py", "from secure_api.options import mtls", "secure_api.health is not allowed to import secure_api.options"),
    ],
)
def test_an_import_that_breaks_the_layout_fails_the_check(
    baked: BakedProject, tmp_path: Path, module: str, line: str, broken: str
) -> None:
    output = lint_imports(with_import(baked("postgresql"), tmp_path, module, line))
    assert broken in " ".join(output.split()), output
