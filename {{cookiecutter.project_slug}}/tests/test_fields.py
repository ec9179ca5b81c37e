"""Field-level authorization (ASVS 5.0 V8.2.3, security/fields.py): the fields of an org a caller
sees depend on its relation to the org, one response model per relation (schemas.ORG_VIEWS):
viewers and editors get OrgOut, admins and owners OrgAdminOut (with `created_by`)."""

from __future__ import annotations

import httpx
import pytest

from {{ cookiecutter.package_name }}.api.schemas import ORG_VIEWS, OrgAdminOut, OrgOut
from {{ cookiecutter.package_name }}.tables import Relation

from .conftest import ALL_SCOPES, TokenFactory, bearer, principal

ORGS = "/api/v1/orgs"
VIEWER_FIELDS = {"id", "name", "created_at"}


async def test_the_fields_of_an_org_depend_on_the_callers_relation(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    alice = bearer(make_token("alice", ALL_SCOPES))
    org = (await client.post(ORGS, json={"name": "Acme"}, headers=alice)).json()["id"]
    for subject, relation in (("bob", "viewer"), ("erin", "editor"), ("carol", "admin")):
        granted = await client.put(f"{ORGS}/{org}/grants/{subject}", json={"relation": relation}, headers=alice)
        assert granted.status_code == 201, granted.text

    async def seen_by(subject: str) -> dict[str, object]:
        answer = await client.get(f"{ORGS}/{org}", headers=bearer(make_token(subject, ALL_SCOPES)))
        assert answer.status_code == 200, answer.text
        body: dict[str, object] = answer.json()
        return body

    for subject in ("bob", "erin"):
        assert set(await seen_by(subject)) == VIEWER_FIELDS
    for subject in ("carol", "alice"):
        seen = await seen_by(subject)
        assert set(seen) == VIEWER_FIELDS | {"created_by"}
        assert seen["created_by"] == principal("alice")


@pytest.mark.parametrize(
    ("held", "model"),
    [
        (Relation.viewer, OrgOut),
        (Relation.editor, OrgOut),
        (Relation.admin, OrgAdminOut),
        (Relation.owner, OrgAdminOut),
    ],
)
def test_each_relation_gets_the_richest_view_it_may_see(held: Relation, model: type[OrgOut]) -> None:
    assert ORG_VIEWS.model(held) is model


async def test_the_openapi_document_lists_every_view(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    answer = schema["paths"]["/api/v1/orgs/{org_id}"]["get"]["responses"]["200"]["content"]["application/json"]
    names = {ref["$ref"].rsplit("/", 1)[-1] for ref in answer["schema"]["anyOf"]}
    assert names == {"OrgOut", "OrgAdminOut"}
