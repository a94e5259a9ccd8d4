# mpesa-pipeline: one command to run the stack, one to test it.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# `make run PROMETHEUS=1` also starts a local Prometheus (infra/prometheus.sh) scraping every service.
PROMETHEUS ?=
# `make run WORKERS=2 GATEWAYS=2 LEDGERS=2`: several processes of those services share their partitions.
WORKERS ?= 1
GATEWAYS ?= 1
LEDGERS ?= 1
# Local database passwords (infra/postgres.sh); URLs carry none.
export PGPASSFILE ?= $(CURDIR)/.local/secrets/pgpass

.PHONY: install run check test bench down infra clean

install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

infra: install ## start Kafka and PostgreSQL on loopback (idempotent)
	bash infra/up.sh

run: install ## the whole stack in the foreground; Ctrl-C stops everything, Kafka and PostgreSQL too
	env="$$(bash infra/up.sh)" || exit 1; set -a; source <(echo "$$env"); set +a; \
	trap 'bash infra/down.sh' EXIT; \
	if [[ "$(PROMETHEUS)" == 1 ]]; then WORKERS=$(WORKERS) GATEWAYS=$(GATEWAYS) LEDGERS=$(LEDGERS) \
	  bash infra/prometheus.sh start || exit 1; fi; \
	$(PY) -m services.cli run --workers $(WORKERS) --gateways $(GATEWAYS) --ledgers $(LEDGERS)

check: install ## the fast loop, with no Kafka or PostgreSQL: lint, types, and every test that needs neither
	bash infra/tools.sh install prometheus  # promtool: the alert rules' tests
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	CHECK_ONLY=1 $(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

test: infra ## the whole suite against the real broker and database
	$(PY) -m pytest $(PYTEST_ARGS)

bench: infra ## benchmarks (throughput and latency figures; not tests)
	set -a; eval "$$(bash infra/up.sh)"; set +a; \
	for b in bench/*_bench.py; do echo "== $$b"; $(PY) $$b || exit 1; done

down: ## stop Kafka and PostgreSQL (and Prometheus)
	bash infra/down.sh

clean: down ## also delete local data
	rm -rf .local
