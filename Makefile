# Two commands do everything on a fresh clone: `make demo` and `make test`.
# The venv is (re)built only when pyproject.toml changes (the stamp file tracks it).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export BCC_HOME ?= $(CURDIR)/var
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo demo-lib airflow test bench lint format venv clean-var help

help:
	@echo "make demo    - set up .venv, then run the main job end to end through Airflow on embedded defaults (SQLite, ./var)"
	@echo "make airflow - the Airflow UI (airflow standalone) with the project's DAGs, on ./var"
	@echo "make demo-lib - the same job without Airflow (the bcc CLI only)"
	@echo "make test   - set up .venv, then run the test suite"
	@echo "make bench  - benchmarks (BENCH_QUICK=1 for the 5-minute version); results in benchmarks/results/"
	@echo "make lint   - ruff check and ruff format --check"
	@echo "make format - apply the one code style (ruff format)"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	scripts/demo.sh

demo-lib: $(STAMP)
	$(BIN)/bcc demo

airflow: $(STAMP)
	scripts/airflow.sh

PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench.py --readme README.md

LINT_PATHS := bcc_pipeline tests benchmarks dags $(wildcard plugins)
lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: $(STAMP)
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

clean-var:
	rm -rf var
