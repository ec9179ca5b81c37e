# Template-level commands, with uv. `make test` (and lock, bench) use the test toolchain in .venv
# (requirements-dev.txt); `make demo` and `make demo-tour` install only what they run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# uv: one on PATH, else the uv wheel the baked services' lock pins, from PyPI with its hash checked
# (their scripts/locked_uv.py: no pip needed), in build/uv.
UV_BOOT := build/uv
UV ?= $(firstword $(shell command -v uv 2>/dev/null) $(UV_BOOT)/bin/uv)

.PHONY: test demo demo-tour demo-timing bench lock tags release clean

# Two pytest-xdist workers (TEST_WORKERS=0 for one process): the variants installed in a venv take
# turns on one worker, one venv per database (tests/conftest.py, its scheduler); every other test
# goes to whichever worker is free.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(BIN)/pytest tests -q -n $(TEST_WORKERS)

# Bakes the default answers (cookiecutter run by `uv tool run`) and installs the service's locked
# runtime set into its own .venv: no test toolchain.
demo: $(UV)
	UV=$(UV) scripts/demo.sh

# How long a fresh clone's `make demo` takes to serve, with uv's cache warm and empty, and on what
# machine; TIMING_ARGS e.g. "--runs 3" or "--warm-only".
demo-timing: $(UV)
	$(PYTHON) scripts/demo_timing.py --uv $(UV) $(TIMING_ARGS)

# One refusal per pipeline layer against the real service, then it stops; README's first table.
# Its own venv: cookiecutter, then the baked service's locked runtime set (scripts/demo_tour.py).
TOUR_VENV := build/tour-venv
demo-tour: $(UV)
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(TOUR_VENV)
	$(UV) pip install --quiet --python $(TOUR_VENV)/bin/python "cookiecutter>=2.6"
	UV=$(abspath $(UV)) $(TOUR_VENV)/bin/python scripts/demo_tour.py $(TOUR_ARGS)

# wrk from Debian when missing and we may install it; else bench/ falls back to a Python load
# generator and says so. Driver flags in BENCH_ARGS, e.g. BENCH_ARGS="--duration 2 --update-docs".
bench: $(VENV)/.installed
	command -v wrk >/dev/null || [ "$$(id -u)" != 0 ] || (apt-get update -q && apt-get install -y -q wrk) </dev/null || true
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The uv.lock every baked service ships, one per combination of the options that change its
# pyproject.toml (scripts/lock.py); UPGRADE=1 for the newest releases pyproject.toml allows.
lock: $(VENV)/.installed
	$(BIN)/python scripts/lock.py $(if $(UPGRADE),--upgrade)

# The annotated vX.Y.Z tags of every release, made from the history (CHANGELOG.md, VERSION) in
# this clone; the template's CI pushes them (.github/workflows/release.yml). Standard library only.
tags:
	$(PYTHON) scripts/release.py tags

# The release commit's edit: `make release NEW=X.Y.Z` sets VERSION and closes CHANGELOG.md's
# [Unreleased] section as that release; review, commit both, merge to the default branch.
release:
	$(PYTHON) scripts/release.py prepare $(NEW)

$(VENV)/.installed: requirements-dev.txt | $(UV)
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --python $(BIN)/python -r requirements-dev.txt
	touch $@

$(UV_BOOT)/bin/uv:
	$(PYTHON) '{{cookiecutter.project_slug}}/scripts/locked_uv.py' --install $(UV_BOOT) --lock "$$(ls '{{cookiecutter.project_slug}}'/locks/*/uv.lock | head -n 1)"

clean:
	rm -rf build $(VENV)
