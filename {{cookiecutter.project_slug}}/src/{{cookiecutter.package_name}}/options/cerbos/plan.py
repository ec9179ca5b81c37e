"""A Cerbos query plan (`PlanResources`) written as SQL over the caller's grants.

A plan's condition is an expression tree over the resource's attributes. The service sends one
attribute, `relation`, so the conditions it can write are those on `request.resource.attr.relation`
(`eq`, `ne`, `in`) combined with `and`, `or` and `not`. Anything else (another attribute, a
function, a comparison it does not know) raises PlanUntranslatable: the list is refused
(PlanRefused, 403), never read without the condition.
"""

from __future__ import annotations

from typing import Any

from cerbos.engine.v1 import engine_pb2
from google.protobuf import json_format
from sqlalchemy import ColumnElement, and_, not_, or_

from ...security.authz import PlanRefused
from ...security.events import security_event
from ...tables import Permission

Operand = engine_pb2.PlanResourcesFilter.Expression.Operand
ATTRIBUTES: dict[str, Any] = {"request.resource.attr.relation": Permission.relation}


class PlanUntranslatable(Exception):
    """A part of a plan this service cannot write as SQL."""


def condition_sql(condition: Operand) -> ColumnElement[bool]:
    """The plan's condition as a WHERE clause on the permissions table, or PlanRefused."""
    try:
        return _boolean(condition)
    except PlanUntranslatable as exc:
        security_event("plan_refused", reason=str(exc))
        raise PlanRefused() from None


def _boolean(operand: Operand) -> ColumnElement[bool]:
    if operand.WhichOneof("node") != "expression":
        raise PlanUntranslatable(f"not a condition: {operand.WhichOneof('node')}")
    operator = operand.expression.operator
    operands = list(operand.expression.operands)
    if operator == "and":
        return and_(*(_boolean(each) for each in operands))
    if operator == "or":
        return or_(*(_boolean(each) for each in operands))
    if operator == "not" and len(operands) == 1:
        return not_(_boolean(operands[0]))
    if operator in ("eq", "ne", "in") and len(operands) == 2:
        column, value = _column_and_value(operands)
        if operator == "in":
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise PlanUntranslatable("`in` needs a list of strings")
            return column.in_(value)  # type: ignore[no-any-return]
        if not isinstance(value, str):
            raise PlanUntranslatable(f"`{operator}` needs a string")
        return (column == value) if operator == "eq" else (column != value)  # type: ignore[no-any-return]
    raise PlanUntranslatable(f"operator {operator!r}")


def _column_and_value(operands: list[Operand]) -> tuple[Any, Any]:
    variables = [each.variable for each in operands if each.WhichOneof("node") == "variable"]
    values = [each.value for each in operands if each.WhichOneof("node") == "value"]
    if len(variables) != 1 or len(values) != 1:
        raise PlanUntranslatable("a comparison of one attribute with one value")
    column = ATTRIBUTES.get(variables[0])
    if column is None:
        raise PlanUntranslatable(f"attribute {variables[0]!r}")
    return column, json_format.MessageToDict(values[0]) if values[0].WhichOneof("kind") else None
