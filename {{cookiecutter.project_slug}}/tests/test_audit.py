"""Layer 2, audit: one JSON line per request and per security decision, one trace id across them,
nothing secret or personal in clear, and an optional append-only table of the events.

The log output is the real one: the service's handler on the root logger, redirected to a buffer.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import Settings
from {{ cookiecutter.package_name }}.db import create_engine
from {{ cookiecutter.package_name }}.security.client_addresses import truncate
from {{ cookiecutter.package_name }}.security.logs import service_log_handler
from {{ cookiecutter.package_name }}.security.masking import Masker

from .conftest import AUDIENCE, ISSUER, PSEUDONYM_KEY, TokenFactory, bearer, owner_url, principal, pseudonym, running

TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
SPAN_ID = re.compile(r"^[0-9a-f]{16}$")
GIVEN_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{GIVEN_TRACE}-00f067aa0ba902b7-01"


class LogLines:
    def __init__(self) -> None:
        self.buffer = io.StringIO()

    @property
    def text(self) -> str:
        return self.buffer.getvalue()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def of_trace(self, trace_id: str) -> list[dict[str, Any]]:
        return [record for record in self.records() if record.get("trace_id") == trace_id]

    def request_line(self, response: httpx.Response) -> dict[str, Any]:
        lines = [r for r in self.of_trace(response.headers["x-trace-id"]) if r.get("event") == "request"]
        assert len(lines) == 1, lines
        return lines[0]

    def event(self, response: httpx.Response, name: str) -> dict[str, Any]:
        """The one event `name` of the request that got `response`."""
        lines = [r for r in self.of_trace(response.headers["x-trace-id"]) if r.get("event") == name]
        assert len(lines) == 1, f"expected one {name} event, got {lines} in {self.records()}"
        assert lines[0]["logger"] == "audit"
        return lines[0]


@contextmanager
def captured_logs() -> Iterator[LogLines]:
    """Redirect the service's own log handler (installed by create_app) to a buffer."""
    handler = service_log_handler()
    assert handler is not None, "create_app installs the service's log handler"
    lines = LogLines()
    previous = handler.setStream(lines.buffer)
    try:
        yield lines
    finally:
        handler.setStream(previous)  # type: ignore[arg-type]


@pytest.fixture
def logs(app: FastAPI) -> Iterator[LogLines]:
    with captured_logs() as lines:
        yield lines


async def create_org(client: httpx.AsyncClient, token: str, name: str = "Acme") -> str:
    response = await client.post("/api/v1/orgs", json={"name": name}, headers=bearer(token))
    assert response.status_code == 201
    return str(response.json()["id"])


# --- the request line ---------------------------------------------------------------------------


async def test_each_request_is_one_json_line_with_time_trace_method_route_status_duration_client_subject(
    client: httpx.AsyncClient, logs: LogLines, make_token: TokenFactory
) -> None:
    org_id = await create_org(client, make_token("alice"))
    response = await client.get(f"/api/v1/orgs/{org_id}", headers=bearer(make_token("alice")))
    assert response.status_code == 200

    line = logs.request_line(response)
    assert datetime.fromisoformat(line["time"]).utcoffset() is not None
    assert line["level"] == "INFO"
    assert line["logger"] == "audit.request"
    assert TRACE_ID.match(line["trace_id"])
    assert line["method"] == "GET"
    assert line["route"] == "/api/v1/orgs/{org_id}"  # the template, never the path with its ids
    assert line["status"] == 200
    assert isinstance(line["duration_ms"], float | int) and line["duration_ms"] >= 0
    assert SPAN_ID.match(line["span_id"])
    assert line["client"] == pseudonym("203.0.113.7")  # LOG_CLIENT_ADDRESS=pseudonym, the default
    assert line["subject"] == pseudonym(principal("alice"))
    assert org_id not in json.dumps(line)


async def test_an_anonymous_or_unrouted_request_is_logged_without_subject_or_route(
    client: httpx.AsyncClient, logs: LogLines
) -> None:
    anonymous = await client.get("/api/v1/orgs/00000000-0000-0000-0000-000000000000")
    unknown = await client.get("/no/such/path")
    assert (anonymous.status_code, unknown.status_code) == (401, 404)
    assert logs.request_line(anonymous)["subject"] is None
    assert logs.request_line(anonymous)["status"] == 401
    assert logs.request_line(unknown)["route"] is None
    service_lines = [record for record in logs.records() if record["logger"] != "httpx"]  # httpx: the test's client
    assert "/no/such/path" not in json.dumps(service_lines)


