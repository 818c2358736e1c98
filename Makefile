# Every target sets up .venv on a fresh machine first (Python 3.11, pinned dependencies).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test test-fast bench clean proto

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

## the main job: the default scenario, run record under runs/
run: $(STAMP)
	$(BIN)/umbel run default

## the whole test suite (slow tests included), on two workers: a test file each, so module
## fixtures run once, the longest files first (tests/conftest.py). Three workers measured no
## faster (1626 s against 1631 s): the suite is CPU-bound on two cores.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

## unit tests only (seconds)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/sim_throughput.py
	$(BIN)/python benchmarks/mixed_regression.py
	$(BIN)/python benchmarks/active_learning.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/koopman.py
	$(BIN)/python benchmarks/deploy_latency.py
	$(BIN)/python benchmarks/backdoor.py --workers 2
	$(BIN)/python benchmarks/ccgc.py --flower
	$(BIN)/python benchmarks/robust_clustered.py --workers 2
	$(BIN)/python benchmarks/mgtab.py --speed --flower --long uniform,scenario
	$(BIN)/python benchmarks/snf.py --flower
	$(BIN)/python benchmarks/ceco.py --flower
	$(BIN)/python benchmarks/sstam.py

clean:
	rm -rf runs .pytest_cache benchmarks/results

## regenerate proto/umbel/v1/*_pb2*.py from monitor.proto (a test fails when they are stale)
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. proto/umbel/v1/monitor.proto
