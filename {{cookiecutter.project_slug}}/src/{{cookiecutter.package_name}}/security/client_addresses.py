"""Client addresses as the logs and the audit table write them (LOG_CLIENT_ADDRESS).

An IP address is personal data under the GDPR. The service needs the real one to limit and lock
out (layers 3 and 4 read `scope["client"]`, never this module); what it writes down may be less:

- `full`: the address as the service resolved it (TRUSTED_PROXIES).
- `truncated`: its network, IPv4 /24 and IPv6 /48 (`203.0.113.0/24`, `2001:db8:1::/48`): where a
  request came from, not which host.
- `pseudonym`: a keyed pseudonym (HMAC-SHA256 with AUDIT_PSEUDONYM_KEY, as subjects are,
  `pseudonyms.py`): the same address always gives the same pseudonym, so "every request from the
  address that attacked" stays one query, and an operator finds a known address's pseudonym with
  `<service> audit-pseudonym --sub <address>`.

`configure_logging` installs the mode with the pseudonym key; every masker (log formatter, audit
table) writes the `client` field through the installed one. One address's written form is
computed once and cached: the request path pays a dictionary lookup.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from functools import lru_cache
from typing import Literal

from . import pseudonyms

Mode = Literal["full", "truncated", "pseudonym"]
IPV4_PREFIX, IPV6_PREFIX = 24, 48
CACHED = 4096  # addresses remembered; an address beyond them is computed again (a few µs)
NOT_AN_ADDRESS = "unknown"


def _parsed(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return parsed.ipv4_mapped  # ::ffff:203.0.113.7 is 203.0.113.7
    return parsed


def truncate(address: str) -> str:
    """The address's network: IPv4 /24, IPv6 /48; `unknown` for what is not an IP address."""
    parsed = _parsed(address)
    if parsed is None:
        return NOT_AN_ADDRESS
    prefix = IPV4_PREFIX if parsed.version == 4 else IPV6_PREFIX
    host_bits = parsed.max_prefixlen - prefix
    return f"{type(parsed)(int(parsed) >> host_bits << host_bits)}/{prefix}"


def writer(mode: Mode, pseudonymize: Callable[[str], str] | None = None) -> Callable[[str], str]:
    """How `mode` writes an address (`pseudonymize`: the installed subject pseudonyms by default)."""
    if mode == "full":
        return str
    if mode == "truncated":
        return lru_cache(maxsize=CACHED)(truncate)
    keyed = pseudonymize or pseudonyms.installed()

    def pseudonym(address: str) -> str:
        parsed = _parsed(address)
        return keyed(str(parsed) if parsed is not None else address)

    return lru_cache(maxsize=CACHED)(pseudonym)


_installed: Callable[[str], str] = writer("pseudonym")  # until configure_logging installs the setting


def install(mode: Mode) -> None:
    """Write client addresses as `mode` from now on (after `pseudonyms.install`: it uses that key)."""
    global _installed
    _installed = writer(mode)


def written(address: object) -> str:
    """The client address as the logs and the audit table write it."""
    return _installed(str(address))
