# Every target creates the virtualenv on first use; only Python 3.11+ is needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv test lint format run-local clean

help:
	@echo "make test        create the venv, install, run the whole test suite"
	@echo "make run-local   run the worker end to end on a local S3/SQS + mail catcher"
	@echo "make lint        ruff (lint + format check) and mypy"
	@echo "make format      apply ruff's formatting and safe fixes"

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . || $(PY) -m pip install --quiet --no-deps -e .
	@touch $@

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check async_notifier handler.py tests
	$(BIN)/ruff format --check async_notifier handler.py tests
	$(BIN)/mypy async_notifier handler.py

format: $(STAMP)
	$(BIN)/ruff check --fix async_notifier handler.py tests
	$(BIN)/ruff format async_notifier handler.py tests

run-local: $(STAMP)
	@echo "make run-local is not there yet (see issue 3); make test runs the worker end to end."

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache outbox
