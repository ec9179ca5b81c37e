"""Audit subjects as keyed pseudonyms: the same subject always gives the same pseudonym, which
reveals nothing about it without the key (HMAC-SHA256 with AUDIT_PSEUDONYM_KEY).

Masking (`a***@example.org`) made different people look alike; a pseudonym keeps every per-user
audit query working ("who still calls the deprecated route") without putting identities in the
log. An operator who must name the person behind one computes the pseudonym of a known subject
with `<service> audit-pseudonym --sub <sub>` and searches for it.

The key is part of the logging configuration of the process: `configure_logging` installs it, and
every masker (log formatter, audit table) uses the installed one.
"""

from __future__ import annotations

import hmac
import secrets

PREFIX = "ps_"


class Pseudonyms:
    def __init__(self, key: bytes) -> None:
        self.key = key

    def __call__(self, subject: str) -> str:
        digest = hmac.digest(self.key, subject.encode("utf-8", "surrogatepass"), "sha256")
        return PREFIX + digest[:16].hex()


# Without AUDIT_PSEUDONYM_KEY (development and tests only; production refuses to start): a key
# of this process, so pseudonyms are stable until a restart and differ between processes.
_generated = Pseudonyms(secrets.token_bytes(32))
_installed = _generated


def install(key: bytes | None) -> Pseudonyms:
    """Use `key` for every pseudonym from now on; None means the key generated for this process."""
    global _installed
    _installed = Pseudonyms(key) if key is not None else _generated
    return _installed


def installed() -> Pseudonyms:
    return _installed
