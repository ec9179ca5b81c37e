"""Format and lint-fix the template's Python files with ruff, Jinja placeholders and all.

`{{ cookiecutter.x }}` is not Python, so each one is swapped for its value in the default bake
(package `secure_api`, ...), ruff runs with the generated project's configuration, and the values
are swapped back. A template file must therefore never spell those values literally.
Usage: python scripts/format_template.py [--check]
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "{{cookiecutter.project_slug}}"
JINJA = re.compile(r"\{\{ cookiecutter\.(\w+) \}\}")
DEFAULTS = {
    "project_slug": "secure-api",
    "package_name": "secure_api",
    "project_name": "Secure API",
    # Yes/no answers stand in as unique strings, since "no" could not be swapped back.
    "api_keys": "answer-of-api-keys",
    "webhooks": "answer-of-webhooks",
    "mtls": "answer-of-mtls",
}


def main() -> int:
    check = "--check" in sys.argv
    files = sorted(TEMPLATE.rglob("*.py"))
    originals = {path: path.read_text() for path in files}
    if any("{%" in text for text in originals.values()):
        print("Jinja blocks ({% %}) in Python files are not supported; keep options to whole files.")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "pyproject.toml"
        baked = subprocess.run(
            [sys.executable, "-m", "cookiecutter", "--no-input", "-o", tmp, str(ROOT)], capture_output=True, text=True
        )
        if baked.returncode != 0:
            print(baked.stderr)
            return 1
        shutil.copy(Path(tmp) / "secure-api" / "pyproject.toml", config)
        context = {**DEFAULTS, **_rendered_private_variables(Path(tmp) / "secure-api")}
        reverse = sorted(context.items(), key=lambda item: -len(item[1]))
        context = {**DEFAULTS, **_rendered_private_variables(Path(tmp) / "secure-api")}
        reverse = sorted(context.items(), key=lambda item: -len(item[1]))
        try:
            for path, text in originals.items():
                path.write_text(JINJA.sub(lambda m: context[m.group(1)], text))
            ruff = [sys.executable, "-m", "ruff"]
            if check:
                code = subprocess.call([*ruff, "format", "--check", "--config", str(config), str(TEMPLATE)])
                code |= subprocess.call([*ruff, "check", "--config", str(config), str(TEMPLATE)])
            else:
                subprocess.call([*ruff, "check", "--fix", "--config", str(config), str(TEMPLATE)])
                code = subprocess.call([*ruff, "format", "--config", str(config), str(TEMPLATE)])
        finally:
            for path in files:
                text = path.read_text()
                for name, value in reverse:
                    text = text.replace(value, f"{{{{ cookiecutter.{name} }}}}")
                path.write_text(text)
    return code


def _rendered_private_variables(baked: Path) -> dict[str, str]:
    """Values of the `__x` variables that Python files use, read back from the default bake."""
    config = (baked / "src" / "secure_api" / "config.py").read_text()
    url = re.search(r'DEFAULT_DATABASE_URL = "([^"]+)"', config)
    return {"__database_url": url.group(1)} if url else {}


if __name__ == "__main__":
    raise SystemExit(main())
