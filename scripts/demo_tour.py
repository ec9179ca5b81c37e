"""`make demo-tour`: one refusal per layer of the security pipeline, against the real service.

Bakes the default answers into build/demo-tour/secure-api and installs it into this Python (or
takes an already installed bake with --project), then starts what the tour needs: a private
redis-server when one is installed (else the service's in-process limiter, and the output says
so) and `<slug> serve` on a loopback port with a migrated SQLite file, a development key pair
and a low address limit. It sends one request per layer and prints, for each, the request as a curl
line, the status, the problem document's `title` and the JSON line the service logged for it
(matched by trace id). Then it stops everything it started, also on Ctrl-C.

Exit status: 0 when every row got its expected status, 1 when one did not, 2 when the tour could
not start, 130 on Ctrl-C. `--json FILE` writes the rows for machines (the template test).
Standard library only: it runs with any Python 3.11+ that can install the service.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOUR_BUILD = ROOT / "build" / "demo-tour"
ISSUER = "https://issuer.dev.local"
ALLOWED_ORIGIN = "https://app.example.com"
REFUSED_ORIGIN = "https://evil.example"
REFUSED_HOST = "evil.example"
# The tour plays a reverse proxy on loopback for one client (a TEST-NET-3 documentation address),
# so the address limit can be shown on that client while the tour's own requests go on.
PROXY = "127.0.0.1"
PROXIED_CLIENT = "203.0.113.7"
IP_LIMIT = 10
MAX_BODY_BYTES = 1_048_576  # the default, set explicitly so the oversized body stays oversized
PREFERRED_PORT = 8001  # `make demo` serves on 8000
STARTUP_SECONDS = 30.0
LOG_WAIT_SECONDS = 3.0
REQUEST_TIMEOUT_SECONDS = 10.0
TOKENS = {"ALICE": ("alice", "orgs:read orgs:write"), "BOB": ("bob", "orgs:read")}
# $STOLEN: carol's token, bound (cnf.jkt) to a DPoP key only her client holds: this thumbprint is
# RFC 9449's example key's; the tour, like a thief, never has the private key.
STOLEN = ("carol", "orgs:read orgs:write")
STOLEN_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"


class TourError(Exception):
    """Something the tour needs did not start; the message says what and where to look."""


# --- processes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    what: str
    command: Sequence[str]
    cwd: Path
    env: Mapping[str, str] | None = None


def run(*jobs: Job) -> list[str]:
    """Run the jobs side by side (the machine may have cores to spare); their outputs, in order."""
    processes: list[subprocess.Popen[str]] = []
    try:
        for job in jobs:
            processes.append(
                subprocess.Popen(
                    list(job.command),
                    cwd=job.cwd,
                    env=job.env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outputs = [process.communicate() for process in processes]
    finally:
        for process in processes:
            stop_process(process)
    for job, process, (stdout, stderr) in zip(jobs, processes, outputs, strict=True):
        if process.returncode != 0:
            output = (stdout + stderr).strip()[-4000:]
            raise TourError(f"{job.what} failed (exit {process.returncode}):\n{output}")
    return [stdout for stdout, _ in outputs]


def free_port(preferred: int = 0) -> int:
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = sock.getsockname()[1]
            return chosen
    raise TourError("no free loopback port")


def stop_process(process: subprocess.Popen[Any]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TourError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclasses look their module up in sys.modules.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --- the service under tour ---------------------------------------------------------------------


@dataclass
class Service:
    """A baked, installed service run as `python -m <package>.cli serve`, logging to a file."""

    project: Path
    workdir: Path
    python: str = sys.executable
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def package(self) -> str:
        packages = [p.name for p in (self.project / "src").iterdir() if (p / "cli.py").is_file()]
        if len(packages) != 1:
            raise TourError(f"expected one package with a cli.py under {self.project / 'src'}")
        return packages[0]

    @property
    def slug(self) -> str:
        return self.project.name

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "service.log"

    def cli(self, *args: str) -> Job:
        return Job(
            f"{self.slug} {args[0]} {args[1]}",
            [self.python, "-m", f"{self.package}.cli", *args],
            self.workdir,
            self.env,
        )

    def prepare(self, redis_url: str | None) -> None:
        """Keys, settings and a migrated database in the work directory."""
        keys = self.workdir / "keys"
        database = {"DATABASE_URL": f"sqlite+aiosqlite:///{self.workdir / 'tour.db'}"}
        self.env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
        # Migrations read only DATABASE_URL; alembic.ini sits in the project.
        migrate = Job("alembic upgrade heads", [self.python, "-m", "alembic", "upgrade", "heads"], self.project)
        run(self.cli("keys", "generate", "--out", str(keys)), replace(migrate, env={**self.env, **database}))
        self.env = {
            **self.env,
            **database,
            "ENVIRONMENT": "development",
            "JWT_PUBLIC_KEY": (keys / "public.pem").read_text(),
            "JWT_PRIVATE_KEY_FILE": str(keys / "private.pem"),  # read by `token mint` only
            "JWT_ISSUER": ISSUER,
            "JWT_AUDIENCE": self.slug,
            "ALLOWED_ORIGINS": ALLOWED_ORIGIN,
            "TRUSTED_PROXIES": PROXY,
            "RATE_LIMIT_IP": f"{IP_LIMIT}/minute",
            "MAX_BODY_BYTES": str(MAX_BODY_BYTES),
            "LOG_LEVEL": "INFO",
            # Probes are left out of the request log by default; the tour finds its own server by
            # its probe's line.
            "LOG_HEALTH_REQUESTS": "true",
            # Addresses in clear (the default writes keyed pseudonyms), so the log lines show which
            # address each layer counted: the proxied client, or the tour itself.
            "LOG_CLIENT_ADDRESS": "full",
            **({"REDIS_URL": redis_url} if redis_url else {}),
            # The service fails fast on a slow Redis (0.5 s by default, a 503); the tour shows the
            # layers' refusals, not that: on a busy machine (CI running the suites beside it) its
            # first round trips may take longer.
            "REDIS_TIMEOUT_SECONDS": "5",
        }

    def start(self, port: int) -> None:
        self.port = port
        command = [self.python, "-m", f"{self.package}.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_until_live(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise TourError(f"the service exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                live = send(self.port, Request("GET", "/health/live"))
                if live.status == 200:
                    # Our log has the request only if our process answered, not another on the port.
                    if self.audit_line(live.trace_id) is None:
                        raise TourError(f"port {self.port} is answered by another server:\n{self.log_tail()}")
                    return
            if time.monotonic() > deadline:
                raise TourError(f"the service did not answer within {STARTUP_SECONDS:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def audit_line(self, trace_id: str) -> str | None:
        """The JSON line logged for this trace id: the security event a layer logged, else (a
        request that was not refused) the request line. The request line is written last, after
        the response, so the request's lines are complete once it is there."""
        deadline = time.monotonic() + LOG_WAIT_SECONDS
        while True:
            lines = [(record, line) for record, line in self.log_records() if record.get("trace_id") == trace_id]
            requests = [line for record, line in lines if record.get("event") == "request"]
            if requests or time.monotonic() > deadline:
                events = [line for record, line in lines if record.get("event") != "request"]
                return next(iter(events or requests), None)
            time.sleep(0.05)

    def log_records(self) -> Iterator[tuple[dict[str, Any], str]]:
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    yield record, line


