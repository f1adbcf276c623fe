# mocosfl — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?=
PROFILE_ARG := $(if $(PROFILE),--profile $(PROFILE),)
MOCOSFL := $(VENV)/bin/mocosfl

.DEFAULT_GOAL := help
.PHONY: help setup test test-fast lint pipeline serve ui tune bench results clean gpu-check services services-stop \
	deploy worker evidence ref-venv

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=test|smoke|cpu|paper (default: params.yaml's profile), OVERRIDES='k=v k2=v2'"

setup: $(VENV)/.installed  ## create .venv and install mocosfl with its dependencies

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[pipeline,dev]'
	@touch $@

test: setup  ## run the whole test suite (what CI runs)
	$(PY) -m pytest -q

test-fast: setup  ## run the tests not marked slow
	$(PY) -m pytest -q -m "not slow"

lint: setup  ## ruff check + ruff format --check (mocosfl pipelines tests scripts) + mypy (mocosfl pipelines)
	$(VENV)/bin/ruff check mocosfl pipelines tests scripts
	$(VENV)/bin/ruff format --check mocosfl pipelines tests scripts
	$(VENV)/bin/mypy mocosfl pipelines

pipeline: setup  ## the Prefect flow prepare -> partition -> pretrain -> evaluate -> report (PROFILE=smoke: ~2 min)
	$(PY) -m pipelines.run $(PROFILE_ARG) $(foreach o,$(OVERRIDES),--set $(o))

services: setup  ## PostgreSQL + MLflow (5000) + Prefect (4200) servers in the background (SERVICES_HOST, *_PORT)
	$(PY) -m pipelines.services start

services-stop: setup  ## stop what `make services` started
	$(PY) -m pipelines.services stop

deploy: setup  ## register prefect.yaml's deployments on the work pool `mocosfl` (server: PREFECT_API_URL or .services/env)
	VENV=$(VENV) bash scripts/pool.sh deploy

worker: setup  ## a worker of the pool `mocosfl` in the foreground (LIMIT=flow runs at a time, 1; THREADS=torch threads)
	VENV=$(VENV) $(if $(LIMIT),LIMIT=$(LIMIT),) $(if $(THREADS),THREADS=$(THREADS),) bash scripts/pool.sh worker

serve: setup  ## Prefect server on 127.0.0.1:4200 + deployments mocosfl/{pretrain,pipeline,tune} (foreground)
	VENV=$(VENV) bash scripts/serve.sh

ui: setup  ## MLflow UI on http://127.0.0.1:5000 (foreground)
	VENV=$(VENV) bash scripts/ui.sh

tune: setup  ## Optuna study over sync period and queue size
	$(MOCOSFL) tune $(PROFILE_ARG) $(foreach o,$(OVERRIDES),--set $(o))

bench: setup  ## simulation vs centralized MoCo step time (CLIENTS=100,1000,10000)
	$(MOCOSFL) bench $(PROFILE_ARG) $(if $(CLIENTS),--clients $(CLIENTS),)

# The reference code's own virtualenv (official-bench needs kornia etc.; kept apart from .venv).
REF_VENV ?= .ref-venv
REF_MIRROR ?=
evidence: setup $(if $(REF_MIRROR),ref-venv,)  ## re-measure README's speed/memory/distributed/tuning/attack figures: reports/evidence.md (REF_MIRROR=)
	$(PY) scripts/evidence.py $(if $(REF_MIRROR),--ref-python $(REF_VENV)/bin/python --mirror $(REF_MIRROR),)

ref-venv:  ## the reference code's virtualenv for `make evidence REF_MIRROR=...` (REF_VENV=.ref-venv)
	test -x $(REF_VENV)/bin/python || $(PYTHON) -m venv $(REF_VENV)
	$(REF_VENV)/bin/python -c "import kornia, sklearn, torchvision" 2>/dev/null || $(REF_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1 kornia scikit-learn matplotlib

gpu-check: setup  ## CUDA tests + width-64 bench in fp32/TF32 and bf16 (one JSON line; skips without a GPU)
	$(PY) scripts/gpu_check.py

results: setup  ## table reports/results-<profile>[-<suite>].md (SUITE=main|full|long|paper|privacy|check, SEEDS=N, EXECUTOR=pool, ESTIMATE=no)
	$(MOCOSFL) results $(PROFILE_ARG) $(if $(SUITE),--suite $(SUITE),) $(if $(SEEDS),--seeds $(SEEDS),) \
		$(if $(EXECUTOR),--executor $(EXECUTOR),) $(if $(filter no,$(ESTIMATE)),--no-estimate,) \
		$(foreach o,$(OVERRIDES),--set $(o))

clean:  ## remove generated data, runs, metrics and reports (keeps .venv, mlflow.db, committed results and evidence)
	rm -rf data runs metrics tune
	find reports -mindepth 1 ! -name 'results-cpu*' ! -name 'evidence.*' -delete 2>/dev/null || true

# DVC: stages in dvc.yaml, state and telemetry kept inside the project. The stages call scripts/mocosfl,
# which finds the workspace's .venv (or $MOCOSFL_VENV) also from `dvc exp run --temp/--queue` copies;
# `dvc queue start` starts its worker as `dvc` from PATH, so run dvc by hand with the venv's bin first:
#   PATH=$PWD/.venv/bin:$PATH dvc exp run --queue -S pretrain.lr=0.03 && PATH=$PWD/.venv/bin:$PATH dvc queue start
.PHONY: repro push pull
DVC := PATH=$(abspath $(VENV))/bin:$$PATH MOCOSFL_VENV=$(abspath $(VENV)) DVC_NO_ANALYTICS=1 \
	DVC_SITE_CACHE_DIR=$(CURDIR)/.dvc/tmp/site-cache $(VENV)/bin/dvc

repro: setup  ## dvc repro: re-run the dvc.yaml stages whose inputs changed (params.yaml's profile)
	$(DVC) repro

push: setup  ## dvc push data, runs, metrics and reports to the DVC remote (default: .dvcstore/)
	$(DVC) push

pull: setup  ## dvc pull data, runs, metrics and reports from the DVC remote
	$(DVC) pull
