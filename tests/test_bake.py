"""Every variant renders completely and keeps only its own option files."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from bake import (
    FULLY_TESTED,
    VARIANTS,
    combined_files,
    option_files,
    report,
    run,
    template_choices,
)
from conftest import BakedProject

# `${{ ... }}` is a GitHub Actions expression, meant to be left as it is.
JINJA_RESIDUE = re.compile(r"(?<!\$)\{\{|\{%|\{#|cookiecutter\.")


def text_files(project: Path) -> list[Path]:
    files = []
    for path in sorted(project.rglob("*")):
        if path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            files.append(path)
    return files


def test_every_option_value_is_baked_by_some_variant() -> None:
    for option, values in template_choices().items():
        baked_values = {
            variant.answers.get(option, values[0]) for variant in VARIANTS.values()
        }
        assert set(values) <= baked_values, (
            f"{option}: no variant bakes {set(values) - baked_values}"
        )


def test_every_fully_tested_variant_is_baked() -> None:
    assert set(FULLY_TESTED) <= set(VARIANTS)


@pytest.mark.parametrize("name", VARIANTS)
def test_bake_uses_the_derived_slug_and_package_name(
    baked: BakedProject, name: str
) -> None:
    variant = VARIANTS[name]
    project = baked(name)
    assert project.name == variant.slug
    assert (project / "src" / variant.package / "__init__.py").is_file()
    assert variant.slug in (project / "pyproject.toml").read_text()


@pytest.mark.parametrize("name", VARIANTS)
def test_no_template_syntax_is_left_in_any_file(baked: BakedProject, name: str) -> None:
    project = baked(name)
    leftovers = [
        str(path.relative_to(project))
        for path in project.rglob("*")
        if JINJA_RESIDUE.search(path.name)
    ]
    for path in text_files(project):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if JINJA_RESIDUE.search(line):
                leftovers.append(
                    f"{path.relative_to(project)}:{number}: {line.strip()}"
                )
    assert not leftovers, "unrendered template syntax:\n" + "\n".join(leftovers)


@pytest.mark.parametrize("name", VARIANTS)
def test_only_the_chosen_option_files_remain(baked: BakedProject, name: str) -> None:
    project = baked(name)
    chosen = VARIANTS[name].chosen
    for option, files_by_value in option_files().items():
        for value, paths in files_by_value.items():
            for path in paths:
                # The hook's paths name the package as the template does.
                relative_path = path.replace(
                    "{{ cookiecutter.package_name }}", VARIANTS[name].package
                )
                exists = (project / relative_path).exists()
                if value == chosen[option]:
                    assert exists, f"{relative_path} ({option}={value}) is missing"
                else:
                    assert not exists, (
                        f"{relative_path} ({option}={value}) was not removed"
                    )


@pytest.mark.parametrize("name", VARIANTS)
def test_a_combination_file_remains_only_with_all_its_options(
    baked: BakedProject, name: str
) -> None:
    project = baked(name)
    chosen = VARIANTS[name].chosen
    for path, options in combined_files().items():
        wanted = all(chosen[option] == "yes" for option in options)
        assert (project / path).exists() == wanted, f"{path} ({', '.join(options)})"


@pytest.mark.parametrize("name", VARIANTS)
def test_python_files_compile(baked: BakedProject, name: str) -> None:
    project = baked(name)
    result = run([sys.executable, "-m", "compileall", "-q", str(project)], cwd=project)
    assert result.returncode == 0, report(result)


def test_a_custom_name_leaves_no_trace_of_the_default_package(
    baked: BakedProject,
) -> None:
    project = baked("custom-name")
    mentions = [
        str(path.relative_to(project))
        for path in text_files(project)
        if "secure_api" in path.read_text(errors="replace")
    ]
    assert not mentions, f"default package name left in: {mentions}"


@pytest.mark.parametrize(
    ("name", "driver"), [("default", "aiosqlite"), ("postgresql", "asyncpg")]
)
def test_database_variant_depends_on_its_driver(
    baked: BakedProject, name: str, driver: str
) -> None:
    assert driver in (baked(name) / "pyproject.toml").read_text()


@pytest.mark.parametrize("name", FULLY_TESTED)
def test_the_production_checklist_names_every_setting_production_requires(
    baked: BakedProject, name: str
) -> None:
    """The Production checklist (docs/production.md) against the baked code's refusals ("X: required in
    production"); its links name pages and headings that exist (mkdocs build --strict, in the baked
    tests/test_docs.py, checks the rest of the site)."""
    project = baked(name)
    sources = "\n".join(path.read_text() for path in (project / "src").rglob("*.py"))
    required = set(re.findall(r"\b([A-Z][A-Z0-9_]+)(?: or [A-Z0-9_]+)?: required in production", sources))
    required |= set(re.findall(r"\bor ([A-Z][A-Z0-9_]+): required in production", sources))
    page = (project / "docs" / "production.md").read_text()
    section = page[page.index("# Production\n") :].split("\n\n")
    checklist = next(block for block in section if block.startswith("- [ ] "))
    listed = set(re.findall(r"`([A-Z][A-Z0-9_]+)(?:=[a-z]+)?`", checklist))
    assert required, "no production refusal found in the sources"
    assert required <= listed, f"not in the Production checklist: {sorted(required - listed)}"
    links = re.findall(r"\]\(([a-z0-9-]+\.md)(?:#([a-z0-9-]+))?\)", checklist)
    assert links, "the checklist links to no page"
    for target, anchor in links:
        assert (project / "docs" / target).is_file(), f"the checklist links to {target}, which docs/ lacks"
        headings = {
            re.sub(r"[^a-z0-9 -]", "", heading.lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", (project / "docs" / target).read_text(), re.MULTILINE)
        }
        assert not anchor or anchor in headings, f"the checklist links to {target}#{anchor}, which no heading makes"
