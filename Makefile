# harvester: `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo demo-clean test lint typecheck unit bench clean chaos image lock

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "harvester needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,postgres]'
	@# Playment's official SDK, for the contract tests, kept out of the venv's site-packages:
	@# its wheel also installs top-level `tests` and `examples` packages that shadow ours.
	$(BIN)/python -m pip install --quiet --target $(VENV)/sdk/playment 'playment>=1.0.5' 'requests>=2.31'
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
	$(BIN)/mypy --strict bench

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

## chaos: the full reliability sweep (76 seeded SIGKILL cases incl. the daemon, fault
## storms with a 60 s outage, bad input, secrets); figures in .chaos/summary.md
chaos: $(STAMP)
	@mkdir -p .chaos && rm -f .chaos/report.jsonl
	@start=$$(date +%s); \
	CHAOS_REPORT=.chaos/report.jsonl CHAOS_DOWN_S=60 $(BIN)/pytest -q -m "chaos or not chaos" \
		tests/chaos tests/badinput; status=$$?; \
	$(BIN)/python tests/chaos/summary.py .chaos/report.jsonl $$(( $$(date +%s) - start )) \
		| tee .chaos/summary.md; exit $$status

## bench: run the benchmarks against the emulator and rewrite BENCHMARKS.md
bench: $(STAMP)
	$(BIN)/python bench/run.py

## image: build the container image (Docker or buildah; registry or Debian base): IMAGE=harvester:dev
image:
	@bash configs/image.sh

## lock: re-pin the image's dependencies (constraints.txt) to what pip resolves today
lock: $(STAMP)
	@bash configs/lock.sh

clean:
	rm -rf $(VENV) .demo .mypy_cache .ruff_cache .pytest_cache
