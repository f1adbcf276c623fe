# mocosfl — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?=
PROFILE_ARG := $(if $(PROFILE),--profile $(PROFILE),)
MOCOSFL := $(VENV)/bin/mocosfl

.DEFAULT_GOAL := help
.PHONY: help setup test test-fast lint pipeline bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: PROFILE=test|smoke|cpu|paper (default: params.yaml's profile)"

setup: $(VENV)/.installed  ## create .venv and install mocosfl with its dependencies

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[pipeline,dev]'
	@touch $@

test: setup  ## run the whole test suite (what CI runs)
	$(PY) -m pytest -q

test-fast: setup  ## run the tests not marked slow
	$(PY) -m pytest -q -m "not slow"

lint: setup  ## ruff + mypy
	$(VENV)/bin/ruff check mocosfl tests
	$(VENV)/bin/mypy mocosfl

pipeline: setup  ## prepare -> partition -> pretrain -> evaluate (PROFILE=smoke for a 2-minute run)
	$(MOCOSFL) prepare $(PROFILE_ARG)
	$(MOCOSFL) partition $(PROFILE_ARG)
	$(MOCOSFL) pretrain $(PROFILE_ARG)
	$(MOCOSFL) evaluate $(PROFILE_ARG)

bench: setup  ## simulation vs centralized MoCo step time (CLIENTS=100,1000,10000)
	$(MOCOSFL) bench $(PROFILE_ARG) $(if $(CLIENTS),--clients $(CLIENTS),)

clean:  ## remove generated data, runs and metrics (keeps .venv)
	rm -rf data runs metrics
