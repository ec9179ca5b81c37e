"""`scaffold resource`: a resource of the service's own in one command, lint-clean, migrated on this
service's database, guarded, with a BOLA test of its own that passes.

Each test scaffolds into a copy of this project (the real one is never touched) and runs the
copy's own checks in a child process: ruff, mypy, the import contracts, and pytest on the
scaffolded test with the migration and route-policy modules."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .servers import CERBOS_BINARY, cerbos_executable

PROJECT = Path(__file__).resolve().parent.parent
PACKAGE = "{{ cookiecutter.package_name }}"
COPIED = ("src", "tests", "scripts", "bench", "pyproject.toml", "alembic.ini")  # what the checks read
# authz_engine=cerbos: the policies (the scaffold adds the resource's) and the PDP's configuration.
POLICIES = ("policies", "deploy/cerbos")


def copy_project(tmp_path: Path) -> Path:
    copy = tmp_path / "service"
    copy.mkdir()
    for name in COPIED + tuple(name for name in POLICIES if (PROJECT / name).is_dir()):
        source = PROJECT / name
        if source.is_dir():
            ignored = shutil.ignore_patterns("__pycache__", "*.db", ".pytest_cache", ".mypy_cache", "*.egg-info")
            shutil.copytree(source, copy / name, ignore=ignored)
        else:
            shutil.copy2(source, copy / name)
    return copy


def in_copy(copy: Path, *command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "CERBOS_BINARY": str(CERBOS_BINARY)}
    return subprocess.run(
        [sys.executable, *command], cwd=copy, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def shown(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"{' '.join(map(str, result.args))} exited {result.returncode}:\n{result.stdout[-6000:]}{result.stderr[-6000:]}"
    )


@pytest.mark.parametrize(
    ("commands", "modules"),
    # Names no service of the template's is likely to have already (the copy holds the owner's own).
    [
        ([("scaffolded_note", "--under", "org")], ["scaffolded_notes"]),
        ([("scaffolded_tag",)], ["scaffolded_tags"]),
        # A child of a scaffolded resource checks the caller's relation to that resource, not to an
        # org: its BOLA test creates the parent as its owner (holding no org) and is refused another's.
        (
            [("scaffolded_board",), ("scaffolded_card", "--under", "scaffolded_board")],
            ["scaffolded_boards", "scaffolded_cards"],
        ),
        # --step-up: the writes declare the configured step-up; the scaffolded test proves a stale
        # authentication is refused (401) and a fresh one is not.
        (
            [("scaffolded_memo", "--under", "org", "--step-up"), ("scaffolded_vault", "--step-up")],
            ["scaffolded_memos", "scaffolded_vaults"],
        ),
    ],
    ids=["under-an-org", "top-level", "under-a-scaffolded-resource", "with-step-up"],
)
def test_a_scaffolded_resource_is_lint_clean_migrated_guarded_and_tested(
    tmp_path: Path, commands: list[tuple[str, ...]], modules: list[str]
) -> None:
    copy = copy_project(tmp_path)
    before = {path.relative_to(copy) for path in copy.rglob("*") if path.is_file()}
    for arguments in commands:
        made = in_copy(copy, "-m", f"{PACKAGE}.cli", "scaffold", "resource", *arguments)
        assert made.returncode == 0, shown(made)
    written = {path.relative_to(copy) for path in copy.rglob("*") if path.is_file()} - before
    assert {path.name for path in written} >= {
        name for module in modules for name in (f"{module}.py", f"test_{module}.py")
    }
    assert any(path.parts[-2] == "versions" for path in written), written
    if (copy / "policies").is_dir():  # authz_engine=cerbos: each resource's policy test, and its policy or rules
        assert {path.name for path in written if path.parts[0] == "policies"} >= {
            f"{command[0] if '--under' not in command else module}_test.yaml"
            for command, module in zip(commands, modules, strict=True)
        }, written
    # Only owner files changed: the new ones, and the three it extends.
    package = Path("src") / PACKAGE
    for path in (package / "models.py", package / "api" / "deps.py", package / "api" / "__init__.py"):
        assert (copy / path).read_text() != (PROJECT / path).read_text(), path
    checks = {
        "ruff check": ("-m", "ruff", "check", "."),
        "ruff format": ("-m", "ruff", "format", "--check", "."),
        "mypy": ("-m", "mypy"),
        "import contracts": ("-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"),
        "its tests": (
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *(f"tests/test_{module}.py" for module in modules),
            "tests/test_migrations.py",
            "tests/test_route_policy.py",
        ),
    }
    failures = [
        f"{name}: {shown(result)}" for name, args in checks.items() if (result := in_copy(copy, *args)).returncode
    ]
    if (copy / "policies").is_dir():  # the policies, the scaffolded ones included, compile and pass their tests
        compiled = subprocess.run(
            [cerbos_executable(), "compile", "policies"], cwd=copy, capture_output=True, text=True, check=False
        )
        if compiled.returncode:
            failures.append(f"cerbos compile: {shown(compiled)}")
    assert not failures, "\n\n".join(failures)


def test_scaffold_refuses_a_resource_that_exists_and_writes_nothing(tmp_path: Path) -> None:
    copy = copy_project(tmp_path)
    models = (copy / "src" / PACKAGE / "models.py").read_text()
    refused = in_copy(copy, "-m", f"{PACKAGE}.cli", "scaffold", "resource", "org")
    assert refused.returncode == 2, shown(refused)
    assert "scaffold refused" in refused.stderr and "orgs.py exists already" in refused.stderr
    assert (copy / "src" / PACKAGE / "models.py").read_text() == models
    unknown = in_copy(copy, "-m", f"{PACKAGE}.cli", "scaffold", "resource", "task", "--under", "nothing")
    assert unknown.returncode == 2 and "--under nothing" in unknown.stderr, shown(unknown)


def source_files(copy: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in copy.rglob("*") if path.is_file() and "__pycache__" not in path.parts}


def test_scaffold_refuses_a_parent_without_grants_of_its_own_and_writes_nothing(tmp_path: Path) -> None:
    """A resource scaffolded under an org has no grants of its own: a relation to one of its rows
    means nothing, so a resource under it could not be guarded by one."""
    copy = copy_project(tmp_path)
    child = in_copy(copy, "-m", f"{PACKAGE}.cli", "scaffold", "resource", "scaffolded_note", "--under", "org")
    assert child.returncode == 0, shown(child)
    files = source_files(copy)
    refused = in_copy(
        copy, "-m", f"{PACKAGE}.cli", "scaffold", "resource", "scaffolded_line", "--under", "scaffolded_note"
    )
    assert refused.returncode == 2, shown(refused)
    assert "--under scaffolded_note: not an object with grants of its own" in refused.stderr
    assert "one of org" in refused.stderr
    assert source_files(copy) == files
