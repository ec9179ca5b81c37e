"""The composition model (README, Decision matrix): mTLS, scoped API keys and signed webhooks in one
production service, each row a test. The service runs with ENVIRONMENT=production through `serve`,
in three shapes: terminating TLS itself; behind the shipped nginx at its one address (a sidecar's),
which verifies the client certificate and forwards it (checked again against MTLS_PROXY_CLIENT_CA);
and behind nginx that connects to the service's own TLS with a certificate of its own (an ingress
controller's, MTLS_PROXY_IDENTITIES). Keys are issued and
revoked with the operators' CLI; a real redis-server and the configured database throughout.

Baked only with all three credential options (the post-gen hook removes it otherwise).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from redis.asyncio import Redis

from {{ cookiecutter.package_name }}.cli import main
from {{ cookiecutter.package_name }}.options.webhooks.outbound import generate_secret, new_message_id, sign
from {{ cookiecutter.package_name }}.security.lockout import Lockout

from .certificates import client_certificate, make_ca, server_certificate
from .conftest import AUDIENCE, ISSUER, PSEUDONYM_KEY, TokenFactory, bearer, principal
from .servers import LOOPBACK
from .test_authn import UNUSABLE_AUTHORIZATION, authorization
from .test_mtls import (
    LISTED,
    PROXY,
    READER,
    UNLISTED,
    UNTRUSTED_PEER,
    Pki,
    Served,
    escaped,
    from_peer,
    nginx_verifying_clients,
    serving,
)

MANAGER = "spiffe://example.org/ns/partners/sa/key-manager"
IDENTITIES = {
    LISTED: ["orgs:read", "orgs:write"],
    READER: ["orgs:read"],
    MANAGER: ["orgs:read", "api-keys:read", "api-keys:write"],
}
PEPPER = "tests-api-key-pepper-0123456789abcdef"  # conftest's option_secrets, which the CLI reads
PARTNER_SECRET = generate_secret()
ORGS = "/api/v1/orgs"
KEYS = "/api/v1/api-keys"
WEBHOOK = "/api/v1/webhooks/acme"
ALL_SCOPES = "orgs:read orgs:write api-keys:read api-keys:write"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway workload CA, the server's certificate and the workloads' (one per identity)."""
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca("Workload CA")
    ca_file = directory / "ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    pki = Pki(directory, ca, ca_file, server_certificate(ca).write(directory, "server"))
    pki.clients = {
        "listed": client_certificate(ca, spiffe_id=LISTED),
        "reader": client_certificate(ca, spiffe_id=READER),
        "manager": client_certificate(ca, spiffe_id=MANAGER),
        "unlisted": client_certificate(ca, spiffe_id=UNLISTED),
        "self-signed": client_certificate(None, spiffe_id=LISTED),
        "proxy": client_certificate(ca, spiffe_id=PROXY),  # the ingress controller's own
    }
    return pki


@pytest.fixture(scope="module")
def production(migrated_database: str, redis_url: str, public_pem: str) -> dict[str, str]:
    """A production service with all three options: everything production requires, and nothing
    relaxed but the limits (this module sends many refused credentials from one address)."""
    return {
        "ENVIRONMENT": "production",
        "DATABASE_URL": migrated_database,
        # A database of its own: this module's refusals do not lock out other modules' clients.
        "REDIS_URL": redis_url.rsplit("/", 1)[0] + "/6",
        "JWT_PUBLIC_KEY": public_pem,
        "JWT_ISSUER": ISSUER,
        "JWT_AUDIENCE": AUDIENCE,
        "TRUSTED_HOSTS": f"{LOOPBACK},localhost",
        "AUDIT_PSEUDONYM_KEY": PSEUDONYM_KEY,
        "API_KEY_PEPPER": PEPPER,
        "MTLS_IDENTITIES": json.dumps(IDENTITIES),
        "WEBHOOK_SECRETS": json.dumps({"acme": PARTNER_SECRET}),
        "RATE_LIMIT_IP": "10000/minute",
        "RATE_LIMIT_SUBJECT": "10000/minute",
        "LOCKOUT_FAILURES": "10000",
    }


def tls_files(pki: Pki) -> dict[str, str]:
    cert, key = pki.server_files
    return {"MTLS_SERVER_CERT": str(cert), "MTLS_SERVER_KEY": str(key), "MTLS_CLIENT_CA": str(pki.ca_file)}


@dataclass
class Shape:
    """One way the workload's certificate reaches the service; `client(name)` presents it."""

    name: str
    url: str
    pki: Pki
    service: Served

    def client(self, certificate: str | None) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.pki.context(certificate), timeout=10)


