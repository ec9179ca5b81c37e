"""Refuse answers that would bake a broken or confusing service.

Cookiecutter renders this file with Jinja before running it. The answers arrive
through ``tojson``, which turns any answer (quotes and backslashes included) into
a valid Python string literal.
"""

import keyword
import re
import sys

PROJECT_SLUG = {{ cookiecutter.project_slug | tojson }}
PACKAGE_NAME = {{ cookiecutter.package_name | tojson }}

SLUG_PATTERN = re.compile(r"^[a-z][a-z0-9-]*[a-z0-9]$")
PACKAGE_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")

# Import names the generated service depends on, or that its layout already uses.
# A package with one of these names would shadow the real module at import time.
RESERVED_PACKAGE_NAMES = frozenset(
    {
        "aiosqlite",
        "alembic",
        "anyio",
        "asyncpg",
        "click",
        "cryptography",
        "dotenv",
        "fastapi",
        "greenlet",
        "h11",
        "hatchling",
        "httpcore",
        "httptools",
        "httpx",
        "jwt",
        "limits",
        "mako",
        "migrations",
        "multipart",
        "mypy",
        "pydantic",
        "pydantic_core",
        "pydantic_settings",
        "pytest",
        "redis",
        "ruff",
        "sniffio",
        "sqlalchemy",
        "src",
        "starlette",
        "test",
        "tests",
        "typing_extensions",
        "uvicorn",
        "uvloop",
        "watchfiles",
        "websockets",
        "yaml",
    }
)


def fail(field: str, value: str, reason: str) -> None:
    print(f"ERROR: {field} {value!r} {reason}", file=sys.stderr)
    sys.exit(1)


def check_project_slug(slug: str) -> None:
    if not SLUG_PATTERN.match(slug):
        fail(
            "project_slug",
            slug,
            "must be lowercase letters, digits and hyphens, start with a letter"
            " and not end with a hyphen",
        )


def check_package_name(name: str) -> None:
    if not PACKAGE_PATTERN.match(name) or not name.isidentifier():
        fail(
            "package_name",
            name,
            "must be a lowercase Python identifier"
            " (letters, digits, underscores; starting with a letter)",
        )
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        fail("package_name", name, "is a Python keyword")
    if name in RESERVED_PACKAGE_NAMES:
        fail("package_name", name, "would shadow a dependency of the service")
    if name in sys.stdlib_module_names:
        fail("package_name", name, "would shadow a standard library module")


def main() -> None:
    check_project_slug(PROJECT_SLUG)
    check_package_name(PACKAGE_NAME)


if __name__ == "__main__":
    main()
