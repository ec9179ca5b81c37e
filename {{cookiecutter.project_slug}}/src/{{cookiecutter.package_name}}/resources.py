"""The one typed way code reaches the process's resources from a request: `runtime_of(request)`.

The app factory puts the `Runtime` on `app.state` (`attach`); nothing else reads or writes
`app.state.runtime`. This module sits below every layer that needs it (the runtime type is named
for the type checker only), so a layer reaches the limiter or the statements without importing
the runtime, which is built from the layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from starlette.requests import HTTPConnection

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from .runtime import Runtime


def attach(app: Starlette, runtime: Runtime) -> None:
    app.state.runtime = runtime


def runtime_of(request: HTTPConnection) -> Runtime:
    return cast("Runtime", request.app.state.runtime)


def app_runtime(app: Starlette) -> Runtime:
    return cast("Runtime", app.state.runtime)
