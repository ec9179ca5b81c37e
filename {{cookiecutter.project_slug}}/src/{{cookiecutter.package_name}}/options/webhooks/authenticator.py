"""Signed webhooks from partners (Standard Webhooks), verified in layer 4 before the body is parsed.

A partner POSTs to `/api/v1/webhooks/<partner>` with three headers:

- `webhook-id`: the message id, the same on every retry of one message;
- `webhook-timestamp`: when it was sent (Unix seconds);
- `webhook-signature`: space-separated `v1,<base64 HMAC-SHA256>` entries over
  `<id>.<timestamp>.<raw body>`, one per secret the sender signs with (several during a rotation).

`WebhookSignature` is a `BodyAuthenticator` (authn.py): on its path it reads the raw body (at most
WEBHOOK_MAX_BODY_BYTES), and only a request whose id, timestamp (within WEBHOOK_TOLERANCE_SECONDS of
this clock, either way) and signature (by any current secret of the partner in the path, compared in
constant time) check out, and whose id was not seen within the tolerance window, gets a principal:
`webhook:<partner>` with the one scope `webhooks:receive`. Everything else is a 401 problem (413 for
an oversized body), logged as `webhook_refused` with the reason, the partner and the message id,
never the body or a signature. The route then parses the body it replays.

Replays: the id is remembered in Redis (`SET NX PX`, under the partner's hash tag) until the
timestamp it came with leaves the tolerance window; a message replayed after that is stale. When
Redis cannot answer, the webhook is refused with 503 whatever RATE_LIMIT_FAILURE_MODE says: a replay
check that was not made is not one that passed, and senders retry a 503.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn

from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope

from ...config import SERVICE_NAME
from ...security.events import security_event
from ...security.principal import WEBHOOK_NAMESPACE, InvalidCredentials, Principal, app_path
from ...security.revocation import RevocationStoreUnavailable, tag
from ...security.transport import BodyTooLarge
from ...store.core import MemoryStore, RemoteStore, StoreUnavailable

WEBHOOK_PATH = "/api/v1/webhooks/"
WEBHOOK_SCOPE = "webhooks:receive"
SUBJECT_PREFIX = WEBHOOK_NAMESPACE  # principal.py: the namespaces of principal ids
STATE_KEY = "webhook"
WHSEC_PREFIX = "whsec_"  # how a secret is written (Standard Webhooks), not one
# The Standard Webhooks specification: secrets of 24 to 64 random bytes.
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64
MAX_SECRETS_PER_PARTNER = 5
PARTNER_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_PARTNER = re.compile(PARTNER_PATTERN)
# Printable ASCII without space (it separates signatures), as ids like `msg_2KWPBgLlAfxdpx2AI54pPJ85f4W` are.
_MESSAGE_ID = re.compile(rb"[\x21-\x7e]{1,255}")
_TIMESTAMP = re.compile(rb"[0-9]{1,12}")
MAX_SIGNATURES = 10
DIGEST_BYTES = 32
_HEADERS = {b"webhook-id": 0, b"webhook-timestamp": 1, b"webhook-signature": 2}
_KEY_PREFIX = f"{SERVICE_NAME}:webhook:"


# --- Secrets --------------------------------------------------------------------------------


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret; ValueError says what is wrong, never the secret."""
    if not secret.startswith(WHSEC_PREFIX):
        raise ValueError(f"a secret must look like {WHSEC_PREFIX}<base64>")
    try:
        key = base64.b64decode(secret[len(WHSEC_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"a secret is not base64 after {WHSEC_PREFIX}") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ValueError(f"a secret must decode to {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes")
    return key


def parse_secrets(text: str) -> dict[str, tuple[bytes, ...]]:
    """WEBHOOK_SECRETS: a JSON object of partner name to one secret or a list of them (a rotation:
    every listed secret is accepted)."""
    try:
        document = json.loads(text)
    except ValueError:
        raise ValueError("must be a JSON object of partner names to whsec_ secrets") from None
    if not isinstance(document, dict):
        raise ValueError("must be a JSON object of partner names to whsec_ secrets")
    partners: dict[str, tuple[bytes, ...]] = {}
    for partner, value in document.items():
        if not _PARTNER.match(partner):
            raise ValueError(f"partner name {partner[:64]!r} must match {PARTNER_PATTERN}")
        secrets = [value] if isinstance(value, str) else value
        if not isinstance(secrets, list) or not secrets or not all(isinstance(s, str) for s in secrets):
            raise ValueError(f"partner {partner!r}: give a secret or a non-empty list of secrets")
        if len(secrets) > MAX_SECRETS_PER_PARTNER:
            raise ValueError(f"partner {partner!r}: at most {MAX_SECRETS_PER_PARTNER} secrets at once")
        try:
            partners[partner] = tuple(decode_secret(secret) for secret in secrets)
        except ValueError as exc:
            raise ValueError(f"partner {partner!r}: {exc}") from None
    return partners


class PartnerSecrets:
    """The current secrets of each partner; `replace` swaps them all at once (a reloaded file)."""

    def __init__(self, partners: Mapping[str, tuple[bytes, ...]]) -> None:
        self.partners = dict(partners)

    def get(self, partner: str) -> tuple[bytes, ...]:
        return self.partners.get(partner, ())

    def replace(self, text: str) -> None:
        self.partners = parse_secrets(text)  # ValueError keeps the last good secrets (secret_files.py)


# --- The signature --------------------------------------------------------------------------


def expected_signature(key: bytes, message_id: bytes, timestamp: bytes, body: bytes) -> bytes:
    """HMAC-SHA256 over `<id>.<timestamp>.<body>`, the Standard Webhooks v1 scheme."""
    return hmac.new(key, b"%s.%s.%s" % (message_id, timestamp, body), hashlib.sha256).digest()


def v1_signatures(header: bytes) -> list[bytes] | None:
    """The digests of the `v1,<base64>` entries of `webhook-signature` (other versions are skipped);
    None when the header is malformed or holds too many entries."""
    entries = header.split()
    if not entries or len(entries) > MAX_SIGNATURES:
        return None
    digests = []
    for entry in entries:
        version, comma, value = entry.partition(b",")
        if not comma:
            return None
        if version != b"v1":
            continue
        try:
            digest = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(digest) == DIGEST_BYTES:
            digests.append(digest)
    return digests


def signed_by_any(
    keys: Iterable[bytes], digests: list[bytes], message_id: bytes, timestamp: bytes, body: bytes
) -> bool:
    """Whether any digest is the signature of any key: every pair is compared, in constant time."""
    matched = False
    for key in keys:
        expected = expected_signature(key, message_id, timestamp, body)
        for digest in digests:
            matched |= hmac.compare_digest(expected, digest)
    return matched


# --- Replays --------------------------------------------------------------------------------


class ReplayGuard:
    """Message ids seen within the tolerance window, in the shared store (SET NX PX): the first
    request with an id wins on every replica. Keys carry the partner's hash tag (Cluster-safe)."""

    def __init__(self, store: RemoteStore | MemoryStore, tolerance_seconds: int) -> None:
        self.store = store
        self.tolerance = tolerance_seconds

    @staticmethod
    def key(partner: str, message_id: str) -> str:
        return f"{_KEY_PREFIX}{tag(partner)}:{message_id}"

    async def first_time(self, partner: str, message_id: str, timestamp: int, now: float) -> bool:
        """Remember the id until `timestamp` leaves the window; False if it is remembered already.
        Raises StoreUnavailable or StoreBusy."""
        key = self.key(partner, message_id)
        ttl_ms = max(1000, math.ceil((timestamp + self.tolerance + 1 - now) * 1000))
        if isinstance(self.store, MemoryStore):
            if self.store.get(key) is not None:
                return False
            self.store.set(key, b"1", ttl_ms / 1000)
            return True
        reply = await self.store.execute(b"SET", key.encode(), b"1", b"NX", b"PX", str(ttl_ms).encode())
        return reply is not None

    async def forget(self, partner: str, message_id: str) -> None:
        """Let the sender's retry through: the message was verified but not handled."""
        key = self.key(partner, message_id)
        if isinstance(self.store, MemoryStore):
            self.store.values.pop(key, None)
        else:
            await self.store.execute(b"DEL", key.encode())


# --- The authenticator ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedWebhook:
    """What the route learns about a verified message (in the request's state)."""

    partner: str
    id: str
    timestamp: int
    release: Callable[[], Awaitable[None]] = field(repr=False)  # forget the id: a retry may come


def webhook_partner(scope: Scope) -> str | None:
    """The partner named by a POST to the webhook path, as given (checked later); else None."""
    if scope.get("method") != "POST":
        return None
    path = app_path(scope)
    if not path.startswith(WEBHOOK_PATH):
        return None
    return path[len(WEBHOOK_PATH) :]


def replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the application the body already read, then waits as `receive` does."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class WebhookSignature:
    """Layer 4 for partners' webhooks (see the module's docstring)."""

    challenge = "Webhook"

    def __init__(
        self,
        secrets: PartnerSecrets,
        replays: ReplayGuard,
        *,
        tolerance_seconds: int,
        max_body_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secrets = secrets
        self.replays = replays
        self.tolerance = tolerance_seconds
        self.max_body_bytes = max_body_bytes
        self.clock = clock

    def owns(self, scope: Scope) -> bool:
        return webhook_partner(scope) is not None

    async def authenticate(self, scope: Scope) -> Principal | None:
        if webhook_partner(scope) is None:
            return None
        raise InvalidCredentials("webhook_body_not_read")  # a webhook is only ever verified with its body

    async def authenticate_body(self, scope: Scope, receive: Receive) -> tuple[Principal | None, Receive]:
        partner = webhook_partner(scope)
        if partner is None:
            return None, receive
        verified, body = await self._verify(scope, receive, partner)
        scope.setdefault("state", {})[STATE_KEY] = verified
        principal = Principal(
            subject=SUBJECT_PREFIX + partner,
            scopes=frozenset({WEBHOOK_SCOPE}),
            token_id=None,
            issued_at=verified.timestamp,
            expires_at=verified.timestamp + self.tolerance,
            credential=self.challenge,
        )
        return principal, replaying(body, receive)

    async def _verify(self, scope: Scope, receive: Receive, path_partner: str) -> tuple[VerifiedWebhook, bytes]:
        partner = path_partner if _PARTNER.match(path_partner) else None
        found: list[bytes | None] = [None, None, None]
        declared: bytes | None = None
        for name, value in scope["headers"]:
            index = _HEADERS.get(name)
            if index is not None:
                if found[index] is not None:
                    self._refuse("duplicate_header", partner)
                found[index] = value
            elif name == b"content-length":
                declared = value
        raw_id, raw_timestamp, raw_signature = found
        if raw_id is None or raw_timestamp is None or raw_signature is None:
            self._refuse("missing_header", partner)
        if not _MESSAGE_ID.fullmatch(raw_id):
            self._refuse("malformed_id", partner)
        message_id = raw_id.decode("ascii")
        if not _TIMESTAMP.fullmatch(raw_timestamp):
            self._refuse("malformed_timestamp", partner, message_id)
        digests = v1_signatures(raw_signature)
        if digests is None:
            self._refuse("malformed_signature", partner, message_id)
        if not digests:
            self._refuse("no_v1_signature", partner, message_id)
        keys = self.secrets.get(partner) if partner is not None else ()
        if not keys:
            self._refuse("unknown_partner", partner, message_id)
        assert partner is not None
        timestamp, now = int(raw_timestamp), self.clock()
        if timestamp < now - self.tolerance:
            self._refuse("stale_timestamp", partner, message_id)
        if timestamp > now + self.tolerance:
            self._refuse("future_timestamp", partner, message_id)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            self._too_large(partner, message_id)
        body = await self._read_body(receive, partner, message_id)
        if not signed_by_any(keys, digests, raw_id, raw_timestamp, body):
            self._refuse("bad_signature", partner, message_id)
        try:
            first = await self.replays.first_time(partner, message_id, timestamp, now)
        except StoreUnavailable as exc:
            security_event("webhook_replay_check_unavailable", partner=partner, webhook_id=message_id)
            raise RevocationStoreUnavailable from exc  # answered 503 by Authenticate
        if not first:
            self._refuse("replayed", partner, message_id)

        async def release() -> None:
            await self.replays.forget(partner, message_id)

        return VerifiedWebhook(partner, message_id, timestamp, release), body

    async def _read_body(self, receive: Receive, partner: str, message_id: str) -> bytes:
        chunks, size = [], 0
        while True:
            try:
                message = await receive()
            except HTTPException as exc:  # BodyLimit: over MAX_BODY_BYTES, or too slow
                reason = "body_too_large" if exc.status_code == 413 else "body_read_timeout"
                security_event("webhook_refused", reason=reason, partner=partner, webhook_id=message_id)
                raise
            if message["type"] != "http.request":
                self._refuse("body_incomplete", partner, message_id)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                self._too_large(partner, message_id)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, partner: str, message_id: str) -> NoReturn:
        security_event("webhook_refused", reason="body_too_large", partner=partner, webhook_id=message_id)
        raise BodyTooLarge(self.max_body_bytes)

    @staticmethod
    def _refuse(reason: str, partner: str | None, message_id: str | None = None) -> NoReturn:
        """Log why (never the body or a signature) and refuse: 401."""
        security_event("webhook_refused", reason=reason, partner=partner, webhook_id=message_id)
        raise InvalidCredentials(f"webhook_{reason}")
