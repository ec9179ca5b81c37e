"""BOLA (broken object level authorization): objects created with the first token are refused to the
second on every route that takes an object id.

The routes come from the OpenAPI document: the running service's, or `--openapi FILE` when docs are
off (production), or else the example routes below. `SEEDS` says how the first token creates the
objects whose ids fill the path parameters; it is the service's own `domain.py`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import domain
from . import paths
from .authn import split_token
from .probe import Scan
from .report import CheckResult, Status, verdict

NAME = "bola"
METHODS = ("get", "post", "put", "patch", "delete")
ORDER = {"GET": 0, "POST": 1, "PUT": 1, "PATCH": 1, "DELETE": 2}  # reads first, deletes last
REFUSED = (403, 404)
OTHER_SUBJECT = "scan-probe"


# The example domain's objects, cleanup and routes: owner code (domain.py).
SEEDS = domain.SCAN_SEEDS
CLEANUP = domain.SCAN_CLEANUP
EXAMPLE_OPERATIONS = domain.SCAN_OPERATIONS


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    body: dict[str, Any] | None

    def url(self, values: Mapping[str, str]) -> str:
        path = self.path
        for name in _parameters(path):
            path = path.replace("{" + name + "}", values.get(name) or _fallback_value(name, values))
        return path


def _parameters(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def _fallback_value(name: str, values: Mapping[str, str]) -> str:
    # An id parameter no seed creates gets the first seeded object; anything else a harmless name.
    if name == "id" or name.endswith("_id"):
        return next(iter(values.values()), str(uuid.uuid4()))
    return OTHER_SUBJECT


def operations_from_openapi(document: Mapping[str, Any]) -> list[Operation]:
    """Every API operation whose path takes a parameter, with a minimal valid JSON body."""
    components = document.get("components", {}).get("schemas", {})
    found = []
    for path, item in document.get("paths", {}).items():
        if not path.startswith(paths.API + "/") or "{" not in path:
            continue
        for method, operation in item.items():
            if method not in METHODS:
                continue
            content = operation.get("requestBody", {}).get("content", {})
            schema = content.get("application/json", {}).get("schema")
            body = example(schema, components) if schema else None
            found.append(Operation(method.upper(), path, body if isinstance(body, dict) else None))
    return found


def example(schema: Mapping[str, Any], components: Mapping[str, Any], depth: int = 0) -> Any:
    """A small instance of a JSON schema: required properties only, first enum value, typed defaults."""
    if depth > 8:
        return None
    if "$ref" in schema:
        return example(components.get(schema["$ref"].rsplit("/", 1)[-1], {}), components, depth + 1)
    for key in ("example", "default", "const"):
        if key in schema:
            return schema[key]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = [option for option in schema.get(key, []) if option.get("type") != "null"]
        if options:
            return example(options[0], components, depth + 1)
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        return {name: example(properties.get(name, {}), components, depth + 1) for name in schema.get("required", [])}
    if kind == "array":
        return [example(schema.get("items", {}), components, depth + 1)] if schema.get("minItems") else []
    if kind in ("integer", "number"):
        return schema.get("minimum", 1)
    if kind == "boolean":
        return False
    formats = {"email": "scan-probe@example.com", "uuid": str(uuid.uuid4()), "date-time": "2000-01-01T00:00:00Z"}
    return formats.get(schema.get("format", ""), "scan" + "x" * max(0, schema.get("minLength", 0) - 4))


def load_operations(scan: Scan) -> tuple[list[Operation], str]:
    if scan.openapi_file:
        document = json.loads(Path(scan.openapi_file).read_text())
        return operations_from_openapi(document), scan.openapi_file
    response = scan.probe.request("GET", paths.OPENAPI)
    if response.status_code == 200:
        try:
            return operations_from_openapi(response.json()), paths.OPENAPI
        except ValueError:
            pass
    return [Operation(*operation) for operation in EXAMPLE_OPERATIONS], "the example routes (no OpenAPI document)"


def _claims(token: str) -> dict[str, Any]:
    try:
        return split_token(token)[1]
    except ValueError:
        return {}


def _scopes(claims: Mapping[str, Any]) -> set[str]:
    scope = claims.get("scope", claims.get("scp", ""))
    return set(scope.split()) if isinstance(scope, str) else {s for s in scope if isinstance(s, str)}


def check(scan: Scan) -> CheckResult:
    if not scan.second_token:
        return CheckResult(NAME, Status.SKIP, "needs --second-token (a token of another subject)")
    first, second = _claims(scan.token), _claims(scan.second_token)
    problems = []
    if first.get("sub") is not None and first.get("sub") == second.get("sub"):
        problems.append("both tokens have the same subject")
    missing = _scopes(first) - _scopes(second)
    if missing:
        problems.append(f"the second token lacks {' '.join(sorted(missing))}: a scope refusal would hide BOLA")
    if problems:
        return verdict(NAME, problems, "")

    values: dict[str, str] = {}
    for seed in SEEDS:
        path = Operation("POST", seed.path, None).url(values)
        response = scan.probe.request("POST", path, token=scan.token, json=seed.body())
        if response.status_code != 201:
            return verdict(
                NAME, [f"the first token could not create {seed.parameter} at {path} ({response.status_code})"], ""
            )
        values[seed.parameter] = str(response.json()["id"])

    operations, source = load_operations(scan)
    outcomes: dict[str, dict[str, int]] = {}
    for operation in sorted(operations, key=lambda op: ORDER.get(op.method, 1)):
        url = operation.url(values)
        label = f"{operation.method} {operation.path}"
        outcomes[label] = {}
        if operation.method == "GET":
            own = scan.probe.request("GET", url, token=scan.token)
            outcomes[label]["first"] = own.status_code
            if not own.is_success:
                problems.append(f"{label}: the first token cannot use its own object ({own.status_code})")
        other = scan.probe.request(operation.method, url, token=scan.second_token, json=operation.body)
        outcomes[label]["second"] = other.status_code
        if other.status_code not in REFUSED:
            problems.append(f"{label}: the second token got {other.status_code} on the first token's object")
    for method, path in CLEANUP:
        scan.probe.request(method, Operation(method, path, None).url(values), token=scan.token)

    if not operations:
        problems.append(f"no route with an object id in {source}")
    success = f"{len(operations)} operations on another subject's objects refused (routes from {source})"
    return verdict(NAME, problems, success, source=source, objects=values, operations=outcomes)
