# deepalign: `make demo` and `make test` are the two commands a new user needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench fashion-mnist clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	command -v apt-get >/dev/null && (dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) || true
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/deepalign demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q
	DEEPALIGN_TEST_THREADS=2 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

# Benchmarks (JSON + logs in bench-out/): `make bench BENCH_ARGS=--quick` for a smoke run.
# They need the peer package `rebasin` (kept out of the runtime dependencies).
bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/run_all.py --out bench-out $(BENCH_ARGS)

# Fashion-MNIST's IDX files from Debian (needs root): /usr/share/datasets/fashion-mnist
fashion-mnist:
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
