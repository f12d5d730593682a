# Every target creates the virtualenv on first use; only Python 3.11+ is needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
UV := $(BIN)/uv
# make lock: extra flags for uv pip compile, e.g. LOCK_ARGS='--upgrade-package botocore'
LOCK_ARGS ?=
PYTEST_ARGS ?=
# make bench: extra flags for python -m bench, e.g. BENCH_ARGS='--scenario remote'
BENCH_ARGS ?=
# make bench BENCH_VS=REF: also run the code of git REF (a commit, HEAD, main~3) as target
# previous, interleaved with the working tree, and compare them (python -m bench --vs REF)
BENCH_VS ?=
BENCH_VS_FLAG := $(if $(BENCH_VS),--vs '$(BENCH_VS)')
# make run-local: how many sample messages, how big each sample ZIP, where the emails go, and
# an S3 + SQS endpoint already running (e.g. LocalStack) instead of starting moto.
MESSAGES ?= 8
ZIP_SIZE ?= 262144
OUTBOX ?= outbox
AWS_ENDPOINT_URL ?=
# make run-local TRANSPORT=ses: send through the endpoint's SES v2 API instead of SMTP.
TRANSPORT ?= smtp
# LocalStack on the host, without Docker, in its own venv (make localstack).
LOCALSTACK_VERSION ?= 4.13.1
LOCALSTACK_DIR := .localstack
LOCALSTACK_VENV := $(LOCALSTACK_DIR)/venv
LOCALSTACK_STAMP := $(LOCALSTACK_VENV)/.installed-$(LOCALSTACK_VERSION)
LOCALSTACK_PACKAGES := 'localstack-core[runtime]==$(LOCALSTACK_VERSION)' 'cbor2<6' \
	'pyopenssl==25.1.0' 'cryptography>=45,<46' service-identity
# make package: the Lambda architecture to build for (arm64 = Graviton, or x86_64); it must
# match the stack's Architecture parameter. (sam build follows that parameter.)
ARCH ?= arm64
# make package: the CPython the wheels are for; it must match the template's Runtime
# (python3.13). Set on the command line only (make package PYTHON_VERSION=3.12): `=`, not `?=`,
# because Python's container images export a PYTHON_VERSION of their own (3.11.7...).
PYTHON_VERSION = 3.13
# The AWS SAM CLI, in its own venv (it pins many libraries): make test-sam.
SAM_VERSION ?= 1.170.0
SAM_DIR := .sam
SAM_VENV := $(SAM_DIR)/venv
SAM_STAMP := $(SAM_VENV)/.installed-$(SAM_VERSION)

.DEFAULT_GOAL := help
.PHONY: help venv lock test test-cold-build test-wheel test-sam lint format run-local \
	localstack localstack-stop test-localstack bench bench-quick clean distclean package \
	test-runtime test-mta cfn-lint build-NotifierFunction build-SesEventsFunction \
	build-CanaryFunction

