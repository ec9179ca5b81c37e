"""`make lock` of the template: refresh the lock files every baked service ships.

A baked service's locked set depends on its database driver and its authz_engine (cerbos adds its
SDK), so the template keeps one set per combination under
`{{cookiecutter.project_slug}}/requirements/<database>[-cerbos]/`, and the post-gen hook moves the
chosen one into `requirements/`. This bakes each combination, puts the current
lock files in place (so `make lock` keeps their pins), runs the baked service's own `make lock`
with this venv's uv, and copies the result back. `--upgrade` moves every pin to the newest
release pyproject.toml allows.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bake import TEMPLATE_DIR, bake, report, template_choices  # noqa: E402

REQUIREMENTS = TEMPLATE_DIR / "{{cookiecutter.project_slug}}" / "requirements"
PER_DATABASE = ("main.txt", "dev.txt")
SHARED = ("build.txt",)


def lock(database: str, engine: str, upgrade: bool) -> None:
    locked_set = database + ("-cerbos" if engine == "cerbos" else "")
    with tempfile.TemporaryDirectory() as output:
        result = bake(Path(output), {"database": database, "authz_engine": engine})
        if result.returncode != 0:
            raise SystemExit(report(result))
        project = Path(output) / "secure-api"
        target = project / "requirements"
        for name in PER_DATABASE:  # a new set (authz_engine=cerbos) starts from its database's pins
            if not (target / name).exists() and (REQUIREMENTS / database / name).exists():
                shutil.copyfile(REQUIREMENTS / database / name, target / name)
        command = ["make", "--no-print-directory", "lock", f"VENV={Path(sys.executable).parent.parent}"]
        if upgrade:
            command.append("UPGRADE=1")
        completed = subprocess.run(command, cwd=project, check=False, stdin=subprocess.DEVNULL)
        if completed.returncode != 0:
            raise SystemExit(f"make lock failed for database={database}")
        (REQUIREMENTS / locked_set).mkdir(exist_ok=True)
        for name in PER_DATABASE:
            shutil.copyfile(target / name, REQUIREMENTS / locked_set / name)
        for name in SHARED:
            shutil.copyfile(target / name, REQUIREMENTS / name)
        print(f"locked database={database} authz_engine={engine}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upgrade", action="store_true", help="newest allowed release of everything")
    parser.add_argument("--only", action="append", help="lock only this set (e.g. sqlite-cerbos); repeatable")
    args = parser.parse_args()
    choices = template_choices()
    only = set(args.only or [])
    for database in choices["database"]:
        for engine in choices["authz_engine"]:
            name = database + ("-cerbos" if engine == "cerbos" else "")
            if not only or name in only:
                lock(database, engine, args.upgrade)


if __name__ == "__main__":
    main()
