# lrpipe: the front door. `make sweep` and `make test` do all their own setup.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DATA := data/FashionMNIST/raw/train-images-idx3-ubyte
PREFECT_DB := .prefect/.db-ready

# Quiet, offline, project-local Prefect and MLflow (see ../shared/FIELD_NOTES.md).
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_LOGGING_LEVEL := WARNING
export PREFECT_SERVER_LOGGING_LEVEL := CRITICAL
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export OMP_WAIT_POLICY := PASSIVE
MLFLOW_URI := sqlite:///$(CURDIR)/mlruns/mlflow.db

# make sweep LRS=0.01,0.1,1 EPOCHS=3 ARGS="--set optim.name=momentum"
LRS ?=
EPOCHS ?=
ARGS ?=
SWEEP_FLAGS := $(if $(LRS),--lrs $(LRS)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(ARGS)

.DEFAULT_GOAL := help
.PHONY: server-stop screenshots help setup data sweep grid search decay schedules transfer optimizers bench server schedule test ui lint clean

help: ## list the targets
	@echo "lrpipe: a learning-rate laboratory for PyTorch"
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  e.g. make sweep LRS=0.01,0.1,1 EPOCHS=3"

setup: $(STAMP) $(DATA) $(PREFECT_DB) ## virtualenv, editable install, data, Prefect database (idempotent)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(DATA): | $(STAMP)
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null || true; \
	fi
	$(PY) -m lrpipe.data --root data

$(PREFECT_DB): $(STAMP)
	@mkdir -p .prefect
	$(VENV)/bin/prefect server database upgrade -y >/dev/null
	touch $@

data: $(DATA) ## prepare Fashion-MNIST under data/

sweep: setup ## the whole pipeline: LR search, full training, decay, transfer (LRS=, EPOCHS=, ARGS=)
	$(VENV)/bin/lrpipe pipeline $(SWEEP_FLAGS)

grid: setup ## just the learning-rate grid: one training per rate (LRS=, EPOCHS=, ARGS=)
	$(VENV)/bin/lrpipe sweep $(SWEEP_FLAGS)

search: setup ## halving search + LR range test on a subset, cross-checked (ARGS=)
	$(VENV)/bin/lrpipe search $(ARGS)

decay: setup ## every decay schedule at the chosen rate over 3 seeds (ARGS=)
	$(VENV)/bin/lrpipe decay $(ARGS)

schedules: setup ## preview every schedule's rate against epoch, no training (ARGS=)
	$(VENV)/bin/lrpipe schedules $(ARGS)

transfer: setup ## pretrain, then fine-tune with per-layer rates (ARGS=)
	$(VENV)/bin/lrpipe transfer $(ARGS)

optimizers: setup ## optimizers side by side on 2D surfaces and real data (ARGS=)
	$(VENV)/bin/lrpipe optimizers $(ARGS)

bench: setup ## speed ratios side by side, written to bench/results.md
	$(PY) bench/bench.py $(ARGS)

server: $(STAMP) ## start a persistent Prefect server on 127.0.0.1:4200 (for schedules)
	$(PY) -m flows.server start

server-stop: $(STAMP) ## stop the Prefect server that `make server` started
	$(PY) -m flows.server stop

schedule: setup ## serve the pipeline on a cron schedule (CRON="0 3 * * *")
	$(VENV)/bin/lrpipe schedule $(if $(CRON),--cron "$(CRON)") $(ARGS)

test: setup ## run the test suite (installs Debian's Chromium for the browser test)
	@bash tests/browser_setup.sh
	$(VENV)/bin/pytest -q

screenshots: setup ## regenerate docs/*.png from the newest sweep in mlruns/
	@bash tests/browser_setup.sh
	$(PY) docs/screenshots.py

ui: $(STAMP) ## MLflow UI on http://127.0.0.1:5000
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_URI) --host 127.0.0.1 --port 5000 --workers 1

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check lrpipe flows tests

clean: ## remove runs, caches and the Prefect database (keeps .venv and data)
	rm -rf mlruns/mlflow.db mlruns/artifacts .prefect .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