help:
	@echo "make test        create the venv, install, run the whole test suite (2 processes)"
	@echo "make run-local   run the worker end to end on a local S3/SQS + mail catcher"
	@echo "                 options: MESSAGES=8 ZIP_SIZE=262144 OUTBOX=outbox, and"
	@echo "                 AWS_ENDPOINT_URL=http://127.0.0.1:4566 to use a running endpoint"
	@echo "make lock        refresh requirements.lock (hashes) from requirements.txt;"
	@echo "                 LOCK_ARGS=--upgrade (or '--upgrade-package NAME') moves the others"
	@echo "make lint        ruff (lint + format check) and mypy"
	@echo "make format      apply ruff's formatting and safe fixes"
	@echo "make localstack  start LocalStack on 127.0.0.1:4566 without Docker (own venv)"
	@echo "make localstack-stop    stop it"
	@echo "make test-localstack    the end-to-end tests against that LocalStack"
	@echo "make bench       benchmark the project against the old design (all scenarios;"
	@echo "                 flags via BENCH_ARGS=..., see bench/README.md); BENCH_VS=REF"
	@echo "                 compares the working tree with git REF instead (no regression?)"
	@echo "make bench-quick the same with small numbers, well under a minute"
	@echo "make package     build dist/deployment-package.zip for Lambda (python3.13, ARCH=arm64"
	@echo "                 or ARCH=x86_64; PYTHON_VERSION=3.12); reproducible, prints its sizes"
	@echo "                 and sha256; dist/template.yaml deploys it without sam build"
	@echo "make test-cold-build  build each zip twice from empty caches (downloads every"
	@echo "                 wheel) and check both builds have the same sha256"
	@echo "make test-wheel  build the sdist and, from it, the wheel; install the wheel in a fresh"
	@echo "                 virtualenv outside the checkout and run it (preview, run against moto)"
	@echo "make test-runtime  run both zips (CPython 3.13, x86_64 and arm64 under qemu) in Debian"
	@echo "                 chroots under Lambda's runtime client (root; caches ~/.cache/async-notifier)"
	@echo "make test-mta    the SMTP client against real Postfix and Exim, each in a Debian chroot"
	@echo "                 (root; first run downloads them; caches ~/.cache/async-notifier)"
	@echo "make cfn-lint    lint template.yaml (the SAM template) with cfn-lint"
	@echo "make test-sam    sam validate --lint and sam build (the SAM CLI in its own venv,"
	@echo "                 .sam/; no Docker), then run the built function's handler"
	@echo "make clean       remove the venv, caches, outbox/, build/, dist/, .aws-sam/, bench/out/"
	@echo "make distclean   also the venvs of LocalStack (and its state) and the SAM CLI"

# The runtime dependencies come from the lock, hash-checked, exactly as the zip gets them; the
# dev tools are then held to the lock's versions (pip refuses hashes in a constraints file: any
# hash there switches every requirement to hash-checking, so the constraints are the lock
# without its hashes). A dev tool that needs another version of a locked package fails here
# instead of silently testing against something the zip does not ship.
$(STAMP): requirements.txt requirements.lock requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements.lock
	sed -e '/--hash=/d' -e 's/ *\\$$//' requirements.lock > $(VENV)/constraints.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt -c $(VENV)/constraints.txt || { \
		echo "make venv: requirements-dev.txt conflicts with requirements.lock;" \
			"after changing requirements.txt, run make lock" >&2; exit 1; }
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip check
	@touch $@

venv: $(STAMP)

# uv alone, pinned in requirements-dev.txt: `make lock` must work when requirements.txt has
# changed and the lock (hence the full venv) is stale.
$(UV):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$$(grep -E '^uv==' requirements-dev.txt)"

# One lock for every target: CPython 3.11 and newer on any platform (--universal writes a
# marker where the answer differs); scripts/package.py evaluates those markers for Lambda.
# uv keeps the lock's other pins unless LOCK_ARGS asks for more (--upgrade, or
# --upgrade-package NAME).
lock: $(UV)
	$(UV) pip compile requirements.txt --quiet --universal --python-version 3.11 \
		--generate-hashes --custom-compile-command 'make lock' \
		--output-file requirements.lock $(LOCK_ARGS)

# Three worker processes (pytest-xdist), each with its own moto: on 2 cores a third keeps
# them busy while the others wait on sockets and sleeps; --dist loadfile gives a worker
# a whole module at a time, so module-scoped set-up (the benchmark run, the package builds)
# happens once. PYTEST_ARGS comes last: PYTEST_ARGS='-n 0' runs the suite in one process.
test: $(STAMP)
	$(PY) -m pytest -n 3 --dist loadfile $(PYTEST_ARGS)

# The zip for each architecture, twice, each time from an empty dependency cache with pip's
# cache off: every wheel downloaded from PyPI again (about a minute and a half), same sha256.
test-cold-build: $(STAMP)
	$(PY) -m pytest -m cold_build tests/test_package.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check async_notifier handler.py tests bench scripts
	$(BIN)/ruff format --check async_notifier handler.py tests bench scripts
	$(BIN)/mypy async_notifier handler.py

format: $(STAMP)
	$(BIN)/ruff check --fix async_notifier handler.py tests bench scripts
	$(BIN)/ruff format async_notifier handler.py tests bench scripts

