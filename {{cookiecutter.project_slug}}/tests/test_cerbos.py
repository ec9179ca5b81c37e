"""authz_engine=cerbos: the policies as code (compiled and tested by the real `cerbos` binary),
every route's declaration agreeing with them, every decision an audit event, and the failure
mode: a PDP that is down or does not answer is a 503 and a service that is not ready, never an
allow. The example domain's BOLA matrix (test_authz.py, test_orgs_api.py) runs unchanged in this
bake against the session's real PDP (conftest.py `pdp`)."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from {{ cookiecutter.package_name }}.app import create_app
from {{ cookiecutter.package_name }}.config import Settings
from {{ cookiecutter.package_name }}.options.cerbos.extension import CerbosSettings, settings_problems
from {{ cookiecutter.package_name }}.options.cerbos.pdp import Pdp
from {{ cookiecutter.package_name }}.security.authz import SERVICE, Attributes, ObjectRule
from {{ cookiecutter.package_name }}.security.principal import Principal
from {{ cookiecutter.package_name }}.security.route_policy import route_policies
from {{ cookiecutter.package_name }}.tables import Relation

from .conftest import ALL_SCOPES, TokenFactory, bearer, principal, pseudonym, running
from .servers import LOOPBACK, PROJECT_ROOT, CerbosServer, cerbos_executable, free_port
from .test_audit import captured_logs

ORGS = "/api/v1/orgs"


def compile_policies(policies: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [cerbos_executable(), "compile", str(policies)],
        env={"CERBOS_NO_TELEMETRY": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_policies_compile_and_their_tests_pass() -> None:
    result = compile_policies(PROJECT_ROOT / "policies")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[0 OK]" not in result.stdout and "OK]" in result.stdout


def test_a_policy_test_that_fails_fails_the_compile(tmp_path: Path) -> None:
    policies = shutil.copytree(PROJECT_ROOT / "policies", tmp_path / "policies")
    tests = policies / "tests" / "org_test.yaml"
    # The admin may not manage grants (owner only): expecting it to is a failing policy test.
    text = tests.read_text()
    broken = text.replace(
        "resource: as_admin\n        actions:\n          orgs:read: EFFECT_ALLOW\n          orgs:write: EFFECT_DENY",
        "resource: as_admin\n        actions:\n          orgs:read: EFFECT_ALLOW\n          orgs:write: EFFECT_ALLOW",
    )
    assert broken != text
    tests.write_text(broken)
    assert compile_policies(policies).returncode != 0


def _principal(scopes: frozenset[str]) -> Principal:
    return Principal(subject="jwt:0:agreement", scopes=scopes, token_id=None, issued_at=0, expires_at=0)


async def test_every_route_declaration_agrees_with_the_policies(app: FastAPI, pdp: CerbosServer) -> None:
    """For each guarded route: its declared relation with its scopes is allowed, the relation
    below it is not, and neither is its relation without the scopes (the PDP decides; the route's
    words say what it must decide)."""
    checked = 0
    decider = Pdp(CerbosSettings(address=pdp.address))
    async with decider.running():
        for policy in route_policies(app.routes):
            rule = policy.object_rule
            assert isinstance(rule, ObjectRule), policy
            action = "+".join(sorted(policy.scopes))
            scoped, unscoped = _principal(policy.scopes), _principal(frozenset())
            if rule.resource_type is None:
                needed: Attributes = {"scopes": sorted(policy.scopes)}
                assert await decider.decide(scoped, action, SERVICE, SERVICE, needed), policy.route
                assert not await decider.decide(unscoped, action, SERVICE, SERVICE, needed), policy.route
                checked += 1
                continue
            if rule.relation is None or rule.resource_type not in _policy_kinds():
                continue  # an option's own check (the key-management API's owner check)
            kind, required = rule.resource_type, rule.relation
            assert await decider.decide(scoped, action, kind, "x", {"relation": required.value}), policy.route
            assert not await decider.decide(unscoped, action, kind, "x", {"relation": required.value}), policy.route
            for relation in [relation.value for relation in Relation if relation.rank < required.rank] + [""]:
                held: Attributes = {"relation": relation}
                assert not await decider.decide(scoped, action, kind, "x", held), (policy.route, relation)
            checked += 1
    assert checked >= 7


def _policy_kinds() -> set[str]:
    return {path.stem for path in (PROJECT_ROOT / "policies" / "resources").glob("*.yaml")}


async def test_every_decision_is_an_audit_event_with_its_outcome_and_policy(
    settings_for: Callable[..., Settings], make_token: TokenFactory, audit_events: list[logging.LogRecord]
) -> None:
    alice, mallory = bearer(make_token("alice", ALL_SCOPES)), bearer(make_token("mallory", ALL_SCOPES))
    # Allows too (AUDIT_AUTHZ_ALLOWS; denials are events whatever it says, test_authz_decisions.py).
    async with running(create_app(settings_for(audit_authz_allows=True))) as client:
        with captured_logs() as logs:
            org = (await client.post(ORGS, json={"name": "Acme"}, headers=alice)).json()["id"]
            assert (await client.get(f"{ORGS}/{org}", headers=alice)).status_code == 200
            assert (await client.get(f"{ORGS}/{org}", headers=mallory)).status_code == 403
    decisions = [record.__dict__ for record in audit_events if record.getMessage() == "authz_decision"]
    outcomes = [(d["action"], d["resource_type"], d["outcome"], d["policy"]) for d in decisions]
    assert outcomes == [
        ("orgs:write", "service", "allow", "resource.service.vdefault"),
        ("orgs:read", "org", "allow", "resource.org.vdefault"),
        ("orgs:read", "org", "deny", "resource.org.vdefault"),
    ]
    assert [d["relation"] for d in decisions[1:]] == ["owner", ""]
    # Masked like every other event: the log line names the caller by its keyed pseudonym only.
    written = [line for line in logs.records() if line.get("event") == "authz_decision"]
    assert [line["subject"] for line in written] == [pseudonym(principal(sub)) for sub in ("alice", "alice", "mallory")]
    assert [line["outcome"] for line in written] == ["allow", "allow", "deny"]
    assert "alice" not in logs.text and "mallory" not in logs.text


def test_production_refuses_a_pdp_on_another_host_over_plaintext(
    settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    production = settings_for(environment="production")
    monkeypatch.setenv("CERBOS_ADDRESS", "pdp.internal:3593")
    assert [problem.split(":")[0] for problem in settings_problems(production)] == ["CERBOS_ADDRESS"]
    assert settings_problems(settings_for()) == []  # outside production, a development PDP anywhere
    monkeypatch.setenv("CERBOS_ALLOW_PLAINTEXT", "true")
    assert settings_problems(production) == []
    monkeypatch.delenv("CERBOS_ALLOW_PLAINTEXT")
    monkeypatch.setenv("CERBOS_ADDRESS", "127.0.0.1:3593")  # a sidecar
    assert settings_problems(production) == []
    monkeypatch.setenv("CERBOS_ADDRESS", "no-port")
    assert [problem.split(":")[0] for problem in settings_problems(production)] == ["CERBOS_ADDRESS"]


@pytest.fixture
def own_pdp(tmp_path: Path) -> Iterator[CerbosServer]:
    server = CerbosServer(tmp_path)
    yield server
    server.stop()


async def test_a_pdp_that_is_down_is_a_503_and_not_ready(
    settings: Settings, own_pdp: CerbosServer, make_token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CERBOS_ADDRESS", own_pdp.address)
    alice = bearer(make_token("alice", ALL_SCOPES))
    app = create_app(settings)
    async with running(app) as client:
        org = (await client.post(ORGS, json={"name": "Acme"}, headers=alice)).json()["id"]
        assert (await client.get(f"{ORGS}/{org}", headers=alice)).status_code == 200
        assert (await client.get("/health/ready")).json()["checks"]["authorizer"] == "ok"
        own_pdp.kill()
        for answer in (
            await client.get(f"{ORGS}/{org}", headers=alice),
            await client.get(f"{ORGS}/{org}/users", headers=alice),
            await client.post(ORGS, json={"name": "Other"}, headers=alice),
            await client.get(ORGS, headers=alice),
        ):
            assert answer.status_code == 503, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["type"].endswith(":problem:dependency-unavailable")
        app.state.readiness = None  # the answer of a second ago is cached (health.py)
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["authorizer"] == "fail"


@pytest.fixture
def silent_pdp() -> Iterator[str]:
    """A listener that accepts connections and never answers: a PDP that hangs."""
    listener = socket.create_server((LOOPBACK, free_port()))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"{LOOPBACK}:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


async def test_a_pdp_that_does_not_answer_is_a_503_never_an_allow(
    settings: Settings, silent_pdp: str, make_token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CERBOS_ADDRESS", silent_pdp)
    monkeypatch.setenv("CERBOS_TIMEOUT_SECONDS", "0.2")
    async with running(create_app(settings)) as client:
        answer = await client.post(ORGS, json={"name": "Acme"}, headers=bearer(make_token("alice", ALL_SCOPES)))
        assert answer.status_code == 503, answer.text
        assert answer.json()["type"].endswith(":problem:dependency-unavailable")
        assert (await client.get("/health/ready")).json()["checks"]["authorizer"] == "fail"


async def test_a_list_plan_the_service_cannot_write_as_sql_is_refused(
    settings: Settings,
    tmp_path: Path,
    make_token: TokenFactory,
    monkeypatch: pytest.MonkeyPatch,
    audit_events: list[logging.LogRecord],
) -> None:
    """A rule for a listed action with a condition on an attribute the service does not send as a
    column (here the org's name) cannot be applied in the statement: 403, never the unfiltered list."""
    policies = shutil.copytree(PROJECT_ROOT / "policies", tmp_path / "policies")
    org_policy = policies / "resources" / "org.yaml"
    text = org_policy.read_text()
    changed = text.replace("""expr: '"orgs:read" in P.attr.scopes'""", """expr: 'R.attr.name == "open"'""")
    assert changed != text
    org_policy.write_text(changed)
    shutil.rmtree(policies / "tests")
    server = CerbosServer(tmp_path, policies=policies)
    try:
        monkeypatch.setenv("CERBOS_ADDRESS", server.address)
        alice = bearer(make_token("alice", ALL_SCOPES))
        async with running(create_app(settings)) as client:
            assert (await client.post(ORGS, json={"name": "Acme"}, headers=alice)).status_code == 201
            refused = await client.get(ORGS, headers=alice)
            assert refused.status_code == 403, refused.text
            assert refused.json()["type"].endswith(":problem:plan-refused")
            assert "items" not in refused.json()
        plans = [record.__dict__ for record in audit_events if getattr(record, "plan", False)]
        assert [(plan["action"], plan["outcome"]) for plan in plans] == [("orgs:read", "refused")]
        assert any(record.getMessage() == "plan_refused" for record in audit_events)
    finally:
        server.stop()
