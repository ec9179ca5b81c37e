"""The scan's only way to the network: one base URL, a request budget and a deadline.

Every check sends its requests through `Probe`, so the scan talks to nothing but the URL it was
given, never follows a redirect elsewhere, and stops by itself when the budget or the time is spent.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

USER_AGENT = "{{ cookiecutter.package_name }}-scan"
BODY_SAMPLE_BYTES = 8192


class BudgetExhausted(Exception):
    """The scan has sent as many requests, or run as long, as it may."""


def target_url(url: str) -> str:
    """The base URL to probe, or ValueError: http(s) only, a host, no credentials, query or fragment."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"only http:// and https:// URLs can be scanned, not {parts.scheme or 'a relative URL'!r}")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    if parts.username or parts.password:
        raise ValueError("the URL must not carry credentials; pass tokens with --token")
    if parts.query or parts.fragment:
        raise ValueError("the URL must not have a query or fragment")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


@dataclass(frozen=True, slots=True)
class Seen:
    """An error response the scan received, kept for the errors check."""

    method: str
    path: str
    status: int
    content_type: str
    body: str


@dataclass
class Probe:
    """Sends requests to paths under one base URL, within a request budget and a deadline."""

    base_url: str
    max_requests: int
    max_seconds: float
    timeout_seconds: float = 5.0
    transport: httpx.BaseTransport | None = None
    sent: int = 0
    rate_limited: int = 0
    errors_seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base_url = target_url(self.base_url)
        self.https = self.base_url.startswith("https://")
        self.deadline = time.monotonic() + self.max_seconds
        self.client = httpx.Client(
            base_url=self.base_url + "/",
            timeout=self.timeout_seconds,
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            transport=self.transport,
        )

    @property
    def remaining(self) -> int:
        return self.max_requests - self.sent

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One request to `path` (absolute, under the base URL). Raises BudgetExhausted when spent."""
        if not path.startswith("/") or path.startswith("//") or "://" in path:
            raise ValueError(f"the scan only requests paths under the target, not {path!r}")
        if self.sent >= self.max_requests:
            raise BudgetExhausted(f"request budget of {self.max_requests} spent")
        if time.monotonic() > self.deadline:
            raise BudgetExhausted(f"time budget of {self.max_seconds:g}s spent")
        request_headers = dict(headers or {})
        if token is not None:
            request_headers["Authorization"] = f"Bearer {token}"
        self.sent += 1
        response = self.client.request(method, path.lstrip("/"), headers=request_headers, **kwargs)
        if response.status_code == 429:
            self.rate_limited += 1
        if response.status_code >= 400:
            self.errors_seen.append(
                Seen(
                    method,
                    path.split("?", 1)[0],
                    response.status_code,
                    response.headers.get("content-type", ""),
                    response.content[:BODY_SAMPLE_BYTES].decode("utf-8", errors="replace"),
                )
            )
        return response

    def close(self) -> None:
        self.client.close()


@dataclass
class Scan:
    """What every check gets: the probe and the operator's inputs."""

    probe: Probe
    token: str
    second_token: str | None = None
    origin: str | None = None
    allow_burst: bool = False
    openapi_file: str | None = None
    min_score: int = 100
    # Every parsed argument, the credential options' own (their `add_arguments`) included.
    arguments: argparse.Namespace = field(default_factory=argparse.Namespace)
