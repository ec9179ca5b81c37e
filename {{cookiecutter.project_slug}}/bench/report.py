"""The targets and the markdown report, computed from the medians."""

from __future__ import annotations

import statistics
from typing import Any

RSS_TARGET_MB = 150.0


# The cost targets of an authenticated, authorized read (c) and a committed write (d), as a share of
# the bare framework's throughput (a) in the same run: what a hand-written app doing the same
# security work reaches on this kind of machine.
TARGETS = {"sqlite": {"c": 0.16, "d": 0.07}, "postgresql": {"c": 0.19, "d": 0.12}}
# authz_engine=cerbos: the read decided by the PDP (c) keeps at least half the requests per second
# of the same read decided by the permissions table (g), in the same run (issue 31).
ENGINE_TARGET = 0.5


def targets(scenarios: dict[str, Any], database: str = "sqlite") -> list[dict[str, Any]]:
    bare = scenarios["a"]["median"]
    found = []
    for key, share in TARGETS[database].items():
        ratio = scenarios[key]["median"]["rps"] / bare["rps"] if bare["rps"] else 0.0
        found.append(
            {
                "target": f"req/s of ({key}) at least {share} x (a) ({database})",
                "value": round(ratio, 3),
                "met": ratio >= share,
            }
        )
    if "g" in scenarios:
        table = scenarios["g"]["median"]["rps"]
        ratio = scenarios["c"]["median"]["rps"] / table if table else 0.0
        found.append(
            {
                "target": f"req/s of (c), the Cerbos PDP deciding, at least {ENGINE_TARGET} x (g), the table deciding",
                "value": round(ratio, 3),
                "met": ratio >= ENGINE_TARGET,
            }
        )
    return found


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _machine(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    packages = ", ".join(f"{name} {version}" for name, version in machine["packages"].items())
    baked = f" from template commit {results['commit']}" if results.get("commit") else ""
    return [
        f"- Run: {results.get('date', '?')}{baked}",
        f"- Machine: {machine['cpu']}, {machine['cpus']} CPUs, {machine['memory_gb']} GB RAM, {machine['os']}, "
        f"Python {machine['python']}",
        f"- Load average before / after: {machine['load_before']} / {machine.get('load_after', '?')}",
        f"- Load generator: {_generator(results)}, one thread, "
        f"{results['settings']['connections']} keep-alive connections on loopback; "
        f"{results['settings']['repeat']} alternating rounds of {results['settings']['duration']:g} s per scenario, "
        "medians",
        f"- Service: uvicorn, 1 worker, uvloop + httptools, no access log, ENVIRONMENT=production, "
        f"redis-server ({machine['redis_server'].split(' sha=')[0]}) on loopback, limits set never to trigger; "
        "the service pinned to core 0, wrk, Redis and the database server to core 1",
        f"- Versions: {packages}",
    ]


def _generator(results: dict[str, Any]) -> str:
    if results["load_generator"] == "wrk":
        return f"wrk ({results['machine']['wrk'].split(' Copyright')[0]})"
    return "the Python asyncio client (wrk not installed; its numbers are lower bounds)"


def _scenarios(results: dict[str, Any]) -> list[str]:
    scenarios = results["scenarios"]
    bare = scenarios["a"]["median"]
    lines = [
        "| | request | req/s | p50 ms | p99 ms | req/s ÷ (a) | p99 ÷ (a) | CPU µs/req | Redis trips/req | non-2xx |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, scenario in scenarios.items():
        median = scenario["median"]
        lines.append(
            f"| ({key}) | {scenario['label']} | {median['rps']:.0f} | {_ms(median['p50_ms'])} "
            f"| {_ms(median['p99_ms'])} "
            f"| {median['rps'] / bare['rps']:.3f} | {median['p99_ms'] / bare['p99_ms']:.1f} "
            f"| {median['cpu_us_per_request']:.0f} "
            f"| {median['redis_round_trips_per_request']:.1f} | {median['non_2xx']:.0f} |"
        )
    return lines


def _targets(results: dict[str, Any]) -> list[str]:
    lines = [f"- {t['target']}: {t['value']:.3f} — {'met' if t['met'] else 'MISSED'}" for t in results["targets"]]
    rss = results.get("rss_mb", {})
    if "full" in rss:
        met = rss["full"] < RSS_TARGET_MB
        lines.append(
            f"- peak RSS (VmHWM) of the service under 150 MB: {rss['full']:.0f} MB — {'met' if met else 'MISSED'}"
            f" (slowapi variant: {rss.get('slowapi', 0):.0f} MB)"
        )
    return lines


def _layers(results: dict[str, Any]) -> list[str]:
    if "layers" not in results:
        return [results.get("layers_skipped", "Not run.")]
    layers = results["layers"]
    full = layers["full"]["median"]
    bare = results["scenarios"]["a"]["median"]
    gap = full["cpu_us_per_request"] - bare["cpu_us_per_request"]
    settings = results["settings"]
    lines = [
        f"CPU time of the service process per request: (c) {full['cpu_us_per_request']:.0f} µs, (a) "
        f"{bare['cpu_us_per_request']:.0f} µs; the gap is {gap:.0f} µs. Each row is (c) with one part switched off, "
        f"{settings['layer_repeat']} alternating rounds of {settings['layer_duration']:g} s. A part's cost is the "
        "median over the rounds of the CPU time per request it saves against (c) in the same round (paired, so "
        "drift across rounds cancels), ± the median absolute deviation of those differences; a cost within its "
        "deviation is marked ~. Costs need not add up exactly: shared per-request overheads (tasks, the "
        "database driver's thread hops) shift when a part goes.",
        "",
        "| switched off | req/s | p99 ms | Redis trips/req | non-2xx | CPU µs/req | cost µs/req | share of the gap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| nothing (c) | {full['rps']:.0f} | {_ms(full['p99_ms'])} | {full['redis_round_trips_per_request']:.1f} "
        f"| {full['non_2xx']:.0f} | {full['cpu_us_per_request']:.0f} | | |",
    ]
    baseline = [run["cpu_us_per_request"] for run in layers["full"]["runs"]]
    for name, layer in layers.items():
        if name == "full":
            continue
        median = layer["median"]
        saved = [base - run["cpu_us_per_request"] for base, run in zip(baseline, layer["runs"], strict=True)]
        cost = statistics.median(saved)
        deviation = statistics.median(abs(value - cost) for value in saved)
        label = name.removeprefix("without:")
        if label == "all":
            label = "all layers and the permission lookup (route and its own query only)"
        lines.append(
            f"| {label} | {median['rps']:.0f} | {_ms(median['p99_ms'])} "
            f"| {median['redis_round_trips_per_request']:.1f} | {median['non_2xx']:.0f} "
            f"| {median['cpu_us_per_request']:.0f} | {'~' if abs(cost) <= deviation else ''}{cost:.0f} ± "
            f"{deviation:.0f} | {cost / gap:.0%} |"
        )
    return lines


def _slowapi(results: dict[str, Any]) -> list[str]:
    scenarios = results["scenarios"]
    ours, theirs = scenarios["c"]["median"], scenarios["e"]["median"]
    lines = [
        f"- slowapi in place of the project's limiter: {theirs['rps']:.0f} vs {ours['rps']:.0f} req/s "
        f"({theirs['rps'] / ours['rps']:.2f}x), p99 {_ms(theirs['p99_ms'])} vs {_ms(ours['p99_ms'])} ms; "
        f"Redis round trips per request {theirs['redis_round_trips_per_request']:.1f} (slowapi's are synchronous: "
        f"the event loop waits) vs {ours['redis_round_trips_per_request']:.1f}; commands per request, those run "
        f"inside Lua scripts included: {theirs['redis_commands_per_request']:.1f} vs "
        f"{ours['redis_commands_per_request']:.1f}.",
    ]
    outage = results.get("outage", {})
    if outage:
        ours, strict, swallow = outage["full"], outage["slowapi"], outage["slowapi:swallow"]
        lines.append(
            f"- Redis stopped: the project's limiter answered {ours['status']} in {ours['ms']} ms; slowapi answered "
            f"{strict['status']} in {strict['ms']} ms (default `swallow_errors=False`) and {swallow['status']} in "
            f"{swallow['ms']} ms (`swallow_errors=True`). Both slowapi variants run "
            "with RATE_LIMIT_FAILURE_MODE=open so that the service's own Redis check (token revocation) lets the "
            "request reach slowapi."
        )
    return lines


def _compared(results: dict[str, Any]) -> list[str]:
    """--compare-with: (c) against the same read on the other service (h), round by round."""
    scenarios = results["scenarios"]
    if "h" not in scenarios:
        return []
    ours, theirs = scenarios["c"]["median"], scenarios["h"]["median"]
    runs = zip(scenarios["c"]["runs"], scenarios["h"]["runs"], strict=True)
    paired = [a["cpu_us_per_request"] / b["cpu_us_per_request"] if b["cpu_us_per_request"] else 0.0 for a, b in runs]
    return [
        "### This service against --compare-with",
        "",
        f"- (c), this service: {ours['cpu_us_per_request']:.0f} CPU µs/req, {ours['rps']:.0f} req/s",
        f"- (h), {scenarios['h']['label']}: {theirs['cpu_us_per_request']:.0f} CPU µs/req, {theirs['rps']:.0f} req/s",
        f"- (c) ÷ (h) CPU per request, round by round: {', '.join(f'{ratio:.3f}' for ratio in paired)}",
        *_jwt_layer(scenarios),
        "",
    ]


def _jwt_layer(scenarios: dict[str, Any]) -> list[str]:
    """The Authenticate layer's own CPU per request on each side: the read with it minus the read
    without it, (c) - (i) here and (h) - (j) there, round by round (the rounds alternate, so each
    difference is taken within one round)."""
    if "i" not in scenarios or "j" not in scenarios:
        return []

    def per_round(with_layer: str, without: str) -> list[float]:
        pairs = zip(scenarios[with_layer]["runs"], scenarios[without]["runs"], strict=True)
        return [a["cpu_us_per_request"] - b["cpu_us_per_request"] for a, b in pairs]

    ours, theirs = per_round("c", "i"), per_round("h", "j")
    return [
        f"- The JWT layer (Authenticate), CPU µs/req: here (c) - (i) = {statistics.median(ours):.0f} "
        f"(rounds {', '.join(f'{value:.0f}' for value in ours)}); there (h) - (j) = "
        f"{statistics.median(theirs):.0f} (rounds {', '.join(f'{value:.0f}' for value in theirs)})",
    ]


def _engines(results: dict[str, Any]) -> list[str]:
    """authz_engine=cerbos: the same read decided by the PDP (c) and by the permissions table (g)."""
    scenarios = results["scenarios"]
    if "g" not in scenarios:
        return []
    pdp, table = scenarios["c"]["median"], scenarios["g"]["median"]
    runs = zip(scenarios["c"]["runs"], scenarios["g"]["runs"], strict=True)
    paired = [ours["rps"] / theirs["rps"] if theirs["rps"] else 0.0 for ours, theirs in runs]
    return [
        "### Authorization engine: Cerbos against the table",
        "",
        f"- (c), the Cerbos PDP deciding (one gRPC CheckResources on loopback per request): {pdp['rps']:.0f} req/s, "
        f"p50 {_ms(pdp['p50_ms'])} ms, p99 {_ms(pdp['p99_ms'])} ms, {pdp['cpu_us_per_request']:.0f} CPU µs/req in the "
        f"service and {pdp['pdp_cpu_us_per_request']:.0f} in the PDP.",
        f"- (g), the permissions table deciding, in the same service: {table['rps']:.0f} req/s, "
        f"p50 {_ms(table['p50_ms'])} ms, p99 {_ms(table['p99_ms'])} ms, {table['cpu_us_per_request']:.0f} CPU µs/req.",
        f"- (c) ÷ (g): {pdp['rps'] / table['rps']:.3f} of the requests per second (target at least {ENGINE_TARGET}); "
        f"round by round (each pair measured back to back): {', '.join(f'{ratio:.3f}' for ratio in paired)}. "
        "The PDP runs on the load generator's core, with Redis and the database: a sidecar shares its node's cores.",
        "",
    ]


def _lookups(results: dict[str, Any]) -> list[str]:
    if "lookups" not in results:
        return [results.get("lookups_skipped", "not run")]
    lookups = results["lookups"]
    lines = [
        "| database | grant rows | calls | median µs | p99 µs | query plan |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in lookups["results"]:
        lines.append(
            f"| {row['database']} | {row['rows']:,} | {row['calls']} | {row['median_us']:.0f} | {row['p99_us']:.0f} "
            f"| {row['plan']} |"
        )
    if "postgresql_skipped" in lookups:
        lines.append(f"\nPostgreSQL not measured: {lookups['postgresql_skipped']}")
    return lines


def markdown(results: dict[str, Any]) -> str:
    sections = [
        "## Pipeline cost",
        "",
        *_machine(results),
        "",
        *_scenarios(results),
        "",
        "### Targets",
        "",
        *_targets(results),
        "",
        "### Per-layer cost",
        "",
        *_layers(results),
        "",
        *_engines(results),
        *_compared(results),
        "### slowapi compared",
        "",
        *_slowapi(results),
        "",
        "### Permission lookup (`security.authz.holds`, one session per call)",
        "",
        *_lookups(results),
        "",
        f"Total bench time: {results.get('elapsed_seconds', '?')} s.",
        "",
    ]
    return "\n".join(sections)
