# qmig developer entry points. `make test` is what CI runs (via .ci/run).
# setup is idempotent: Debian packages are checked with dpkg, pip runs only when
# pyproject.toml is newer than the stamp file, CRIU is built once (cached by version).
# `image` builds the broker image localhost/qmig-broker:<version>-<source hash> only when the
# project's source changed; where containers cannot run (not root, no namespaces) it says so in
# one line and the targets that use it carry on without it.

SHELL := /bin/bash
.DEFAULT_GOAL := test

VENV := .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# python3.11 if present, else python3 (checked to be >= 3.11 when the venv is made)
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)

.PHONY: setup system containers image test lint demo bench clean distclean

setup: system containers $(STAMP)

system:
	@bash scripts/setup-system.sh

# After system: the two must never run apt at the same time (make -j).
containers: system
	@bash scripts/setup-containers.sh

# Needs the venv: the image's wheels come from the host venv's pip (same cp311 ABI).
image: setup
	@$(VENV_PY) -m migration.image --if-available

# The venv needs only a Python >= 3.11 (no apt): `make lint` works without `make setup`.
$(VENV_PY):
	@test -n "$(PYTHON)" || { echo "make: no python3.11 or python3 found" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "make: $(PYTHON) is older than Python 3.11; install python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(VENV_PY)
	$(VENV_PY) -m pip install -q -e '.[dev,lab,load]'
	@touch $@

test: setup image lint
	$(VENV_PY) -m pytest -q $(PYTEST_ARGS)

# Static checks, venv only: lint, format, the floors of the import graph, types.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy

# PODMAN=shared: every edge host a pod of the machine's one Podman (default: per-host, every
# edge host its own Podman, storage, networks and API, in its own netns).
PODMAN ?=
demo: setup image
	$(VENV_PY) -m qmig demo $(if $(PODMAN),--podman $(PODMAN))

bench: setup
	@mkdir -p reports
	$(VENV_PY) -m qmig bench broker --json reports/bench-broker.json

# Headless locust run against a loopback broker: CSV, HTML, trace and summary in reports/.
USERS ?= 50
RATE ?= 1
DURATION ?= 30
.PHONY: loadtest
loadtest: setup
	@mkdir -p reports
	$(VENV_PY) -m loadtests.run --users $(USERS) --rate $(RATE) --duration $(DURATION) --out reports

# Endurance: live migrations every minute under 1,000 msg/s of QUIC and TCP traffic, RSS
# sampled; fails on loss, QoS 2 duplicates, QUIC re-handshakes or RSS growth. Not in CI.
# `make soak DURATION=5m`; DURATION defaults to 1h here (loadtest's 30 is seconds).
SOAK_DURATION = $(if $(filter command line environment,$(origin DURATION)),$(DURATION),1h)
.PHONY: soak
soak: setup image
	@mkdir -p reports
	$(VENV_PY) -m migration.soak --duration $(SOAK_DURATION) --json reports/soak.json

# Coverage-guided fuzzing (atheris): every parser target, 1,000,000 inputs each by default.
FUZZ_RUNS ?= 1000000
.PHONY: fuzz
fuzz: $(STAMP)
	$(VENV_PY) -m fuzz --all --runs $(FUZZ_RUNS)

clean:
	rm -rf build .pytest_cache .ruff_cache .hypothesis *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) reports
