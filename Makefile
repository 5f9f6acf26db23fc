# fraud-poc: one command to set up and test (`make test`), one to set up and run the whole thing (`make run`).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# pytest-xdist workers of `make pytest` and `make pytest-fast` (the service tests mostly wait: more than the cores).
PYTEST_WORKERS ?= 3
PYTEST := $(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile
NBTEST := $(BIN)/nbdev_test --flags "redis dask slow" --n_workers 1
# Ports of `make run`, `make up`, `make training-service`, `make prediction-service` and `make lab` (e.g. `make lab LAB_PORT=8899`).
TRAINING_PORT   ?= 8020
PREDICTION_PORT ?= 8021
LAB_PORT        ?= 8888
LAB_ARGS        ?=
# More launcher options for `make run`, e.g. RUN_ARGS="--num-orders 100000 --num-customers 2000 --months 6".
RUN_ARGS        ?=
# Runs a command with Redis ensured at $FRAUD_REDIS_URL: the one there, or the embedded one for the command's life.
WITH_REDIS := $(BIN)/python -m fraud_poc.store.redis_server --
# Fails at once, naming what holds them, if these services' ports are taken (another `make up`, say).
CHECK_PORTS := $(BIN)/python -m fraud_poc.launcher --check-ports
# Jupyter refuses to run as root without --allow-root (containers, CI machines).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: install readme docs test test-fast check-sync nbtest nbtest-and-pytest pytest pytest-fast lint openapi-check run up training-service prediction-service bench lab clean-nbs

install: $(STAMP)

$(STAMP): settings.ini setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

## Everything CI runs: notebooks/library in sync, lint, then the notebook tests and pytest (unit, integration, end
## to end) side by side, on one Redis.
test: install check-sync lint openapi-check nbtest-and-pytest

## The fast tier: lint, then the notebook tests and pytest without the system tier (no service in a subprocess,
## no make) side by side, on one Redis.
test-fast: install lint
	. config/env.sh && $(WITH_REDIS) bash -c '$(NBTEST) & nb=$$!; $(PYTEST) -m "not system" tests; py=$$?; wait $$nb && exit $$py'

check-sync: install
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export
	@git diff --exit-code --stat -- nbs fraud_poc || { echo "notebooks and library out of sync (or notebooks not clean): run 'make clean-nbs' and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- nbs fraud_poc)" || { git status --porcelain -- nbs fraud_poc; echo "untracked files in nbs/ or fraud_poc/"; exit 1; }
	$(BIN)/python install/readme.py
	@git diff --exit-code --stat -- README.md || { echo "README.md is not what nbs/index.ipynb gives: edit the notebook, run 'make readme' and commit both"; exit 1; }

clean-nbs: install
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export

## The docs site, offline, into _docs/ (open _docs/index.html): the notebooks and docs/*.md (install/docs.py), and a
## check that every name of every module's __all__ is in it.
docs: install
	. config/env.sh && $(BIN)/python install/docs.py --check

## README.md from nbs/index.ipynb (its source): edit the notebook, then run this.
readme: install
	$(BIN)/python install/readme.py

lint: install
	$(BIN)/ruff check nbs tests bench
	$(BIN)/ruff check --select F401 fraud_poc  # the exported library imports nothing it does not use
	$(BIN)/ruff format --check nbs tests bench

nbtest: install
	. config/env.sh && $(WITH_REDIS) $(NBTEST)

## Both test runs at once (many tests wait on services and Redis): fails if either fails.
nbtest-and-pytest: install
	. config/env.sh && $(WITH_REDIS) bash -c '$(NBTEST) & nb=$$!; $(PYTEST) tests; py=$$?; wait $$nb && exit $$py'

## In parallel (pytest-xdist), a test file per worker at a time: module fixtures (services) start once.
pytest: install
	. config/env.sh && $(WITH_REDIS) $(PYTEST) tests

pytest-fast: install
	. config/env.sh && $(WITH_REDIS) $(PYTEST) -m "not system" tests

openapi-check: install
	BIN=$(BIN) install/openapi.sh check

## The main job: both services, the whole pipeline on a sample, example predictions and a summary.
run: install
	. config/env.sh && $(BIN)/python -m fraud_poc.launcher --training-port=$(TRAINING_PORT) --prediction-port=$(PREDICTION_PORT) $(RUN_ARGS)

## Both services (Redis ensured, as for `make run`), with an API token, until Ctrl-C.
up: install
	. config/env.sh && $(BIN)/python -m fraud_poc.launcher --serve --training-port=$(TRAINING_PORT) --prediction-port=$(PREDICTION_PORT)

## One service each (Redis ensured, as for `make run`); for both at once use `make up`.
## XDG_RUNTIME_DIR: gunicorn's control socket in a folder of the service's own, not ~/.gunicorn/ (launcher.own_control_socket).
training-service: install
	. config/env.sh && $(CHECK_PORTS) training --training-port=$(TRAINING_PORT) && XDG_RUNTIME_DIR="$$FRAUD_DATA_ROOT/run/training-$(TRAINING_PORT)" && mkdir -p "$$XDG_RUNTIME_DIR" && export XDG_RUNTIME_DIR && $(WITH_REDIS) $(BIN)/hopeit_server run --config-files=config/server.json,config/redis-streams.json,config/training-pipeline.json --api-file=config/openapi-training.json --start-streams --port=$(TRAINING_PORT)

prediction-service: install
	. config/env.sh && $(CHECK_PORTS) prediction --prediction-port=$(PREDICTION_PORT) && XDG_RUNTIME_DIR="$$FRAUD_DATA_ROOT/run/prediction-$(PREDICTION_PORT)" && mkdir -p "$$XDG_RUNTIME_DIR" && export XDG_RUNTIME_DIR && $(WITH_REDIS) $(BIN)/hopeit_server run --config-files=config/server-prediction.json,config/redis-streams.json,config/fraud-service.json --api-file=config/openapi-service.json --start-streams --port=$(PREDICTION_PORT) --worker-class=GunicornUVLoopWebWorker --workers=2

bench: install
	. config/env.sh && $(BIN)/python bench/bench_pipeline.py && $(BIN)/python bench/bench_service.py && $(BIN)/python bench/bench_service.py --replicas 2

## JupyterLab on nbs/ (Redis ensured, the project's variables set; also as root).
lab: install
	. config/env.sh && $(WITH_REDIS) $(BIN)/jupyter lab --notebook-dir=nbs --port=$(LAB_PORT) $(ROOT_FLAG) $(LAB_ARGS)
