"""The credential options chosen when this service was baked: the seed's decision matrix.

Each chosen option is one package here (`mtls`, `api_keys`, `webhooks`) that holds all of it, in
one layout: `extension.py` (its wiring, below), `authenticator.py` (its layer-4 credential),
`settings.py`, `models.py`, `routes.py`, `cli.py`, `scan.py` (its checks for the scan) and
`migrations/` (its Alembic revisions), as far as it has them. A service baked without an option
has no folder for it (the template's post-gen hook removes the folder), and nothing outside this
package names an option: `present()` finds them, here and nowhere else. An option's
`extension` module provides:

- `extension(runtime) -> Extension`: what it adds to the running service;
- `add_commands(commands)`, optionally: its operators' commands, given the CLI's subparsers;
- `server_options(settings) -> dict`, optionally: uvicorn settings `serve` adds (e.g. TLS);
- `settings_problems(settings) -> list[str]`, optionally: its invalid settings, and its unsafe
  ones in production, each naming its variable, added to the core's by `startup.load_settings`
  (so the service, `check-config` and every command refuse alike);
- `move_issuer(session, old_namespace, new_namespace) -> int`, optionally: gives its rows that
  name a principal of one issuer (`jwt:<issuer key>:<sub>`) to the same `sub` of another, in the
  transaction of `grants move-issuer`; how many it moved.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from .security.principal import Authenticator, ChannelAuthenticator

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from .config import Settings
    from .runtime import Runtime
    from .security.authz import Authorizer

# Every option this template offers, in the order their authenticators are tried: a client
# certificate (a channel), then an API key; a webhook signature, which reads the body, after every
# header credential (security/authn.py).
KNOWN = ("mtls", "api_keys", "webhooks", "cerbos")
# Where they are. Found by path and imported by name, so no core module imports an option.
OPTIONS = Path(__file__).parent / "options"
PACKAGE = f"{__package__}.options"


@dataclass(frozen=True)
class Extension:
    """What one option adds to the service."""

    name: str
    # More entries for Authenticate(authenticators=[...]), layer 4: credentials of the caller.
    authenticators: Sequence[Authenticator] = ()
    # Credentials of the connection (a client certificate), required on every authenticated request
    # and combined with the caller's (security/composition.py).
    channels: Sequence[ChannelAuthenticator] = ()
    # Routes, included after the core API's.
    routers: Sequence[APIRouter] = ()
    # Entered for the life of the service (background work, e.g. batched writes), exited at shutdown.
    lifespan: Callable[[], AbstractAsyncContextManager[None]] | None = None
    # A policy engine that decides layer 7 in place of the permissions table (security/authz.py).
    authorizer: Authorizer | None = None


def present() -> list[str]:
    """The options baked into this service, in KNOWN order."""
    found = {module.name for module in pkgutil.iter_modules([str(OPTIONS)]) if module.ispkg}
    return [name for name in KNOWN if name in found]


def parts(part: str) -> list[ModuleType]:
    """Each baked option's module `part` (`extension`, `scan`) that exists, in KNOWN order."""
    modules = []
    for name in present():
        if (OPTIONS / name / f"{part}.py").is_file():
            modules.append(importlib.import_module(f"{PACKAGE}.{name}.{part}"))
    return modules


def chosen() -> list[ModuleType]:
    """The baked options' `extension` modules, in KNOWN order."""
    return parts("extension")


def migration_locations() -> list[str]:
    """The baked options' Alembic revisions (`<option>/migrations`), as `version_locations` entries."""
    return [f"{PACKAGE}:{name}/migrations" for name in present() if (OPTIONS / name / "migrations").is_dir()]


def extensions(runtime: Runtime) -> list[Extension]:
    return [module.extension(runtime) for module in chosen()]


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    for module in chosen():
        adder = getattr(module, "add_commands", None)
        if adder is not None:
            adder(commands)


def server_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn settings the chosen options add to `serve`. Raises ConfigError like load_settings."""
    merged: dict[str, Any] = {}
    for module in chosen():
        provider = getattr(module, "server_options", None)
        if provider is not None:
            merged.update(provider(settings))
    return merged


def settings_problems(settings: Settings) -> list[str]:
    """The chosen options' invalid and unsafe settings (startup.load_settings adds them to its own)."""
    problems: list[str] = []
    for module in chosen():
        checker = getattr(module, "settings_problems", None)
        if checker is not None:
            problems.extend(checker(settings))
    return problems


async def move_issuer(session: AsyncSession, old_namespace: str, new_namespace: str) -> dict[str, int]:
    """Each chosen option's rows given from the old issuer's principals to the new one's (its
    `move_issuer`), in the caller's transaction: how many, by option."""
    moved: dict[str, int] = {}
    for module in chosen():
        mover = getattr(module, "move_issuer", None)
        if mover is not None:
            moved[module.__name__.split(".")[-2]] = await mover(session, old_namespace, new_namespace)
    return moved