async def test_every_line_of_a_request_carries_its_trace_id_which_is_also_in_the_problem_body(
    app: FastAPI, client: httpx.AsyncClient, logs: LogLines, make_token: TokenFactory
) -> None:
    @app.get("/api/v1/library-logs")
    async def library_logs() -> None:
        logging.getLogger("some.library").warning("a library speaks")
        raise RuntimeError("and then fails")

    app.middleware_stack = None  # rebuild with the new route
    response = await client.get("/api/v1/library-logs", headers=bearer(make_token("alice")))

    assert response.status_code == 500
    trace_id = response.headers["x-trace-id"]
    assert response.json()["trace_id"] == trace_id
    lines = [record for record in logs.records() if record["logger"] != "httpx"]  # httpx: the test's client
    assert {record["logger"] for record in lines} >= {"some.library", "audit.request"}
    assert all(record["trace_id"] == trace_id for record in lines), lines
    assert all(record.keys() >= {"time", "level", "logger", "message"} for record in lines)


async def test_a_refusal_event_and_its_request_line_share_the_trace_id_of_the_problem(
    client: httpx.AsyncClient, logs: LogLines, make_token: TokenFactory
) -> None:
    response = await client.get("/api/v1/orgs/00000000-0000-0000-0000-000000000000", headers=bearer("not-a-jwt"))
    assert response.status_code == 401
    trace_id = response.json()["trace_id"]
    assert trace_id == response.headers["x-trace-id"]
    assert {r["event"] for r in logs.of_trace(trace_id)} == {"authentication_failed", "request"}


# --- trace id ---------------------------------------------------------------------------------


@pytest.fixture
def trust_for(settings_for: Callable[..., Settings]) -> Callable[[str], FastAPI]:
    """An app with the given TRACE_CONTEXT_TRUST, behind the proxy 10.0.0.5."""
    return lambda trust: create_app(settings_for(trace_context_trust=trust, trusted_proxies=["10.0.0.5"]))


PROXY, CLIENT = ("10.0.0.5", 4711), ("203.0.113.7", 4711)


@pytest.mark.parametrize(
    ("trust", "peer", "honoured"),
    [
        ("always", CLIENT, True),
        ("always", PROXY, True),
        ("proxies", PROXY, True),
        ("proxies", CLIENT, False),
        ("never", PROXY, False),
        ("never", CLIENT, False),
    ],
)
async def test_a_valid_traceparent_gives_the_trace_id_only_from_a_caller_trace_context_trust_believes(
    trust_for: Callable[[str], FastAPI], trust: str, peer: tuple[str, int], honoured: bool
) -> None:
    async with running(trust_for(trust), client=peer) as http:
        with captured_logs() as logs:
            # Not a probe: probes are not in the request log (LOG_HEALTH_REQUESTS).
            response = await http.get("/no/such/path", headers={"traceparent": TRACEPARENT})
    assert (response.headers["x-trace-id"] == GIVEN_TRACE) is honoured
    assert TRACE_ID.match(response.headers["x-trace-id"])
    assert logs.request_line(response)["trace_id"] == response.headers["x-trace-id"]


@pytest.mark.parametrize("asked", [False, True])
async def test_probes_are_in_the_request_log_only_when_asked_for(
    settings_for: Callable[..., Settings], asked: bool
) -> None:
    async with running(create_app(settings_for(log_health_requests=asked))) as http:
        with captured_logs() as logs:
            probes = [await http.get("/health/live"), await http.get("/health/ready")]
            refused = await http.get("/health/live", headers={"Host": "evil.example"})
            other = await http.get("/no/such/path")
    lines = [r for r in logs.records() if r.get("event") == "request"]
    assert [line["route"] for line in lines] == (["/health/live", "/health/ready", None, None] if asked else [None])
    assert all(probe.status_code == 200 for probe in probes)
    logs.event(refused, "host_refused")  # a probe's security events are logged either way
    assert logs.request_line(other)["status"] == 404


