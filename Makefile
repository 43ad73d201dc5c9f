# nightshift — the commands you need. `make help` lists them.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
DEV_DIR ?= $(ROOT)/.dev
export NIGHTSHIFT_DEV_DIR := $(DEV_DIR)
PROFILE ?= dev
TARGET_DIR := $(ROOT)/target/$(if $(filter dev,$(PROFILE)),debug,$(PROFILE))
NIGHTSHIFT_BOOTSTRAP_API_KEY ?= ns-dev-key
VENV := $(ROOT)/target/e2e-venv

.PHONY: help
help: ## Show this help.
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}'

.PHONY: infra
infra: ## Start (installing when missing) Postgres, Redis, RabbitMQ and Garage on loopback.
	@$(ROOT)/deploy/dev/infra.sh up

.PHONY: build
build: ## Build the nightshift binaries (PROFILE=release for an optimised build).
	cargo build --profile $(PROFILE) -p nightshift-cli -p nightshift-inference-sim

.PHONY: up
up: infra build ## Run the whole stack on loopback; the gateway serves http://127.0.0.1:8080/v1.
	@NIGHTSHIFT_BIN=$(TARGET_DIR)/nightshift \
	  NIGHTSHIFT_BOOTSTRAP_API_KEY=$(NIGHTSHIFT_BOOTSTRAP_API_KEY) \
	  $(ROOT)/deploy/dev/services.sh up

.PHONY: down
down: ## Stop what `make up` started (services it found running are left alone).
	@$(ROOT)/deploy/dev/services.sh down
	@$(ROOT)/deploy/dev/infra.sh down

.PHONY: status
status: ## One line per component of the local stack.
	@$(ROOT)/deploy/dev/infra.sh status
	@$(ROOT)/deploy/dev/services.sh status

$(VENV)/.ok:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check openai
	touch $@

# schemathesis: tests/openapi.rs checks the gateway against its OpenAPI document with it.
$(VENV)/.schemathesis-ok: | $(VENV)/.ok
	$(VENV)/bin/pip install --quiet --disable-pip-version-check 'schemathesis==4.32.5'
	touch $@

.PHONY: venv
venv: $(VENV)/.ok $(VENV)/.schemathesis-ok ## The Python virtualenv with the official openai SDK and schemathesis (for the e2e tests).

# The console's browser test (tests/console.rs): Debian's Chromium, driven by Playwright's
# Python package (which never downloads a browser of its own here).
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium

$(VENV)/.playwright-ok: | $(VENV)/.ok
	$(VENV)/bin/pip install --quiet --disable-pip-version-check 'playwright==1.65.3'
	touch $@

.PHONY: browser
browser: $(CHROMIUM) $(VENV)/.playwright-ok ## Chromium and Playwright for the console's browser test.

# `nightshift batch watch` is tested in a real terminal, a tmux pane (tests/cli_batch.rs).
/usr/bin/tmux:
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends tmux

.PHONY: terminal
terminal: /usr/bin/tmux ## tmux, for the terminal test of `nightshift batch watch`.

$(VENV)/.ops-ok: $(ROOT)/deploy/check/requirements.txt | $(VENV)/.ok
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r $<
	touch $@

.PHONY: ops-check
ops-check: $(VENV)/.ops-ok ## Check deploy/ and helm/ (compose, Dockerfile, chart render + schemas, alerts, dashboards).
	@$(ROOT)/deploy/check/tools.sh
	@$(VENV)/bin/python $(ROOT)/deploy/check/check_ops.py --tools $(DEV_DIR)/tools \
	  --nightshift-bin $(ROOT)/target/debug/nightshift

.PHONY: lint
lint: ## cargo fmt --check and clippy with warnings denied.
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

E2E_ENV := NIGHTSHIFT_E2E_PYTHON=$(VENV)/bin/python NIGHTSHIFT_BIN=$(ROOT)/target/debug/nightshift
# The chaos suite (tests/chaos.rs) is #[ignore]d in the parallel run: it runs on its own after
# it, on private PostgreSQL/Redis/RabbitMQ/Garage instances (never the shared ones).
CHAOS_NEXTEST := cargo nextest run -p nightshift-e2e --test chaos --run-ignored only --no-fail-fast --no-capture

.PHONY: test
test: infra venv browser terminal lint ## Every test: unit, conformance suites and end-to-end, against real services; then chaos-short.
	cargo build -p nightshift-cli
	@$(MAKE) --no-print-directory ops-check
	@rc=0; \
	$(E2E_ENV) cargo nextest run --workspace --no-fail-fast || rc=$$?; \
	$(MAKE) --no-print-directory chaos-short || rc=$$?; \
	exit $$rc

.PHONY: chaos-short
chaos-short: infra venv ## The chaos suite's short variant (6-13 min): one run per fault, 2-minute outages included.
	cargo build -p nightshift-cli
	$(E2E_ENV) $(CHAOS_NEXTEST) -E 'not test(randomized)'

