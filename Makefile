# tracestore developer commands. Every target creates the virtualenv (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SCALE ?= 1m

.PHONY: help venv demo test lint bench bench-migration clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(BIN)/tracestore: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

venv: $(BIN)/tracestore  ## create .venv and install tracestore with its dev tools

demo: venv  ## build a SQLite file of synthetic traces through the migrations, query it, show the plan
	$(BIN)/tracestore --url sqlite:///demo.db demo --force

test: venv  ## run the whole test suite (PostgreSQL tests on a throwaway cluster when the server is installed)
	scripts/with-postgres $(BIN)/pytest

lint: venv  ## ruff check, ruff format --check, and mypy --strict on tracestore/ and migrations/
	$(BIN)/ruff check tracestore migrations tests benchmarks examples
	$(BIN)/ruff format --check tracestore migrations tests benchmarks examples
	$(BIN)/mypy

bench: venv  ## the benchmark suite, OTLP ingest and export memory: JSON, tables and plots into benchmarks/results/$(SCALE)/ (SCALE=1m ~ 9 min; 10m ~ 30 min)
	TRACESTORE_PG_OPTIONS="-c shared_buffers=2GB $${TRACESTORE_PG_OPTIONS:-}" scripts/with-postgres $(BIN)/python benchmarks/suite.py --scale $(SCALE)
	$(BIN)/python benchmarks/otlp_ingest.py --json benchmarks/results/$(SCALE)/otlp-ingest.json > benchmarks/results/$(SCALE)/otlp-ingest.txt; \
		status=$$?; cat benchmarks/results/$(SCALE)/otlp-ingest.txt; exit $$status
	$(BIN)/python benchmarks/otlp_ingest.py --senders 2 --json benchmarks/results/$(SCALE)/otlp-ingest-2-senders.json > benchmarks/results/$(SCALE)/otlp-ingest-2-senders.txt; \
		status=$$?; cat benchmarks/results/$(SCALE)/otlp-ingest-2-senders.txt; exit $$status
	$(BIN)/python benchmarks/export_rss.py --keep --json benchmarks/results/$(SCALE)/export-rss.json > benchmarks/results/$(SCALE)/export-rss.txt; \
		status=$$?; cat benchmarks/results/$(SCALE)/export-rss.txt; exit $$status

bench-migration: venv  ## upgrade a legacy file under a live writer, then a kill -9 / rerun (SCALE=1m; 10m ~ 15 min)
	$(BIN)/python benchmarks/bench_migration.py --scale $(SCALE)

clean:  ## remove the virtualenv, build outputs and scratch databases
	rm -rf $(VENV) build dist *.egg-info demo.db* benchmarks/scratch
