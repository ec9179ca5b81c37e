"""Baking the template and running commands, shared by the template tests."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPLATE_DIR = Path(__file__).resolve().parent.parent
POST_GEN_HOOK = TEMPLATE_DIR / "hooks" / "post_gen_project.py"
OUTPUT_LIMIT = 20_000
# The uv of this venv (requirements-dev.txt): the venv has no pip.
UV = str(Path(sys.executable).parent / "uv")
# The PostgreSQL variants' venv (variant_python), beside the template's other build output.
POSTGRESQL_VENV = TEMPLATE_DIR / "build" / "venv-postgresql"


@dataclass(frozen=True)
class Variant:
    """One bake of the template: the answers given and what they must produce."""

    name: str
    answers: Mapping[str, str]
    slug: str
    package: str
    database: str
    # The pytest arguments of its own suite when it runs one: empty for the whole suite.
    suite: tuple[str, ...] = ()

    @property
    def chosen(self) -> dict[str, str]:
        """The value of every multiple-choice option in this bake (the first one by default)."""
        return {
            option: self.answers.get(option, values[0])
            for option, values in template_choices().items()
        }


# The seed's decision matrix as yes/no questions (cookiecutter.json).
CREDENTIAL_OPTIONS = ("api_keys", "webhooks", "mtls")
# The baked tests that belong to each option ...
OPTION_TESTS: dict[str, tuple[str, ...]] = {
    "api_keys": ("tests/test_api_keys.py",),
    "webhooks": ("tests/test_webhooks.py",),
    "mtls": ("tests/test_mtls.py",),
}
# ... the tests of the three together: the composition model (README, Decision matrix), in production ...
COMPOSITION_TESTS = ("tests/test_credentials.py",)
# ... and the ones that check how options are wired into the pipeline, routes, CLI and schema.
WIRING_TESTS = (
    "tests/test_options.py",
    "tests/test_route_policy.py",
    "tests/test_health.py",
    "tests/test_migrations.py",
    "tests/test_settings.py",
)

# authz_engine=cerbos: a real Cerbos PDP decides; the example domain's BOLA matrix and lists against
# it, its own tests (policies compiled and tested, PDP down -> 503), and the wiring it touches.
CERBOS_TESTS = (
    "tests/test_cerbos.py",
    "tests/test_lists.py",
    "tests/test_authz.py",
    "tests/test_orgs_api.py",
    "tests/test_health.py",
    "tests/test_route_policy.py",
    "tests/test_scaffold.py",
    "tests/test_options.py",
    "tests/test_migrations.py",
    "tests/test_settings.py",
)

# Sentinel and Cluster failovers and the lockout lift across replicas: store/ and lockout only.
REDIS_FAILOVER_TESTS = ("test_redis_failover.py", "test_lockout_lift.py")

VARIANTS = {
    variant.name: variant
    for variant in (
        Variant("default", {}, "secure-api", "secure_api", "sqlite"),
        # Every credential option on, with the other database (its whole suite, the composition
        # tests included, but the Redis failover modules: they test store/ alone, with no database
        # and no option, and run in "default") ...
        Variant(
            "postgresql",
            {"database": "postgresql", **dict.fromkeys(CREDENTIAL_OPTIONS, "yes")},
            "secure-api",
            "secure_api",
            "postgresql",
            suite=tuple(f"--ignore=tests/{module}" for module in REDIS_FAILOVER_TESTS),
        ),
        # ... and on SQLite: the composition tests only (each option's own run below, alone).
        Variant(
            "all-options",
            dict.fromkeys(CREDENTIAL_OPTIONS, "yes"),
            "secure-api",
            "secure_api",
            "sqlite",
            suite=COMPOSITION_TESTS,
        ),
        # Each credential option alone: its own tests and those of the shared wiring.
        *(
            Variant(
                option.replace("_", "-"),
                {option: "yes"},
                "secure-api",
                "secure_api",
                "sqlite",
                suite=(*OPTION_TESTS[option], *WIRING_TESTS),
            )
            for option in CREDENTIAL_OPTIONS
        ),
        # The other authorization engine, on PostgreSQL (`make cerbos` installs the PDP binary first).
        Variant(
            "cerbos",
            {"database": "postgresql", "authz_engine": "cerbos"},
            "secure-api",
            "secure_api",
            "postgresql",
            suite=CERBOS_TESTS,
        ),
        Variant(
            "custom-name",
            {"project_name": "Billing Service"},
            "billing-service",
            "billing_service",
            "sqlite",
        ),
        # authz_engine=cerbos on SQLite, with every credential option: the PDP's deployment beside
        # the other database's (one replica, Recreate) and every option's settings and secrets.
        Variant(
            "cerbos-sqlite",
            {**dict.fromkeys(CREDENTIAL_OPTIONS, "yes"), "authz_engine": "cerbos"},
            "secure-api",
            "secure_api",
            "sqlite",
        ),
    )
}
# Variants whose own checks (ruff, mypy, their whole test suite) run, and whose shipping files
# and locks are checked; ...
FULLY_TESTED = ("default", "postgresql")
# ... variants that run ruff, mypy and their `suite`; the others are only rendered and compiled.
SUITE_TESTED = (*(option.replace("_", "-") for option in CREDENTIAL_OPTIONS), "all-options", "cerbos")


def variant_python(name: str) -> Path:
    """The interpreter of the venv variant `name` is installed into: this venv for the SQLite
    variants, one venv of their own for the PostgreSQL ones (their dependencies differ: asyncpg
    for aiosqlite), so the two sets can run at once (`make test` runs them on two pytest-xdist
    workers). Both venvs are kept between runs; uv brings them up to date in seconds."""
    if VARIANTS[name].database != "postgresql":
        return Path(sys.executable)
    venv = POSTGRESQL_VENV
    python = venv / "bin" / "python"
    if not python.exists():
        created = run([UV, "venv", "--quiet", "--python", sys.executable, str(venv)], cwd=TEMPLATE_DIR)
        assert created.returncode == 0, report(created)
    return python


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
    value: dict[str, dict[str, list[str]]] = hook_constant("OPTION_FILES")
    return value


def combined_files() -> dict[str, list[str]]:
    """COMBINED_FILES of the post-gen hook: a file and the options that must all be "yes"."""
    value: dict[str, list[str]] = hook_constant("COMBINED_FILES")
    return value


def hook_constant(name: str) -> Any:
    # The hook is a Jinja template, but its rendered parts are still valid syntax.
    tree = ast.parse(POST_GEN_HOOK.read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [target.id for target in targets if isinstance(target, ast.Name)]
            if name in names and node.value is not None:
                return ast.literal_eval(node.value)
    raise AssertionError(f"no {name} in {POST_GEN_HOOK}")


# Git for the update tests' throwaway repositories: a fixed identity, no system config.
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "template test",
    "GIT_AUTHOR_EMAIL": "template-test@example.invalid",
    "GIT_COMMITTER_NAME": "template test",
    "GIT_COMMITTER_EMAIL": "template-test@example.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": os.environ.get("HOME", "/tmp"),
}


def git(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, report(result)
    return result.stdout


def copy_working_tree(destination: Path) -> None:
    """This template as it is on disk (uncommitted changes included), without ignored files."""
    listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=TEMPLATE_DIR)
    for relative in filter(None, listed.split("\0")):
        source = TEMPLATE_DIR / relative
        if source.is_file():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def make_target(target: str, project: Path, *variables: str) -> subprocess.CompletedProcess[str]:
    """`make TARGET [NAME=value ...]` in a baked service, with this venv's tools (cruft among them)."""
    return subprocess.run(
        ["make", "--no-print-directory", target, f"VENV={Path(sys.executable).parent.parent}", *variables],
        cwd=project,
        env=GIT_ENV,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