def test_inbound_trace_context_is_believed_only_from_trusted_proxies_by_default(settings: Settings) -> None:
    assert settings.trace_context_trust == "proxies"


async def test_requests_sharing_a_trace_id_are_told_apart_by_their_own_span_id(
    trust_for: Callable[[str], FastAPI],
) -> None:
    async with running(trust_for("always")) as http:
        with captured_logs() as logs:
            first = await http.get(
                "/api/v1/orgs/00000000-0000-0000-0000-000000000000", headers={"traceparent": TRACEPARENT}
            )
            second = await http.get(
                "/api/v1/orgs/00000000-0000-0000-0000-000000000000", headers={"traceparent": TRACEPARENT}
            )
    assert first.headers["x-trace-id"] == second.headers["x-trace-id"] == GIVEN_TRACE
    lines = logs.of_trace(GIVEN_TRACE)
    assert [line["event"] for line in lines] == ["authentication_failed", "request"] * 2
    spans = [line["span_id"] for line in lines]
    assert all(SPAN_ID.match(span) for span in spans)
    assert spans[0] == spans[1] != spans[2] == spans[3]  # one span per request, on every line of it
    assert "00f067aa0ba902b7" not in spans  # the caller's span is its parent, not this service's


async def test_a_later_traceparent_version_with_extra_fields_is_honoured(trust_for: Callable[[str], FastAPI]) -> None:
    async with running(trust_for("always")) as http:
        response = await http.get("/health/live", headers={"traceparent": f"01-{GIVEN_TRACE}-00f067aa0ba902b7-01-xyz"})
    assert response.headers["x-trace-id"] == GIVEN_TRACE


@pytest.mark.parametrize(
    "traceparent",
    [
        f"00-{GIVEN_TRACE.upper()}-00f067aa0ba902b7-01",  # uppercase hex
        f"00-{GIVEN_TRACE}-00f067aa0ba902b7-01-extra",  # version 00 has exactly four fields
        f"ff-{GIVEN_TRACE}-00f067aa0ba902b7-01",  # version ff is invalid
        f"00-{'0' * 32}-00f067aa0ba902b7-01",  # all-zero trace id
        f"00-{GIVEN_TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{GIVEN_TRACE[:-1]}-00f067aa0ba902b7-01",  # short trace id
        f"{GIVEN_TRACE}",
        "garbage\u00e9",
    ],
)
async def test_a_malformed_traceparent_is_ignored_and_a_new_trace_id_generated(
    trust_for: Callable[[str], FastAPI], traceparent: str
) -> None:
    async with running(trust_for("always")) as http:
        response = await http.get("/health/live", headers={b"traceparent": traceparent.encode("latin-1")})
    assert response.status_code == 200
    assert TRACE_ID.match(response.headers["x-trace-id"])
    assert response.headers["x-trace-id"] != GIVEN_TRACE.lower()


async def test_two_traceparent_headers_are_ignored(trust_for: Callable[[str], FastAPI]) -> None:
    other = "00-11111111111111111111111111111111-00f067aa0ba902b7-01"
    async with running(trust_for("always")) as http:
        response = await http.get("/health/live", headers=[("traceparent", TRACEPARENT), ("traceparent", other)])
    assert response.headers["x-trace-id"] not in (GIVEN_TRACE, "1" * 32)


async def test_each_request_without_traceparent_gets_its_own_trace_id(client: httpx.AsyncClient) -> None:
    first, second = await client.get("/health/live"), await client.get("/health/live")
    assert TRACE_ID.match(first.headers["x-trace-id"])
    assert first.headers["x-trace-id"] != second.headers["x-trace-id"]


