# freshet — every target has a `## description`; `make help` lists them.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_SRC := $(shell find protos -name '*.proto')
DEMO_SECONDS ?= 60

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -qq --upgrade pip
	$(BIN)/pip install -qq 'torch==2.13.0'
	$(BIN)/pip install -qq -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install freshet with its dev tools

protos: $(STAMP) ## regenerate the Python code for protos/ into libs/freshet
	$(BIN)/python scripts/gen_protos.py

protos-check: $(STAMP) ## regenerate protos and fail if the committed code differs
	$(BIN)/python scripts/gen_protos.py --check

lint: $(STAMP) ## ruff format check + ruff check
	$(BIN)/ruff format --check libs services tests integration scripts bench
	$(BIN)/ruff check libs services tests integration scripts bench

format: $(STAMP) ## ruff format + autofix
	$(BIN)/ruff format libs services tests integration scripts
	$(BIN)/ruff check --fix libs services tests integration scripts

test: $(STAMP) ## run unit and integration tests (each integration test starts its own nats-server)
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/python -m pytest -q tests integration

test-unit: $(STAMP) ## unit tests only
	$(BIN)/python -m pytest -q tests

demo: $(STAMP) ## run every service on an embedded NATS, feed synthetic events for DEMO_SECONDS, print a summary
	$(BIN)/freshet demo --seconds $(DEMO_SECONDS)

bench-store: $(STAMP) ## embedding store benchmark -> bench/results/store.json (+ store.md)
	$(BIN)/python bench/store_bench.py

bench-device-cache: $(STAMP) ## device cache on CPU (and CUDA when present) -> bench/results/device_cache.json
	$(BIN)/python bench/device_cache_bench.py

bench-joiner: $(STAMP) ## joiner throughput and join latency -> bench/results/joiner.json (+ joiner.md)
	$(BIN)/python bench/joiner_bench.py

bench-train: $(STAMP) ## samples/s through joiner -> trainer -> store vs static torch -> bench/results/train.json (+ train.md)
	$(BIN)/python bench/train_bench.py

bench-serve: $(STAMP) ## freshness and Predict latency with every service running -> bench/results/serve.json (+ serve.md)
	$(BIN)/python bench/serve_bench.py

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

.PHONY: help setup protos protos-check lint format test test-unit demo bench-store bench-device-cache bench-joiner bench-train bench-serve clean
