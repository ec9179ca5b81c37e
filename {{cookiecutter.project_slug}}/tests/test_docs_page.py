"""The API page, `/docs`, in a real headless Chromium against the running service: Swagger UI comes
from the service itself, lists every operation of the OpenAPI document, breaks no rule of its own
strict CSP, and no request leaves the host. Debian's `chromium` (or $CHROMIUM), driven by
Playwright; no browser is downloaded."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import ConsoleMessage, Page, Route, sync_playwright

from .conftest import ServiceFactory

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
# A page that renders in a blink on an idle machine can take seconds on a busy CI runner: this only
# bounds how long a broken page is waited for, it asserts nothing about speed.
RENDER_TIMEOUT_MS = 90_000


def chromium_executable() -> str:
    found = os.environ.get("CHROMIUM") or next(
        (path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None
    )
    if found is None:
        raise RuntimeError("no Chromium: install Debian's (apt-get install -y chromium) or set CHROMIUM")
    return found


@dataclass
class Visit:
    """What the browser did while it showed the page."""

    requests: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # requests to another host, answered by nobody
    console: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # securitypolicyviolation events
    page_errors: list[str] = field(default_factory=list)
    operations: list[str] = field(default_factory=list)


# Runs in the page before its own scripts (through the DevTools protocol, which the page's CSP does
# not govern) and reports every CSP violation the document sees.
REPORT_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (event) => {
  window.reportViolation(`${event.effectiveDirective} blocked ${event.blockedURI || "inline"}`);
});
"""


def visit(url: str, page_origin: str) -> Visit:
    seen = Visit()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable(), headless=True)
        try:
            context = browser.new_context()
            context.on("request", lambda request: seen.requests.append(request.url))

            def same_host_only(route: Route) -> None:
                if _origin(route.request.url) == page_origin:
                    route.continue_()
                else:  # as on a machine without internet: nothing answers
                    seen.refused.append(route.request.url)
                    route.abort("internetdisconnected")

            context.route("**/*", same_host_only)
            context.expose_function("reportViolation", lambda violation: seen.violations.append(violation))
            context.add_init_script(REPORT_VIOLATIONS)
            page = context.new_page()
            page.on("console", lambda message: seen.console.append(_console_line(message)))
            page.on("pageerror", lambda error: seen.page_errors.append(str(error)))
            page.goto(url, wait_until="load")
            seen.operations = _listed_operations(page)
            page.wait_for_load_state("networkidle")
        finally:
            browser.close()
    return seen


def _listed_operations(page: Page) -> list[str]:
    """`METHOD /path` of every operation Swagger UI lists, once it has rendered the document."""
    try:
        page.wait_for_selector(".opblock", timeout=RENDER_TIMEOUT_MS)
    except Exception:  # a page that never renders lists nothing; the test says what it saw instead
        return []
    listed: list[str] = page.eval_on_selector_all(
        ".opblock .opblock-summary",
        """summaries => summaries.map(summary =>
            summary.querySelector(".opblock-summary-method").textContent.trim().toUpperCase() + " " +
            summary.querySelector("[data-path]").getAttribute("data-path"))""",
    )
    return listed


def _console_line(message: ConsoleMessage) -> str:
    return f"{message.type}: {message.text}"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@pytest.fixture
def service_url(start_service: ServiceFactory) -> Iterator[str]:
    yield start_service(DOCS_ENABLED="true").base_url


def test_docs_page_lists_every_operation_under_its_strict_csp_without_leaving_the_host(service_url: str) -> None:
    document = httpx.get(f"{service_url}/openapi.json").json()
    documented = sorted(
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if method in HTTP_METHODS
    )
    assert documented, "the OpenAPI document lists operations"

    seen = visit(f"{service_url}/docs", service_url)

    assert seen.refused == [], "no request leaves the host"
    assert all(_origin(url) == service_url for url in seen.requests), seen.requests
    assert {
        f"{service_url}/docs",
        f"{service_url}/docs/swagger-ui-bundle.js",
        f"{service_url}/docs/swagger-ui.css",
        f"{service_url}/docs/swagger-initializer.js",
        f"{service_url}/openapi.json",
    } <= set(seen.requests), seen.requests
    assert seen.violations == [], "no securitypolicyviolation event"
    assert [line for line in seen.console if "Content Security Policy" in line or line.startswith("error")] == []
    assert seen.page_errors == []
    assert sorted(seen.operations) == documented, (seen.console, seen.page_errors)


def test_docs_page_csp_allows_nothing_inline_and_no_other_origin(service_url: str) -> None:
    page = httpx.get(f"{service_url}/docs")
    assert page.status_code == 200
    directives = (directive.partition(" ") for directive in page.headers["content-security-policy"].split("; "))
    csp = {name: value for name, _, value in directives}
    assert csp["default-src"] == "'none'"
    for directive in ("script-src", "style-src", "connect-src"):
        assert csp[directive] == "'self'", directive
    assert csp["img-src"] == "'self' data:"
    assert "unsafe-inline" not in page.headers["content-security-policy"]
    assert "<script>" not in page.text and "style=" not in page.text, "nothing inline in the page itself"
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "swagger-initializer.js"):
        response = httpx.get(f"{service_url}/docs/{asset}")
        assert response.status_code == 200, asset
        assert response.headers["x-content-type-options"] == "nosniff"
