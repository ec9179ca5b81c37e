"""Field-level authorization (ASVS 5.0 V8.2.3): which fields of an object a caller sees, by its
relation to the object, declared as one response model per relation.

A route that shows more to some callers than to others names its views once:

    ORG_VIEWS = ViewsByRelation({Relation.viewer: OrgOut, Relation.admin: OrgAdminOut})

(each model is seen from that relation up; a richer model extends the poorer one), reads the
object with the caller's relation (`read_with_relation(..., with_relation=True)`), and answers
`ORG_VIEWS.view(row, row.relation)`. The route's `response_model` is `ORG_VIEWS.response_model`,
so the OpenAPI document lists every view. A field no view names never leaves the service.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, TypeVar, Union

from pydantic import BaseModel

from ..tables import Relation

M = TypeVar("M", bound=BaseModel)


class ViewsByRelation(Generic[M]):
    """Response models by the lowest relation that may see each."""

    def __init__(self, views: Mapping[Relation, type[M]]) -> None:
        if Relation.viewer not in views:
            raise ValueError("ViewsByRelation needs a view for the lowest relation (viewer)")
        self.views = sorted(views.items(), key=lambda item: item[0].rank)

    def model(self, held: Relation) -> type[M]:
        """The richest view the relation `held` may see."""
        return [model for relation, model in self.views if held.rank >= relation.rank][-1]

    def view(self, source: Any, held: Relation) -> M:
        """`source` (a row, a dataclass: read by attribute) as the view `held` may see."""
        return self.model(held).model_validate(source, from_attributes=True)

    @property
    def response_model(self) -> Any:
        """Every view, richest first (a route's `response_model`): serialized as the view it is."""
        return Union[tuple(model for _, model in reversed(self.views))]  # noqa: UP007  # a runtime union
