"""Header grading after the MDN HTTP Observatory's rules (mdn/mdn-http-observatory, src/analyzer and
src/grader): the same test names, results, score modifiers, pass rules and grade chart, for the tests
that apply to one API response.

Graded: content-security-policy, cookies (simplified), cross-origin-resource-sharing, referrer-policy,
strict-transport-security (https targets only), x-content-type-options, x-frame-options and
cross-origin-resource-policy. Not graded: redirection (the scan only talks to the URL it is given),
subresource-integrity (API responses are not HTML) and HSTS preloading.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

MINIMUM_SCORE_FOR_EXTRA_CREDIT = 90
SIX_MONTHS = 15_552_000  # the Observatory's own "white lie" for 15768000
GRADES = (
    (100, "A+"),
    (90, "A"),
    (85, "A-"),
    (80, "B+"),
    (70, "B"),
    (65, "B-"),
    (60, "C+"),
    (50, "C"),
    (45, "C-"),
    (40, "D+"),
    (30, "D"),
    (25, "D-"),
    (0, "F"),
)
MODIFIERS = {
    "csp-implemented-with-no-unsafe-default-src-none": 10,
    "csp-implemented-with-no-unsafe": 5,
    "csp-implemented-with-unsafe-inline-in-style-src-only": 0,
    "csp-implemented-with-insecure-scheme-in-passive-content-only": -10,
    "csp-implemented-with-unsafe-eval": -10,
    "csp-implemented-with-unsafe-inline": -20,
    "csp-implemented-with-insecure-scheme": -20,
    "csp-header-invalid": -25,
    "csp-not-implemented": -25,
    "cookies-not-found": 0,
    "cookies-secure-with-httponly-sessions-and-samesite": 5,
    "cookies-secure-with-httponly-sessions": 0,
    "cookies-without-secure-flag-but-protected-by-hsts": -5,
    "cookies-without-secure-flag": -20,
    "cookies-session-without-httponly-flag": -30,
    "cross-origin-resource-sharing-not-implemented": 0,
    "cross-origin-resource-sharing-implemented-with-public-access": 0,
    "cross-origin-resource-sharing-implemented-with-restricted-access": 0,
    "cross-origin-resource-sharing-implemented-with-universal-access": -50,
    "referrer-policy-private": 5,
    "referrer-policy-not-implemented": 0,
    "referrer-policy-unsafe": -5,
    "referrer-policy-header-invalid": -5,
    "hsts-implemented-max-age-at-least-six-months": 0,
    "hsts-implemented-max-age-less-than-six-months": -10,
    "hsts-not-implemented": -20,
    "hsts-header-invalid": -20,
    "x-content-type-options-nosniff": 0,
    "x-content-type-options-not-implemented": -5,
    "x-content-type-options-header-invalid": -5,
    "x-frame-options-implemented-via-csp": 5,
    "x-frame-options-sameorigin-or-deny": 0,
    "x-frame-options-allow-from-origin": 0,
    "x-frame-options-not-implemented": -20,
    "x-frame-options-header-invalid": -20,
    "cross-origin-resource-policy-implemented-with-same-origin": 10,
    "cross-origin-resource-policy-implemented-with-same-site": 10,
    "cross-origin-resource-policy-implemented-with-cross-origin": 0,
    "cross-origin-resource-policy-not-implemented": 0,
    "cross-origin-resource-policy-header-invalid": -5,
}
PASSING = frozenset(
    {
        "csp-implemented-with-no-unsafe-default-src-none",
        "csp-implemented-with-no-unsafe",
        "csp-implemented-with-unsafe-inline-in-style-src-only",
        "csp-implemented-with-insecure-scheme-in-passive-content-only",
        "cookies-not-found",
        "cookies-secure-with-httponly-sessions-and-samesite",
        "cookies-secure-with-httponly-sessions",
        "cross-origin-resource-sharing-not-implemented",
        "cross-origin-resource-sharing-implemented-with-public-access",
        "cross-origin-resource-sharing-implemented-with-restricted-access",
        "referrer-policy-private",
        "referrer-policy-not-implemented",
        "hsts-implemented-max-age-at-least-six-months",
        "x-content-type-options-nosniff",
        "x-frame-options-implemented-via-csp",
        "x-frame-options-sameorigin-or-deny",
        "x-frame-options-allow-from-origin",
        "cross-origin-resource-policy-implemented-with-same-origin",
        "cross-origin-resource-policy-implemented-with-same-site",
        "cross-origin-resource-policy-implemented-with-cross-origin",
        "cross-origin-resource-policy-not-implemented",
    }
)

DANGEROUSLY_BROAD = frozenset({"ftp:", "http:", "https:", "*", "http://*", "http://*.*", "https://*", "https://*.*"})
UNSAFE_INLINE = frozenset({"'unsafe-inline'", "data:"})
BROAD_OR_INLINE = DANGEROUSLY_BROAD | UNSAFE_INLINE
PASSIVE_DIRECTIVES = ("img-src", "media-src")
NONCES_HASHES = ("'sha256-", "'sha384-", "'sha512-", "'nonce-")
REFERRER_GOOD = ("no-referrer", "same-origin", "strict-origin", "strict-origin-when-cross-origin")
REFERRER_BAD = ("origin", "origin-when-cross-origin", "unsafe-url", "no-referrer-when-downgrade")

Csp = dict[str, set[str]]


@dataclass(frozen=True, slots=True)
class TestResult:
    test: str
    result: str

    @property
    def modifier(self) -> int:
        return MODIFIERS[self.result]

    @property
    def passed(self) -> bool:
        return self.result in PASSING


@dataclass(frozen=True, slots=True)
class Grade:
    score: int
    grade: str
    tests: tuple[TestResult, ...]

    @property
    def failures(self) -> list[TestResult]:
        return [test for test in self.tests if not test.passed]


def grade(headers: httpx.Headers, *, https: bool, request_origin: str | None = None) -> Grade:
    """Grade one response's headers. `request_origin` is the Origin the request carried, if any."""
    csp = parse_csp(headers.get_list("content-security-policy"))
    hsts = _hsts(headers) if https else None
    tests = [
        TestResult("content-security-policy", _csp(csp, https)),
        TestResult("cookies", _cookies(headers, hsts_ok=hsts == "hsts-implemented-max-age-at-least-six-months")),
        TestResult("cross-origin-resource-sharing", _cors(headers, request_origin)),
        TestResult("referrer-policy", _referrer(headers)),
        TestResult("x-content-type-options", _nosniff(headers)),
        TestResult("x-frame-options", _frame_options(headers, csp)),
        TestResult("cross-origin-resource-policy", _corp(headers)),
    ]
    if hsts is not None:
        tests.append(TestResult("strict-transport-security", hsts))
    return Grade(*_score(tests), tuple(tests))


