"""Remove the files of the options that were not chosen, then say what to do next (on a first
bake only: `cruft update` and `cruft diff` run this hook too, twice, rendering the old and the new
template to compare them).

Options are included or excluded as whole files, never as Jinja branches inside
Python modules. A file that only one option value needs is listed here under that
value, by its path relative to the baked project. Cookiecutter runs this hook with
the baked project as the working directory.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

PROJECT_SLUG = {{ cookiecutter.project_slug | tojson }}
CHOSEN = {
    "database": {{ cookiecutter.database | tojson }},
    "api_keys": {{ cookiecutter.api_keys | tojson }},
    "webhooks": {{ cookiecutter.webhooks | tojson }},
    "mtls": {{ cookiecutter.mtls | tojson }},
    "authz_engine": {{ cookiecutter.authz_engine | tojson }},
}
# The whole context of this bake, for .cruft.json.
CONTEXT = json.loads({{ cookiecutter | tojson | tojson }})

# option -> value -> paths that only that value needs.
# The PostgreSQL test server helper lives in tests/servers.py, shared by both variants.
OPTION_FILES: dict[str, dict[str, list[str]]] = {
    "database": {
        "sqlite": ["deploy/kubernetes/persistentvolumeclaim.yaml"],
        # A SQLite file has one writer: no autoscaling, nothing for a disruption budget to keep.
        "postgresql": [
            "deploy/kubernetes/poddisruptionbudget.yaml",
            "deploy/kubernetes/horizontalpodautoscaler.yaml",
            # The owner and the app role (README, Database access): a SQLite file has no roles.
            "tests/test_database_roles.py",
            "deploy/postgres",
        ],
    },
    # The credential options (the seed's decision matrix): each one is one package,
    # src/<package>/options/<option>/ (see extensions.py), and one test module.
    "api_keys": {
        "yes": ["src/{{ cookiecutter.package_name }}/options/api_keys", "tests/test_api_keys.py", "docs/api-keys.md"]
    },
    "webhooks": {
        "yes": ["src/{{ cookiecutter.package_name }}/options/webhooks", "tests/test_webhooks.py", "docs/webhooks.md"]
    },
    "mtls": {"yes": ["src/{{ cookiecutter.package_name }}/options/mtls", "tests/test_mtls.py"]},
    # Who decides authorization: the permissions table in-process (table), or a Cerbos PDP asked
    # over gRPC (cerbos), with its policies as code, its configuration and its tests.
    "authz_engine": {
        "cerbos": [
            "src/{{ cookiecutter.package_name }}/options/cerbos",
            "policies",
            "deploy/cerbos",
            "tests/test_cerbos.py",
        ]
    },
}

# Files that only a combination of options needs: kept only when every option listed is "yes".
# The composition of the three credential options (README, Decision matrix) has its own tests.
COMBINED_FILES: dict[str, list[str]] = {
    "tests/test_credentials.py": ["api_keys", "webhooks", "mtls"],
}

# uv.lock follows pyproject.toml, which these options change (the database driver, ...): the template
# keeps one lock per combination of their values, locks/<value>[-<value>...]/uv.lock (scripts/lock.py
# makes them), and the chosen one becomes uv.lock. An option that changes pyproject.toml is one more
# name here.
LOCK_KEYS = ("database", "authz_engine")
LOCKS = "locks"

# What the generated test suite starts by itself, so must find installed.
TEST_SERVERS = {
    "sqlite": "redis-server and nginx (apt-get install -y redis-server nginx)",
    "postgresql": "redis-server, nginx and initdb"
    " (apt-get install -y redis-server nginx postgresql)",
}
# The cruft commands that render the template again for a service that exists (into temporary
# directories, the old and the new commit, to diff them).
CRUFT_RERENDERS = {"update", "diff"}
# Cookiecutter's abbreviations, which git (and so cruft) does not know.
ABBREVIATIONS = {
    "gh:": "https://github.com/",
    "gl:": "https://gitlab.com/",
    "bb:": "https://bitbucket.org/",
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


def remove_unselected_combination_files() -> None:
    for relative_path, options in COMBINED_FILES.items():
        if not all(CHOSEN[option] == "yes" for option in options):
            remove_path(relative_path)


def place_lock() -> None:
    chosen = Path(LOCKS) / "-".join(CHOSEN[key] for key in LOCK_KEYS) / "uv.lock"
    if chosen.is_file():
        chosen.replace("uv.lock")
    remove_path(LOCKS)


def local_template_dir() -> Path | None:
    """The template's directory when it was baked from a local path. Cookiecutter keeps that path
    as given and runs this hook inside the baked project, so a relative one is resolved against
    the directory cookiecutter was started from."""
    for key in ("_repo_dir", "_template"):
        given = Path(str(CONTEXT.get(key) or ""))
        if not str(given):
            continue
        base = Path(os.environ.get("PWD", "/"))
        candidate = given if given.is_absolute() else base / given
        if (candidate / "cookiecutter.json").is_file():
            return candidate.resolve()
    return None


def template_source() -> str:
    template = str(CONTEXT.get("_template", ""))
    for short, url in ABBREVIATIONS.items():
        if template.startswith(short):
            return url + template[len(short) :]
    if not re.match(r"^[\w+.-]+://|^[\w.-]+@", template):  # a local path, not a URL
        local = local_template_dir()
        return str(local) if local else template
    return template


def template_commit() -> str | None:
    repo_dir = local_template_dir()
    if repo_dir is None:
        return None
    result = subprocess.run(
        ["git", "-C", str(repo_dir), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def write_cruft_state() -> None:
    """Give a plain `cookiecutter` bake the .cruft.json that `cruft create` writes, so
    `cruft update` works on every service. Under cruft (create, update, diff) the context has
    `_commit` and cruft writes the file itself."""
    if "_commit" in CONTEXT or Path(".cruft.json").exists():
        return
    commit = template_commit()
    if commit is None:
        print("note: the template is not a git checkout, so no .cruft.json was written;"
              " bake with `cruft create` to be able to `cruft update`")
        return
    answers = {key: value for key, value in CONTEXT.items() if not key.startswith("_")}
    state = {
        "template": template_source(),
        "commit": commit,
        "checkout": CONTEXT.get("_checkout"),
        "context": {"cookiecutter": {**answers, "_template": template_source(), "_commit": commit}},
        "directory": None,
    }
    Path(".cruft.json").write_text(json.dumps(state, indent=2) + "\n")


def parent_command() -> list[str]:
    """The command line of the process running this hook: cookiecutter runs it as a child of its
    own process, which is cruft's under cruft."""
    parent = os.getppid()
    try:
        return Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # no /proc (macOS): ps
        try:
            listed = subprocess.run(["ps", "-o", "args=", "-p", str(parent)], capture_output=True, text=True, check=False)
        except OSError:
            return []
        return listed.stdout.split()