def start_redis(project: Path, workdir: Path, wanted: str, stack: contextlib.ExitStack) -> tuple[Any, str]:
    """A private redis-server (the service's own test helper starts it), or None and why not."""
    executable = shutil.which("redis-server")
    if wanted == "memory":
        return None, "in-process limiter (--limiter memory)"
    if executable is None:
        if wanted == "redis":
            raise TourError("--limiter redis: redis-server not found (apt-get install -y redis-server)")
        return None, "in-process limiter: redis-server is not installed (apt-get install -y redis-server)"
    servers = load_module("tour_servers", project / "tests" / "servers.py")
    directory = workdir / "redis"
    directory.mkdir()
    server = servers.RedisServer(executable, directory, servers.free_port())
    stack.callback(server.stop)  # before start: an interrupted start is stopped too
    server.start()
    return server, f"private redis-server on 127.0.0.1:{server.port}"


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    token: str | None = None  # a name from the token legend
    json_body: Any = None
    declared_length: int | None = None  # headers only: a body this large is announced, never sent
    note: str = ""

    def curl(self, base_url: str) -> str:
        parts = ["curl"]
        if self.declared_length is not None:
            parts = [f"head -c {self.declared_length} /dev/zero |", "curl", "--json", "@-"]
        if self.method not in ("GET", "POST"):
            parts += ["-X", self.method]
        for name, value in self.headers.items():
            parts += ["-H", quote(f"{name}: {value}")]
        if self.token:
            parts += ["-H", f'"Authorization: Bearer ${self.token}"']
        if self.json_body is not None:
            parts += ["--json", quote(json.dumps(self.json_body, separators=(",", ":")))]
        line = " ".join([*parts, base_url + self.path])
        return f"{line}  # {self.note}" if self.note else line


def quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def trace_id(self) -> str:
        return self.headers.get("x-trace-id", "")


def send(port: int, request: Request, tokens: Mapping[str, str] | None = None) -> Response:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_SECONDS)
    try:
        headers = dict(request.headers)
        if request.token:
            headers["Authorization"] = f"Bearer {(tokens or {})[request.token]}"
        if request.declared_length is not None:
            # As curl does for a large body: announce it and wait for the answer before sending.
            connection.putrequest(request.method, request.path, skip_host="Host" in headers)
            for name, value in {
                **headers,
                "Content-Type": "application/json",
                "Content-Length": str(request.declared_length),
                "Expect": "100-continue",
            }.items():
                connection.putheader(name, value)
            connection.endheaders()
        else:
            body = None if request.json_body is None else json.dumps(request.json_body).encode()
            if body is not None:
                headers["Content-Type"] = "application/json"
            connection.request(request.method, request.path, body=body, headers=headers)
        answer = connection.getresponse()
        raw = answer.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, parsed)
    finally:
        connection.close()


def tampered(token: str, **claims: Any) -> str:
    """The token with its payload edited and its signature kept."""
    header, payload, signature = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    edited = base64.urlsafe_b64encode(json.dumps({**decoded, **claims}).encode()).rstrip(b"=").decode()
    return f"{header}.{edited}.{signature}"


# --- the tour -----------------------------------------------------------------------------------


@dataclass
class Row:
    layer: str
    refusal: str
    expected: int
    curl: str
    status: int = 0
    title: str = ""
    trace_id: str = ""
    audit: str | None = None
    retry_after: str | None = None
    problem: Any = None

    @property
    def ok(self) -> bool:
        return self.status == self.expected and self.audit is not None


@dataclass(frozen=True)
class Step:
    layer: str
    refusal: str
    expected: int
    request: Request
    before: Callable[[], None] | None = None  # e.g. the burst that precedes the 429


def tour_steps(service: Service, tokens: dict[str, str], org_id: str) -> list[Step]:
    def burst() -> None:
        for _ in range(IP_LIMIT):
            send(service.port, Request("GET", f"/api/v1/orgs/{org_id}", {"X-Forwarded-For": PROXIED_CLIENT}))

    # Pipeline order. The address limit is shown on another client (behind the tour's proxy), so
    # reaching it does not stop the tour's own requests that follow.
    return [
        Step("1 transport", "untrusted Host", 400, Request("GET", "/health/live", {"Host": REFUSED_HOST})),
        Step(
            "1 transport",
            "CORS preflight, origin not allowed",
            403,
            Request("OPTIONS", "/api/v1/orgs", {"Origin": REFUSED_ORIGIN, "Access-Control-Request-Method": "POST"}),
        ),
        Step(
            "1 transport",
            "body over MAX_BODY_BYTES",
            413,
            Request("POST", "/api/v1/orgs", declared_length=MAX_BODY_BYTES + 1),
        ),
        Step(
            "3 address limit",
            f"request {IP_LIMIT + 1} in a minute",
            429,
            Request(
                "GET",
                f"/api/v1/orgs/{org_id}",
                {"X-Forwarded-For": PROXIED_CLIENT},
                note=f"after {IP_LIMIT} from {PROXIED_CLIENT} this minute",
            ),
            before=burst,
        ),
        Step("4 authentication", "no token", 401, Request("POST", "/api/v1/orgs", json_body={"name": "bobco"})),
        Step(
            "4 authentication",
            "tampered token",
            401,
            Request("POST", "/api/v1/orgs", token="TAMPERED", json_body={"name": "bobco"}),
        ),
        Step(
            "4 authentication",
            "stolen DPoP-bound token",
            401,
            Request("POST", "/api/v1/orgs", token="STOLEN", json_body={"name": "bobco"}, note="without its key"),
        ),
        Step(
            "6 validation",
            "unknown body field",
            400,
            Request("POST", "/api/v1/orgs", token="ALICE", json_body={"name": "acme2", "created_by": "bob"}),
        ),
        Step(
            "7 authorization",
            "token without the scope",
            403,
            Request("POST", "/api/v1/orgs", token="BOB", json_body={"name": "bobco"}),
        ),
        Step(
            "7 authorization",
            "another subject's org",
            403,
            Request("GET", f"/api/v1/orgs/{org_id}", token="BOB", note="alice's org"),
        ),
        Step(
            "7 authorization",
            "an org that does not exist",
            403,
            Request("GET", f"/api/v1/orgs/{uuid.uuid4()}", token="BOB", note="no such org: the same 403"),
        ),
        Step(
            "8 business logic",
            "authorized create",
            201,
            Request("POST", "/api/v1/orgs", token="ALICE", json_body={"name": "demo"}),
        ),
    ]