run-local: $(STAMP)
	@$(PY) -m async_notifier.local --messages "$(MESSAGES)" --zip-size "$(ZIP_SIZE)" \
		--outbox "$(OUTBOX)" --endpoint-url "$(AWS_ENDPOINT_URL)" --transport "$(TRANSPORT)"

$(LOCALSTACK_STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is required")'
	$(PYTHON) -m venv $(LOCALSTACK_VENV)
	$(LOCALSTACK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCALSTACK_VENV)/bin/python -m pip install --quiet $(LOCALSTACK_PACKAGES)
	@touch $@

localstack: $(LOCALSTACK_STAMP)
	@$(PYTHON) -m async_notifier.local.localstack start --venv $(LOCALSTACK_VENV) \
		--root $(LOCALSTACK_DIR)

localstack-stop:
	@$(PYTHON) -m async_notifier.local.localstack stop --root $(LOCALSTACK_DIR)

# Fails (does not skip) when LocalStack is not running: start it with make localstack.
test-localstack: $(STAMP)
	$(PY) -m pytest -m localstack tests/test_localstack.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench $(BENCH_VS_FLAG) $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) -m bench --quick $(BENCH_VS_FLAG) $(BENCH_ARGS)

package: $(STAMP)
	$(PY) scripts/package.py --arch "$(ARCH)" --python-version "$(PYTHON_VERSION)"
	$(PY) scripts/zip_template.py

# `sam build` (template.yaml: Metadata BuildMethod makefile) runs make build-<LogicalId> with
# ARTIFACTS_DIR set, and zips that directory itself: make package's build, unpacked there, for
# the architecture and runtime SAM resolved (scripts/sam_build.py reads them from SAM's
# build.toml); ARCH and PYTHON_VERSION, when given, win. SAM builds each function on its
# own; the second reuses the first's cached dependencies.
SAM_BUILD_FLAGS = $(if $(filter command%,$(origin ARCH)),--arch "$(ARCH)") \
	$(if $(filter command%,$(origin PYTHON_VERSION)),--python-version "$(PYTHON_VERSION)")

build-NotifierFunction build-SesEventsFunction build-CanaryFunction: $(STAMP)
	$(PY) scripts/sam_build.py $(@:build-%=%) $(SAM_BUILD_FLAGS)

# The sdist, and the wheel built from it, installed into a fresh virtualenv in a temp dir and
# run there (--version, preview, run --drain against moto and an SMTP sink): tests/test_wheel.py.
test-wheel: $(STAMP)
	$(PY) -m pytest -m wheel tests/test_wheel.py $(PYTEST_ARGS)

# Builds (or reuses) the Debian root file systems first, so their download is not charged to
# a test; the tests build both zips for CPython 3.13 and run them under awslambdaric.
test-runtime: $(STAMP)
	$(PY) scripts/rootfs.py --arch x86_64 --arch arm64 >/dev/null
	$(PY) -m pytest -m chroot tests/test_runtime.py $(PYTEST_ARGS)

# Builds (or reuses) the MTAs' root file systems first, as test-runtime does; the tests then run
# the same conformance scenarios against Postfix and Exim (tests/mta).
test-mta: $(STAMP)
	$(PY) scripts/rootfs.py --mta postfix --mta exim >/dev/null
	$(PY) -m pytest -m mta tests/mta $(PYTEST_ARGS)

cfn-lint: $(STAMP)
	$(BIN)/cfn-lint template.yaml

$(SAM_STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is required")'
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SAM_VENV)/bin/python -m pip install --quiet 'aws-sam-cli==$(SAM_VERSION)'
	@touch $@

# sam validate --lint, then sam build as a deployer runs it (into a temporary directory), and
# the built function run by the host's Python (tests/test_sam.py).
test-sam: $(STAMP) $(SAM_STAMP)
	SAM_CLI=$(SAM_VENV)/bin/sam $(PY) -m pytest -m sam tests/test_sam.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache outbox build dist .aws-sam bench/out

# Also LocalStack's venv and state, and the SAM CLI's venv (minutes to reinstall); stop
# LocalStack first.
distclean: clean
	rm -rf $(LOCALSTACK_DIR) $(SAM_DIR)
