"""Layer 6, input validation: every malformed, oversized or unexpected input is a 400 problem
with an `errors` list of {loc, msg} that never echoes the input back, and never a 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .conftest import TokenFactory, bearer
from .test_errors import assert_problem

PROBLEM = "urn:{{ cookiecutter.project_slug }}:problem:"
MARKER = "ZQXJ-input-marker"  # must never come back in a response
NO_ORG = "00000000-0000-0000-0000-000000000000"


def assert_validation_problem(response: httpx.Response, errors: list[dict[str, Any]] | None = None) -> list[Any]:
    body = assert_problem(response, 400)
    assert body["type"] == PROBLEM + "validation"
    assert body["title"] == "Validation failed"
    assert body["detail"] == "The request is not valid."
    reported = body["errors"]
    assert isinstance(reported, list) and reported
    for error in reported:
        assert set(error) == {"loc", "msg"}
    if errors is not None:
        assert reported == errors
    assert MARKER not in response.text
    return reported


@pytest.fixture
def alice(make_token: TokenFactory) -> dict[str, str]:
    return bearer(make_token("alice"))


@pytest.fixture
async def org_id(client: httpx.AsyncClient, alice: dict[str, str]) -> str:
    response = await client.post("/api/v1/orgs", json={"name": "Acme"}, headers=alice)
    assert response.status_code == 201
    org: str = response.json()["id"]
    return org


# --- bodies ----------------------------------------------------------------------------------


async def test_unknown_field_is_refused_by_name(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    response = await client.post("/api/v1/orgs", json={"name": "Acme", "is_admin": True}, headers=alice)
    assert_validation_problem(response, [{"loc": ["body", "is_admin"], "msg": "Extra inputs are not permitted"}])


async def test_unknown_field_name_that_is_not_a_name_is_not_echoed(
    client: httpx.AsyncClient, alice: dict[str, str]
) -> None:
    response = await client.post("/api/v1/orgs", json={"name": "Acme", f"<img src={MARKER}>": 1}, headers=alice)
    assert_validation_problem(response, [{"loc": ["body", "*"], "msg": "Extra inputs are not permitted"}])


async def test_missing_field_is_reported(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    response = await client.post("/api/v1/orgs", json={}, headers=alice)
    assert_validation_problem(response, [{"loc": ["body", "name"], "msg": "Field required"}])


async def test_too_long_string_is_refused_without_echoing_it(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    response = await client.post("/api/v1/orgs", json={"name": MARKER * 10}, headers=alice)
    assert_validation_problem(response, [{"loc": ["body", "name"], "msg": "String should have at most 100 characters"}])


async def test_blank_string_is_refused(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    response = await client.post("/api/v1/orgs", json={"name": "   "}, headers=alice)
    assert_validation_problem(response, [{"loc": ["body", "name"], "msg": "String should have at least 1 character"}])


INVISIBLE = "String should not contain control or invisible characters"
REFUSED_TEXT = [
    "Ac\u0000me",  # Cc: C0 controls and DEL
    "Acme\nInjected: line",
    "Ac\u001bme",
    "Ac\u007fme",
    "Ac\u0085me",  # Cc: C1 controls, NEL and CSI
    "Ac\u009b31mme",
    "Acme\u2028Injected",  # Zl, Zp: line and paragraph separators
    "Acme\u2029Injected",
    "Acme\u202egnp.exe",  # Cf: bidirectional override, byte order mark, zero-width space
    "\ufeffAcme",
    "Ac\u200bme",
]


@pytest.mark.parametrize("name", REFUSED_TEXT)
async def test_control_and_invisible_characters_in_text_are_refused(
    client: httpx.AsyncClient, alice: dict[str, str], name: str
) -> None:
    response = await client.post("/api/v1/orgs", json={"name": name}, headers=alice)
    assert_validation_problem(response, [{"loc": ["body", "name"], "msg": INVISIBLE}])


@pytest.mark.parametrize("value", REFUSED_TEXT)
async def test_control_and_invisible_characters_in_metadata_values_are_refused(
    client: httpx.AsyncClient, alice: dict[str, str], org_id: str, value: str
) -> None:
    body = {"email": "j@example.org", "metadata": {"team": value}}
    response = await client.post(f"/api/v1/orgs/{org_id}/users", json=body, headers=alice)
    assert_validation_problem(response, [{"loc": ["body", "metadata", "team"], "msg": INVISIBLE}])


async def test_text_is_stored_in_nfc_and_its_length_counted_after_normalizing(
    client: httpx.AsyncClient, alice: dict[str, str]
) -> None:
    decomposed = "Cafe\u0301 M\u00fcller\u00a0& Co"  # combining accent; a no-break space (Zs) is fine
    response = await client.post("/api/v1/orgs", json={"name": decomposed}, headers=alice)
    assert response.status_code == 201
    assert response.json()["name"] == "Caf\u00e9 M\u00fcller\u00a0& Co"
    # 101 characters as sent, 100 once the accent is composed: within the limit.
    at_limit = await client.post("/api/v1/orgs", json={"name": "a" * 98 + "e\u0301"}, headers=alice)
    assert at_limit.status_code == 201
    assert at_limit.json()["name"] == "a" * 98 + "\u00e9"


async def test_malformed_json_is_a_400_problem(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    response = await client.post(
        "/api/v1/orgs", content=b'{"name": ' + MARKER.encode(), headers={**alice, "Content-Type": "application/json"}
    )
    assert_validation_problem(response, [{"loc": ["body", 9], "msg": "JSON decode error"}])


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml", "multipart/form-data", None]
)
async def test_wrong_or_missing_content_type_is_a_400_problem(
    client: httpx.AsyncClient, alice: dict[str, str], content_type: str | None
) -> None:
    headers = {**alice, "Content-Type": content_type} if content_type else alice
    response = await client.post("/api/v1/orgs", content=b'{"name": "Acme"}', headers=headers)
    assert_validation_problem(
        response, [{"loc": ["body"], "msg": "Input should be a valid dictionary or object to extract fields from"}]
    )


@pytest.mark.parametrize("body", [b'[{"name": "Acme"}]', b'"Acme"', b"42", b"true", b"null"])
async def test_body_that_is_not_a_json_object_is_a_400_problem(
    client: httpx.AsyncClient, alice: dict[str, str], body: bytes
) -> None:
    response = await client.post("/api/v1/orgs", content=body, headers={**alice, "Content-Type": "application/json"})
    assert_validation_problem(
        response, [{"loc": ["body"], "msg": "Input should be a valid dictionary or object to extract fields from"}]
    )


@pytest.mark.parametrize("where", ["top", "field"])
async def test_deeply_nested_json_is_a_400_problem_not_a_500(
    client: httpx.AsyncClient, alice: dict[str, str], where: str
) -> None:
    nested = b"[" * 5000 + b"]" * 5000
    body = nested if where == "top" else b'{"name": ' + nested + b"}"
    response = await client.post("/api/v1/orgs", content=body, headers={**alice, "Content-Type": "application/json"})
    problem = assert_problem(response, 400)
    assert problem["detail"] == "The request is not valid."
    assert "Recursion" not in response.text


async def test_body_of_two_mebibytes_is_a_413_problem(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    body = b'{"name": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    response = await client.post("/api/v1/orgs", content=body, headers={**alice, "Content-Type": "application/json"})
    problem = assert_problem(response, 413)
    assert problem["type"] == PROBLEM + "body-too-large"


async def test_many_errors_are_reported_up_to_twenty(client: httpx.AsyncClient, alice: dict[str, str]) -> None:
    body = {"name": "Acme", **{f"field{n}": n for n in range(50)}}
    response = await client.post("/api/v1/orgs", json=body, headers=alice)
    assert len(assert_validation_problem(response)) == 20


# --- the seed's CreateUser body --------------------------------------------------------------


@pytest.mark.parametrize(
    ("email", "msg"),
    [
        (f"{MARKER}<script>@@example..com", "value is not a valid email address"),
        (f"{MARKER}@exa mple.com", "value is not a valid email address"),
        (MARKER * 20 + "@example.com", "value is not a valid email address"),
        (42, "Input should be a valid string"),
    ],
)
async def test_invalid_email_is_refused_without_echoing_it(
    client: httpx.AsyncClient, alice: dict[str, str], org_id: str, email: object, msg: str
) -> None:
    response = await client.post(f"/api/v1/orgs/{org_id}/users", json={"email": email}, headers=alice)
    assert_validation_problem(response, [{"loc": ["body", "email"], "msg": msg}])


async def test_unknown_role_lists_the_allowed_ones(
    client: httpx.AsyncClient, alice: dict[str, str], org_id: str
) -> None:
    response = await client.post(
        f"/api/v1/orgs/{org_id}/users", json={"email": "j@example.org", "role": "owner"}, headers=alice
    )
    assert_validation_problem(
        response, [{"loc": ["body", "role"], "msg": "Input should be 'viewer', 'editor' or 'admin'"}]
    )


@pytest.mark.parametrize(
    ("metadata", "errors"),
    [
        (
            {f"k{n}": "v" for n in range(21)},
            [
                {
                    "loc": ["body", "metadata"],
                    "msg": "Dictionary should have at most 20 items after validation, not more",
                }
            ],
        ),
        (
            {f"bad key {MARKER}": "v"},
            [{"loc": ["body", "metadata", "*", "[key]"], "msg": "String should match pattern '^[A-Za-z0-9_.:-]+$'"}],
        ),
        (
            {"k" * 65: "v"},
            [{"loc": ["body", "metadata", "*", "[key]"], "msg": "String should have at most 64 characters"}],
        ),
        (
            {"team": MARKER * 20},
            [{"loc": ["body", "metadata", "team"], "msg": "String should have at most 256 characters"}],
        ),
        ({"team": 7}, [{"loc": ["body", "metadata", "team"], "msg": "Input should be a valid string"}]),
        ({"team": "a\u0000b"}, [{"loc": ["body", "metadata", "team"], "msg": INVISIBLE}]),
        ({"team": {"nested": "map"}}, [{"loc": ["body", "metadata", "team"], "msg": "Input should be a valid string"}]),
        (["team"], [{"loc": ["body", "metadata"], "msg": "Input should be a valid dictionary"}]),
    ],
)
async def test_metadata_is_a_bounded_string_to_string_map(
    client: httpx.AsyncClient, alice: dict[str, str], org_id: str, metadata: object, errors: list[dict[str, Any]]
) -> None:
    body = {"email": "j@example.org", "metadata": metadata}
    response = await client.post(f"/api/v1/orgs/{org_id}/users", json=body, headers=alice)
    assert_validation_problem(response, errors)


async def test_metadata_at_its_bounds_is_accepted(
    client: httpx.AsyncClient, alice: dict[str, str], org_id: str
) -> None:
    metadata = {f"{n:02d}" + "k" * 62: "v" * 256 for n in range(20)}
    body = {"email": "j@example.org", "role": "editor", "metadata": metadata}
    response = await client.post(f"/api/v1/orgs/{org_id}/users", json=body, headers=alice)
    assert response.status_code == 201, response.text
    assert response.json()["metadata"] == metadata


# --- path and query parameters ---------------------------------------------------------------


async def test_malformed_path_id_is_refused_without_echoing_it(
    client: httpx.AsyncClient, alice: dict[str, str]
) -> None:
    response = await client.get(f"/api/v1/orgs/{MARKER}", headers=alice)
    assert_validation_problem(response, [{"loc": ["path", "org_id"], "msg": "Input should be a valid UUID"}])


async def test_overlong_path_parameter_is_refused(
    client: httpx.AsyncClient, alice: dict[str, str], org_id: str
) -> None:
    response = await client.put(f"/api/v1/orgs/{org_id}/grants/{'b' * 256}", json={"relation": "viewer"}, headers=alice)
    assert [error["loc"] for error in assert_validation_problem(response)] == [["path", "subject"]]


@pytest.mark.parametrize(
    ("query", "errors"),
    [
        ("limit=1000", [{"loc": ["query", "limit"], "msg": "Input should be less than or equal to 100"}]),
        ("limit=0", [{"loc": ["query", "limit"], "msg": "Input should be greater than or equal to 1"}]),
        (
            f"limit={MARKER}",
            [
                {
                    "loc": ["query", "limit"],
                    "msg": "Input should be a valid integer, unable to parse string as an integer",
                }
            ],
        ),
        ("offset=-1", [{"loc": ["query", "offset"], "msg": "Input should be greater than or equal to 0"}]),
    ],
)
async def test_out_of_range_query_parameters_are_refused(
    client: httpx.AsyncClient, alice: dict[str, str], org_id: str, query: str, errors: list[dict[str, Any]]
) -> None:
    response = await client.get(f"/api/v1/orgs/{org_id}/users?{query}", headers=alice)
    assert_validation_problem(response, errors)


# --- identity before validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "kwargs"),
    [
        ("/api/v1/orgs", {"content": b'{"name": ', "headers": {"Content-Type": "application/json"}}),
        ("/api/v1/orgs", {"json": {"name": "Acme", "is_admin": True}}),
        ("/api/v1/orgs", {"content": b'{"name": "Acme"}', "headers": {"Content-Type": "text/plain"}}),
        ("/api/v1/orgs", {"json": [1, 2, 3]}),
        (f"/api/v1/orgs/{MARKER}/users", {"json": {"email": "nope"}}),
        (f"/api/v1/orgs/{NO_ORG}/users", {"json": {"email": "j@example.org", "role": "god"}}),
    ],
)
async def test_anonymous_request_with_bad_input_is_401_not_400(
    client: httpx.AsyncClient, path: str, kwargs: dict[str, Any]
) -> None:
    response = await client.post(path, **kwargs)
    body = assert_problem(response, 401)
    assert "errors" not in body
    assert response.headers["www-authenticate"].split(", ")[-1] == "Bearer"
