# The README's two commands: `make run` starts the whole system on embedded defaults,
# `make test` runs the whole suite. Both create the virtual environment on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed

.PHONY: run test install bench clean

$(DEPS): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first (constraints-cpu.txt), so no multi-GB CUDA download happens
	$(BIN)/pip install -q -c constraints-cpu.txt torch
	$(BIN)/pip install -q -c constraints-cpu.txt ".[dev]"
	@if command -v npm >/dev/null 2>&1 && [ -f tests/js/package-lock.json ]; then \
		cd tests/js && npm ci --no-audit --no-fund --silent; fi
	touch $@

# Non-editable install: the project's `fhir` package and fhir.resources then share one folder.
# setuptools' build/ keeps files the tree no longer has (a renamed migration became a second head): start clean.
install: $(DEPS)
	rm -rf build
	$(BIN)/pip install -q --no-deps --force-reinstall --no-compile .

run: install
	$(BIN)/python -m skinbridge up

# The suite runs on SQLite, then every database test again on PostgreSQL (127.0.0.1:5432).
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	SKINBRIDGE_TEST_BACKEND=postgresql $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m skinbridge bench inference --json var/bench-inference.json

clean:
	rm -rf $(VENV) build *.egg-info
