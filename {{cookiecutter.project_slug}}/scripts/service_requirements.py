"""The service's own dependencies (requirements/service.in, one requirement per line) as the uv
workspace member requirements/pyproject.toml, which `uv lock` reads.

    python3 scripts/service_requirements.py          # make lock: write requirements/pyproject.toml
    python3 scripts/service_requirements.py --check  # pre-commit and CI: fail when it is behind service.in

service.in is the owner's file and the template never edits it; the member is made from it, so it
holds nothing of its own and a template update never meets it either. Standard library only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SERVICE_IN = Path("requirements/service.in")
MEMBER = Path("requirements/pyproject.toml")
PROJECT = Path("pyproject.toml")


def requirements(text: str) -> list[str]:
    """Each requirement line, without comments and blank lines."""
    found = []
    for line in text.splitlines():
        requirement = line.split(" #", 1)[0].strip()
        if requirement and not requirement.startswith("#"):
            if requirement.startswith("-"):
                raise SystemExit(f"{SERVICE_IN}: {requirement!r}: only requirements (name and versions) belong here")
            found.append(requirement)
    return found


def member(project_name: str, dependencies: list[str]) -> str:
    listed = "".join(f"    {json.dumps(requirement)},\n" for requirement in dependencies)
    return (
        f"# Made by `make lock` from {SERVICE_IN.name} (your dependencies): edit that file, not this one.\n"
        "[project]\n"
        f'name = "{project_name}-service-requirements"\n'
        'version = "0"\n'
        'requires-python = ">=3.11"\n'
        f"dependencies = [{chr(10) + listed if listed else ''}]\n"
        "\n"
        "# Virtual: its dependencies are installed, nothing of its own is built.\n"
        "[tool.uv]\n"
        "package = false\n"
    )


def project_name() -> str:
    import tomllib

    name: str = tomllib.loads(PROJECT.read_text())["project"]["name"]
    return name


def main(arguments: list[str]) -> int:
    expected = member(project_name(), requirements(SERVICE_IN.read_text()))
    if arguments == ["--check"]:
        if not MEMBER.is_file() or MEMBER.read_text() != expected:
            print(f"{MEMBER} is behind {SERVICE_IN}: run `make lock` and commit both with uv.lock", file=sys.stderr)
            return 1
        return 0
    if arguments:
        print(__doc__, file=sys.stderr)
        return 2
    if not MEMBER.is_file() or MEMBER.read_text() != expected:
        MEMBER.write_text(expected)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
