# vae_lightning: `make help` lists the targets. ARGS="..." passes Hydra overrides.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= data
ARGS ?=
PYTEST_ARGS ?=
# one pytest worker per core, a test file's tests in one worker (its module fixtures built once)
PYTEST_WORKERS ?= -n auto --dist loadfile
TB_HOST ?= 127.0.0.1
TB_PORT ?= 6006
# pip's warnings about index folders this machine's global config names but lacks are noise
PIP_QUIET := grep -v -e "is ignored: it is neither a file nor a directory" || true

.PHONY: help install data train sweep report evaluate classifiers reproduce reproduce-quick claims zoo bench bench-gpu gpu-bundle test test-fast test-wheel lint format tensorboard clean distclean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(VENV)/.installed ## create .venv and install the package with its dev tools (quick when done)

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | { $(PIP_QUIET); }
	touch $@

data: install ## fetch and verify MNIST and Fashion-MNIST into $(DATA_DIR)/ (offline sources work)
	$(BIN)/vae-data data_dir=$(abspath $(DATA_DIR))

train: data ## train (default: seed 1's VAE on MNIST); ARGS="experiment=seed2_convvae_fashion ..."
	$(BIN)/python -m vae_lightning.train paths.data_dir=$(abspath $(DATA_DIR)) $(ARGS)

sweep: data ## latent_dim x beta sweep (20 jobs) and its REPORT.md; ARGS="hydra/launcher=joblib ..."
	$(BIN)/python -m vae_lightning.train experiment=sweep_latent_beta paths.data_dir=$(abspath $(DATA_DIR)) $(ARGS)

report: install ## REPORT.md, summary.csv and plots for every run folder below DIR=...
	@test -n "$(DIR)" || { echo "usage: make report DIR=outputs/<task>/multiruns/<stamp>"; exit 2; }
	$(BIN)/vae-report dir=$(DIR) $(ARGS)

evaluate: data ## metrics and image grids from a checkpoint: CKPT=<run>/checkpoints/last.ckpt [ARGS="k=5000 probes=true"]
	@test -n "$(CKPT)" || { echo "usage: make evaluate CKPT=<run folder>/checkpoints/<file>.ckpt"; exit 2; }
	$(BIN)/vae-evaluate ckpt=$(CKPT) $(ARGS)

classifiers: data ## train (or check) the cached FID classifiers under $(DATA_DIR)/classifiers
	$(BIN)/vae-evaluate classifiers=true data_dir=$(abspath $(DATA_DIR))

reproduce: data ## both seeds at full length, evaluated, into outputs/reproduce/REPORT.md (hours on a CPU)
	$(BIN)/vae-reproduce data_dir=$(abspath $(DATA_DIR)) $(ARGS)

reproduce-quick: data ## the same pipeline with 2 epochs per model, into outputs/reproduce_quick/
	$(BIN)/vae-reproduce quick=true data_dir=$(abspath $(DATA_DIR)) $(ARGS)

claims: data ## the seeds' proposals on seed 2's ConvVAE, measured: outputs/claims_5ep/CLAIMS.md (~1.5 h on 2 cores)
	$(BIN)/vae-claims data_dir=$(abspath $(DATA_DIR)) $(ARGS)

zoo: data ## every model (CVAE, HVAE, deeper ConvVAE, VQ-VAE) beside the seeds': outputs/zoo_4ep/ZOO.md (~57 min on 2 cores)
	$(BIN)/vae-zoo data_dir=$(abspath $(DATA_DIR)) $(ARGS)

bench: data ## the framework's training path against a bare PyTorch loop (writes bench.json)
	$(BIN)/vae-bench data_dir=$(abspath $(DATA_DIR)) $(ARGS)

# the GPU checks' Python: the venv's here; on a GPU machine without one (PyTorch only), its own,
# with the Hydra that `make gpu-bundle` packed into .gpu/site
GPU_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_PATH := $(if $(wildcard .gpu/site),PYTHONPATH=$(CURDIR)/.gpu/site:$(CURDIR),)

bench-gpu: ## every GPU check in one command (tests, CUDA bench, both studies, fused sweep, resume): bench_gpu.json
	@$(GPU_PATH) PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m vae_lightning.studies.bench_gpu $(ARGS)

gpu-bundle: data ## pack Hydra and the gzipped data into .gpu/ for a GPU machine without them (carry .gpu)
	rm -rf .gpu && mkdir -p .gpu/site .gpu/data_gz
	site=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  cp -r "$$site/hydra" "$$site/omegaconf" "$$site/antlr4" .gpu/site/
	for d in MNIST FashionMNIST; do mkdir -p .gpu/data_gz/$$d; \
	  for f in $(DATA_DIR)/$$d/raw/*-ubyte; do gzip -c "$$f" > .gpu/data_gz/$$d/$$(basename "$$f").gz; done; done
	@du -sh .gpu

test: install ## run the test suite (slow tests included; about 7 minutes on 2 slow CPU cores)
	$(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-fast: install ## the test suite without tests marked slow
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-wheel: install ## the wheel in a fresh venv with all its dependencies (GBs; not in make test), trained and evaluated outside the clone
	VAE_WHEEL_FULL=1 $(BIN)/python -m pytest tests/test_packaging.py -k installed_wheel -rP $(PYTEST_ARGS)

lint: install ## ruff lint and format check, and the floors' import contract (import-linter)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install ## ruff: fix what it can and format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

tensorboard: install ## TensorBoard over outputs/ on $(TB_HOST):$(TB_PORT) (localhost unless told otherwise)
	$(BIN)/tensorboard --logdir outputs --host $(TB_HOST) --port $(TB_PORT)

clean: ## remove caches and build files (keeps data/, outputs/ and .venv)
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache build *.egg-info

distclean: clean ## also remove .venv (keeps data/ and outputs/)
	rm -rf $(VENV)
