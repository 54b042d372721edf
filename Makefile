# lrpipe: the front door. `make sweep` and `make test` do all their own setup.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LOCK := requirements.lock
LOCK_VENV := .lock-venv
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
STORE := mlruns/mlflow.db

# make sweep LRS=0.01,0.1,1 EPOCHS=3 ARGS="--set optim.name=momentum"
LRS ?=
EPOCHS ?=
ARGS ?=
SWEEP_FLAGS := $(if $(LRS),--lrs $(LRS)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(ARGS)

.DEFAULT_GOAL := help
.PHONY: server-stop screenshots help lock setup data sweep grid search decay schedules transfer optimizers batch-size dropout losses article bench server schedule test ui lint clean

help: ## list the targets
	@echo "lrpipe: a learning-rate laboratory for PyTorch"
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  e.g. make sweep LRS=0.01,0.1,1 EPOCHS=3"

setup: $(STAMP) $(DATA) $(PREFECT_DB) $(STORE) ## virtualenv, editable install, data, Prefect and MLflow stores (idempotent)

# The MLflow store, created and migrated once under a lock (lrpipe.faults.create_store): any
# number of commands may then start together on it.
$(STORE): | $(STAMP)
	$(PY) -c "from lrpipe import faults, tracking; u = '$(MLFLOW_URI)'; faults.create_store(u, lambda: tracking.client(u).search_experiments(max_results=1))" 2>&1 | grep -v ' INFO ' || true
	@test -s $@

# Exactly the locked versions (pip and setuptools included), then lrpipe itself, editable, with
# no dependency resolution and no build isolation (the locked setuptools builds it); a venv that
# drifts from the lock is an error naming the package.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) tests/lockfile.py $(LOCK)
	touch $@

lock: ## re-resolve pyproject's dependencies into requirements.lock (the one upgrade command)
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip setuptools
	$(LOCK_VENV)/bin/pip install -q '.[dev]'
	{ echo "# Every package of lrpipe's virtualenv, pinned: written by 'make lock' from pyproject.toml"; \
	  echo "# (CPython $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version(), platform.machine())')); installed by 'make setup'. Do not edit by hand."; \
	  $(LOCK_VENV)/bin/pip freeze --all --exclude-editable | grep -vE '^lrpipe( @|==)' | LC_ALL=C sort -f; } > $(LOCK)
	rm -rf $(LOCK_VENV) build lrpipe.egg-info
	@echo "$(LOCK): $$(grep -c '==' $(LOCK)) packages; rebuild the venv with: rm -rf $(VENV) && make setup"

$(DATA): | $(STAMP)
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null || true; \
	fi
	$(PY) -m lrpipe.engine.data --root data

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

# The article's Figure 2: the single-layer softmax net on Fashion-MNIST at rates from too small to
# diverging (0.5, 1 and 10 oscillate but stay finite; 100 diverges), cross-entropy and error.
ARTICLE_ARGS := --set model.name=softmax --lrs 0.001,0.01,0.1,0.5,1,10,100 --epochs 5

article: setup ## the article's figure: softmax net, rates from too small to diverging
	$(VENV)/bin/lrpipe sweep $(ARTICLE_ARGS)

batch-size: setup ## the best rate against the batch size, with the linear and sqrt rules (ARGS=)
	$(VENV)/bin/lrpipe batch-size $(ARGS)

dropout: setup ## dropout against the train/validation gap, with and without, over a rate grid (ARGS=)
	$(VENV)/bin/lrpipe dropout $(ARGS)

losses: setup ## cross-entropy against squared error, each at its own searched rate (ARGS=)
	$(VENV)/bin/lrpipe losses $(ARGS)

bench: setup ## speed ratios side by side, written to bench/results.md
	$(PY) bench/bench.py $(ARGS)

# Ports: PORT=... on the command line, else LRPIPE_UI_PORT (MLflow UI, default 5000; reports and
# printed links read it too) or PREFECT_SERVER_API_PORT (Prefect, default 4200).
server: $(STAMP) ## start a persistent Prefect server on 127.0.0.1:4200 or PORT= (for schedules)
	$(PY) -m flows.server start $(if $(PORT),--port $(PORT))

server-stop: $(STAMP) ## stop the Prefect server that `make server` started (PORT= as given)
	$(PY) -m flows.server stop $(if $(PORT),--port $(PORT))

schedule: setup ## serve the pipeline on a cron schedule (CRON="0 3 * * *"; Prefect on PORT=)
	$(if $(PORT),PREFECT_API_URL=http://127.0.0.1:$(PORT)/api) \
		$(VENV)/bin/lrpipe schedule $(if $(CRON),--cron "$(CRON)") $(ARGS)

test: setup ## run the test suite (installs Debian's Chromium for the browser test)
	@bash tests/browser_setup.sh
	$(VENV)/bin/pytest -q

screenshots: setup ## regenerate docs/*.png from the newest sweep in mlruns/
	@bash tests/browser_setup.sh
	$(PY) docs/screenshots.py

ui: UI_PORT = $(or $(PORT),$(LRPIPE_UI_PORT),5000)
ui: $(STAMP) ## MLflow UI on http://127.0.0.1:5000, or PORT= (LRPIPE_UI_PORT=... for links too)
	@echo "MLflow UI: http://127.0.0.1:$(UI_PORT)/#/experiments?workflowType=machine_learning"
	@$(if $(filter $(UI_PORT),$(or $(LRPIPE_UI_PORT),5000)),true,echo "Reports link to \
	port $(or $(LRPIPE_UI_PORT),5000): export LRPIPE_UI_PORT=$(UI_PORT) for the flows you run")
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_URI) --host 127.0.0.1 --port $(UI_PORT) \
		--workers 1

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check lrpipe flows tests

clean: ## remove runs, caches and the Prefect database (keeps .venv and the downloaded data)
	rm -rf mlruns/mlflow.db mlruns/artifacts .prefect .pytest_cache .ruff_cache data/cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