def mint_tokens(service: Service) -> dict[str, str]:
    jobs = [service.cli("token", "mint", "--sub", sub, "--scope", scope) for sub, scope in TOKENS.values()]
    stolen = service.cli("token", "mint", "--sub", STOLEN[0], "--scope", STOLEN[1], "--jkt", STOLEN_JKT)
    minted = run(*jobs, stolen)
    tokens = {name: token.strip() for name, token in zip([*TOKENS, "STOLEN"], minted, strict=True)}
    tokens["TAMPERED"] = tampered(tokens["BOB"], scope="orgs:read orgs:write")
    return tokens


def walk(service: Service, steps: list[Step], tokens: dict[str, str]) -> Iterator[Row]:
    for step in steps:
        request = step.request
        if step.before is not None:
            step.before()
        row = Row(step.layer, step.refusal, step.expected, request.curl(service.base_url))
        response = send(service.port, request, tokens)
        row.status = response.status
        row.trace_id = response.trace_id
        row.retry_after = response.headers.get("retry-after")
        row.problem = response.body
        if isinstance(response.body, dict):
            row.title = str(response.body.get("title", ""))
        row.audit = service.audit_line(row.trace_id) if row.trace_id else None
        yield row


# --- output -------------------------------------------------------------------------------------


COLUMNS = "{:<18}{:<36}{:<22}{}"
README = ROOT / "README.md"
README_START = "<!-- demo-tour output: scripts/demo_tour.py --update-readme -->"
README_END = "<!-- /demo-tour output -->"


class Transcript:
    """Prints the tour and keeps what it printed, for --update-readme."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.extend(text.split("\n"))

    def update_readme(self) -> None:
        text = README.read_text()
        start, end = text.find(README_START), text.find(README_END)
        if start < 0 or end < start:
            raise TourError(f"README.md has no {README_START} ... {README_END} block")
        block = "\n".join(["```text", *(line.rstrip() for line in self.lines), "```"])
        README.write_text(f"{text[: start + len(README_START)]}\n{block}\n{text[end:]}")
        print(f"updated the tour's output in {shown(README)}")


def print_row(print: Transcript, row: Row) -> None:
    status = str(row.status)
    if row.retry_after is not None:
        status += f", Retry-After: {row.retry_after}"
    if row.status != row.expected:
        status += f" (expected {row.expected})"
    title = row.title or ("(no problem document)" if row.status >= 400 else "-")
    print(COLUMNS.format(row.layer, row.refusal, status, title))
    print(f"  $ {row.curl}")
    print(f"  {row.audit or f'(no log line with trace id {row.trace_id or None})'}")


def shown(path: Path) -> str:
    """A path as the reader would type it from where they ran the tour."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def print_header(print: Transcript, service: Service, limiter: str, org_id: str) -> None:
    (alice, alice_scope), (bob, bob_scope) = TOKENS["ALICE"], TOKENS["BOB"]
    print(
        f"""{service.slug} serving on {service.base_url} (log: {shown(service.log_path)})
  rate limits  {limiter}
  settings     RATE_LIMIT_IP={IP_LIMIT}/minute (low for the tour), MAX_BODY_BYTES={MAX_BODY_BYTES},
               ALLOWED_ORIGINS={ALLOWED_ORIGIN}, TRUSTED_PROXIES={PROXY} (the tour is the proxy of {PROXIED_CLIENT})
  tokens       from `{service.slug} token mint`: $ALICE sub={alice} scope="{alice_scope}",
               $BOB sub={bob} scope="{bob_scope}", and $TAMPERED: $BOB's token with its payload
               edited to scope="orgs:read orgs:write", its signature kept; $STOLEN: sub={STOLEN[0]}'s
               token bound to her client's DPoP key (`token mint --jkt`), which the tour does not hold
  setup        $ALICE created org {org_id} (she owns it; {bob} holds no grant on it)

Each request, the status and problem title it got, and the JSON line the service logged for it (same trace id):
"""
    )
    print(COLUMNS.format("layer", "request", "status", "problem title"))


