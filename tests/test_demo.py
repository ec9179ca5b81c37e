"""`make demo-tour` keeps working: every row gets its status and its audit line, Ctrl-C
stops what the tour started, and README shows the rows the tour prints.

The tour runs as `make demo-tour` runs it, minus the bake: this session's default bake
is installed in this venv already, and `--project` points the tour at it. Titles and
event names are left to the service; statuses and trace ids are the contract.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bake import TEMPLATE_DIR, report, run

TOUR = TEMPLATE_DIR / "scripts" / "demo_tour.py"
README = TEMPLATE_DIR / "README.md"
# Each row's layer and status, in the order the tour prints them (pipeline order).
EXPECTED = [
    ("transport", 400),  # untrusted Host
    ("transport", 403),  # CORS preflight from an origin not allowed
    ("transport", 413),  # body over MAX_BODY_BYTES
    ("address limit", 429),  # RATE_LIMIT_IP reached
    ("authentication", 401),  # no token
    ("authentication", 401),  # tampered token
    ("validation", 400),  # unknown body field
    ("authorization", 403),  # token without the scope
    ("authorization", 403),  # another subject's org
    ("authorization", 403),  # an org that does not exist
    ("business logic", 201),  # authorized create
]
ANOTHER_SUBJECTS_ORG, NONEXISTENT_ORG = 8, 9

pytestmark = pytest.mark.parametrize("installed_project", ["default"], indirect=True)


@dataclass
class Tour:
    limiter: str
    stdout: str
    rows: list[dict[str, Any]]


@pytest.fixture(scope="module", params=["redis", "memory"])
def tour(
    request: pytest.FixtureRequest,
    installed_project: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Tour:
    """One non-interactive run of the tour, with a private redis-server or without."""
    workdir = tmp_path_factory.mktemp(f"tour-{request.param}")
    rows_file = workdir / "rows.json"
    command = [
        sys.executable, str(TOUR), "--project", str(installed_project),
        "--workdir", str(workdir / "run"), "--limiter", request.param,
        "--json", str(rows_file),
    ]  # fmt: skip
    result = run(command, cwd=TEMPLATE_DIR, timeout=120)
    assert result.returncode == 0, report(result)
    return Tour(request.param, result.stdout, json.loads(rows_file.read_text()))


def layer_name(row: dict[str, Any]) -> str:
    return str(row["layer"]).split(" ", 1)[1]  # "1 transport" -> "transport"


def test_every_row_gets_its_status(tour: Tour) -> None:
    assert [(layer_name(row), row["status"]) for row in tour.rows] == EXPECTED


def test_every_refusal_is_a_problem_document_with_a_title(tour: Tour) -> None:
    for row in tour.rows:
        if row["status"] >= 400:
            problem = row["problem"]
            assert isinstance(problem, dict), row
            assert problem["status"] == row["status"], row
            assert problem["title"] and problem["title"] == row["title"], row
            assert problem["trace_id"] == row["trace_id"], row


def test_every_row_shows_the_log_line_with_its_trace_id(tour: Tour) -> None:
    for row in tour.rows:
        assert row["trace_id"], row
        assert row["audit"], f"no log line for trace id {row['trace_id']}: {row}"
        line = json.loads(row["audit"])
        assert line["trace_id"] == row["trace_id"], row


def test_the_address_limit_answers_with_retry_after(tour: Tour) -> None:
    (limited,) = [row for row in tour.rows if row["status"] == 429]
    assert int(limited["retry_after"]) >= 1, limited


def test_a_nonexistent_org_gets_the_same_403_as_another_subjects(tour: Tour) -> None:
    existing, missing = tour.rows[ANOTHER_SUBJECTS_ORG], tour.rows[NONEXISTENT_ORG]
    assert (existing["status"], missing["status"]) == (403, 403)

    def without_trace(problem: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in problem.items() if key != "trace_id"}

    assert without_trace(existing["problem"]) == without_trace(missing["problem"])


def test_the_output_says_which_rate_limit_storage_it_used(tour: Tour) -> None:
    said = {"redis": "private redis-server", "memory": "in-process limiter"}
    assert said[tour.limiter] in tour.stdout


def test_the_output_shows_each_request_status_and_log_line(tour: Tour) -> None:
    for row in tour.rows:
        assert f"$ {row['curl']}" in tour.stdout, row
        assert row["audit"] in tour.stdout, row
    assert f"{len(EXPECTED)} of {len(EXPECTED)} rows as expected" in tour.stdout


def row_lines(text: str) -> list[tuple[str, str, str]]:
    """Layer, request and status code of each row (`1 transport  untrusted Host  400`).

    Ports, ids, times and Retry-After seconds differ from run to run; these must not.
    """
    rows = []
    for line in text.splitlines():
        if re.match(r"^\d [a-z]", line):
            layer, request, status = re.split(r"\s{2,}", line.strip())[:3]
            rows.append((layer, request, status[:3]))
    return rows


def test_readme_shows_the_rows_the_tour_prints(tour: Tour) -> None:
    start = "<!-- demo-tour output"
    readme = README.read_text()
    assert start in readme, "README.md has no demo-tour output block"
    block = readme.split(start, 1)[1].split("<!-- /demo-tour output -->", 1)[0]
    assert row_lines(block) == row_lines(tour.stdout), (
        "README.md's demo-tour table differs from what the tour prints: "
        "run `make demo-tour TOUR_ARGS=--update-readme`"
    )


# What differs from run to run, each replaced by a placeholder; everything else must match.
VARYING = (
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00"), "<time>"),
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"\bps_[0-9a-f]+"), "ps_<pseudonym>"),  # keyed per run unless AUDIT_PSEUDONYM_KEY is set
    (re.compile(r"\b[0-9a-f]{32}\b"), "<trace id>"),
    (re.compile(r"\b[0-9a-f]{16}\b"), "<span id>"),
    (re.compile(r"127\.0\.0\.1:\d+"), "127.0.0.1:<port>"),
    (re.compile(r'"duration_ms": [\d.]+'), '"duration_ms": <ms>'),
    (re.compile(r"Retry-After: \d+"), "Retry-After: <s>"),
    (re.compile(r"in [\d.]+ s;"), "in <s> s;"),
    (re.compile(r"\(log: [^)]*\)"), "(log: <path>)"),
    (re.compile(r" +$", re.MULTILINE), ""),
)


def normalized(text: str) -> str:
    for pattern, placeholder in VARYING:
        text = pattern.sub(placeholder, text)
    return text.strip()


def test_readme_shows_the_whole_tour_apart_from_times_and_ids(
    installed_project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The README's block is the tour's output, every line of it: only times, ids, ports and
    durations may differ (README "What `make demo-tour` does")."""
    workdir = tmp_path_factory.mktemp("tour-readme")
    command = [sys.executable, str(TOUR), "--project", str(installed_project), "--workdir", str(workdir / "run")]
    result = run(command, cwd=TEMPLATE_DIR, timeout=120)
    assert result.returncode == 0, report(result)
    readme = README.read_text()
    block = readme.split("<!-- demo-tour output: scripts/demo_tour.py --update-readme -->", 1)[1]
    block = block.split("<!-- /demo-tour output -->", 1)[0].strip().removeprefix("```text").removesuffix("```")
    assert normalized(block) == normalized(result.stdout), (
        "README.md's demo-tour block differs from what the tour prints: run `make demo-tour TOUR_ARGS=--update-readme`"
    )