@pytest.fixture(scope="module")
def behind_nginx(pki: Pki, production: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Plain HTTP behind nginx (127.0.0.1, the one proxy address, as a sidecar's), checking what it
    forwards. TRUSTED_PROXIES is a whole range, as a pod network is: its other addresses are no proxy."""
    env = {
        **production,
        "TRUSTED_PROXIES": "127.0.0.0/8",
        "MTLS_PROXY_ADDRESSES": LOOPBACK,
        "MTLS_PROXY_CLIENT_CA": str(pki.ca_file),
    }
    with serving(tmp_path_factory.mktemp("behind-nginx"), env) as served:
        yield served


@pytest.fixture(scope="module", params=["serve-tls", "nginx", "nginx-over-mtls"])
def shape(
    request: pytest.FixtureRequest, pki: Pki, production: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Shape]:
    if request.param == "serve-tls":
        with serving(tmp_path_factory.mktemp("serve-tls"), {**production, **tls_files(pki)}) as served:
            yield Shape("serve-tls", served.url, pki, served)
    elif request.param == "nginx-over-mtls":
        env = {
            **production,
            **tls_files(pki),
            "MTLS_PROXY_IDENTITIES": json.dumps([PROXY]),
            "MTLS_PROXY_CLIENT_CA": str(pki.ca_file),
        }
        with (
            serving(tmp_path_factory.mktemp("nginx-over-mtls"), env) as served,
            nginx_verifying_clients(pki, served.port, upstream_certificate="proxy") as url,
        ):
            yield Shape("nginx-over-mtls", url, pki, served)
    else:
        served = request.getfixturevalue("behind_nginx")
        with nginx_verifying_clients(pki, served.port) as url:
            yield Shape("nginx", url, pki, served)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, production: dict[str, str]) -> Callable[..., Any]:
    """The operators' `api-key` commands, against the service's database and Redis."""
    for name in ("DATABASE_URL", "REDIS_URL", "JWT_PUBLIC_KEY", "JWT_ISSUER", "JWT_AUDIENCE", "API_KEY_PEPPER"):
        monkeypatch.setenv(name, production[name])
    monkeypatch.setenv("ENVIRONMENT", "test")

    async def run(*argv: str) -> int:
        return await anyio.to_thread.run_sync(main, list(argv))

    return run


async def issue_key(cli: Callable[..., Any], capsys: pytest.CaptureFixture[str], *scopes: str) -> str:
    assert await cli("api-key", "issue", "--owner", "partner-admin", "--scope", " ".join(scopes)) == 0
    key: str = capsys.readouterr().out.strip()
    return key


def api_key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


# The caller credentials' challenges when none was sent: the API key's, DPoP's (with the proof
# algorithms it accepts, DPOP_ALGORITHMS) and the bearer token's.
CALLER_CHALLENGES = 'ApiKey, DPoP algs="ES256 ES384 EdDSA PS256 RS256", Bearer'


def assert_401(response: httpx.Response, challenge: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 401
    assert response.headers["www-authenticate"] == challenge


def create_org(http: httpx.Client, headers: dict[str, str] | None = None) -> httpx.Response:
    return http.post(ORGS, json={"name": "Acme"}, headers=headers)


def webhook(
    http: httpx.Client, *, message_id: str | None = None, extra: dict[str, str] | None = None
) -> httpx.Response:
    content = json.dumps({"type": "invoice.paid", "data": {}}).encode()
    headers = sign(PARTNER_SECRET, message_id or new_message_id(), int(time.time()), content)
    return http.post(WEBHOOK, content=content, headers={**headers, "Content-Type": "application/json", **(extra or {})})


# --- The API: the workload, and the caller within it -------------------------------------------


def test_a_workload_alone_is_the_principal_with_its_own_scopes(shape: Shape) -> None:
    with shape.client("listed") as http:
        created = create_org(http)
        assert created.status_code == 201, created.text
        assert http.get(f"{ORGS}/{created.json()['id']}").status_code == 200
    with shape.client("reader") as http:
        assert create_org(http).status_code == 403


async def test_an_api_key_with_a_wrong_secret_is_refused_whatever_the_certificate(
    shape: Shape, cli: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    key = await issue_key(cli, capsys, "orgs:read", "orgs:write")
    prefix, key_id, secret = key.split("_")
    wrong = f"{prefix}_{key_id}_{'0' * len(secret)}"
    with shape.client("listed") as http:
        assert_401(create_org(http, api_key(wrong)), 'ApiKey error="invalid_token"')
        assert_401(http.get(ORGS + "/x", headers=api_key(wrong)), 'ApiKey error="invalid_token"')


def test_a_malformed_api_key_is_refused_whatever_the_certificate(shape: Shape) -> None:
    with shape.client("listed") as http:
        assert_401(create_org(http, api_key("garbage")), 'ApiKey error="invalid_token"')
        assert_401(create_org(http, {"Authorization": "ApiKey"}), 'ApiKey error="invalid_token"')


async def test_the_key_is_the_principal_with_the_scopes_both_it_and_the_workload_hold(
    shape: Shape, cli: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    read_only = await issue_key(cli, capsys, "orgs:read")
    read_write = await issue_key(cli, capsys, "orgs:read", "orgs:write")
    with shape.client("listed") as http:
        assert create_org(http, api_key(read_only)).status_code == 403  # the key's scopes limit the workload's
        created = create_org(http, api_key(read_write))
        assert created.status_code == 201, created.text
        org = f"{ORGS}/{created.json()['id']}"
        # The key owns what it created, not the workload it came through.
        assert http.get(org, headers=api_key(read_write)).status_code == 200
        assert http.get(org).status_code == 403
    with shape.client("reader") as http:
        assert create_org(http, api_key(read_write)).status_code == 403  # the workload's limit the key's


async def test_a_key_revoked_with_the_cli_is_refused_with_a_certificate(
    shape: Shape, cli: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    key = await issue_key(cli, capsys, "orgs:read", "orgs:write")
    with shape.client("listed") as http:
        assert create_org(http, api_key(key)).status_code == 201  # looked up: now reused by the replica
        assert await cli("api-key", "revoke", key.split("_")[1]) == 0
        assert_401(create_org(http, api_key(key)), 'ApiKey error="invalid_token"')


def test_a_token_is_the_principal_within_the_workload_and_a_bad_one_is_refused(
    shape: Shape, make_token: TokenFactory
) -> None:
    token = make_token("alice", ALL_SCOPES)
    with shape.client("listed") as http:
        created = create_org(http, bearer(token))
        assert created.status_code == 201, created.text
        assert http.get(f"{ORGS}/{created.json()['id']}", headers=bearer(token)).status_code == 200  # alice's
        assert_401(create_org(http, bearer(token[:-2])), 'Bearer error="invalid_token"')
    with shape.client("reader") as http:
        assert create_org(http, bearer(token)).status_code == 403


async def test_two_caller_credentials_are_refused_even_when_both_verify(
    shape: Shape, make_token: TokenFactory, cli: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    key = await issue_key(cli, capsys, "orgs:read", "orgs:write")
    with shape.client("listed") as http:
        refused = create_org(http, {**api_key(key), **bearer(make_token("alice", ALL_SCOPES))})
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("case", UNUSABLE_AUTHORIZATION)
async def test_an_unusable_authorization_header_is_refused_and_counted_whatever_the_certificate(
    shape: Shape, production: dict[str, str], make_token: TokenFactory, case: str
) -> None:
    """Issue 28, finding 3: with a good workload certificate, `Basic` then `Bearer <garbage>`, a
    tab after `Bearer` or an unknown scheme were passed over and the workload answered 201. Each is
    a credential presented: refused with the schemes the service accepts, counted for the address."""
    values, reason = UNUSABLE_AUTHORIZATION[case]
    failures = Lockout._keys(LOOPBACK)[0]  # the address's failure count (both shapes: the client is on loopback)
    redis = Redis.from_url(production["REDIS_URL"])
    try:
        await redis.delete(failures)
        with shape.client("listed") as http:
            token = make_token("alice", ALL_SCOPES)
            refused = http.post(ORGS, json={"name": "Acme"}, headers=authorization(values, token))
        if shape.name.startswith("nginx") and reason == "several_authorization_headers":
            # The shipped nginx refuses a repeated Authorization header itself: it never reaches the service.
            assert refused.status_code == 400
            assert refused.headers["content-type"] == "application/problem+json"
            return
        assert_401(refused, CALLER_CHALLENGES)
        assert int(await redis.get(failures) or 0) == 1
    finally:
        await redis.aclose()
    assert reason in [event.get("reason") for event in shape.service.events("authentication_failed")]


async def test_a_token_whose_sub_is_a_keys_or_a_workloads_id_is_neither(
    pki: Pki,
    production: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    cli: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
    make_token: TokenFactory,
) -> None:
    """Issue 28, finding 10 (ASVS V10.3.3): a token whose `sub` is `apikey:<id>` of a real key, or a
    workload's SPIFFE ID, gets none of that principal's objects, and none of its rate limit."""
    key = await issue_key(cli, capsys, "orgs:read", "orgs:write")
    key_id = key.split("_")[1]
    env = {**production, **tls_files(pki), "RATE_LIMIT_SUBJECT": "3/minute"}
    with serving(tmp_path_factory.mktemp("namespaces"), env) as served:
        async with httpx.AsyncClient(base_url=served.url, verify=pki.context("listed"), timeout=10) as http:
            by_key = await http.post(ORGS, json={"name": "Acme"}, headers=api_key(key))
            assert by_key.status_code == 201, by_key.text
            by_workload = await http.post(ORGS, json={"name": "Acme"})
            assert by_workload.status_code == 201, by_workload.text
            keys_org, workloads_org = (f"{ORGS}/{r.json()['id']}" for r in (by_key, by_workload))
            as_key = bearer(make_token(f"apikey:{key_id}", ALL_SCOPES))
            as_workload = bearer(make_token(LISTED, ALL_SCOPES))
            assert (await http.get(keys_org, headers=as_key)).status_code == 403
            assert (await http.get(workloads_org, headers=as_workload)).status_code == 403
            assert (await http.get(keys_org, headers=as_key)).status_code == 403  # the token's 3rd request
            # The key has made one request: its own bucket has room, whatever the token spent.
            assert (await http.get(keys_org, headers=api_key(key))).status_code == 200


def test_a_certificate_the_service_does_not_list_is_refused_whatever_else_is_sent(
    shape: Shape, make_token: TokenFactory
) -> None:
    with shape.client("unlisted") as http:
        assert_401(create_org(http, bearer(make_token("alice", ALL_SCOPES))), 'mTLS error="invalid_token"')


# --- Webhooks: the signature, within an allowed workload ----------------------------------------


def test_a_signed_webhook_is_accepted_with_a_certificate_and_replays_are_not(shape: Shape) -> None:
    message_id = new_message_id()
    with shape.client("reader") as http:  # any listed workload: the signature, not its scopes, decides
        accepted = webhook(http, message_id=message_id)
        assert accepted.status_code == 204, accepted.text
        assert_401(webhook(http, message_id=message_id), 'Webhook error="invalid_token"')


def test_a_webhook_sent_with_another_caller_credential_is_refused_without_spending_its_id(
    shape: Shape, make_token: TokenFactory
) -> None:
    message_id = new_message_id()
    with shape.client("listed") as http:
        refused = webhook(http, message_id=message_id, extra=bearer(make_token("alice", ALL_SCOPES)))
        assert refused.status_code == 401
        assert webhook(http, message_id=message_id).status_code == 204  # the same message, alone


def test_a_webhook_with_a_bad_signature_is_refused_with_a_certificate(shape: Shape) -> None:
    with shape.client("listed") as http:
        content = b'{"type": "invoice.paid"}'
        headers = sign(generate_secret(), new_message_id(), int(time.time()), content)
        assert_401(http.post(WEBHOOK, content=content, headers=headers), 'Webhook error="invalid_token"')


# --- The key-management API: a token, within the workload ----------------------------------------


async def test_keys_are_managed_with_a_token_only_and_within_the_workloads_scopes(
    shape: Shape, make_token: TokenFactory, cli: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    token = bearer(make_token("alice", ALL_SCOPES))
    body = {"name": "partner", "scopes": ["orgs:read"]}
    key = await issue_key(cli, capsys, "orgs:read")
    with shape.client("manager") as http:
        issued = http.post(KEYS, json=body, headers=token)
        assert issued.status_code == 201, issued.text
        assert issued.json()["subject"].startswith("apikey:")
        assert http.post(KEYS, json=body).status_code == 403  # the workload alone
        assert http.post(KEYS, json=body, headers=api_key(key)).status_code == 403  # an API key
    with shape.client("listed") as http:
        assert http.post(KEYS, json=body, headers=token).status_code == 403  # the workload lacks api-keys:write


# --- Health: public --------------------------------------------------------------------------------


def test_health_needs_no_caller_credential(shape: Shape, behind_nginx: Served) -> None:
    with shape.client("reader") as http:
        assert http.get("/health/live").status_code == 200
    with from_peer(behind_nginx, LOOPBACK) as direct:  # no certificate at all
        assert direct.get("/health/live").status_code == 200


# --- Without a certificate nothing under /api/ is reached -----------------------------------------


async def test_without_a_certificate_no_credential_reaches_the_api(
    shape: Shape,
    behind_nginx: Served,
    make_token: TokenFactory,
    cli: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = await issue_key(cli, capsys, "orgs:read", "orgs:write")
    with shape.client(None) as http:
        if shape.name == "serve-tls":
            with pytest.raises(httpx.TransportError):  # the handshake requires one
                create_org(http, api_key(key))
        else:
            assert create_org(http, api_key(key)).status_code == 400  # nginx: no required certificate
    # From the trusted proxy's own address, with nothing forwarded: the service itself refuses.
    with from_peer(behind_nginx, LOOPBACK) as direct:
        for headers in (api_key(key), bearer(make_token("alice", ALL_SCOPES))):
            assert_401(create_org(direct, headers), 'mTLS error="invalid_token"')
        assert_401(webhook(direct), 'mTLS error="invalid_token"')


def test_a_peer_in_the_proxies_range_that_is_not_the_proxy_cannot_forward_a_certificate(
    behind_nginx: Served, pki: Pki, make_token: TokenFactory
) -> None:
    # A pod of the network TRUSTED_PROXIES names, with a copy of a listed workload's (public) certificate.
    copied = {"X-Client-Cert": escaped(pki.clients["listed"])}
    with from_peer(behind_nginx, UNTRUSTED_PEER) as pod:
        assert_401(create_org(pod, copied), 'mTLS error="invalid_token"')
        assert_401(create_org(pod, {**copied, **bearer(make_token("alice", ALL_SCOPES))}), 'mTLS error="invalid_token"')
    reasons = [event["reason"] for event in behind_nginx.events("client_certificate_refused")]
    assert "forwarded_certificate_from_untrusted_peer" in reasons


def test_a_forwarded_certificate_not_issued_by_the_proxy_client_ca_is_refused(behind_nginx: Served, pki: Pki) -> None:
    # A proxy that forwards a certificate it did not verify: a self-signed one naming a listed workload.
    with from_peer(behind_nginx, LOOPBACK) as proxy:
        assert_401(
            create_org(proxy, {"X-Client-Cert": escaped(pki.clients["self-signed"])}), 'mTLS error="invalid_token"'
        )
        assert create_org(proxy, {"X-Client-Cert": escaped(pki.clients["listed"])}).status_code == 201
    reasons = [event["reason"] for event in behind_nginx.events("client_certificate_refused")]
    assert "forwarded_certificate_not_issued_by_ca" in reasons


# --- Mode mtls+jwt: the caller's credential is required ---------------------------------------------


@pytest.fixture(scope="module")
def mtls_jwt(pki: Pki, production: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shape]:
    env = {**production, **tls_files(pki), "MTLS_MODE": "mtls+jwt"}
    with serving(tmp_path_factory.mktemp("mtls-jwt"), env) as served:
        yield Shape("serve-tls", served.url, pki, served)


async def test_in_mtls_jwt_mode_the_workload_alone_is_refused_with_the_callers_challenge(
    mtls_jwt: Shape, make_token: TokenFactory, cli: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    key = await issue_key(cli, capsys, "orgs:read", "orgs:write")
    with mtls_jwt.client("listed") as http:
        assert_401(create_org(http), CALLER_CHALLENGES)  # no caller credential: what is missing is asked for
        # A refused token is the token's problem (a client refreshes it), not the certificate's.
        assert_401(create_org(http, bearer(make_token("alice", ALL_SCOPES)[:-2])), 'Bearer error="invalid_token"')
        assert create_org(http, bearer(make_token("alice", ALL_SCOPES))).status_code == 201
        assert create_org(http, api_key(key)).status_code == 201  # an API key is a caller credential too
        assert webhook(http).status_code == 204  # and so is a webhook's signature, on its route


def test_the_composed_principal_is_what_the_audit_log_names(shape: Shape, make_token: TokenFactory) -> None:
    from .conftest import pseudonym

    with shape.client("listed") as http:
        assert create_org(http, bearer(make_token("carol", ALL_SCOPES))).status_code == 201
    deadline = time.monotonic() + 5
    subjects: list[Any] = []
    while time.monotonic() < deadline and pseudonym(principal("carol")) not in subjects:
        subjects = [record.get("subject") for record in shape.service.log_records() if record.get("event") == "request"]
        time.sleep(0.05)
    assert pseudonym(principal("carol")) in subjects  # the token's subject, not the workload's
    assert LISTED not in Path(shape.service.log_path).read_text()
