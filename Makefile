# Template-level commands. Each creates (or reuses) its own virtualenv in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo demo-tour bench lock tags release clean

test: $(VENV)/.installed
	$(BIN)/pytest tests -q

demo: $(VENV)/.installed
	VENV=$(VENV) scripts/demo.sh

# One refusal per pipeline layer against the real service, then it stops; README's first table.
demo-tour: $(VENV)/.installed
	$(BIN)/python scripts/demo_tour.py $(TOUR_ARGS)

# wrk from Debian when missing and we may install it; else bench/ falls back to a Python load
# generator and says so. Driver flags in BENCH_ARGS, e.g. BENCH_ARGS="--duration 2 --update-docs".
bench: $(VENV)/.installed
	command -v wrk >/dev/null || [ "$$(id -u)" != 0 ] || (apt-get update -q && apt-get install -y -q wrk) </dev/null || true
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The locked requirements every baked service ships, one set per database; UPGRADE=1 for the
# newest releases pyproject.toml allows.
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

$(VENV)/.installed: requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

clean:
	rm -rf build $(VENV)
