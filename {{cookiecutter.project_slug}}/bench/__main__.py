"""`python -m bench`: start Redis, the database and the service, drive it, write the report.

Every phase is bounded: load runs last `--duration` seconds, servers get a startup timeout, and
the layer breakdown and lookup benchmark are skipped (and the report says so) when the time
budget is spent.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import statistics
import subprocess
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from redis import Redis

from {{ cookiecutter.package_name }} import extensions
from {{ cookiecutter.package_name }}.config import DEFAULT_DATABASE_URL, SERVICE_NAME
from {{ cookiecutter.package_name }}.security.dpop import thumbprint
from tests.servers import (
    LOOPBACK,
    CerbosServer,
    create_database_roles,
    find_postgres_bin_dir,
    start_postgres,
    start_redis,
)

from . import lookup, machine, report
from .apps import AUTHZ_OBJECT, BARE_PATH
from .load import LOAD_CPU, Sample, Target, run_python, run_wrk, wrk_path
from .servers import CLOCK_TICKS, Service, start_all, stop_all

ISSUER = "https://issuer.bench.local"
SUBJECT = "bench-owner"
SCOPES = "orgs:read orgs:write users:read users:write"
HUGE_LIMIT = "1000000000/hour"  # never reached: the bench measures the checks, not the refusals
# authz_engine=cerbos: a PDP decides layer 7, and (g) measures the same GET decided by the table.
CERBOS = "cerbos" in extensions.present()
TABLE_ENGINE = "engine:table"
NO_JWT = "without:Authenticate"
LAYERS_OFF = ["SecurityHeaders", "ClientAddress", "AuditContext", "TrustedHosts", "StrictCors", "BodyLimit"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("build/bench"), help="results.md and results.json go here")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load run")
    parser.add_argument("--repeat", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--connections", type=int, default=32, help="concurrent keep-alive connections")
    parser.add_argument("--layer-duration", type=float, default=3.0, help="seconds per per-layer run")
    parser.add_argument(
        "--layer-repeat", type=int, default=5, help="alternating rounds of the per-layer runs (short runs, more rounds)"
    )
    parser.add_argument(
        "--layers",
        choices=["auto", "always", "never"],
        default="auto",
        help="per-layer runs: auto = only when a target is missed",
    )
    parser.add_argument("--lookup-calls", type=int, default=2000, help="permission lookups timed per table size")
    parser.add_argument("--python-load", action="store_true", help="use the Python load generator even if wrk exists")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds after which optional phases are skipped")
    parser.add_argument("--commit", help="the template commit the service was baked from, for the report")
    parser.add_argument(
        "--compare-with",
        type=Path,
        help="another baked SQLite service, installed with its bench extra (e.g. an older release): its (c) is "
        "measured as (h) in the same alternating rounds, and each service's (c) without its Authenticate layer "
        "((i) here, (j) there) to give the JWT layer's cost on both",
    )
    return parser.parse_args()


def key_pair() -> tuple[rsa.RSAPrivateKey, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public.decode()


def owner_token(private: rsa.RSAPrivateKey, **more: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": SERVICE_NAME, "sub": SUBJECT, "scope": SCOPES, "iat": now, "exp": now + 3000}
    return jwt.encode({**claims, "jti": uuid.uuid4().hex, **more}, private, algorithm="RS256")


def compare_with(
    args: argparse.Namespace, env: dict[str, str], log_dir: Path, token: str
) -> tuple[Service, Service, str]:
    """The other baked service, on its own SQLite file migrated by its own code, with the same
    settings, Redis and token, as shipped and without its Authenticate layer; and the path of an
    org its owner reads, as (c) does."""
    project = args.compare_with.resolve()
    if DEFAULT_DATABASE_URL.startswith("postgresql"):
        raise SystemExit("--compare-with measures SQLite bakes (both services)")
    database_path = (args.out / "compared.db").resolve()
    database_path.unlink(missing_ok=True)
    database_url = f"sqlite+aiosqlite:///{database_path}"
    python = project / ".venv" / "bin" / "python"
    migrate = [str(python), "-c", f"from bench import lookup; lookup.migrate({database_url!r})"]
    subprocess.run(migrate, cwd=project, check=True, stdin=subprocess.DEVNULL)
    # Its bench/apps.py builds the same "full" variant; its log in a folder of its own.
    (log_dir / "compared").mkdir(exist_ok=True)
    compared_env = {**env, "DATABASE_URL": database_url}
    service = Service("full", compared_env, log_dir / "compared", project=project)
    unauthenticated = Service(NO_JWT, compared_env, log_dir / "compared", project=project)
    try:
        service.wait_ready()
        unauthenticated.wait_ready()
        return service, unauthenticated, org_path(service, token)
    except Exception:
        stop_all({"compared": service, NO_JWT: unauthenticated})
        raise


def org_path(service: Service, token: str) -> str:
    """The path of an org the token's owner creates on `service`, as (c) reads it."""
    created = httpx.post(
        f"{service.base_url}/api/v1/orgs",
        json={"name": "bench"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    created.raise_for_status()
    return f"/api/v1/orgs/{created.json()['id']}"


def dpop_target(private: rsa.RSAPrivateKey, url: str, path: str) -> Target:
    """(c) as a DPoP request: the owner's token bound to an ES256 key, a fresh proof per request."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    token = owner_token(private, cnf={"jkt": thumbprint(jwk)})
    ath = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()
    header = {"typ": "dpop+jwt", "jwk": jwk}

    def proofs(count: int) -> list[str]:
        now = int(time.time())
        claims = {"htm": "GET", "htu": url + path, "iat": now, "ath": ath}
        return [jwt.encode({**claims, "jti": uuid.uuid4().hex}, key, "ES256", headers=header) for _ in range(count)]

    return Target("GET", path, token, proofs=proofs)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.wrk = None if args.python_load else wrk_path()
        self.scratch = args.out / "tmp"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.redis_url = ""
        self.pdp: CerbosServer | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def sample(self, service: Service, target: Target, duration: float) -> Sample:
        if self.wrk:
            return run_wrk(
                self.wrk, service.base_url + target.path, target, duration, self.args.connections, self.scratch
            )
        return run_python(LOOPBACK, service.port, target, duration, self.args.connections)

    def redis_counters(self) -> tuple[int, int]:
        """Commands run (those inside Lua scripts too) and reads served: one read per round trip."""
        with Redis.from_url(self.redis_url) as client:
            stats: dict[str, Any] = client.info("stats")
            return int(stats["total_commands_processed"]), int(stats["total_reads_processed"])

    def measure(
        self, plan: list[tuple[str, Service, Target]], duration: float, repeat: int
    ) -> dict[str, list[dict[str, Any]]]:
        """Warm each up for a second, then alternate: round after round of every entry."""
        for _name, service, target in plan:
            self.sample(service, target, 1.0)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in plan}
        for round_number in range(repeat):
            for name, service, target in plan:
                commands, reads = self.redis_counters()
                cpu, pdp_cpu = service.cpu_seconds(), self.pdp_cpu_seconds()
                result = self.sample(service, target, duration)
                cpu_after, pdp_cpu_after = service.cpu_seconds(), self.pdp_cpu_seconds()
                commands_after, reads_after = self.redis_counters()
                requests = max(1, result.requests)
                runs[name].append(
                    {
                        **asdict(result),
                        "rps": result.rps,
                        # CPU the service process spent per request: what a layer costs, little
                        # disturbed by whatever else the machine is doing
                        "cpu_us_per_request": (cpu_after - cpu) * 1e6 / requests,
                        # authz_engine=cerbos: what the PDP spent deciding, beside the service
                        "pdp_cpu_us_per_request": (pdp_cpu_after - pdp_cpu) * 1e6 / requests,
                        # minus one: the INFO that took the first reading
                        "redis_commands_per_request": (commands_after - commands - 1) / requests,
                        "redis_round_trips_per_request": (reads_after - reads - 1) / requests,
                    }
                )
                print(
                    f"  round {round_number + 1} {name:<28} {result.rps:9.0f} req/s  p99 {result.p99_ms:7.2f} ms"
                    f"  {runs[name][-1]['cpu_us_per_request']:6.0f} CPU µs/req"
                )
        return runs

    def pdp_cpu_seconds(self) -> float:
        if self.pdp is None:
            return 0.0
        fields = Path(f"/proc/{self.pdp.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def median_of(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = (
        "rps",
        "cpu_us_per_request",
        "pdp_cpu_us_per_request",
        "p50_ms",
        "p99_ms",
        "redis_commands_per_request",
        "redis_round_trips_per_request",
        "non_2xx",
        "socket_errors",
    )
    return {key: float(statistics.median(run[key] for run in runs)) for key in keys}


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    log_dir = args.out / "logs"
    log_dir.mkdir(exist_ok=True)
    results: dict[str, Any] = {"machine": machine.describe(), "load_generator": "wrk" if bench.wrk else "python"}
    settings = ("duration", "repeat", "connections", "layer_duration", "layer_repeat")
    results["settings"] = {key: getattr(args, key) for key in settings}
    results["commit"] = args.commit
    results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"bench: load generator {results['load_generator']}, {args.repeat} x {args.duration:g} s per scenario")

    redis = start_redis(args.out / "redis")
    bench.redis_url = redis.url
    pin_to_load_cpu(redis._process.pid if redis._process else None)
    postgres = None
    if DEFAULT_DATABASE_URL.startswith("postgresql"):
        postgres = start_postgres(args.out / "postgres")
        make_room(postgres)
        pin_to_load_cpu(postmaster_pid(postgres))
        # As production runs (README, Database access): the owner migrates, the app role serves.
        roles = create_database_roles(postgres.url)
        lookup.migrate(roles.owner_url, app_role=roles.app_role)
        database_url = roles.app_url
    else:
        database_path = (args.out / "service.db").resolve()
        database_path.unlink(missing_ok=True)
        database_url = f"sqlite+aiosqlite:///{database_path}"
        lookup.migrate(database_url)

    if CERBOS:
        # The sidecar's PDP (deploy/cerbos/config.yaml, the service's policies/) on loopback, as the
        # suite starts it; on the load generator's core, as Redis and the database are.
        (args.out / "cerbos").mkdir(exist_ok=True)
        bench.pdp = CerbosServer(args.out / "cerbos")
        pin_to_load_cpu(bench.pdp.process.pid)

    private, public_pem = key_pair()
    token = owner_token(private)
    env = {
        "ENVIRONMENT": "production",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis.url,
        "JWT_PUBLIC_KEY": public_pem,
        "JWT_ISSUER": ISSUER,
        "JWT_AUDIENCE": SERVICE_NAME,
        "TRUSTED_HOSTS": LOOPBACK,
        "ALLOWED_ORIGINS": "https://app.example.com",
        "RATE_LIMIT_IP": HUGE_LIMIT,
        "RATE_LIMIT_SUBJECT": HUGE_LIMIT,
        # The load writes one org's users by the thousand: the business limits at their maximum.
        "QUOTA_USERS_PER_ORG": "10000000",
        "QUOTA_ORGS_PER_SUBJECT": "1000000",
        "LOG_LEVEL": "INFO",
        "AUDIT_PSEUDONYM_KEY": secrets.token_urlsafe(32),
        "BENCH_TOKEN": token,
        # One token serves the whole run (minutes longer than the 900 s default lifetime).
        "JWT_MAX_TOKEN_LIFETIME_SECONDS": "3600",
        **({"CERBOS_ADDRESS": bench.pdp.address} if bench.pdp else {}),
    }

    services: dict[str, Service] = {}
    try:
        # Fail-open for the project's own Redis checks (the token revocation lookup) on the slowapi
        # variants only, so that with Redis down a request gets as far as slowapi; no effect otherwise.
        fail_open = {"RATE_LIMIT_FAILURE_MODE": "open", "RATE_LIMIT_FAILURE_MODE_ACKNOWLEDGED": "true"}
        services = start_all(
            ["full", "slowapi", "slowapi:swallow", *([TABLE_ENGINE] if CERBOS else [])],
            env,
            log_dir,
            {"slowapi": fail_open, "slowapi:swallow": fail_open},
        )
        main_service = services["full"]
        org = org_path(main_service, token)
        get_org = Target("GET", org, token)
        compared = compare_with(args, env, log_dir, token) if args.compare_with else None
        if compared:
            services["compared"], services["compared:" + NO_JWT] = compared[0], compared[1]
            services.update(start_all([NO_JWT], env, log_dir))
        with_dpop = dpop_target(private, main_service.base_url, org)
        scenarios = {
            "a": ("bare endpoint, no pipeline", main_service, Target("GET", BARE_PATH)),
            "b": ("GET /health/live, pipeline", main_service, Target("GET", "/health/live")),
            "c": ("GET /api/v1/orgs/{id}, full pipeline", main_service, get_org),
            "d": (
                "POST /api/v1/orgs/{id}/users, full pipeline",
                main_service,
                Target("POST", f"{org}/users", token, unique_emails=True),
            ),
            "e": ("(c) with slowapi as the limiter", services["slowapi"], get_org),
            "f": ("(c) with a DPoP-bound token and proof", main_service, with_dpop),
        }
        if CERBOS:
            label = "GET /api/v1/orgs/{id}, full pipeline, the Cerbos PDP decides"
            scenarios["c"] = (label, main_service, get_org)
            table_label = "(c) with authz_engine=table: the permissions table decides"
            scenarios["g"] = (table_label, services[TABLE_ENGINE], get_org)
        if compared:
            label = f"(c) on {args.compare_with.resolve()} (--compare-with)"
            scenarios["h"] = (label, compared[0], Target("GET", compared[2], token))
            # The JWT layer's own cost on each side: (c) - (i) here, (h) - (j) there (report.py).
            scenarios["i"] = ("(c) without the Authenticate layer (JWT)", services[NO_JWT], get_org)
            scenarios["j"] = (
                "(h) without its Authenticate layer (JWT)",
                compared[1],
                Target("GET", compared[2], token),
            )
        print(f"bench: scenarios {', '.join(scenarios)}")
        plan = [(key, service, target) for key, (_, service, target) in scenarios.items()]
        runs = bench.measure(plan, args.duration, args.repeat)
        results["scenarios"] = {
            key: {"label": label, "median": median_of(runs[key]), "runs": runs[key]}
            for key, (label, _, _) in scenarios.items()
        }
        results["targets"] = report.targets(
            results["scenarios"], "postgresql" if DEFAULT_DATABASE_URL.startswith("postgresql") else "sqlite"
        )

        missed = not all(target["met"] for target in results["targets"])
        wanted = args.layers == "always" or (args.layers == "auto" and missed)
        if not wanted:
            results["layers_skipped"] = "Not run: " + ("--layers never." if missed else "every target is met.")
        elif bench.elapsed() > args.budget * 0.5:
            results["layers_skipped"] = f"time budget: {bench.elapsed():.0f} s spent before the layer runs"
        elif wanted:
            print("bench: per-layer cost (one layer switched off per variant)")
            layers = [f"without:{name}" for name in LAYERS_OFF]
            layers += ["without:RateLimit:ip", NO_JWT, "without:RateLimit:subject"]
            layers += [f"without:{AUTHZ_OBJECT}", "without:all"]
            services.update(start_all([name for name in layers if name not in services], env, log_dir))
            plan = [("full", main_service, get_org)] + [(name, services[name], get_org) for name in layers]
            layer_runs = bench.measure(plan, args.layer_duration, args.layer_repeat)
            results["layers"] = {
                name: {"median": median_of(layer_runs[name]), "runs": layer_runs[name]} for name in layer_runs
            }

        results["rss_mb"] = {name: service.peak_rss_mb() for name, service in services.items()}
        results["outage"] = outage(redis, services, get_org)
    finally:
        stop_all(services)
        redis.stop()
        if bench.pdp is not None:
            bench.pdp.stop()

    if bench.elapsed() > args.budget:
        results["lookups_skipped"] = f"time budget: {bench.elapsed():.0f} s spent before the lookup benchmark"
    else:
        print("bench: permission lookups")
        results["lookups"] = lookups(args, postgres)
    if postgres is not None:
        postgres.stop()
    results["elapsed_seconds"] = round(bench.elapsed(), 1)
    results["machine"]["load_after"] = machine.load_average()

    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = report.markdown(results)
    (args.out / "results.md").write_text(markdown)
    print()
    print(markdown)
    print(f"bench: wrote {args.out / 'results.md'} and {args.out / 'results.json'} in {bench.elapsed():.0f} s")
    return 0


def pin_to_load_cpu(pid: int | None) -> None:
    """Redis and PostgreSQL share the load generator's core, not the service's: in production they
    run elsewhere, and on the service's core they would take its CPU and its caches. PostgreSQL's
    backends are forked from the postmaster after this, so they inherit it."""
    if pid is not None and (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {int(LOAD_CPU)})


def postmaster_pid(postgres: Any) -> int | None:
    pid_file = Path(postgres.data_dir) / "postmaster.pid"
    return int(pid_file.read_text().split()[0]) if pid_file.exists() else None


def make_room(postgres: Any) -> None:
    """Each service variant keeps a pool of up to 20 connections, more than the default 100 in all."""

    async def alter() -> None:
        import asyncpg

        connection = await asyncpg.connect(postgres.url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await connection.execute("ALTER SYSTEM SET max_connections = 500")
        finally:
            await connection.close()

    asyncio.run(alter())
    postgres.restart()


def outage(redis: Any, services: dict[str, Service], target: Target) -> dict[str, Any]:
    """Redis down: how the project's limiter and slowapi answer the limited endpoint."""
    redis.kill()
    answers: dict[str, Any] = {}
    for name in ("full", "slowapi", "slowapi:swallow"):
        started = time.perf_counter()
        try:
            response = httpx.get(
                services[name].base_url + target.path, headers={"Authorization": f"Bearer {target.token}"}, timeout=15
            )
            status: int | str = response.status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        answers[name] = {"status": status, "ms": round((time.perf_counter() - started) * 1000, 1)}
    return answers


def lookups(args: argparse.Namespace, postgres: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"results": [asdict(row) for row in lookup.run_sqlite(args.out, args.lookup_calls)]}
    try:
        if postgres is None:
            find_postgres_bin_dir()
            postgres = start_postgres(args.out / "postgres")
            found["results"] += [asdict(row) for row in lookup.run_postgres(postgres.url, args.lookup_calls)]
            postgres.stop()
        else:
            found["results"] += [asdict(row) for row in lookup.run_postgres(postgres.url, args.lookup_calls)]
    except RuntimeError as exc:
        found["postgresql_skipped"] = str(exc).splitlines()[0]
    return found


if __name__ == "__main__":
    raise SystemExit(main())
