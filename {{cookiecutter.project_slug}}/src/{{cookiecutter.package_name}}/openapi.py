"""The OpenAPI document tells the truth about errors: 400 problem documents, never 422."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .security.errors import PROBLEM_MEDIA_TYPE

PROBLEM_REF = "#/components/schemas/Problem"
VALIDATION_RESPONSE = {
    "description": "Bad Request: the body, a parameter or the content type is not valid",
    "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": PROBLEM_REF}}},
}


def problem_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path_item in schema.get("paths", {}).values():
                for operation in path_item.values():
                    _rewrite_responses(operation)
            components = schema.setdefault("components", {})
            schemas = components.setdefault("schemas", {})  # Problem is there: every API route documents it
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _rewrite_responses(operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    # FastAPI documents 422 for every operation that validates input; the service answers 400.
    if responses.pop("422", None) is not None or "requestBody" in operation or operation.get("parameters"):
        responses.setdefault("400", VALIDATION_RESPONSE)
    for response in responses.values():
        content = response.get("content", {})
        json_content = content.get("application/json")
        if json_content is not None and json_content.get("schema", {}).get("$ref") == PROBLEM_REF:
            content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")
