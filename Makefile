# harvester: `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-clean test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "harvester needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres]'
	@touch $(STAMP)

install: $(STAMP)

## demo: start the built-in emulator, harvest the demo jobs against it, stop the emulator
demo: $(STAMP)
	@bash configs/demo.sh

demo-clean:
	rm -rf .demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy --strict harvester

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

## bench: run the benchmarks against the emulator and rewrite BENCHMARKS.md
bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .demo .mypy_cache .ruff_cache .pytest_cache