def test_trace_and_span_ids_cost_no_system_call(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import secrets

    from {{ cookiecutter.package_name }}.security.events import new_trace

    def no_syscall(*_args: Any) -> Any:
        raise AssertionError("trace ids need uniqueness, not secrecy: no getrandom() per request")

    monkeypatch.setattr(os, "urandom", no_syscall)
    monkeypatch.setattr(secrets, "token_hex", no_syscall)
    monkeypatch.setattr(secrets, "token_bytes", no_syscall)
    trace_id, span_id = new_trace()
    assert TRACE_ID.match(trace_id) and SPAN_ID.match(span_id)
    assert new_trace(GIVEN_TRACE)[0] == GIVEN_TRACE


# --- what is never logged -----------------------------------------------------------------------


async def test_no_token_cookie_query_body_or_unmasked_email_is_logged(
    app: FastAPI, client: httpx.AsyncClient, logs: LogLines, make_token: TokenFactory
) -> None:
    token = make_token("jane.doe@example.org")
    signature = token.rsplit(".", 1)[1]
    carrying = {
        **bearer(token),
        "Cookie": "session=cookie-secret-value",
        "traceparent": TRACEPARENT,
    }

    @app.get("/api/v1/leaky")
    async def leaky() -> None:
        # What a careless caller might do; the formatter masks it all the same.
        logging.getLogger("careless").warning(
            "mailing paul.smith@example.org with %s", f"Bearer {token}", extra={"authorization": "Bearer abc"}
        )
        raise RuntimeError("failed for paul.smith@example.org via https://u:pw-secret@db.example.org/x?k=q-secret")

    app.middleware_stack = None
    org_id = await create_org(client, token, name="body-secret-name")
    responses = [
        await client.post(
            f"/api/v1/orgs/{org_id}/users?api_key=query-secret-value",
            json={"email": "john.smith@example.org", "role": "viewer", "metadata": {"note": "body-secret-value"}},
            headers=carrying,
        ),
        await client.post(  # a validation failure: its locations are logged, its values are not
            f"/api/v1/orgs/{org_id}/users",
            json={"email": "john.smith@example.org", "role": "body-secret-role", "unknown": "body-secret-field"},
            headers=carrying,
        ),
        await client.get("/api/v1/leaky?token=query-secret-value", headers=carrying),
        await client.get(f"/api/v1/orgs/{org_id}", headers={**carrying, "Authorization": f"Bearer {token}x"}),
    ]
    assert [r.status_code for r in responses] == [201, 400, 500, 401]

    logged = logs.text
    for secret in (
        token,
        signature,
        "cookie-secret-value",
        "query-secret-value",
        "body-secret",
        "jane.doe@example.org",
        "john.smith@example.org",
        "paul.smith@example.org",
        "pw-secret",
        "q-secret",
        "Bearer abc",
    ):
        assert secret not in logged, secret
    assert pseudonym(principal("jane.doe@example.org")) in logged  # the subject, pseudonymized on the request lines
    assert "p***@example.org" in logged  # the careless message and the traceback, masked
    assert "RuntimeError" in logged  # the traceback itself is kept for operators
    validation = logs.event(responses[1], "validation_failed")
    assert "body.role" in validation["locations"]


def test_the_masker_masks_emails_and_configured_fields_and_redacts_secret_keys() -> None:
    masker = Masker(["email", "phone"])
    masked = masker.mapping(
        {
            "message": "sent to jane@example.org and j.o+x@mail.example.co.uk",
            "email": "not-an-email-but-configured",
            "phone": "+49 30 1234567",
            "authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
            "refresh_token": "r",
            "nested": [{"note": "token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl here"}],
            "count": 3,
        }
    )
    assert masked["message"] == "sent to j***@example.org and j***@mail.example.co.uk"
    assert masked["email"] == "n***"
    assert masked["phone"] == "+***"
    assert masked["authorization"] == masked["refresh_token"] == "[REDACTED]"
    assert masked["nested"] == [{"note": "token [REDACTED] here"}]
    assert masked["count"] == 3
    assert masker.text("j***@example.org") == "j***@example.org"  # masking twice changes nothing


async def test_subjects_are_logged_as_keyed_pseudonyms_that_tell_people_apart(
    client: httpx.AsyncClient, logs: LogLines, make_token: TokenFactory
) -> None:
    path = "/api/v1/orgs/00000000-0000-0000-0000-000000000000"
    alice = await client.get(path, headers=bearer(make_token("alice@example.com")))
    anna = await client.get(path, headers=bearer(make_token("anna@example.com")))
    alice_again = await client.get(path, headers=bearer(make_token("alice@example.com")))
    assert {alice.status_code, anna.status_code, alice_again.status_code} == {403}

    subjects = [logs.request_line(r)["subject"] for r in (alice, anna, alice_again)]
    assert subjects == [pseudonym(principal(s)) for s in ("alice@example.com", "anna@example.com", "alice@example.com")]
    assert subjects[0] != subjects[1]  # masking made both `a***@example.com`
    assert logs.event(anna, "object_denied")["subject"] == subjects[1]  # events name the same pseudonym
    assert "alice" not in logs.text and "anna" not in logs.text and "***" not in logs.text


def test_the_pseudonym_depends_on_the_key(settings_for: Callable[..., Settings]) -> None:
    other_key = "another-audit-pseudonym-key-0123456789"
    create_app(settings_for(audit_pseudonym_key=other_key))
    masked = Masker().mapping({"subject": "alice"})
    assert masked["subject"] == pseudonym("alice", other_key) != pseudonym("alice")


def test_without_a_key_outside_production_one_is_generated_for_the_process_with_a_warning(
    settings_for: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        create_app(settings_for(audit_pseudonym_key=None))
    warnings = [r for r in caplog.records if getattr(r, "event", None) == "audit_pseudonym_key_generated"]
    assert len(warnings) == 1
    assert "AUDIT_PSEUDONYM_KEY" in warnings[0].getMessage()
    masked = Masker().mapping({"subject": "alice"})["subject"]
    assert re.fullmatch(r"ps_[0-9a-f]{32}", masked) and masked != pseudonym("alice")


def test_audit_pseudonym_command_prints_what_to_search_the_log_for(
    public_pem: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from {{ cookiecutter.package_name }}.cli import main

    for name, value in {"JWT_PUBLIC_KEY": public_pem, "JWT_ISSUER": ISSUER, "JWT_AUDIENCE": AUDIENCE}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(Path(__file__).parent)  # no .env here
    monkeypatch.setenv("AUDIT_PSEUDONYM_KEY", PSEUDONYM_KEY)
    assert main(["audit-pseudonym", "--sub", "alice@example.com"]) == 0
    assert capsys.readouterr().out.strip() == pseudonym(principal("alice@example.com"))
    monkeypatch.delenv("AUDIT_PSEUDONYM_KEY")
    assert main(["audit-pseudonym", "--sub", "alice@example.com"]) == 2
    assert "AUDIT_PSEUDONYM_KEY" in capsys.readouterr().err


# --- one event per security decision ------------------------------------------------------------


async def test_authentication_failure_is_logged_with_its_internal_reason(
    client: httpx.AsyncClient, logs: LogLines, make_token: TokenFactory
) -> None:
    missing = await client.get("/api/v1/orgs/00000000-0000-0000-0000-000000000000")
    expired = await client.get(
        "/api/v1/orgs/00000000-0000-0000-0000-000000000000",
        headers=bearer(make_token("alice", iat=1_000_000_000, exp=1_000_000_600)),
    )
    assert (missing.status_code, expired.status_code) == (401, 401)
    reasons = [logs.event(r, "authentication_failed")["reason"] for r in (missing, expired)]
    assert all(reasons) and reasons[0] != reasons[1]  # the internal reason tells the two apart


async def test_scope_denial_is_logged_with_the_subject(
    client: httpx.AsyncClient, logs: LogLines, make_token: TokenFactory
) -> None:
    org_id = await create_org(client, make_token("alice"))
    response = await client.get(f"/api/v1/orgs/{org_id}", headers=bearer(make_token("alice", scope="orgs:write")))
    assert response.status_code == 403
    denied = logs.event(response, "scope_denied")
    assert denied["subject"] == pseudonym(principal("alice"))
    assert denied["route"] == "/api/v1/orgs/{org_id}"


async def test_object_denial_is_logged_with_the_subject(
    client: httpx.AsyncClient, logs: LogLines, make_token: TokenFactory
) -> None:
    org_id = await create_org(client, make_token("alice"))
    response = await client.get(f"/api/v1/orgs/{org_id}", headers=bearer(make_token("mallory")))
    assert response.status_code == 403
    assert logs.event(response, "object_denied")["subject"] == pseudonym(principal("mallory"))


async def test_validation_failure_is_logged_with_field_locations_only(
    client: httpx.AsyncClient, logs: LogLines, make_token: TokenFactory
) -> None:
    response = await client.post("/api/v1/orgs", json={"name": "", "owner": "x-injected"}, headers=bearer(make_token()))
    assert response.status_code == 400
    failed = logs.event(response, "validation_failed")
    assert set(failed["locations"]) == {"body.name", "body.owner"}
    assert "x-injected" not in logs.text


async def test_body_too_large_is_logged(settings_for: Callable[..., Settings], make_token: TokenFactory) -> None:
    app = create_app(settings_for(max_body_bytes=1024))
    with captured_logs() as logs:
        async with running(app) as client:
            response = await client.post("/api/v1/orgs", content=b"x" * 2048, headers=bearer(make_token()))
    assert response.status_code == 413
    assert logs.event(response, "body_too_large")["limit"] == 1024


async def test_cors_refusal_is_logged(client: httpx.AsyncClient, logs: LogLines) -> None:
    preflight = await client.options(
        "/api/v1/orgs", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 403
    assert logs.event(preflight, "cors_refused")["origin"] == "https://evil.example"


async def test_untrusted_host_is_logged(client: httpx.AsyncClient, logs: LogLines) -> None:
    response = await client.get("/health/live", headers={"Host": "evil.example"})
    assert response.status_code == 400
    logs.event(response, "host_refused")


async def test_rate_limit_rejection_is_logged(settings_for: Callable[..., Settings]) -> None:
    app = create_app(settings_for(rate_limit_ip="2/minute"))
    with captured_logs() as logs:
        async with running(app) as client:
            responses = [await client.get("/api/v1/orgs/00000000-0000-0000-0000-000000000000") for _ in range(3)]
    assert [r.status_code for r in responses] == [401, 401, 429]
    assert logs.event(responses[2], "rate_limited")["client"] == pseudonym("203.0.113.7")


async def test_dependency_failure_is_logged(settings_for: Callable[..., Settings]) -> None:
    app = create_app(settings_for(redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.2))
    with captured_logs() as logs:
        async with running(app, reset=False) as client:
            response = await client.get("/api/v1/orgs/00000000-0000-0000-0000-000000000000")
    assert response.status_code == 503
    assert logs.event(response, "dependency_unavailable")["dependency"] == "redis"


# --- the append-only table ----------------------------------------------------------------------


async def audit_rows(app: FastAPI, trace_id: str) -> list[dict[str, Any]]:
    engine = create_engine(owner_url(app.state.runtime.settings.database_url))
    try:
        async with engine.connect() as connection:
            result = await connection.execute(
                text("SELECT event, subject, client, route FROM audit_events WHERE trace_id = :t ORDER BY id"),
                {"t": trace_id},
            )
            return [dict(row._mapping) for row in result]
    finally:
        await engine.dispose()


async def test_events_are_appended_to_the_audit_table_pseudonymized_when_enabled(
    settings_for: Callable[..., Settings], make_token: TokenFactory
) -> None:
    app = create_app(settings_for(audit_db_enabled=True))
    statements: list[str] = []
    event.listen(
        app.state.runtime.engine.sync_engine,
        "before_cursor_execute",
        lambda _c, _cur, statement, *_: statements.append(statement),
    )
    async with running(app) as client:
        org_id = await create_org(client, make_token("ann@example.org"))
        denied = await client.get(f"/api/v1/orgs/{org_id}", headers=bearer(make_token("bob@example.org")))
    # Leaving `running` stopped the sink, which wrote what was queued.
    rows = await audit_rows(app, denied.headers["x-trace-id"])
    assert [row["event"] for row in rows] == ["authz_decision", "object_denied"]  # the decision, the refusal
    assert {row["subject"] for row in rows} == {pseudonym(principal("bob@example.org"))}
    assert {row["client"] for row in rows} == {pseudonym("203.0.113.7")}
    assert {row["route"] for row in rows} == {"/api/v1/orgs/{org_id}"}
    sink_statements = [s for s in statements if "audit_events" in s]
    assert sink_statements and all(s.lstrip().upper().startswith("INSERT") for s in sink_statements)


async def test_no_event_reaches_the_table_by_default(client: httpx.AsyncClient, app: FastAPI) -> None:
    response = await client.get("/api/v1/orgs/00000000-0000-0000-0000-000000000000")
    assert response.status_code == 401
    assert app.state.runtime.audit_sink is None
    assert await audit_rows(app, response.headers["x-trace-id"]) == []


@pytest.mark.parametrize("statement", ["UPDATE audit_events SET subject = 'someone else'", "DELETE FROM audit_events"])
async def test_the_audit_table_refuses_updates_and_deletes(
    settings_for: Callable[..., Settings], make_token: TokenFactory, statement: str
) -> None:
    app = create_app(settings_for(audit_db_enabled=True))
    async with running(app) as client:
        await client.get("/api/v1/orgs/00000000-0000-0000-0000-000000000000")
    engine = create_engine(owner_url(app.state.runtime.settings.database_url))
    try:
        async with engine.connect() as connection:
            assert (await connection.scalar(text("SELECT count(*) FROM audit_events"))) > 0
        with pytest.raises(DBAPIError, match="append-only"):
            async with engine.begin() as connection:
                await connection.execute(text(statement))
    finally:
        await engine.dispose()


# --- client addresses (LOG_CLIENT_ADDRESS) --------------------------------------------------------

ADDRESSES = {"ipv4": "203.0.113.7", "ipv6": "2001:db8:abcd:12::7"}
WRITTEN = {
    ("full", "ipv4"): "203.0.113.7",
    ("full", "ipv6"): "2001:db8:abcd:12::7",
    ("truncated", "ipv4"): "203.0.113.0/24",
    ("truncated", "ipv6"): "2001:db8:abcd::/48",
    ("pseudonym", "ipv4"): pseudonym("203.0.113.7"),
    ("pseudonym", "ipv6"): pseudonym("2001:db8:abcd:12::7"),
}


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("mode", ["full", "truncated", "pseudonym"])
async def test_the_client_address_is_written_as_log_client_address_says_in_lines_events_and_audit_rows(
    settings_for: Callable[..., Settings], make_token: TokenFactory, mode: str, family: str
) -> None:
    address = ADDRESSES[family]
    app = create_app(settings_for(audit_db_enabled=True, log_client_address=mode))
    with captured_logs() as logs:
        async with running(app, client=(address, 4711)) as client:
            org_id = await create_org(client, make_token("ann"))
            denied = await client.get(f"/api/v1/orgs/{org_id}", headers=bearer(make_token("bob")))
    assert denied.status_code == 403
    written = WRITTEN[mode, family]
    assert logs.request_line(denied)["client"] == written
    assert logs.event(denied, "object_denied")["client"] == written
    rows = await audit_rows(app, denied.headers["x-trace-id"])
    assert [row["client"] for row in rows] == [written, written]  # authz_decision, object_denied
    if mode != "full":
        assert address not in logs.text and address not in json.dumps(rows)


async def test_rate_limits_count_the_real_address_whatever_the_log_writes(
    settings_for: Callable[..., Settings],
) -> None:
    """Truncated, 203.0.113.7 and 203.0.113.8 are written alike; they are limited apart."""
    app = create_app(settings_for(rate_limit_ip="2/minute", log_client_address="truncated"))
    path = "/api/v1/orgs/00000000-0000-0000-0000-000000000000"
    with captured_logs() as logs:
        async with running(app, client=("203.0.113.7", 4711)) as first:
            transport = httpx.ASGITransport(app=app, client=("203.0.113.8", 4711))
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as neighbour:
                limited = [(await first.get(path)).status_code for _ in range(3)]
                other = await neighbour.get(path)
    assert limited == [401, 401, 429]
    assert other.status_code == 401
    assert logs.request_line(other)["client"] == "203.0.113.0/24"


@pytest.mark.parametrize(
    ("address", "written"),
    [
        ("198.51.100.255", "198.51.100.0/24"),
        ("::ffff:198.51.100.7", "198.51.100.0/24"),  # an IPv4 client on a dual-stack socket
        ("2001:db8:ffff:ffff::1", "2001:db8:ffff::/48"),
        ("::1", "::/48"),
        ("testclient", "unknown"),  # not an address: nothing of it is written
    ],
)
def test_a_truncated_address_keeps_its_network_only(address: str, written: str) -> None:
    assert truncate(address) == written
