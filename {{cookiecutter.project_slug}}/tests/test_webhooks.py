"""Signed webhooks (the `webhooks` option): verified in layer 4 before the body is parsed, with a
real redis-server remembering message ids and a real database recording the messages."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy import delete, select

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.cli import main as cli_main
from {{ cookiecutter.package_name }}.config import ConfigError, Settings
from {{ cookiecutter.package_name }}.options.webhooks import scan as scan_webhooks
from {{ cookiecutter.package_name }}.options.webhooks.authenticator import ReplayGuard, WebhookSignature, expected_signature
from {{ cookiecutter.package_name }}.options.webhooks.models import WebhookEvent
from {{ cookiecutter.package_name }}.options.webhooks.outbound import generate_secret, new_message_id, sign
from {{ cookiecutter.package_name }}.runtime import Runtime
from {{ cookiecutter.package_name }}.scan.probe import Probe, Scan
from {{ cookiecutter.package_name }}.scan.report import Status

from .conftest import bearer, running
from .servers import RedisServer, free_port, start_redis

# The Standard Webhooks specification's test vector.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

NEW_SECRET = generate_secret()
OLD_SECRET = generate_secret()
OTHER_PARTNER_SECRET = generate_secret()
TOLERANCE = 300
MAX_BODY = 2048
URL = "/api/v1/webhooks/acme"
# A marker in every body sent, that no log line may ever contain.
BODY_MARKER = "body-marker-5f1d2c"


def body(event_type: str = "invoice.paid", **extra: Any) -> bytes:
    return json.dumps({"type": event_type, "data": {"note": BODY_MARKER, **extra}}).encode()


def signed(
    content: bytes, *, secret: str | list[str] = NEW_SECRET, message_id: str | None = None, at: float | None = None
) -> dict[str, str]:
    timestamp = int(time.time() if at is None else at)
    headers = sign(secret, message_id or new_message_id(), timestamp, content)
    return {**headers, "Content-Type": "application/json"}


def secrets_json(**partners: str | list[str]) -> str:
    return json.dumps(partners)


@pytest.fixture(autouse=True)
def webhook_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The option's settings come from the environment, as in production."""
    monkeypatch.setenv("WEBHOOK_SECRETS", secrets_json(acme=[NEW_SECRET, OLD_SECRET], globex=OTHER_PARTNER_SECRET))
    monkeypatch.setenv("WEBHOOK_TOLERANCE_SECONDS", str(TOLERANCE))
    monkeypatch.setenv("WEBHOOK_MAX_BODY_BYTES", str(MAX_BODY))
    monkeypatch.delenv("WEBHOOK_SECRETS_FILE", raising=False)


async def clear_events(runtime: Runtime) -> None:
    async with runtime.sessionmaker() as session:
        await session.execute(delete(WebhookEvent))
        await session.commit()


async def recorded(runtime: Runtime) -> list[tuple[str, str, str]]:
    async with runtime.sessionmaker() as session:
        rows = await session.execute(select(WebhookEvent.partner, WebhookEvent.webhook_id, WebhookEvent.type))
        return sorted((partner, webhook_id, event_type) for partner, webhook_id, event_type in rows.all())


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with running(app) as http:
        await clear_events(app.state.runtime)
        yield http