# --- main ---------------------------------------------------------------------------------------


def bake_and_install(python: str) -> Path:
    """The default answers baked into build/demo-tour (apart from `make demo`'s build/secure-api,
    which may be serving), installed editable into this Python."""
    project = TOUR_BUILD / "secure-api"
    print(f"baking the default answers into {shown(project)} and installing it ...", flush=True)
    shutil.rmtree(project, ignore_errors=True)
    TOUR_BUILD.mkdir(parents=True, exist_ok=True)
    output_dir = str(TOUR_BUILD)
    run(Job("cookiecutter", [python, "-m", "cookiecutter", "--no-input", "--output-dir", output_dir, str(ROOT)], ROOT))
    # `make demo-tour` passes its uv (UV): the service's locked runtime set from its uv.lock, into
    # this Python's venv beside cookiecutter (--inexact keeps that). Without uv, pip as before.
    uv = os.environ.get("UV")
    if uv:
        environment = Path(python).parent.parent
        command = [uv, "sync", "--quiet", "--locked", "--inexact", "--all-packages", "--no-dev", "--python", python]
        run(Job("uv sync", command, project, env={**os.environ, "UV_PROJECT_ENVIRONMENT": str(environment)}))
        return project
    command = [python, "-m", "pip", "install", "--quiet", "--editable", str(project)]
    if all(importlib.util.find_spec(name) for name in ("hatchling", "editables")):
        command.insert(4, "--no-build-isolation")
    run(Job("pip install", command, ROOT))
    return project


def raise_keyboard_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def tour(args: argparse.Namespace) -> int:
    started = time.monotonic()
    project = Path(args.project).resolve() if args.project else bake_and_install(sys.executable)
    workdir = Path(args.workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    service = Service(project, workdir)
    transcript = Transcript()
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        redis, limiter = start_redis(project, workdir, args.limiter, stack)
        service.prepare(redis.url if redis else None)
        stack.callback(service.stop)
        service.start(args.port or free_port(PREFERRED_PORT))
        tokens = mint_tokens(service)  # while the service starts
        service.wait_until_live()
        created = send(service.port, Request("POST", "/api/v1/orgs", json_body={"name": "acme"}, token="ALICE"), tokens)
        if created.status != 201 or not isinstance(created.body, dict):
            raise TourError(f"setup: creating alice's org answered {created.status}: {created.body}")
        org_id = str(created.body["id"])
        print()
        print_header(transcript, service, limiter, org_id)
        for row in walk(service, tour_steps(service, tokens, org_id), tokens):
            print_row(transcript, row)
            rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(row) for row in rows], indent=2))
    failed = [row for row in rows if not row.ok]
    stopped = "the service and redis-server" if redis is not None else "the service"
    transcript()
    transcript(
        f"{len(rows) - len(failed)} of {len(rows)} rows as expected, in {time.monotonic() - started:.1f} s; "
        f"stopped {stopped}."
    )
    if args.update_readme and not failed:
        transcript.update_readme()
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", help="an already baked service installed in this Python (default: bake one)")
    parser.add_argument("--workdir", default=str(TOUR_BUILD / "run"), help="keys, database and logs (recreated)")
    parser.add_argument("--limiter", choices=("auto", "redis", "memory"), default="auto")
    parser.add_argument("--port", type=int, default=0, help=f"default {PREFERRED_PORT}, or any free port")
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument("--update-readme", action="store_true", help="put this run's output into README.md")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    signal.signal(signal.SIGHUP, raise_keyboard_interrupt)
    try:
        return tour(args)
    except TourError as exc:
        print(f"demo-tour: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndemo-tour: interrupted; stopped what it had started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
