"""The harness of `make test` itself: which tests share a venv, and so a worker (tests/conftest.py)."""

from __future__ import annotations

import re

import pytest
from bake import TEMPLATE_DIR
from conftest import INSTALLED_PROJECT_MODULES, venv_group


def test_the_modules_that_install_a_variant_are_the_ones_kept_together() -> None:
    """A module that requests `installed_project` but is not listed would run on any worker,
    while another variant is installed in the venv it imports from."""
    using = {
        f"tests/{path.name}"
        for path in (TEMPLATE_DIR / "tests").glob("test_*.py")
        if path.name != "test_harness.py" and re.search(r"\binstalled_project\b", path.read_text())
    }
    assert using == set(INSTALLED_PROJECT_MODULES)


@pytest.mark.parametrize(
    ("nodeid", "group"),
    [
        ("tests/test_baked_service.py::test_baked_service_passes[default-pytest]", "venv-sqlite"),
        ("tests/test_baked_service.py::test_baked_service_passes[api-keys-import-contracts]", "venv-sqlite"),
        ("tests/test_baked_service.py::test_baked_service_passes[all-options-mypy]", "venv-sqlite"),
        ("tests/test_baked_service.py::test_baked_service_passes[postgresql-ruff-check]", "venv-postgresql"),
        ("tests/test_baked_service.py::test_baked_service_passes[cerbos-pytest]", "venv-postgresql"),
        ("tests/test_demo.py::test_every_row_gets_its_status[redis-default]", "venv-sqlite"),
        ("tests/test_scan.py::test_the_scan_passes[default]", "venv-sqlite"),
        ("tests/test_bake.py::test_python_files_compile[cerbos-sqlite]", None),
        ("tests/test_update.py::test_the_updated_service_passes_its_tests", None),
    ],
)
def test_each_installed_variants_tests_go_with_its_venv(nodeid: str, group: str | None) -> None:
    assert venv_group(nodeid) == group
