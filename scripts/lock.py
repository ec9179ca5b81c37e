"""`make lock` of the template: refresh the lock files every baked service ships.

A baked service's locked set depends on its database driver, so the template keeps one set per
`database` value under `{{cookiecutter.project_slug}}/requirements/<database>/`, and the post-gen
hook moves the chosen one into `requirements/`. This bakes each database value, puts the current
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


def lock(database: str, upgrade: bool) -> None:
    with tempfile.TemporaryDirectory() as output:
        result = bake(Path(output), {"database": database})
        if result.returncode != 0:
            raise SystemExit(report(result))
        project = Path(output) / "secure-api"
        target = project / "requirements"
        command = ["make", "--no-print-directory", "lock", f"VENV={Path(sys.executable).parent.parent}"]
        if upgrade:
            command.append("UPGRADE=1")
        completed = subprocess.run(command, cwd=project, check=False, stdin=subprocess.DEVNULL)
        if completed.returncode != 0:
            raise SystemExit(f"make lock failed for database={database}")
        (REQUIREMENTS / database).mkdir(exist_ok=True)
        for name in PER_DATABASE:
            shutil.copyfile(target / name, REQUIREMENTS / database / name)
        for name in SHARED:
            shutil.copyfile(target / name, REQUIREMENTS / name)
        print(f"locked database={database}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upgrade", action="store_true", help="newest allowed release of everything")
    args = parser.parse_args()
    for database in template_choices()["database"]:
        lock(database, args.upgrade)


if __name__ == "__main__":
    main()
