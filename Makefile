# nanoPoSE: `make test`, `make demo` and `make demo-real` build everything they need from scratch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# a CPU wheel of torch 2.13.0 lies on the CI disk; any other pin downloads a multi-GB CUDA build
TORCH := torch==2.13.0
# the older transformers line our exports are tested against (tests/test_export_compat.py), in its
# own venv
VENV_HF445 := .venv-hf445
HF445 := transformers==4.45.2

.PHONY: install install-dev test demo demo-real clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python requirements.txt
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# make demo-real only: transformers + gguf + accelerate read SmolLM2's GGUF (demo/convert_gguf.py),
# matplotlib plots
$(VENV)/.installed-real: $(VENV)/.installed requirements-real.txt
	$(BIN)/pip install -q -r requirements-real.txt
	touch $@

$(VENV_HF445)/.installed:
	$(PY) -m venv $(VENV_HF445)
	$(VENV_HF445)/bin/pip install -q $(TORCH) $(HF445)
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

test: $(VENV)/.installed-dev $(VENV_HF445)/.installed
	HF445_PYTHON=$(abspath $(VENV_HF445))/bin/python $(BIN)/python -m pytest -q tests

# make demo SEEDS="1 2 3": one run per seed, the table gives each cell's mean (min-max)
SEEDS ?= 1
demo: $(VENV)/.installed-dev  # matplotlib for the plots
	PY=$(BIN)/python SEEDS="$(SEEDS)" bash demo/mini.sh

demo-real: $(VENV)/.installed-real
	PY=$(BIN)/python bash demo/real.sh

clean:
	rm -rf $(VENV) $(VENV_HF445) out-* data-*
