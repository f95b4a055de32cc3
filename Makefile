PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup bench-setup demo test test-fast bench lint clean constraints

# constraints.txt: the versions of every dependency the suite last passed with (`make constraints`)
$(BIN)/choreograph: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(BIN)/choreograph

setup: $(BIN)/choreograph

bench-setup: setup  # the benchmarks' comparisons (FastStream in bench/brokers.py)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,bench]'

demo: setup
	$(BIN)/python -m examples.drone_delivery.demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python bench/chain.py

lint: setup
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy

# The newest releases pyproject.toml allows, resolved in a scratch venv, written to
# constraints.txt; then `make clean test` to check the suite with them before committing.
constraints:
	rm -rf .venv-constraints
	$(PY) -m venv .venv-constraints
	.venv-constraints/bin/pip install -q --upgrade pip
	.venv-constraints/bin/pip install -q -e '.[dev,bench]'
	{ echo "# Versions the test suite passed with: make setup installs these (pip -c)."; \
	  echo "# pyproject.toml keeps the ranges a user's install resolves; refresh: make constraints."; \
	  .venv-constraints/bin/pip freeze --exclude-editable; } > constraints.txt
	rm -rf .venv-constraints

clean:
	rm -rf $(VENV) var .pytest_cache
