"""API lifecycle: a deprecated route announces its deprecation, sunset and successor on every
answer, logs who still calls it, and is gone (410, handler not run) from its sunset on.

The clock is the runtime's, replaced here, so these tests mean the same on any date.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI

from {{ cookiecutter.package_name }}.api.legacy import GET_ORG_V0
from {{ cookiecutter.package_name }}.security.deprecation import Deprecation
from {{ cookiecutter.package_name }}.security.logs import service_log_handler

from .conftest import TokenFactory, bearer, principal, pseudonym

BEFORE_SUNSET = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


def set_clock(app: FastAPI, now: datetime) -> None:
    app.state.runtime.clock = lambda: now


@pytest.fixture
def log_buffer(app: FastAPI) -> Iterator[io.StringIO]:
    handler = service_log_handler()
    assert handler is not None
    buffer = io.StringIO()
    previous = handler.setStream(buffer)
    yield buffer
    handler.setStream(previous)  # type: ignore[arg-type]


async def create_org(client: httpx.AsyncClient, token: str) -> str:
    response = await client.post("/api/v1/orgs", json={"name": "Acme"}, headers=bearer(token))
    assert response.status_code == 201
    return str(response.json()["id"])


async def test_the_deprecated_alias_answers_like_its_successor_with_exact_lifecycle_headers(
    app: FastAPI, client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    set_clock(app, BEFORE_SUNSET)
    alice = bearer(make_token("alice"))
    org_id = await create_org(client, make_token("alice"))

    old = await client.get(f"/api/v0/orgs/{org_id}", headers=alice)
    new = await client.get(f"/api/v1/orgs/{org_id}", headers=alice)

    assert old.status_code == 200
    assert old.json() == new.json()
    assert old.headers["deprecation"] == "@1782864000"  # RFC 9745: @<unix seconds> of 2026-07-01T00:00:00Z
    assert old.headers["sunset"] == "Thu, 01 Jul 2027 00:00:00 GMT"  # RFC 8594: IMF-fixdate
    assert old.headers["link"] == f'</api/v1/orgs/{org_id}>; rel="successor-version"'
    assert not {"deprecation", "sunset", "link"} & set(new.headers)


async def test_errors_of_a_deprecated_route_carry_the_lifecycle_headers_too(
    app: FastAPI, client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    set_clock(app, BEFORE_SUNSET)
    org_id = await create_org(client, make_token("alice"))
    refused = await client.get(f"/api/v0/orgs/{org_id}", headers=bearer(make_token("mallory")))
    assert refused.status_code == 403
    assert refused.headers["deprecation"] == "@1782864000"
    assert refused.headers["link"] == f'</api/v1/orgs/{org_id}>; rel="successor-version"'


async def test_the_deprecated_alias_keeps_the_scope_and_object_policy_of_its_successor(
    app: FastAPI, client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    set_clock(app, BEFORE_SUNSET)
    org_id = await create_org(client, make_token("alice"))
    no_scope = await client.get(f"/api/v0/orgs/{org_id}", headers=bearer(make_token("alice", scope="orgs:write")))
    no_grant = await client.get(f"/api/v0/orgs/{org_id}", headers=bearer(make_token("mallory")))
    anonymous = await client.get(f"/api/v0/orgs/{org_id}")
    assert (no_scope.status_code, no_grant.status_code, anonymous.status_code) == (403, 403, 401)


async def test_each_call_is_logged_as_deprecated_use_with_the_subject(
    app: FastAPI, client: httpx.AsyncClient, make_token: TokenFactory, log_buffer: io.StringIO
) -> None:
    set_clock(app, BEFORE_SUNSET)
    org_id = await create_org(client, make_token("alice"))
    response = await client.get(f"/api/v0/orgs/{org_id}", headers=bearer(make_token("alice")))
    records = [json.loads(line) for line in log_buffer.getvalue().splitlines()]
    uses = [r for r in records if r.get("event") == "deprecated_use"]
    assert len(uses) == 1
    assert uses[0]["subject"] == pseudonym(principal("alice"))
    assert uses[0]["route"] == "/api/v0/orgs/{org_id}"
    assert uses[0]["successor"] == f"/api/v1/orgs/{org_id}"
    assert uses[0]["trace_id"] == response.headers["x-trace-id"]
    assert uses[0]["sunset_passed"] is False


@pytest.mark.parametrize("after", [timedelta(0), timedelta(seconds=1), timedelta(days=400)])
async def test_from_its_sunset_on_the_route_answers_410_without_running_anything_else(
    app: FastAPI, client: httpx.AsyncClient, make_token: TokenFactory, after: timedelta
) -> None:
    org_id = await create_org(client, make_token("alice"))
    set_clock(app, GET_ORG_V0.sunset + after)

    owner = await client.get(f"/api/v0/orgs/{org_id}", headers=bearer(make_token("alice")))
    # A caller without any grant gets the same 410: the object check never ran.
    stranger = await client.get(f"/api/v0/orgs/{org_id}", headers=bearer(make_token("mallory")))

    for response in (owner, stranger):
        assert response.status_code == 410
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["status"] == 410
        assert body["trace_id"] == response.headers["x-trace-id"]
        assert "/api/v1/orgs/" in body["detail"]
        assert response.headers["sunset"] == "Thu, 01 Jul 2027 00:00:00 GMT"
        assert response.headers["link"] == f'</api/v1/orgs/{org_id}>; rel="successor-version"'


async def test_one_second_before_the_sunset_the_route_still_works(
    app: FastAPI, client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    org_id = await create_org(client, make_token("alice"))
    set_clock(app, GET_ORG_V0.sunset - timedelta(seconds=1))
    assert (await client.get(f"/api/v0/orgs/{org_id}", headers=bearer(make_token("alice")))).status_code == 200


async def test_the_handler_of_a_sunset_route_is_not_run(
    app: FastAPI, client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    calls: list[str] = []
    lifecycle = Deprecation(
        since=datetime(2026, 1, 1, tzinfo=UTC), sunset=datetime(2026, 6, 1, tzinfo=UTC), successor="/api/v1/new"
    )

    @app.get("/api/v1/old", **lifecycle.route())
    async def old() -> dict[str, str]:
        calls.append("old")
        return {"ok": "yes"}

    app.middleware_stack = None  # rebuild with the new route
    set_clock(app, datetime(2026, 5, 31, tzinfo=UTC))
    before = await client.get("/api/v1/old", headers=bearer(make_token()))
    set_clock(app, datetime(2026, 6, 1, tzinfo=UTC))
    after = await client.get("/api/v1/old", headers=bearer(make_token()))
    assert (before.status_code, after.status_code) == (200, 410)
    assert calls == ["old"]


async def test_the_successor_link_percent_encodes_what_the_client_put_in_the_path(
    app: FastAPI, client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    set_clock(app, BEFORE_SUNSET)
    response = await client.get("/api/v0/orgs/a%3E%2C%20b", headers=bearer(make_token()))
    assert response.status_code == 400  # not a UUID
    assert response.headers["link"] == '</api/v1/orgs/a%3E%2C%20b>; rel="successor-version"'


async def test_openapi_marks_the_route_deprecated_and_documents_410(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    old, new = paths["/api/v0/orgs/{org_id}"]["get"], paths["/api/v1/orgs/{org_id}"]["get"]
    assert old["deprecated"] is True
    assert "application/problem+json" in old["responses"]["410"]["content"]
    assert not new.get("deprecated", False)


def test_a_deprecation_needs_aware_dates_and_a_sunset_after_it() -> None:
    with pytest.raises(ValueError, match="time zone"):
        Deprecation(since=datetime(2026, 1, 1), sunset=datetime(2027, 1, 1, tzinfo=UTC), successor="/x")
    with pytest.raises(ValueError, match="after"):
        Deprecation(since=datetime(2027, 1, 1, tzinfo=UTC), sunset=datetime(2026, 1, 1, tzinfo=UTC), successor="/x")
