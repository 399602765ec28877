# Two commands on a fresh machine: `make demo` and `make test`.
# Installs use the exact versions in constraints.txt; `make lock` refreshes it, `make test-latest` tries the newest.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
LOCK := constraints.txt
LATEST := .venv-latest

.PHONY: install demo test lint format lock test-latest clean

# PIP_CONSTRAINT also reaches pip's isolated build environment, so the build backend is the locked one too.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/$(LOCK) $(BIN)/python -m pip install pip setuptools
	PIP_CONSTRAINT=$(CURDIR)/$(LOCK) $(BIN)/python -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/histotransfer demo --out $(DEMO_DIR)
	$(BIN)/histotransfer study examples/demo_study.yaml --out $(DEMO_DIR)/study

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# Rewrites the code in the project's one style (what `make lint` checks).
format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q

# A throw-away environment of the newest releases that pyproject.toml allows.
$(LATEST)/.installed: pyproject.toml
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --upgrade pip setuptools
	$(LATEST)/bin/python -m pip install -e ".[test]"
	touch $@

# Writes constraints.txt from the newest releases; commit it once `make test` passes with it.
lock:
	rm -rf $(LATEST)
	$(MAKE) $(LATEST)/.installed
	{ echo "# Exact versions for 'make install' (pip constraints). Refresh: make lock"; \
	  $(LATEST)/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

test-latest: $(LATEST)/.installed
	$(LATEST)/bin/ruff check src tests benchmarks
	$(LATEST)/bin/mypy
	$(LATEST)/bin/python -m pytest -q

clean:
	rm -rf $(DEMO_DIR) build .pytest_cache
