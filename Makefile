# fraud-poc: one command to set up and test (`make test`), one to set up and run the whole thing (`make run`).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test check-sync nbtest pytest lint openapi-check run up training-service prediction-service bench lab clean-nbs

install: $(STAMP)

$(STAMP): settings.ini setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

## Everything CI runs: notebooks/library in sync, lint, notebook tests, pytest (unit, integration, end to end).
test: install check-sync lint openapi-check nbtest pytest

check-sync: install
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export
	@git diff --exit-code --stat -- nbs fraud_poc || { echo "notebooks and library out of sync (or notebooks not clean): run 'make clean-nbs' and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- nbs fraud_poc)" || { git status --porcelain -- nbs fraud_poc; echo "untracked files in nbs/ or fraud_poc/"; exit 1; }

clean-nbs: install
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export

lint: install
	$(BIN)/ruff check nbs tests bench
	$(BIN)/ruff format --check nbs tests bench

nbtest: install
	. config/env.sh && $(BIN)/python -m fraud_poc.redis_server -- $(BIN)/nbdev_test --flags "redis dask slow" --n_workers 1

pytest: install
	. config/env.sh && $(BIN)/python -m fraud_poc.redis_server -- $(BIN)/pytest -q tests

openapi-check: install
	BIN=$(BIN) install/openapi.sh check

## The main job: both services, the whole pipeline on a sample, example predictions and a summary.
run: install
	. config/env.sh && $(BIN)/python -m fraud_poc.launcher

## Both services (Redis ensured, as for `make run`), with an API token, until Ctrl-C.
up: install
	. config/env.sh && $(BIN)/python -m fraud_poc.launcher --serve

training-service: install
	. config/env.sh && $(BIN)/hopeit_server run --config-files=config/server.json,config/redis-streams.json,config/training-pipeline.json --api-file=config/openapi-training.json --start-streams --port=8020

prediction-service: install
	. config/env.sh && $(BIN)/hopeit_server run --config-files=config/server-prediction.json,config/redis-streams.json,config/fraud-service.json --api-file=config/openapi-service.json --start-streams --port=8021 --worker-class=GunicornUVLoopWebWorker

bench: install
	. config/env.sh && $(BIN)/python bench/bench_pipeline.py && $(BIN)/python bench/bench_service.py && $(BIN)/python bench/bench_service.py --replicas 2

lab: install
	$(BIN)/jupyter lab nbs
