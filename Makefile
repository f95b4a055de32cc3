PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup bench-setup demo test test-fast bench lint clean

$(BIN)/choreograph: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/choreograph

setup: $(BIN)/choreograph

bench-setup: setup  # the benchmarks' comparisons (FastStream in bench/brokers.py)
	$(BIN)/pip install -q -e '.[dev,bench]'

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

clean:
	rm -rf $(VENV) var .pytest_cache