def rendered_for_a_cruft_diff() -> bool:
    """True under `cruft update` and `cruft diff`, whose renders are compared, never kept."""
    if "_commit" not in CONTEXT:  # plain cookiecutter
        return False
    command = parent_command()
    for index, part in enumerate(command[:-1]):
        if Path(part).name == "cruft":  # the console script, or `python -m cruft`
            return command[index + 1] in CRUFT_RERENDERS
    return False


def print_next_steps() -> None:
    print(
        f"\nBaked {PROJECT_SLUG} (database: {CHOSEN['database']}). Next steps:\n"
        f"  cd {PROJECT_SLUG}\n"
        "  make install   # the service and its dev tools\n"
        "  make migrate   # alembic upgrade heads\n"
        + ("  make cerbos    # the Cerbos PDP binary (npm), which the tests start\n" if CHOSEN["authz_engine"] == "cerbos" else "")
        + f"  make test      # needs {TEST_SERVERS[CHOSEN['database']]}\n"
        "  make run       # set JWT_PUBLIC_KEY, JWT_ISSUER, JWT_AUDIENCE first\n"
    )


def main() -> None:
    remove_unselected_option_files()
    remove_unselected_combination_files()
    place_lock()
    write_cruft_state()
    if not rendered_for_a_cruft_diff():
        print_next_steps()


if __name__ == "__main__":
    main()
