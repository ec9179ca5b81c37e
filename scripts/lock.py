"""`make lock` of the template: refresh the uv.lock every baked service ships.

uv.lock follows pyproject.toml, which some options change (the database driver, ...): the post-gen
hook's LOCK_KEYS names them, the template keeps one lock per combination of their values under
`{{cookiecutter.project_slug}}/locks/<value>[-<value>...]/uv.lock`, and the hook moves the chosen
one to uv.lock. This bakes each combination (the hook puts the current lock in place, so its pins
are kept), runs the baked service's own `make lock` with this venv's uv, and copies the result
back with the project's name made a template variable again. `--upgrade` moves every pin to the
newest release pyproject.toml allows.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bake import TEMPLATE_DIR, bake, hook_constant, report, template_choices  # noqa: E402

LOCKS = TEMPLATE_DIR / "{{cookiecutter.project_slug}}" / "locks"
SLUG = "secure-api"  # the default answers' project_slug
SLUG_VARIABLE = "{{ cookiecutter.project_slug }}"


def combinations() -> list[dict[str, str]]:
    """Every combination of the values of the options that change pyproject.toml."""
    keys: tuple[str, ...] = hook_constant("LOCK_KEYS")
    choices = template_choices()
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(choices[key] for key in keys))]


def template_lock(answers: dict[str, str]) -> Path:
    return LOCKS / "-".join(answers.values()) / "uv.lock"


def as_template(lock: str) -> str:
    """The baked lock with the project's name (the root package and the requirements member) as
    the template variable it was rendered from."""
    return lock.replace(f'"{SLUG}"', f'"{SLUG_VARIABLE}"').replace(
        f'"{SLUG}-service-requirements"', f'"{SLUG_VARIABLE}-service-requirements"'
    )


def lock(answers: dict[str, str], upgrade: bool) -> None:
    with tempfile.TemporaryDirectory() as output:
        result = bake(Path(output), answers)
        if result.returncode != 0:
            raise SystemExit(report(result))
        project = Path(output) / SLUG
        command = ["make", "--no-print-directory", "lock", f"VENV={Path(sys.executable).parent.parent}"]
        if upgrade:
            command.append("UPGRADE=1")
        completed = subprocess.run(command, cwd=project, check=False, stdin=subprocess.DEVNULL)
        if completed.returncode != 0:
            raise SystemExit(f"make lock failed for {answers}")
        target = template_lock(answers)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(as_template((project / "uv.lock").read_text()))
        print(f"locked {answers} into {target.relative_to(TEMPLATE_DIR)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upgrade", action="store_true", help="newest allowed release of everything")
    parser.add_argument("--only", action="append", help="lock only this combination (e.g. sqlite-cerbos); repeatable")
    args = parser.parse_args()
    only = set(args.only or [])
    for answers in combinations():
        if not only or "-".join(answers.values()) in only:
            lock(answers, args.upgrade)


if __name__ == "__main__":
    main()
