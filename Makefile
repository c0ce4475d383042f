# GLUScope: `make demo` sets up and runs the demo end to end; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The demo's token budget and dtype: `make demo TOKENS=1M DTYPE=bfloat16`. DTYPE auto picks
# bfloat16 only where the CPU (AVX512-BF16, AMX) or GPU runs it natively, else float32.
TOKENS ?= 100k
DTYPE ?= auto

.PHONY: setup demo test test-fast bench clean

# torch 2.13.0 first: a CPU build is cached on the project machines, and pinning it keeps pip
# from resolving a multi-GB CUDA build. On a GPU machine install your CUDA torch instead.
$(BIN)/gluscope: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[collect,dev]"
	touch $@

setup: $(BIN)/gluscope

demo: setup
	$(BIN)/gluscope demo --max-tokens $(TOKENS) --dtype $(DTYPE)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "" -q -p no:cacheprovider

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow" -q

bench: setup
	$(BIN)/python bench/collect_overhead.py
	$(BIN)/python bench/site_build.py

clean:
	rm -rf site test-output
