# Two set-up commands for a fresh machine with only Python: `make demo` and `make test`.
# Each creates the virtual environment .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo_out

.PHONY: demo test lint bench clean-venv

$(BIN)/holons: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(BIN)/holons

demo: $(BIN)/holons
	$(BIN)/holons demo --out $(DEMO_OUT)

test: $(BIN)/holons
	$(BIN)/ruff check holons tests benchmarks docs
	$(BIN)/python -m pytest -q tests

bench: $(BIN)/holons
	$(BIN)/python benchmarks/run.py

clean-venv:
	rm -rf $(VENV)
