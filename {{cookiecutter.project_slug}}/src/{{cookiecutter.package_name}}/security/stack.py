"""The app the pipeline is wrapped around, and what readiness reads of it (the layers installed)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.types import ASGIApp


class SecuredApp(FastAPI):
    """FastAPI with the pipeline wrapped around Starlette's whole stack.

    Starlette puts ServerErrorMiddleware outside all user middleware, so a 500 it sends would
    skip a headers middleware added with `add_middleware`. Here the pipeline wraps the finished
    stack instead, and the audit layer catches what escapes it.
    """

    pipeline: list[Middleware]

    def __init__(self, *, pipeline: list[Middleware], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pipeline = pipeline

    def build_middleware_stack(self) -> ASGIApp:
        app = super().build_middleware_stack()
        for cls, args, kwargs in reversed(self.pipeline):
            app = cls(app, *args, **kwargs)
        return app


def installed_layers(app: SecuredApp) -> list[str]:
    """Names of the layers actually built around the app, outermost first."""
    names: list[str] = []
    layer: Any = app.middleware_stack
    while layer is not None and len(names) < 64:
        names.append(type(layer).__name__)
        layer = getattr(layer, "app", None)
    return names


def expected_layers(app: SecuredApp) -> list[str]:
    return [middleware.cls.__name__ for middleware in app.pipeline]  # type: ignore[attr-defined]
