"""Secrets from mounted files: `<NAME>_FILE` names a file holding the value of secret setting NAME.

This is the convention of Docker and Kubernetes secrets, Vault Agent templates and the Secrets Store
CSI driver: the secret never sits in the environment, where `ps e`, crash reports and `docker
inspect` show it. The file is read at start (settings), and the JWT public key is read again
every SECRET_FILE_REFRESH_SECONDS by a background task, so a rotated mount takes effect on every
replica without a restart. A file that turns unreadable keeps the last good value (one warning).
`alembic upgrade` reads DATABASE_URL_FILE the same way (migrations/env.py), so the migration Job
gets the owner's credentials as a file too.

Only names and paths are ever logged, never a file's content.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The settings that carry a secret or a key; each also reads from `<NAME>_FILE`.
SECRET_SETTINGS = ("jwt_public_key", "database_url", "redis_url", "audit_pseudonym_key")

logger = logging.getLogger(__name__)


def read_secret_file(name: str, path: str, *, production: bool) -> str:
    """The file's content without surrounding whitespace. ValueError names NAME_FILE and the path."""
    variable = f"{name.upper()}_FILE"
    try:
        mode = Path(path).stat().st_mode
        value = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise ValueError(f"{variable}: {path} is missing or cannot be read") from None
    if not value:
        raise ValueError(f"{variable}: {path} is empty")
    if production and mode & stat.S_IROTH:
        raise ValueError(
            f"{variable}: {path} is readable by every user of the host; chmod o-r it "
            "(Kubernetes: defaultMode 0440 on the secret volume)"
        )
    return value


def values_from_files(data: dict[str, Any]) -> dict[str, Any]:
    """The settings input with each secret read from its `_FILE`; both given is an error naming the pair."""
    production = data.get("environment") == "production"
    for name in SECRET_SETTINGS:
        path = data.get(f"{name}_file")
        if not path:
            continue
        if data.get(name) not in (None, ""):
            raise ValueError(f"set {name.upper()} or {name.upper()}_FILE, not both")
        data = {**data, name: read_secret_file(name, str(path), production=production)}
    return data


@dataclass
class WatchedFile:
    name: str
    path: str
    value: str
    apply: Callable[[str], None]  # takes the new value, or raises ValueError to refuse it
    warned: bool = False


class SecretFiles:
    """Re-reads watched secret files on an interval, off the request path."""

    def __init__(self, interval_seconds: float, *, production: bool) -> None:
        self.interval_seconds = interval_seconds
        self.production = production
        self.files: list[WatchedFile] = []
        self._task: asyncio.Task[None] | None = None

    def watch(self, name: str, path: str, value: str, apply: Callable[[str], None]) -> None:
        self.files.append(WatchedFile(name, path, value, apply))

    async def check(self) -> None:
        for file in self.files:
            try:
                value = await asyncio.to_thread(read_secret_file, file.name, file.path, production=self.production)
            except ValueError as exc:
                self._warn(file, str(exc))
                continue
            if value != file.value:
                try:
                    file.apply(value)
                except ValueError:
                    self._warn(file, f"{file.name.upper()}_FILE: {file.path} holds no valid value")
                    continue
                file.value = value
                logger.info(
                    "secret file reloaded", extra={"event": "secret_file_reloaded", "setting": file.name.upper()}
                )
            file.warned = False

    @staticmethod
    def _warn(file: WatchedFile, reason: str) -> None:
        if not file.warned:  # one warning until the file is usable again, not one per interval
            file.warned = True
            logger.warning(
                "secret file unusable, keeping the last good value",
                extra={"event": "secret_file_unusable", "setting": file.name.upper(), "reason": reason},
            )

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_seconds)
            await self.check()

    async def start(self) -> None:
        if self.files:
            self._task = asyncio.create_task(self._check_forever(), name="secret-files")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