def _score(tests: list[TestResult]) -> tuple[int, str]:
    # Bonuses count only when the score without them is already an A.
    uncurved = 100 + sum(t.modifier for t in tests if t.modifier < 0)
    score = max(0, 100 + sum(t.modifier for t in tests) if uncurved >= MINIMUM_SCORE_FOR_EXTRA_CREDIT else uncurved)
    return score, letter(score)


def letter(score: int) -> str:
    return next(letter for floor, letter in GRADES if score >= floor)


def parse_csp(values: list[str]) -> Csp | None:
    """Directive -> sources. None when there is no policy; an empty dict when it cannot be parsed."""
    policies = [policy.strip() for value in values for policy in value.split(",") if policy.strip()]
    if not policies:
        return None
    csp: Csp = {}
    for policy in policies:
        for directive in policy.split(";"):
            parts = directive.strip().lower().split()
            if not parts:
                continue
            name, sources = parts[0], set(parts[1:])
            if not all(ch.isalnum() or ch == "-" for ch in name):
                return {}
            # Several policies all apply: a directive repeated in a later one cannot loosen the first.
            csp.setdefault(name, sources)
    return csp


def _csp(csp: Csp | None, https: bool) -> str:  # one branch per rule, in the Observatory's order
    if csp is None:
        return "csp-not-implemented"
    if not csp:
        return "csp-header-invalid"
    everything = {"*"}
    default = csp.get("default-src")
    script = set(csp.get("script-src") or default or everything)
    style = set(csp.get("style-src") or default or everything)
    objects = set(csp.get("object-src") or default or everything)
    for sources in (script, style):
        if any(s.startswith(NONCES_HASHES) for s in sources):
            sources.discard("'unsafe-inline'")
    if "'strict-dynamic'" in script:
        if not any(s.startswith(NONCES_HASHES) for s in script):
            return "csp-header-invalid"
        script = {
            s for s in script if not s.startswith(tuple(DANGEROUSLY_BROAD)) and s not in ("'self'", "'unsafe-inline'")
        }
    active = [s for name, sources in csp.items() if name not in (*PASSIVE_DIRECTIVES, "script-src") for s in sources]
    active += script
    passive = [s for name in PASSIVE_DIRECTIVES for s in csp.get(name) or default or set()]
    if script & BROAD_OR_INLINE or objects & DANGEROUSLY_BROAD:
        return "csp-implemented-with-unsafe-inline"
    if https and any(s.startswith(("http:", "ftp:")) for s in active):
        return "csp-implemented-with-insecure-scheme"
    if "'unsafe-eval'" in script | style:
        return "csp-implemented-with-unsafe-eval"
    if https and any(s.startswith(("http:", "ftp:")) for s in passive):
        return "csp-implemented-with-insecure-scheme-in-passive-content-only"
    if style & BROAD_OR_INLINE:
        return "csp-implemented-with-unsafe-inline-in-style-src-only"
    if default == {"'none'"}:
        return "csp-implemented-with-no-unsafe-default-src-none"
    return "csp-implemented-with-no-unsafe"


