"""Masking, in one place for the log formatter and the audit table: `subject` fields become keyed
pseudonyms (`pseudonyms.py`), `client` addresses are written as LOG_CLIENT_ADDRESS says
(`client_addresses.py`), other emails and the AUDIT_MASKED_FIELDS are masked (`j***@example.org`),
secrets are redacted, whoever logs them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import client_addresses, pseudonyms

REDACTED = "[REDACTED]"
# Keys whose values are never logged, whatever they hold.
SECRET_KEYS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "set_cookie",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "password",
        "secret",
        "client_secret",
        "api_key",
        "apikey",
        "signature",
        "private_key",
        "query",
        "query_string",
        "body",
        "request_body",
        "response_body",
    }
)
SECRET_SUFFIXES = ("_token", "_secret", "_password", "_key")
# Keys whose values name who acted, or whose privileges changed (`grantee`, a key's `owner`):
# logged as keyed pseudonyms, stable per subject.
SUBJECT_KEYS = frozenset({"subject", "grantee", "owner"})
# Keys whose values are client addresses: written in full, truncated or as pseudonyms.
ADDRESS_KEYS = frozenset({"client", "client_address"})

# Compiled once: these run on every log line.
_EMAIL = re.compile(r"(?<![\w.%+-])([A-Za-z0-9])[A-Za-z0-9._%+-]*@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_CREDENTIALS = re.compile(r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{8,}")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")
_URL_QUERY = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s?#\"']*)\?[^\s#\"']*")


_SECRET, _SUBJECT, _ADDRESS, _PERSONAL, _VALUE = "secret", "subject", "address", "personal", "value"
_MAX_RULES = 1024  # field names remembered; callers choose field names, not clients
_PLAIN = frozenset({int, float, bool})


class Masker:
    """Pseudonymizes subjects, masks personal data and redacts secrets in any log value, recursively.

    `pseudonymize` defaults to the process's installed key (`pseudonyms.install`), so the log and
    the audit table give a subject the same pseudonym."""

    def __init__(
        self, masked_fields: Iterable[str] = ("email",), *, pseudonymize: Callable[[str], str] | None = None
    ) -> None:
        self.masked_fields = frozenset(field.lower() for field in masked_fields)
        self._pseudonymize = pseudonymize
        self._rules: dict[str, str] = {}

    def pseudonym(self, subject: Any) -> str:
        return (self._pseudonymize or pseudonyms.installed())(str(subject))

    def text(self, value: str) -> str:
        if "@" in value:
            value = _URL_USERINFO.sub(r"\1[REDACTED]@", value)
            value = _EMAIL.sub(r"\1***@\2", value)
        if "eyJ" in value:
            value = _JWT.sub(REDACTED, value)
        if "://" in value and "?" in value:
            value = _URL_QUERY.sub(r"\1?[REDACTED]", value)
        return _CREDENTIALS.sub(r"\1 [REDACTED]", value) if " " in value else value

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return self.mapping(value)
        if isinstance(value, list | tuple | set | frozenset):
            return [self.value(item) for item in value]
        return value

    def mapping(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        masked: dict[Any, Any] = {}
        for key, value in data.items():
            rule = self._rules.get(key)
            if rule is None:
                rule = self._rule(key)
            if value is None or (rule == _VALUE and value.__class__ in _PLAIN):
                masked[key] = value  # nothing to mask in a number
            elif rule == _SECRET:
                masked[key] = REDACTED
            elif rule == _SUBJECT:
                masked[key] = self.pseudonym(value)
            elif rule == _ADDRESS:
                masked[key] = client_addresses.written(value)
            elif rule == _PERSONAL:
                masked[key] = self.personal(value)
            else:
                masked[key] = self.value(value)
        return masked

    def _rule(self, key: Any) -> str:
        """What to do with a field's value, decided once per field name (log lines repeat them)."""
        name = str(key).lower()
        if name in SECRET_KEYS or name.endswith(SECRET_SUFFIXES):
            rule = _SECRET
        elif name in SUBJECT_KEYS:
            rule = _SUBJECT
        elif name in ADDRESS_KEYS:
            rule = _ADDRESS
        elif name in self.masked_fields:
            rule = _PERSONAL
        else:
            rule = _VALUE
        if len(self._rules) < _MAX_RULES and isinstance(key, str):
            self._rules[key] = rule
        return rule

    def personal(self, value: Any) -> str:
        text = str(value)
        if "@" in text:
            masked = _EMAIL.sub(r"\1***@\2", text)
            if masked != text:
                return masked
        return f"{text[:1]}***" if text else ""
