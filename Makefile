# Gantry: two set-up commands, `make run` and `make test`. Both are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODELS_DIR ?= models
TABBY_HOST_ADDR ?= 127.0.0.1
TABBY_PORT ?= 5000
TABBY_MODEL ?= Small-Chat-200M
TORCH_VERSION ?= 2.13.0

.PHONY: run test bench models install install-test clean

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
install-test: $(VENV)/.installed-test

models: $(VENV)/.installed
	$(PY) -m tabby make-demo-models $(MODELS_DIR)

run: models
	@mkdir -p var/tabby
	@echo "Starting the model server on http://$(TABBY_HOST_ADDR):$(TABBY_PORT) with $(TABBY_MODEL) loaded."
	@echo "Its keys are in var/tabby/api_tokens.yml (made on first start)."
	cd var/tabby && exec ../../$(PY) -m tabby serve --host $(TABBY_HOST_ADDR) --port $(TABBY_PORT) \
		--model-dir ../../$(MODELS_DIR) --model-name $(TABBY_MODEL)

test: install-test models
	$(PY) -m pytest

bench: install-test models
	$(PY) bench/run.py

clean:
	rm -rf var .pytest_cache .mypy_cache
