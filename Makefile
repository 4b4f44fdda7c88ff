# Development tasks. Run them from the repository root with the virtual environment active
# (python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]').
PY ?= python
PATHS ?= .

.PHONY: format lint type-check test-fast test

format:  ## rewrite: ruff format, then ruff check --fix
	$(PY) -m ruff format $(PATHS)
	$(PY) -m ruff check --fix $(PATHS)

lint:  ## check only: formatting and lint rules
	$(PY) -m ruff format --check $(PATHS)
	$(PY) -m ruff check $(PATHS)

type-check:  ## mypy over the library ([tool.mypy] in pyproject.toml)
	$(PY) -m mypy

test-fast:  ## the fast tier: no process-spawning, multi-process or slow tests
	$(PY) -m pytest -q -m "not spawns and not distributed and not slow"

test:  ## the whole suite, exactly as CI runs it (.ci/run)
	$(PY) -m pytest -q
