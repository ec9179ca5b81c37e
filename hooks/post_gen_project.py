"""Remove the files of the options that were not chosen, then say what to do next.

Options are included or excluded as whole files, never as Jinja branches inside
Python modules. A file that only one option value needs is listed here under that
value, by its path relative to the baked project. Cookiecutter runs this hook with
the baked project as the working directory.
"""

import shutil
from pathlib import Path

PROJECT_SLUG = {{ cookiecutter.project_slug | tojson }}
CHOSEN = {
    "database": {{ cookiecutter.database | tojson }},
}

# option -> value -> paths that only that value needs.
# The PostgreSQL test server helper lives in tests/servers.py, shared by both
# variants, so no database value owns a whole file yet.
OPTION_FILES: dict[str, dict[str, list[str]]] = {
    "database": {
        "sqlite": [],
        "postgresql": [],
    },
}

# What the generated test suite starts by itself, so must find installed.
TEST_SERVERS = {
    "sqlite": "redis-server (apt-get install -y redis-server)",
    "postgresql": "redis-server and initdb"
    " (apt-get install -y redis-server postgresql)",
}


def remove_path(relative_path: str) -> None:
    path = Path(relative_path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove_unselected_option_files() -> None:
    for option, files_by_value in OPTION_FILES.items():
        for value, paths in files_by_value.items():
            if value == CHOSEN[option]:
                continue
            for relative_path in paths:
                remove_path(relative_path)


def print_next_steps() -> None:
    print(
        f"\nBaked {PROJECT_SLUG} (database: {CHOSEN['database']}). Next steps:\n"
        f"  cd {PROJECT_SLUG}\n"
        "  make install   # the service and its dev tools\n"
        "  make migrate   # alembic upgrade head\n"
        f"  make test      # needs {TEST_SERVERS[CHOSEN['database']]}\n"
        "  make run       # set JWT_PUBLIC_KEY, JWT_ISSUER, JWT_AUDIENCE first\n"
    )


def main() -> None:
    remove_unselected_option_files()
    print_next_steps()


if __name__ == "__main__":
    main()
