# Balcony distillation pipeline. `make demo` and `make test` are the two commands a new
# machine needs; each prepares what it uses.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BIN ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
CONFIG     ?= configs/demo.yaml
ARGS       ?=
# CPU machines take the local CPU build; on a GPU cluster run `make setup TORCH_SPEC=` to keep
# the cluster's own torch.
TORCH_SPEC ?= torch==2.13.0
ASSETS     ?= assets
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

STAMP := $(VENV)/.installed

.PHONY: help setup assets demo test stage-tokenize clean-run

help:
	@echo "make demo    - set up, prepare assets, run the whole pipeline on configs/demo.yaml"
	@echo "make test    - set up, prepare assets, run the test suite"
	@echo "make setup   - create $(VENV) and install the package and its dependencies"
	@echo "make assets  - build the embedded default backbone and corpus under $(ASSETS)/"
	@echo "make stage-tokenize CONFIG=configs/demo.yaml [ARGS='key=value ...']"

setup: $(STAMP)

# Reinstall only when the dependency list changes. deepspeed is an sdist whose build imports
# torch: build it without isolation against the torch installed just before.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.16,<0.20"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

assets: setup
	$(PY) -m pipeline.assets --root $(ASSETS)

stage-tokenize: assets
	$(PY) stages/tokenize_corpus.py --config $(CONFIG) $(ARGS)

test: assets
	$(PY) -m pytest -q tests

clean-run:
	rm -rf runs/
