# Two commands do everything on a fresh machine:
#   make demo   - virtualenv, package, a broker, then the demo
#   make test   - the same plus test dependencies, then the whole suite
# Developer extras: make lint, make tox, make docs, make bench, make faults, make soak,
# make unit-offline (the tests that need no broker).
# pika variants: make unit-pika-paths (fast paths off), make unit-pika13 (pika 1.3.0).
# RabbitMQ 4 and clusters: make test-rabbitmq4 (4.0), make test-rabbitmq43 (4.3),
# make cluster-up, make cluster-down (scripts/cluster.sh; RABBITMQ_VERSION=3.10, 4.0 or 4.3).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VPY := $(BIN)/python
COMPAT_VERSION := 3.0.2
COMPAT_DIR := build/compat
# 3.0.2's wheel, downloaded once and reused (tests/test_wire_format.py looks here too).
COMPAT_WHEEL_DIR := build/wheel-302
COMPAT_WHEEL := $(COMPAT_WHEEL_DIR)/domain_event_broker-$(COMPAT_VERSION)-py3-none-any.whl
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: demo test unit unit-offline compat lint tox docs bench soak faults broker clean venv
.PHONY: test-rabbitmq4 test-rabbitmq43 cluster-up cluster-down unit-pika-paths unit-pika13
RABBITMQ_VERSION ?= 3.10

# The metadata and the development tools are all in pyproject.toml (setup.py
# is a shim without content). The tools are the `dev` dependency group
# (PEP 735), which pip installs from 25.1 on.
$(VENV)/.core: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "Python 3.10 or newer is needed (PYTHON=$(PYTHON))" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade 'pip>=25.1'
	$(VPY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(VPY) -m pip install -q -e '.[django]' --group dev
	touch $@

venv: $(VENV)/.dev

broker:
	@PYTHON=$(PYTHON) scripts/ensure-broker.sh

demo: $(VENV)/.core broker
	$(VPY) examples/demo.py

test: $(VENV)/.dev broker unit compat

unit: $(VENV)/.dev broker
	$(VPY) -m pytest $(PYTEST_ARGS)

# The tests that need no RabbitMQ (no `broker` marker, see tests/conftest.py):
# no broker is started or needed, and they take well under a minute.
unit-offline: $(VENV)/.dev
	$(VPY) -m pytest -m "not broker" $(PYTEST_ARGS)

# The whole suite on pika's own code paths: every fast path of
# domain_event_broker/_amqp/pika_internals.py off (the tests of how a fast
# path works skip themselves).
unit-pika-paths: $(VENV)/.dev broker
	DOMAIN_EVENT_BROKER_PIKA_FAST_PATHS=0 $(VPY) -m pytest $(PYTEST_ARGS)

# The whole suite on pika 1.3.0, the oldest pika supported, in a virtualenv
# of its own (the dev install first, then pika pinned back).
PIKA13_VENV ?= .venv-pika13
unit-pika13: broker
	$(MAKE) --no-print-directory VENV=$(PIKA13_VENV) venv
	$(PIKA13_VENV)/bin/python -m pip install -q pika==1.3.0
	$(PIKA13_VENV)/bin/python -c 'import pika, sys; sys.exit(pika.__version__ != "1.3.0")'
	$(MAKE) --no-print-directory VENV=$(PIKA13_VENV) unit

# 3.0.2's own test suite, downloaded at test time and run unmodified against
# this library (except the tests that patch 3.0.2's private modules).
$(COMPAT_WHEEL): | $(VENV)/.core
	$(VPY) -m pip download -q --no-deps --dest $(COMPAT_WHEEL_DIR) domain-event-broker==$(COMPAT_VERSION)
	@test -f $@ || { echo "pip did not download $@" >&2; exit 1; }

compat: $(VENV)/.dev broker $(COMPAT_WHEEL)
	rm -rf $(COMPAT_DIR) && mkdir -p $(COMPAT_DIR)
	$(VPY) scripts/prepare_compat.py $(COMPAT_WHEEL_DIR) $(COMPAT_DIR)
	$(VPY) scripts/compat_cleanup.py
	status=0; (cd $(COMPAT_DIR) && ../../$(VPY) -m pytest -c pytest.ini deb302_tests) || status=$$?; \
		$(VPY) scripts/compat_cleanup.py; exit $$status

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

docs: $(VENV)/.dev
	$(BIN)/sphinx-build -W --keep-going -q -b html docs build/docs

# tox finds python3.1x on PATH; add the pyenv interpreters where they exist.
empty :=
space := $(empty) $(empty)
PYENV_BINS := $(subst $(space),:,$(strip $(wildcard $(HOME)/.pyenv/versions/3.1[0-9]*/bin)))

tox: $(VENV)/.dev broker
	PATH="$(if $(PYENV_BINS),$(PYENV_BINS):)$$PATH" $(BIN)/tox $(TOX_ARGS)

bench: $(VENV)/.core broker
	$(VPY) benchmarks/run_all.py

# Fault injection only (also part of `unit`). It stops the broker and closes
# every connection: point DOMAIN_EVENT_BROKER and DEB_TEST_RABBITMQ_NODE at a
# broker nobody else uses (see docs/reliability.rst).
faults: $(VENV)/.dev broker
	$(VPY) -m pytest -m faults tests/faults $(PYTEST_ARGS)

soak: $(VENV)/.dev broker
	$(VPY) -m pytest -m soak tests/soak $(PYTEST_ARGS)

# Private nodes beside the default one (never touched): a three-node cluster
# of RabbitMQ $(RABBITMQ_VERSION); 4.0 and 4.3 run from cached Debian chroots
# (trixie's and forky's rabbitmq-server).
cluster-up:
	scripts/cluster.sh up $(RABBITMQ_VERSION)

cluster-down:
	scripts/cluster.sh down $(RABBITMQ_VERSION)

# This repository's suite (cluster tests included) against another RabbitMQ
# (3.0.2's own suite talks to localhost:5672 directly, so it runs in `make test`
# only): one private node of that version for the suite and the fault tests, a
# cluster of it for tests/cluster. test-rabbitmq4 is 4.0, test-rabbitmq43 is 4.3.
test-rabbitmq4: TEST_RABBITMQ_VERSION := 4.0
test-rabbitmq43: TEST_RABBITMQ_VERSION := 4.3
test-rabbitmq4 test-rabbitmq43: $(VENV)/.dev
	scripts/cluster.sh single-up $(TEST_RABBITMQ_VERSION)
	status=0; eval "$$(scripts/cluster.sh env $(TEST_RABBITMQ_VERSION) single)"; \
		DEB_TEST_CLUSTER_VERSION=$(TEST_RABBITMQ_VERSION) $(MAKE) --no-print-directory unit || status=$$?; \
		scripts/cluster.sh single-down $(TEST_RABBITMQ_VERSION); exit $$status

clean:
	rm -rf $(VENV) $(PIKA13_VENV) build .tox .mypy_cache .pytest_cache .ruff_cache *.egg-info
