"""Baking the template and running commands, shared by the template tests."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent.parent
POST_GEN_HOOK = TEMPLATE_DIR / "hooks" / "post_gen_project.py"
OUTPUT_LIMIT = 20_000


@dataclass(frozen=True)
class Variant:
    """One bake of the template: the answers given and what they must produce."""

    name: str
    answers: Mapping[str, str]
    slug: str
    package: str
    database: str


VARIANTS = {
    variant.name: variant
    for variant in (
        Variant("default", {}, "secure-api", "secure_api", "sqlite"),
        Variant(
            "postgresql",
            {"database": "postgresql"},
            "secure-api",
            "secure_api",
            "postgresql",
        ),
        Variant(
            "custom-name",
            {"project_name": "Billing Service"},
            "billing-service",
            "billing_service",
            "sqlite",
        ),
    )
}
# Variants whose own checks (ruff, mypy, their test suite) run; the others are only
# rendered and byte-compiled.
FULLY_TESTED = ("default", "postgresql")


def run(
    command: Sequence[str],
    cwd: Path,
    timeout: float = 900,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command),
        cwd=cwd,
        env=None if env is None else dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def report(result: subprocess.CompletedProcess[str]) -> str:
    """The command and its output, for an assertion message."""
    output = (result.stdout + result.stderr).strip()
    if len(output) > OUTPUT_LIMIT:
        output = "[...]\n" + output[-OUTPUT_LIMIT:]
    command = " ".join(str(part) for part in result.args)
    return f"`{command}` exited {result.returncode}:\n{output}"


def bake(
    output_dir: Path, answers: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "cookiecutter",
        "--no-input",
        "--output-dir",
        str(output_dir),
        str(TEMPLATE_DIR),
        *(f"{key}={value}" for key, value in answers.items()),
    ]
    return run(command, cwd=output_dir, timeout=120)


def template_choices() -> dict[str, list[str]]:
    """Each multiple-choice question of cookiecutter.json with its values."""
    context = json.loads((TEMPLATE_DIR / "cookiecutter.json").read_text())
    return {
        key: value
        for key, value in context.items()
        if not key.startswith("_") and isinstance(value, list)
    }


def option_files() -> dict[str, dict[str, list[str]]]:
    """OPTION_FILES of the post-gen hook, read without rendering or running it."""
    # The hook is a Jinja template, but its rendered parts are still valid syntax.
    tree = ast.parse(POST_GEN_HOOK.read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [target.id for target in targets if isinstance(target, ast.Name)]
            if "OPTION_FILES" in names and node.value is not None:
                value: dict[str, dict[str, list[str]]] = ast.literal_eval(node.value)
                return value
    raise AssertionError(f"no OPTION_FILES in {POST_GEN_HOOK}")