def refusals(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    return [
        {name: getattr(record, name, None) for name in ("reason", "partner", "webhook_id")}
        for record in records
        if getattr(record, "event", None) == "webhook_refused"
    ]


def assert_401_problem(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == 401


# --- The signature scheme -------------------------------------------------------------------


def test_the_outbound_signer_matches_the_specifications_test_vector() -> None:
    headers = sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
    assert headers == {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TIMESTAMP),
        "webhook-signature": SPEC_SIGNATURE,
    }


def test_the_inbound_verifier_matches_the_specifications_test_vector() -> None:
    key = base64.b64decode(SPEC_SECRET.removeprefix("whsec_"))
    digest = expected_signature(key, SPEC_ID.encode(), str(SPEC_TIMESTAMP).encode(), SPEC_BODY)
    assert "v1," + base64.b64encode(digest).decode() == SPEC_SIGNATURE


def test_the_outbound_signer_signs_once_per_secret_during_a_rotation() -> None:
    headers = sign([NEW_SECRET, OLD_SECRET], "msg_1", 1700000000, b"{}")
    entries = headers["webhook-signature"].split(" ")
    assert len(entries) == 2
    for entry, secret in zip(entries, (NEW_SECRET, OLD_SECRET), strict=True):
        key = base64.b64decode(secret.removeprefix("whsec_"))
        assert (
            entry == "v1," + base64.b64encode(hmac.new(key, b"msg_1.1700000000.{}", hashlib.sha256).digest()).decode()
        )


# --- Accepted -------------------------------------------------------------------------------


async def test_a_signed_webhook_is_recorded_once_and_answered_204(
    client: httpx.AsyncClient, app: FastAPI, audit_events: list[logging.LogRecord]
) -> None:
    content = body()
    headers = signed(content, message_id="msg_first")
    response = await client.post(URL, content=content, headers=headers)
    assert response.status_code == 204, response.text
    assert response.content == b""
    assert await recorded(app.state.runtime) == [("acme", "msg_first", "invoice.paid")]
    received = [r for r in audit_events if getattr(r, "event", None) == "webhook_received"]
    assert [(r.partner, r.webhook_id, r.type, r.duplicate) for r in received] == [  # type: ignore[attr-defined]
        ("acme", "msg_first", "invoice.paid", False)
    ]
    assert received[0].subject == "webhook:acme"  # type: ignore[attr-defined]


@pytest.mark.parametrize("secrets", [[NEW_SECRET], [OLD_SECRET], [NEW_SECRET, OLD_SECRET], [OLD_SECRET, NEW_SECRET]])
async def test_during_a_rotation_either_secret_or_both_signatures_are_accepted(
    client: httpx.AsyncClient, secrets: list[str]
) -> None:
    content = body()
    response = await client.post(URL, content=content, headers=signed(content, secret=secrets))
    assert response.status_code == 204, response.text


async def test_a_retired_secret_is_refused_once_it_is_removed(
    settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEBHOOK_SECRETS", secrets_json(acme=NEW_SECRET))  # the rotation is over
    async with running(create_app(settings_for())) as client:
        content = body()
        assert_401_problem(await client.post(URL, content=content, headers=signed(content, secret=OLD_SECRET)))
        response = await client.post(URL, content=content, headers=signed(content, secret=NEW_SECRET))
        assert response.status_code == 204


async def test_a_signature_among_unknown_versions_and_wrong_signatures_is_found(client: httpx.AsyncClient) -> None:
    content = body()
    headers = signed(content)
    good = headers["webhook-signature"]
    wrong = "v1," + base64.b64encode(b"\0" * 32).decode()
    headers["webhook-signature"] = f"v1a,c2lnbmF0dXJl {wrong} {good}"
    response = await client.post(URL, content=content, headers=headers)
    assert response.status_code == 204, response.text


async def test_a_timestamp_just_inside_the_tolerance_is_accepted_both_ways(client: httpx.AsyncClient) -> None:
    for offset in (-(TOLERANCE - 5), TOLERANCE - 5):
        content = body()
        response = await client.post(URL, content=content, headers=signed(content, at=time.time() + offset))
        assert response.status_code == 204, (offset, response.text)


# --- Refused --------------------------------------------------------------------------------


async def test_a_wrong_signature_is_refused_with_a_401_problem_and_an_audit_event(
    client: httpx.AsyncClient, app: FastAPI, audit_events: list[logging.LogRecord]
) -> None:
    content = body()
    headers = signed(content, secret=generate_secret(), message_id="msg_forged")
    response = await client.post(URL, content=content, headers=headers)
    assert_401_problem(response)
    assert refusals(audit_events) == [{"reason": "bad_signature", "partner": "acme", "webhook_id": "msg_forged"}]
    assert await recorded(app.state.runtime) == []


async def test_a_body_changed_after_signing_is_refused(client: httpx.AsyncClient) -> None:
    content = body()
    headers = signed(content)
    assert_401_problem(await client.post(URL, content=body(amount=1), headers=headers))


async def test_a_message_signed_for_another_partner_is_refused(client: httpx.AsyncClient) -> None:
    content = body()
    headers = signed(content, secret=OTHER_PARTNER_SECRET)
    assert_401_problem(await client.post(URL, content=content, headers=headers))
    assert (await client.post("/api/v1/webhooks/globex", content=content, headers=headers)).status_code == 204


async def test_an_unknown_partner_is_refused(client: httpx.AsyncClient, audit_events: list[logging.LogRecord]) -> None:
    content = body()
    for partner in ("initech", "ACME", "a" * 80, "acme/extra"):
        response = await client.post(f"/api/v1/webhooks/{partner}", content=content, headers=signed(content))
        assert_401_problem(response)
    assert {refusal["reason"] for refusal in refusals(audit_events)} == {"unknown_partner"}
    assert [refusal["partner"] for refusal in refusals(audit_events)] == ["initech", None, None, None]


@pytest.mark.parametrize(
    ("offset", "reason"), [(-(TOLERANCE + 5), "stale_timestamp"), (TOLERANCE + 5, "future_timestamp")]
)
async def test_stale_and_future_timestamps_are_refused(
    client: httpx.AsyncClient, audit_events: list[logging.LogRecord], offset: int, reason: str
) -> None:
    content = body()
    response = await client.post(URL, content=content, headers=signed(content, at=time.time() + offset))
    assert_401_problem(response)
    assert [refusal["reason"] for refusal in refusals(audit_events)] == [reason]


async def test_an_unsigned_request_is_refused(client: httpx.AsyncClient, audit_events: list[logging.LogRecord]) -> None:
    assert_401_problem(await client.post(URL, content=body(), headers={"Content-Type": "application/json"}))
    assert [refusal["reason"] for refusal in refusals(audit_events)] == ["missing_header"]


async def test_a_bearer_token_does_not_open_the_webhook_route(
    client: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    token = make_token("webhook:acme", scope="webhooks:receive")
    assert_401_problem(await client.post(URL, content=body(), headers=bearer(token)))


async def test_a_signed_webhook_opens_no_other_route(client: httpx.AsyncClient) -> None:
    content = body()
    response = await client.post("/api/v1/orgs", content=content, headers=signed(content))
    assert_401_problem(response)
    assert response.json()["type"].endswith(":unauthenticated")
    # A webhook signature is valid on its own route only: not advertised on every 401.
    assert "Webhook" not in response.headers["www-authenticate"]


def malformed_cases() -> Iterator[tuple[str, Callable[[dict[str, str]], list[tuple[str, str]]], str]]:
    def without(name: str) -> Callable[[dict[str, str]], list[tuple[str, str]]]:
        return lambda h: [(k, v) for k, v in h.items() if k != name]

    def replaced(name: str, value: str) -> Callable[[dict[str, str]], list[tuple[str, str]]]:
        return lambda h: [(k, value if k == name else v) for k, v in h.items()]

    def doubled(name: str) -> Callable[[dict[str, str]], list[tuple[str, str]]]:
        return lambda h: [*h.items(), (name, h[name])]

    yield "no id", without("webhook-id"), "missing_header"
    yield "no timestamp", without("webhook-timestamp"), "missing_header"
    yield "no signature", without("webhook-signature"), "missing_header"
    yield "two ids", doubled("webhook-id"), "duplicate_header"
    yield "two signature headers", doubled("webhook-signature"), "duplicate_header"
    yield "id with a space", replaced("webhook-id", "msg 1"), "malformed_id"
    yield "id too long", replaced("webhook-id", "m" * 256), "malformed_id"
    yield "timestamp not a number", replaced("webhook-timestamp", "1700000000.5"), "malformed_timestamp"
    yield "timestamp in ISO form", replaced("webhook-timestamp", "2026-11-30T04:40:00Z"), "malformed_timestamp"
    yield "negative timestamp", replaced("webhook-timestamp", "-1"), "malformed_timestamp"
    yield "signature without version", replaced("webhook-signature", "c2lnbmF0dXJl"), "malformed_signature"
    yield "signature not base64", replaced("webhook-signature", "v1,!!!"), "malformed_signature"
    yield "empty signature", replaced("webhook-signature", ""), "malformed_signature"
    yield "only another version", replaced("webhook-signature", "v1a,c2lnbmF0dXJl"), "no_v1_signature"
    yield "v1 of the wrong length", replaced("webhook-signature", "v1,c2lnbmF0dXJl"), "no_v1_signature"
    yield (
        "too many signatures",
        lambda h: [*without("webhook-signature")(h), ("webhook-signature", " ".join([h["webhook-signature"]] * 11))],
        "malformed_signature",
    )


@pytest.mark.parametrize(("case", "change", "reason"), list(malformed_cases()), ids=[c[0] for c in malformed_cases()])
async def test_malformed_headers_are_refused_with_a_401_problem(
    client: httpx.AsyncClient,
    audit_events: list[logging.LogRecord],
    case: str,
    change: Callable[[dict[str, str]], list[tuple[str, str]]],
    reason: str,
) -> None:
    content = body()
    headers = change(signed(content))
    response = await client.post(URL, content=content, headers=headers)
    assert_401_problem(response)
    assert [refusal["reason"] for refusal in refusals(audit_events)] == [reason], case


async def test_cr_lf_and_quotes_in_the_webhook_id_stay_inside_one_json_line(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """The id is the partner's text: refused as malformed, it is never logged raw, and every log
    line the service's own formatter writes is still one JSON object (a proxy may pass CR and LF)."""
    forged = 'msg_1\r\n{"event": "forged", "webhook_id": "x"}\n"'
    content = body()
    async with running(create_app(settings)) as http:
        capsys.readouterr()
        headers = {**signed(content), "webhook-id": forged}
        assert_401_problem(await http.post(URL, content=content, headers=headers))
        written = capsys.readouterr().out
    lines = [json.loads(line) for line in written.split("\n") if line.strip()]
    refused = [line for line in lines if line.get("event") == "webhook_refused"]
    assert [line["reason"] for line in refused] == ["malformed_id"]
    assert not any(line.get("event") == "forged" or "forged" in str(line.get("webhook_id")) for line in lines)


async def test_an_oversized_body_is_refused_413_before_it_is_read_whole(
    client: httpx.AsyncClient, audit_events: list[logging.LogRecord]
) -> None:
    content = body(padding="x" * MAX_BODY)
    assert len(content) > MAX_BODY
    response = await client.post(URL, content=content, headers=signed(content, message_id="msg_large"))
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("application/problem+json")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused while streaming
        for start in range(0, len(content), 512):
            yield content[start : start + 512]

    response = await client.post(URL, content=chunks(), headers=signed(content, message_id="msg_streamed"))
    assert response.status_code == 413
    assert refusals(audit_events) == [
        {"reason": "body_too_large", "partner": "acme", "webhook_id": "msg_large"},
        {"reason": "body_too_large", "partner": "acme", "webhook_id": "msg_streamed"},
    ]


async def test_an_oversized_declared_body_is_refused_without_reading_it(app: FastAPI) -> None:
    content = body(padding="x" * MAX_BODY)
    headers = signed(content, message_id="msg_declared")
    reads: list[str] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        reads.append("body")
        return {"type": "http.request", "body": content, "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": URL,
        "raw_path": URL.encode(),
        "root_path": "",
        "query_string": b"",
        "client": ("203.0.113.7", 4711),
        "server": ("localhost", 80),
        "headers": [
            (b"host", b"localhost"),
            (b"content-length", str(len(content)).encode()),
            *((name.lower().encode(), value.encode()) for name, value in headers.items()),
        ],
    }
    async with running(app):
        await app(scope, receive, send)
    assert sent[0]["status"] == 413
    assert reads == []


async def test_a_body_just_under_the_limit_is_accepted(client: httpx.AsyncClient) -> None:
    padding = MAX_BODY - len(body(padding=""))
    content = body(padding="x" * padding)
    assert len(content) == MAX_BODY
    assert (await client.post(URL, content=content, headers=signed(content))).status_code == 204


async def test_a_verified_body_that_is_not_a_webhook_payload_is_a_400_problem(client: httpx.AsyncClient) -> None:
    content = b'{"type": "has spaces"}'
    response = await client.post(URL, content=content, headers=signed(content))
    assert response.status_code == 400
    assert response.json()["errors"][0]["loc"] == ["body", "type"]


async def test_a_corrected_redelivery_of_a_message_whose_body_failed_validation_is_accepted(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    # Verified, then refused by validation: the message was not handled, so its id is not spent.
    message_id = new_message_id()
    broken = b'{"type": "has spaces"}'
    assert (await client.post(URL, content=broken, headers=signed(broken, message_id=message_id))).status_code == 400
    corrected = body("invoice.paid")
    response = await client.post(URL, content=corrected, headers=signed(corrected, message_id=message_id))
    assert response.status_code == 204, response.text
    assert await recorded(app.state.runtime) == [("acme", message_id, "invoice.paid")]
    # Handled now: the same message again is a replay.
    assert_401_problem(await client.post(URL, content=corrected, headers=signed(corrected, message_id=message_id)))


async def test_neither_the_body_nor_a_signature_is_ever_logged(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    content = body()
    good = signed(content)
    forged = signed(content, secret=generate_secret())
    for headers in (good, good, forged, signed(content, at=time.time() - 3600)):
        await client.post(URL, content=content, headers=headers)
    await client.post(URL, content=b'{"type": "' + BODY_MARKER.encode() + b' x"}', headers=signed(content))
    logged = [f"{record.getMessage()} {record.__dict__}" for record in caplog.records]
    assert any("webhook_received" in line for line in logged)
    assert any("webhook_refused" in line for line in logged)
    for line in logged:
        assert BODY_MARKER not in line
        for headers in (good, forged):
            for entry in headers["webhook-signature"].split():
                assert entry.removeprefix("v1,") not in line


# --- Replays --------------------------------------------------------------------------------


async def test_a_replay_is_refused_by_another_instance_sharing_redis(
    settings: Settings, audit_events: list[logging.LogRecord], redis: Redis
) -> None:
    content = body()
    headers = signed(content, message_id="msg_replayed")
    first, second = create_app(settings), create_app(settings)
    async with running(first) as one, running(second, reset=False) as two:
        await clear_events(first.state.runtime)
        assert (await one.post(URL, content=content, headers=headers)).status_code == 204
        assert_401_problem(await two.post(URL, content=content, headers=headers))
        assert_401_problem(await one.post(URL, content=content, headers=headers))
        # Re-signed with a new timestamp (as a sender's retry is), the id is still a replay.
        assert_401_problem(await two.post(URL, content=content, headers=signed(content, message_id="msg_replayed")))
        assert await recorded(first.state.runtime) == [("acme", "msg_replayed", "invoice.paid")]
    assert [refusal["reason"] for refusal in refusals(audit_events)] == ["replayed"] * 3
    assert refusals(audit_events)[0]["webhook_id"] == "msg_replayed"
    # Remembered under the partner's hash tag, for the tolerance window of the message's timestamp.
    key = ReplayGuard.key("acme", "msg_replayed")
    assert "{acme}" in key
    ttl = await redis.pttl(key)
    assert (TOLERANCE - 5) * 1000 < ttl <= (TOLERANCE + 1) * 1000


async def test_the_same_id_from_another_partner_is_not_a_replay(client: httpx.AsyncClient) -> None:
    content = body()
    one = signed(content, message_id="msg_shared")
    other = signed(content, secret=OTHER_PARTNER_SECRET, message_id="msg_shared")
    assert (await client.post(URL, content=content, headers=one)).status_code == 204
    assert (await client.post("/api/v1/webhooks/globex", content=content, headers=other)).status_code == 204


async def test_a_refused_signature_does_not_spend_the_id(client: httpx.AsyncClient) -> None:
    """An attacker who sees an id in flight cannot burn it with a forged signature first."""
    content = body()
    forged = signed(content, secret=generate_secret(), message_id="msg_race")
    assert_401_problem(await client.post(URL, content=content, headers=forged))
    assert (await client.post(URL, content=content, headers=signed(content, message_id="msg_race"))).status_code == 204


async def test_a_message_delivered_again_after_the_replay_window_is_recorded_once(
    client: httpx.AsyncClient, app: FastAPI, redis: Redis, audit_events: list[logging.LogRecord]
) -> None:
    content = body()
    assert (await client.post(URL, content=content, headers=signed(content, message_id="msg_again"))).status_code == 204
    await redis.delete(ReplayGuard.key("acme", "msg_again"))  # the window has passed
    assert (await client.post(URL, content=content, headers=signed(content, message_id="msg_again"))).status_code == 204
    assert await recorded(app.state.runtime) == [("acme", "msg_again", "invoice.paid")]
    duplicates = [r.duplicate for r in audit_events if getattr(r, "event", None) == "webhook_received"]  # type: ignore[attr-defined]
    assert duplicates == [False, True]


async def test_a_message_the_handler_failed_on_can_be_retried(
    settings_for: Callable[..., Settings], settings: Settings, unreachable_database_url: str
) -> None:
    """The database is down: 503, and the id is forgotten so that the sender's retry gets through."""
    content = body()
    broken, healthy = create_app(settings_for(database_url=unreachable_database_url)), create_app(settings)
    async with running(healthy) as ok:
        await clear_events(healthy.state.runtime)
        async with running(broken, reset=False) as failing:
            response = await failing.post(URL, content=content, headers=signed(content, message_id="msg_retry"))
            assert response.status_code == 503
            assert response.headers["content-type"].startswith("application/problem+json")
        retry = signed(content, message_id="msg_retry")
        assert (await ok.post(URL, content=content, headers=retry)).status_code == 204
        assert await recorded(healthy.state.runtime) == [("acme", "msg_retry", "invoice.paid")]


@pytest.fixture
def unreachable_database_url() -> str:
    from .conftest import UNREACHABLE_DATABASE_URL

    return UNREACHABLE_DATABASE_URL


# --- Redis down -----------------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, to kill."""
    server = start_redis(tmp_path)
    yield server
    server.stop()


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_down_refuses_webhooks_with_503_in_either_failure_mode(
    settings_for: Callable[..., Settings],
    private_redis: RedisServer,
    audit_events: list[logging.LogRecord],
    mode: str,
) -> None:
    """Without the replay check a webhook is not accepted: 503 (the sender retries), never 500 or 204."""
    app = create_app(settings_for(redis_url=private_redis.url, rate_limit_failure_mode=mode))
    async with running(app) as client:
        await clear_events(app.state.runtime)
        private_redis.kill()
        try:
            content = body()
            response = await client.post(URL, content=content, headers=signed(content))
            assert response.status_code == 503, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.headers["retry-after"] == "1"
            assert await recorded(app.state.runtime) == []
        finally:
            private_redis.restart()
        # Back without a restart of the service.
        content = body()
        assert (await client.post(URL, content=content, headers=signed(content))).status_code == 204
    if mode == "open":  # past the address limit, the replay check itself refused
        assert any(getattr(r, "event", None) == "webhook_replay_check_unavailable" for r in audit_events)


async def test_without_redis_url_replays_are_refused_by_this_process(
    settings_for: Callable[..., Settings],
) -> None:
    app = create_app(settings_for(redis_url=None))
    async with running(app) as client:
        await clear_events(app.state.runtime)
        content = body()
        headers = signed(content)
        assert (await client.post(URL, content=content, headers=headers)).status_code == 204
        assert_401_problem(await client.post(URL, content=content, headers=headers))


# --- Settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not json", "WEBHOOK_SECRETS: must be a JSON object"),
        ('["whsec_x"]', "WEBHOOK_SECRETS: must be a JSON object"),
        ('{"acme": "plain-secret"}', "partner 'acme': a secret must look like whsec_<base64>"),
        ('{"acme": "whsec_!!!!"}', "partner 'acme': a secret is not base64"),
        ('{"acme": "whsec_c2hvcnQ="}', "partner 'acme': a secret must decode to 24 to 64 bytes"),
        ('{"acme": []}', "partner 'acme': give a secret or a non-empty list"),
        ('{"Not A Name": "whsec_x"}', "partner name 'Not A Name' must match"),
    ],
)
def test_invalid_secrets_refuse_to_start_naming_the_setting_and_never_a_secret(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("WEBHOOK_SECRETS", value)
    with pytest.raises(ConfigError, match="WEBHOOK_SECRETS") as raised:
        create_app(settings)
    assert message in str(raised.value)
    assert "c2hvcnQ" not in str(raised.value) and "plain-secret" not in str(raised.value)


async def test_without_webhook_secrets_every_webhook_is_refused(
    settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, audit_events: list[logging.LogRecord]
) -> None:
    monkeypatch.delenv("WEBHOOK_SECRETS")
    async with running(create_app(settings_for())) as client:
        content = body()
        assert_401_problem(await client.post(URL, content=content, headers=signed(content)))
    assert [refusal["reason"] for refusal in refusals(audit_events)] == ["unknown_partner"]


def test_a_world_readable_secrets_file_is_refused_in_production(
    settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secrets_file = tmp_path / "secrets.json"
    secrets_file.write_text(secrets_json(acme=NEW_SECRET))
    secrets_file.chmod(0o644)
    monkeypatch.delenv("WEBHOOK_SECRETS")
    monkeypatch.setenv("WEBHOOK_SECRETS_FILE", str(secrets_file))
    production = settings_for(environment="production", trusted_hosts=["api.example.com"])
    with pytest.raises(ConfigError, match=r"WEBHOOK_SECRETS_FILE: .* is readable by every user"):
        create_app(production)


def test_the_tolerance_is_bounded(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_TOLERANCE_SECONDS", "86400")
    with pytest.raises(ConfigError, match="WEBHOOK_TOLERANCE_SECONDS"):
        create_app(settings)


def test_the_webhook_body_limit_never_exceeds_max_body_bytes(
    settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEBHOOK_MAX_BODY_BYTES", str(10 * 1024 * 1024))
    app = create_app(settings_for(max_body_bytes=4096))
    assert webhook_authenticator(app).max_body_bytes == 4096


def webhook_authenticator(app: FastAPI) -> WebhookSignature:
    runtime: Runtime = app.state.runtime
    (authenticator,) = (a for e in runtime.extensions for a in e.authenticators if isinstance(a, WebhookSignature))
    return authenticator


async def test_secrets_from_a_file_are_rotated_without_a_restart(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secrets_file = tmp_path / "webhook-secrets.json"
    secrets_file.write_text(secrets_json(acme=OLD_SECRET))
    secrets_file.chmod(0o600)
    monkeypatch.delenv("WEBHOOK_SECRETS")
    monkeypatch.setenv("WEBHOOK_SECRETS_FILE", str(secrets_file))
    app = create_app(settings)
    async with running(app) as client:
        await clear_events(app.state.runtime)
        content = body()
        assert (await client.post(URL, content=content, headers=signed(content, secret=OLD_SECRET))).status_code == 204
        assert_401_problem(await client.post(URL, content=content, headers=signed(content, secret=NEW_SECRET)))
        secrets_file.write_text(secrets_json(acme=[NEW_SECRET, OLD_SECRET]))  # the overlap
        await app.state.runtime.secret_files.check()
        assert (await client.post(URL, content=content, headers=signed(content, secret=NEW_SECRET))).status_code == 204
        secrets_file.write_text("{not json")  # a broken file keeps the last good secrets
        await app.state.runtime.secret_files.check()
        assert (await client.post(URL, content=content, headers=signed(content, secret=OLD_SECRET))).status_code == 204
        secrets_file.write_text(secrets_json(acme=NEW_SECRET))  # the rotation is over
        await app.state.runtime.secret_files.check()
        assert_401_problem(await client.post(URL, content=content, headers=signed(content, secret=OLD_SECRET)))


def test_webhook_secrets_and_its_file_together_are_refused(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secrets_file = tmp_path / "secrets.json"
    secrets_file.write_text(secrets_json(acme=NEW_SECRET))
    monkeypatch.setenv("WEBHOOK_SECRETS_FILE", str(secrets_file))
    with pytest.raises(ConfigError, match="WEBHOOK_SECRETS or WEBHOOK_SECRETS_FILE, not both"):
        create_app(settings)


def test_the_cli_generates_a_secret_the_service_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["webhook-secret", "generate"]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32


def test_the_cli_lists_partners_by_fingerprint_never_by_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli_main(["webhook-secret", "list"]) == 0
    out = capsys.readouterr().out
    new_fingerprint = hashlib.sha256(base64.b64decode(NEW_SECRET.removeprefix("whsec_"))).hexdigest()[:12]
    assert f"acme: 2 secret(s): {new_fingerprint}, " in out
    assert "globex: 1 secret(s)" in out
    for secret in (NEW_SECRET, OLD_SECRET, OTHER_PARTNER_SECRET):
        assert secret.removeprefix("whsec_")[:12] not in out
    monkeypatch.setenv("WEBHOOK_SECRETS", "not json")
    assert cli_main(["webhook-secret", "list"]) == 1
    assert "WEBHOOK_SECRETS: must be a JSON object" in capsys.readouterr().err


# --- The self-scan check --------------------------------------------------------------------


class ServedApp:
    """The app in a uvicorn server on a thread, on a free loopback port, for the scan's HTTP client."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, access_log=False, lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def run_scan_check(url: str, secret: str | None) -> Any:
    probe = Probe(url, max_requests=50, max_seconds=30)
    arguments = argparse.Namespace(webhook_partner="acme", webhook_secret=secret, webhook_path="/api/v1/webhooks")
    try:
        return scan_webhooks.check(Scan(probe=probe, token="unused", arguments=arguments))
    finally:
        probe.close()


async def served_scan(app: FastAPI, secret: str | None) -> Any:
    """The scan's messages have fresh random ids, so nothing needs resetting between instances."""
    with ServedApp(app) as url:
        return await asyncio.to_thread(run_scan_check, url, secret)


@pytest.fixture
def scanned_settings(settings_for: Callable[..., Settings]) -> Settings:
    # The scan's refusals count towards 127.0.0.1's lockout; several scans run here.
    return settings_for(lockout_failures=10_000)


async def test_the_scan_check_passes_against_a_healthy_instance(scanned_settings: Settings) -> None:
    result = await served_scan(create_app(scanned_settings), NEW_SECRET)
    assert result.status is Status.PASS, result
    assert result.details["cases"] == {
        "unsigned": 401,
        "forged signature": 401,
        "correctly signed": 204,
        "replayed": 401,
        "stale": 401,
        "future": 401,
    }


async def test_the_scan_check_without_a_secret_is_skipped_after_the_unsigned_cases(
    scanned_settings: Settings,
) -> None:
    result = await served_scan(create_app(scanned_settings), None)
    assert result.status is Status.SKIP, result


async def test_the_scan_check_fails_against_an_instance_that_forgets_ids(scanned_settings: Settings) -> None:
    app = create_app(scanned_settings)

    async def always_first(*_args: object) -> bool:
        return True

    webhook_authenticator(app).replays.first_time = always_first  # type: ignore[method-assign,assignment]
    result = await served_scan(app, NEW_SECRET)
    assert result.status is Status.FAIL
    assert "replayed: answered 204, not 401" in result.reason


async def test_the_scan_check_fails_against_an_instance_that_ignores_timestamps(
    scanned_settings: Settings,
) -> None:
    app = create_app(scanned_settings)
    webhook_authenticator(app).tolerance = 10**9
    result = await served_scan(app, NEW_SECRET)
    assert result.status is Status.FAIL
    assert "stale: answered 204, not 401" in result.reason
    assert "future: answered 204, not 401" in result.reason