def processes_of(workdir: Path) -> list[str]:
    """Processes whose working directory or command line is in `workdir` (/proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cwd.startswith(str(workdir)) or str(workdir) in command:
            found.append(f"{entry.name}: {command}")
    return found


@pytest.mark.skipif(not Path("/proc/self/cwd").exists(), reason="needs Linux /proc")
def test_ctrl_c_stops_everything_the_tour_started(
    installed_project: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "run"
    command = [
        sys.executable, str(TOUR), "--project", str(installed_project),
        "--workdir", str(workdir), "--limiter", "redis",
    ]  # fmt: skip
    # Its own process group, signalled as a whole: what Ctrl-C in a terminal does.
    tour = subprocess.Popen(
        command,
        cwd=TEMPLATE_DIR,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        # The log appears when redis-server is up and the service is starting.
        while not (workdir / "service.log").exists():
            assert tour.poll() is None, tour.communicate()[0]
            assert time.monotonic() < deadline, "the tour did not start the service"
            time.sleep(0.05)
        os.killpg(tour.pid, signal.SIGINT)
        output, _ = tour.communicate(timeout=30)
    finally:
        if tour.poll() is None:
            os.killpg(tour.pid, signal.SIGKILL)
            tour.wait()
    assert tour.returncode == 130, output
    assert "interrupted" in output
    assert processes_of(workdir) == []