def _cookies(headers: httpx.Headers, *, hsts_ok: bool) -> str:
    # Simplified: every cookie is treated as a session cookie.
    cookies = [[part.strip().lower() for part in value.split(";")] for value in headers.get_list("set-cookie")]
    if not cookies:
        return "cookies-not-found"
    if not all("secure" in attributes for attributes in cookies):
        return "cookies-without-secure-flag-but-protected-by-hsts" if hsts_ok else "cookies-without-secure-flag"
    if not all("httponly" in attributes for attributes in cookies):
        return "cookies-session-without-httponly-flag"
    same_site = all(any(a.startswith("samesite=") for a in attributes) for attributes in cookies)
    return (
        "cookies-secure-with-httponly-sessions-and-samesite" if same_site else "cookies-secure-with-httponly-sessions"
    )


def _cors(headers: httpx.Headers, request_origin: str | None) -> str:
    allow_origin = headers.get("access-control-allow-origin")
    if not allow_origin:
        return "cross-origin-resource-sharing-not-implemented"
    if allow_origin.strip() == "*":
        return "cross-origin-resource-sharing-implemented-with-public-access"
    credentials = headers.get("access-control-allow-credentials", "").strip().lower() == "true"
    if request_origin and allow_origin == request_origin and credentials:
        return "cross-origin-resource-sharing-implemented-with-universal-access"
    return "cross-origin-resource-sharing-implemented-with-restricted-access"


def _referrer(headers: httpx.Headers) -> str:
    values = headers.get_list("referrer-policy")
    if not values:
        return "referrer-policy-not-implemented"
    known = [
        p.strip().lower() for v in values for p in v.split(",") if p.strip().lower() in (*REFERRER_GOOD, *REFERRER_BAD)
    ]
    policy = known[-1] if known else ""  # the last policy the browser understands wins
    if policy in REFERRER_GOOD:
        return "referrer-policy-private"
    return "referrer-policy-unsafe" if policy in REFERRER_BAD else "referrer-policy-header-invalid"


def _hsts(headers: httpx.Headers) -> str:
    values = headers.get_list("strict-transport-security")
    if not values:
        return "hsts-not-implemented"
    if len(values) > 1 or "," in values[0]:
        return "hsts-header-invalid"
    max_age = None
    for parameter in values[0].split(";"):
        name, _, value = parameter.strip().lower().partition("=")
        if name == "max-age":
            digits = value.strip().strip('"')
            if not digits.isdigit():
                return "hsts-header-invalid"
            max_age = int(digits[:128])
    if max_age is None:
        return "hsts-header-invalid"
    return (
        "hsts-implemented-max-age-at-least-six-months"
        if max_age >= SIX_MONTHS
        else "hsts-implemented-max-age-less-than-six-months"
    )


def _nosniff(headers: httpx.Headers) -> str:
    value = headers.get("x-content-type-options")
    if value is None:
        return "x-content-type-options-not-implemented"
    return (
        "x-content-type-options-nosniff"
        if value.strip().lower() == "nosniff"
        else "x-content-type-options-header-invalid"
    )


def _frame_options(headers: httpx.Headers, csp: Csp | None) -> str:
    if csp and "frame-ancestors" in csp:
        return "x-frame-options-implemented-via-csp"
    value = headers.get("x-frame-options")
    if value is None:
        return "x-frame-options-not-implemented"
    value = value.strip().lower()
    if value in ("deny", "sameorigin"):
        return "x-frame-options-sameorigin-or-deny"
    return "x-frame-options-allow-from-origin" if value.startswith("allow-from") else "x-frame-options-header-invalid"


def _corp(headers: httpx.Headers) -> str:
    value = headers.get("cross-origin-resource-policy")
    if value is None:
        return "cross-origin-resource-policy-not-implemented"
    results = {
        "same-origin": "cross-origin-resource-policy-implemented-with-same-origin",
        "same-site": "cross-origin-resource-policy-implemented-with-same-site",
        "cross-origin": "cross-origin-resource-policy-implemented-with-cross-origin",
    }
    return results.get(value.strip().lower(), "cross-origin-resource-policy-header-invalid")
