"""The documentation site (mkdocs.yml, docs/): it builds with `mkdocs build --strict`, which fails on a
broken link, anchor or nav entry, and README.md's map names every page the site has.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
DOCS = PROJECT / "docs"


def mkdocs_build(project: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=project,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        check=False,
    )


def copy_of_the_docs(tmp_path: Path) -> Path:
    copy = tmp_path / "project"
    copy.mkdir()
    shutil.copytree(DOCS, copy / "docs")
    for name in ("mkdocs.yml", "README.md"):  # index.md includes README.md's quick start
        shutil.copyfile(PROJECT / name, copy / name)
    return copy


def test_the_site_builds_with_strict_link_and_anchor_checks(tmp_path: Path) -> None:
    built = mkdocs_build(PROJECT, tmp_path / "site")
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "site" / "production" / "index.html").is_file()
    # The quick start on the site's home page is README.md's, included (pymdownx.snippets).
    home = (tmp_path / "site" / "index.html").read_text()
    assert "A development token" in home


def test_a_broken_anchor_a_missing_page_and_a_page_outside_the_nav_each_fail_the_build(tmp_path: Path) -> None:
    copy = copy_of_the_docs(tmp_path)
    page = copy / "docs" / "transport.md"
    page.write_text(
        page.read_text() + "\nSee [lockout](rate-limiting.md#no-such-section) and [the old page](no-such-page.md).\n"
    )
    (copy / "docs" / "orphan.md").write_text("# Orphan\n")
    built = mkdocs_build(copy, tmp_path / "site")
    assert built.returncode != 0
    # Each is a warning (which --strict turns into the failure); a validation left at mkdocs' default
    # would only mention its defect as INFO.
    warnings = [line for line in built.stderr.splitlines() if line.startswith("WARNING")]
    for defect in ("no-such-section", "no-such-page.md", 'not included in the "nav"'):
        assert any(defect in line for line in warnings), f"{defect} is not a warning:\n{built.stderr}"
    assert "orphan.md" in built.stderr


def test_the_readme_maps_every_page_of_the_site_and_its_links_resolve() -> None:
    readme = (PROJECT / "README.md").read_text()
    links = re.findall(r"\]\(docs/([a-z0-9/-]+\.md)(?:#([a-z0-9-]+))?\)", readme)
    linked = {page for page, _anchor in links}
    pages = {page.name for page in DOCS.glob("*.md")} - {"index.md"}
    assert pages <= linked, f"README.md's map lacks {sorted(pages - linked)}"
    missing = {page for page in linked if not (DOCS / page).is_file()}
    assert not missing, f"README.md links to pages that do not exist: {sorted(missing)}"
    for page, anchor in links:
        # GitHub's heading ids (README.md is read there): lower case, punctuation dropped, hyphens.
        headings = re.findall(r"^#+ (.+)$", (DOCS / page).read_text(), re.MULTILINE)
        ids = {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}
        assert not anchor or anchor in ids, f"README.md links to docs/{page}#{anchor}, which no heading makes"