.PHONY: chaos
chaos: infra venv ## The chaos suite: CHAOS_RUNS (20) randomized runs; CHAOS_SEED replays (see tests/chaos.rs).
	cargo build -p nightshift-cli
	$(E2E_ENV) $(CHAOS_NEXTEST) -E 'test(randomized)'

# tests/real.rs is #[ignore]d everywhere else: it needs llama.cpp's llama-server with a real
# model, built once (~12-25 min, cached under .dev/llama) and started by deploy/dev/llama.sh.
.PHONY: test-real
test-real: infra venv ## E2E against a real llama-server (builds it once, cached): chat, completions, embeddings on both deployments. Not part of `make test`.
	$(ROOT)/deploy/dev/llama.sh up
	cargo build -p nightshift-cli
	$(E2E_ENV) NIGHTSHIFT_REAL_UPSTREAM=$$($(ROOT)/deploy/dev/llama.sh url) \
	  cargo nextest run -p nightshift-e2e --test real --run-ignored only --no-fail-fast

.PHONY: bench-files
bench-files: ## Peak gateway RSS while uploading and downloading a 1 GiB file (needs `make up PROFILE=release`).
	python3 $(ROOT)/bench/files_rss.py --size-mib $${SIZE_MIB:-1024}

.PHONY: bench-pipeline
bench-pipeline: ## Fairness (200k vs 10 lines) and scale (1M lines: time, peak RSS per service) against `make up`.
	python3 $(ROOT)/bench/pipeline.py fairness --big-lines $${BIG_LINES:-200000}
	python3 $(ROOT)/bench/pipeline.py scale --lines $${LINES:-1000000}

.PHONY: standalone
standalone: ## The whole product in one process, no infrastructure (ARGS="--upstream http://host:8000/v1"; default --simulate).
	cargo run --release -p nightshift-cli -- standalone $${ARGS:---simulate}

.PHONY: bench-standalone
bench-standalone: ## A 1M-line batch through one release `nightshift standalone` process: wall time, peak RSS.
	cargo build --release -p nightshift-cli
	rm -rf $(ROOT)/target/bench-standalone
	INFERENCE_SIM_BASE_LATENCY_MS=0 INFERENCE_SIM_PER_TOKEN_LATENCY_MS=0 \
	  $(ROOT)/target/release/nightshift standalone --simulate --quiet --listen 127.0.0.1:18080 \
	  --ops-listen 127.0.0.1:18091 --data-dir $(ROOT)/target/bench-standalone & pid=$$!; \
	trap "kill $$pid" EXIT; \
	for i in $$(seq 1 600); do curl -sf http://127.0.0.1:18091/readyz >/dev/null && break; sleep 0.1; done; \
	python3 $(ROOT)/bench/pipeline.py scale --lines $${LINES:-1000000} --base-url http://127.0.0.1:18080/v1 \
	  --key "$$(cat $(ROOT)/target/bench-standalone/api-key)" --pid $$pid

# `make bench`: every row of issue 10 in one run, both deployments and the peer script side by
# side, release builds, written to docs/performance.md. Sizes: BENCH_* variables (bench/bench.py
# --help). Never part of `make test`: it takes the machine for a long while.
BENCH_SMOKE_ENV := BENCH_LINES=400 BENCH_LATENCY_MS=20 BENCH_SCALE_LINES=600 BENCH_BIG_LINES=5000 \
  BENCH_UPLOAD_MIB=32 BENCH_NOTE="Smoke sizes (make bench-smoke) on a machine shared with other builds: these figures check the harness, they do not measure the targets."

.PHONY: bench
bench: infra $(VENV)/.ok ## Every performance target of issue 10 on both deployments vs the SDK peer script; writes docs/performance.md.
	cargo build --release -p nightshift-cli -p nightshift-inference-sim
	BENCH_COMMAND="$${BENCH_COMMAND:-make bench}" python3 $(ROOT)/bench/bench.py --peer-python $(VENV)/bin/python

.PHONY: bench-profile
bench-profile: infra ## perf profile of the zero-latency row (PROFILE_DEPLOYMENT, PROFILE_PROCESS, PROFILE_LINES): hottest functions, flame graph with inferno.
	cargo build --release -p nightshift-cli -p nightshift-inference-sim
	$(ROOT)/bench/profile.sh

.PHONY: bench-smoke
bench-smoke: ## `make bench` with tiny sizes: checks the harness end to end in a few minutes.
	@$(BENCH_SMOKE_ENV) BENCH_COMMAND="make bench-smoke" $(MAKE) --no-print-directory bench

.PHONY: clean-dev
clean-dev: down ## Stop everything and delete the local stack's data (.dev/).
	rm -rf $(DEV_DIR)
