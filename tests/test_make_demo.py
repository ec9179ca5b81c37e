"""`make demo` from a fresh clone: it serves, and installs only what it runs (cookiecutter from uv's
tool cache, the baked service's locked runtime set in its own .venv); the test toolchain comes with
`make test` alone. How long it takes is measured by `make demo-timing` (scripts/demo_timing.py),
never asserted here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bake import TEMPLATE_DIR, UV, report, run



def test_make_demo_serves_from_a_fresh_clone_with_only_the_runtime_set(tmp_path: Path) -> None:
    """`make demo` in a copy of this checkout (as a fresh clone has it): it serves /health/live,
    and installed only the baked service's locked runtime set in the service's own .venv (no test
    toolchain here, no dev tools there), with uv (no pip in that venv)."""
    sys.path.insert(0, str(TEMPLATE_DIR / "scripts"))
    import demo_timing

    clone = tmp_path / "clone"
    demo_timing.fresh_clone(clone)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MAKE", "MFLAGS", "UV"))}
    # A uv from this venv stands in for the bootstrap's (tests/test_locks.py covers that path).
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    seconds = demo_timing.time_demo(tmp_path / "run", env, tmp_path / "demo.log", clone=clone)
    assert seconds > 0
    assert not (clone / ".venv").exists(), "make demo installed the template's test toolchain"
    venv = clone / "build" / "secure-api" / ".venv"
    listed = run([UV, "pip", "list", "--python", str(venv / "bin/python"), "--format", "json"], cwd=clone)
    assert listed.returncode == 0, report(listed)
    installed = {package["name"] for package in json.loads(listed.stdout)}
    assert "secure-api" in installed and "fastapi" in installed
    assert not installed & {"pytest", "ruff", "mypy", "import-linter", "pre-commit", "pip", "cookiecutter"}, installed
