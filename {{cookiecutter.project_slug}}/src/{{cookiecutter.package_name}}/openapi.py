"""The OpenAPI document tells the truth about errors: 400 problem documents, never 422."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .security.errors import PROBLEM_MEDIA_TYPE


def problem_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path_item in schema.get("paths", {}).values():
                for operation in path_item.values():
                    _rewrite_responses(operation.get("responses", {}))
            components = schema.get("components", {}).get("schemas", {})
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _rewrite_responses(responses: dict[str, Any]) -> None:
    responses.pop("422", None)
    for status, response in responses.items():
        content = response.get("content", {})
        if status[0] in "45" and "application/json" in content:
            content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
