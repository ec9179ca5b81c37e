"""Sign outbound webhooks the Standard Webhooks way, for a service that sends them to partners.

    headers = sign(secret, new_message_id(), int(time.time()), body)
    httpx.post(url, content=body, headers={**headers, "Content-Type": "application/json"})

`body` is the exact bytes sent. During a rotation, pass the old and the new secret: the
`webhook-signature` header then carries one `v1,` signature per secret, and a receiver that knows
either accepts it. A retry of the same message keeps its id and is signed again with a new
timestamp. Standard library only, so it can be copied into any sender; the inbound verifier
(options/webhooks/authenticator.py) is a separate implementation, tested against this one and the
specification's test vector.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Sequence

WHSEC_PREFIX = "whsec_"  # how a secret is written (Standard Webhooks), not one
SECRET_BYTES = 32


def generate_secret() -> str:
    """A new secret to share with a partner: `whsec_` and 32 random bytes in base64."""
    return WHSEC_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def new_message_id() -> str:
    """A unique message id; keep it for every retry of the message (receivers deduplicate on it)."""
    return "msg_" + secrets.token_urlsafe(18)


def _key(secret: str) -> bytes:
    if not secret.startswith(WHSEC_PREFIX):
        raise ValueError(f"a secret must look like {WHSEC_PREFIX}<base64>")
    return base64.b64decode(secret.removeprefix(WHSEC_PREFIX), validate=True)


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()).decode()


def sign(secret: str | Sequence[str], message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three headers of a signed webhook; one signature per secret given."""
    secrets_ = [secret] if isinstance(secret, str) else list(secret)
    if not secrets_:
        raise ValueError("at least one secret is required")
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, message_id, timestamp, body) for s in secrets_),
    }
