"""The credential options chosen when this service was baked: the seed's decision matrix.

Each chosen option is one module in this package (`mtls`, `api_keys`, `webhooks`); a service
baked without an option has no module for it, nor any other file of it (the template's post-gen
hook removes them). Nothing outside this package names an option. An option module provides:

- `extension(runtime) -> Extension`: what it adds to the running service;
- `add_commands(commands)`, optionally: its operators' commands, given the CLI's subparsers.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from ..security.authn import Authenticator

if TYPE_CHECKING:
    from ..runtime import Runtime

# Every option this template offers, in the order their authenticators are tried (all before the
# bearer token): a client certificate, then an API key, then a webhook signature.
KNOWN = ("mtls", "api_keys", "webhooks")


@dataclass(frozen=True)
class Extension:
    """What one option adds to the service."""

    name: str
    # More entries for Authenticate(authenticators=[...]), layer 4.
    authenticators: Sequence[Authenticator] = ()
    # Routes, included after the core API's.
    routers: Sequence[APIRouter] = ()
    # Entered for the life of the service (background work, e.g. batched writes), exited at shutdown.
    lifespan: Callable[[], AbstractAsyncContextManager[None]] | None = None


def chosen() -> list[ModuleType]:
    """The option modules present in this service, in KNOWN order."""
    present = {module.name for module in pkgutil.iter_modules(__path__)}
    return [importlib.import_module(f"{__name__}.{name}") for name in KNOWN if name in present]


def extensions(runtime: Runtime) -> list[Extension]:
    return [module.extension(runtime) for module in chosen()]


def add_commands(commands: argparse._SubParsersAction[Any]) -> None:
    for module in chosen():
        adder = getattr(module, "add_commands", None)
        if adder is not None:
            adder(commands)
