# Template-level commands. Both create (or reuse) their own virtualenv in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test demo clean

test: $(VENV)/.installed
	$(BIN)/pytest tests -q

demo: $(VENV)/.installed
	VENV=$(VENV) scripts/demo.sh

$(VENV)/.installed: requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

clean:
	rm -rf build $(VENV)
