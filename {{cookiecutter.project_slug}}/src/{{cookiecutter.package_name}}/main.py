"""ASGI entry point: `uvicorn {{ cookiecutter.package_name }}.main:app` (prefer `{{ cookiecutter.project_slug }} serve`: its
uvicorn settings, and the drain on SIGTERM of shutdown.py)."""

from __future__ import annotations

import sys

from .app import create_app
from .config import SERVICE_NAME, ConfigError

try:
    app = create_app()
except ConfigError as exc:
    sys.exit(f"{SERVICE_NAME}: refusing to start: {exc}")
