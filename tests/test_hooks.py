"""The pre-generation hook refuses answers that would bake a broken service."""

from __future__ import annotations

from pathlib import Path

import pytest
from bake import bake, report

BAD_ANSWERS = [
    pytest.param("project_slug", "Secure-API", id="slug-with-uppercase"),
    pytest.param("project_slug", "1service", id="slug-starting-with-digit"),
    pytest.param("project_slug", "service-", id="slug-ending-with-hyphen"),
    pytest.param("package_name", "my-service", id="package-not-an-identifier"),
    pytest.param("package_name", "class", id="package-a-keyword"),
    pytest.param("package_name", "redis", id="package-shadowing-redis"),
    pytest.param("package_name", "jwt", id="package-shadowing-jwt"),
    pytest.param("package_name", "json", id="package-shadowing-stdlib"),
    pytest.param("package_name", "Secure_Api", id="package-with-uppercase"),
]


@pytest.mark.parametrize(("field", "value"), BAD_ANSWERS)
def test_pre_gen_hook_refuses_bad_answer(
    tmp_path: Path, field: str, value: str
) -> None:
    result = bake(tmp_path, {field: value})

    assert result.returncode != 0, report(result)
    messages = [
        line
        for line in result.stderr.splitlines()
        if line.startswith(f"ERROR: {field} ")
    ]
    assert len(messages) == 1, report(result)
    assert repr(value) in messages[0]
    assert list(tmp_path.iterdir()) == [], "nothing may be baked"
