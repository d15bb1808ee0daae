# capkeeper — developer entry points. Both targets work as root on a fresh Debian 12.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# System tools the test suite drives for real (reference tools and deploy tools),
# and systemd for the throwaway-systemd tests.
APT_PACKAGES := libcap2-bin attr rsync inotify-tools dpkg tar coreutils util-linux netcat-openbsd \
                gcc libc6-dev python3.11-dev valgrind gdb iputils-ping \
                e2fsprogs systemd python3-venv
# Building and checking the .deb and .rpm (make deb, make rpm, tests/test_packaging.py).
APT_PACKAGES += dpkg-dev debhelper lintian python3.11 python3.11-venv rpm python3-rpm man-db
DEMO_DIR := /var/tmp/capkeeper-demo
# The pinned ansible-core the collection's tests drive, in its own venv (not capkeeper's deps).
ANSIBLE_VENV := .venv-ansible
# promtool for the alert-rule tests, unpacked from Debian's prometheus package into the
# checkout: installing that package would add a prometheus.service to every booted sandbox.
PROMTOOL := .cache/prometheus/usr/bin/promtool

.PHONY: deps venv ansible promtool run test lint typecheck pytest bench clean man lock wheels deb rpm packages

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make: run as root to install:$$missing" >&2; exit 1; fi; \
	  echo "installing:$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "capkeeper needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

$(ANSIBLE_VENV)/.installed: packaging/ansible/requirements-test.txt
	$(PYTHON) -m venv $(ANSIBLE_VENV)
	$(ANSIBLE_VENV)/bin/pip install -q -r packaging/ansible/requirements-test.txt
	touch $@

ansible: $(ANSIBLE_VENV)/.installed

$(PROMTOOL):
	mkdir -p .cache/prometheus
	cd .cache/prometheus && rm -f prometheus_*.deb && \
	  { apt-get -o APT::Sandbox::User=root download prometheus || { apt-get update -qq && apt-get -o APT::Sandbox::User=root download prometheus; }; }
	dpkg-deb --fsys-tarfile .cache/prometheus/prometheus_*.deb | tar -x -C .cache/prometheus ./usr/bin/promtool
	rm -f .cache/prometheus/prometheus_*.deb
	touch $@

promtool: $(PROMTOOL)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

pytest: deps venv ansible promtool
	$(BIN)/pytest

test: deps venv lint typecheck pytest

# The bundled example: a copy of a real ELF binary in $(DEMO_DIR), declared in
# examples/state.toml.
demo:
	@if [ "$$(id -u)" != 0 ]; then \
	  echo "make run needs root: capkeeper writes security.capability, which needs CAP_SETFCAP." >&2; \
	  echo "Run it as root (sudo make run), or grant the capability: see README.md." >&2; exit 1; fi
	install -d -m 0755 -o root -g root $(DEMO_DIR) $(DEMO_DIR)/bin
	install -m 0755 -o root -g root "$$(type -P true)" $(DEMO_DIR)/bin/demo-server

# The daemon in the foreground on the example state, with readable log lines.
run: deps venv demo
	@echo
	@echo "capkeeper now watches $(DEMO_DIR)/bin/demo-server (declared in examples/state.toml)."
	@echo "Try it from another terminal: drop its capabilities with a deploy, and watch them come back:"
	@echo "    cp /bin/true $(DEMO_DIR)/bin/demo-server && getcap $(DEMO_DIR)/bin/demo-server"
	@echo "Stop with Ctrl-C."
	@echo
	$(BIN)/capkeeper watch --state examples/state.toml --log-format console \
	  --status-file $(DEMO_DIR)/run/status.json

# Every benchmark in bench/ (a few minutes), then one table against the goals of issue 11.
# Not part of make test: the figures depend on the machine's load, not on correctness.
bench: venv
	@if [ "$$(id -u)" != 0 ]; then \
	  echo "make bench needs root: the benchmarks write security.capability." >&2; exit 1; fi
	$(BIN)/python bench/run_all.py

# -- packages for production hosts (packaging/, README "Installing") ---------------------
# make wheels fetches the pinned wheelhouse (network: PyPI, once; kept in dist/);
# make deb / make rpm build from it offline into dist/.
WHEELHOUSE := dist/wheelhouse

# The manual pages, from the code and man/*.include|.in (tests fail when they are stale).
man: venv
	$(BIN)/python packaging/manpages.py man

# Re-pin packaging/requirements.lock (network) after a dependency change in pyproject.toml.
lock:
	rm -rf build/piptools && $(PYTHON) -m venv build/piptools
	build/piptools/bin/pip install -q pip-tools
	build/piptools/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links --annotation-style=line \
	  -o packaging/requirements.lock pyproject.toml packaging/wheelhouse.in

wheels: $(WHEELHOUSE)/.complete

$(WHEELHOUSE)/.complete: packaging/requirements.lock packaging/wheels.sh | $(BIN)/.installed
	PIP=$(BIN)/pip sh packaging/wheels.sh $(WHEELHOUSE)

# No network from here on: a missing or stale wheelhouse is an error, not a download.
define need_wheelhouse
	@cmp -s packaging/requirements.lock $(WHEELHOUSE)/.complete || { \
	  echo "make $@: the wheelhouse is missing or older than packaging/requirements.lock; run make wheels first" >&2; \
	  exit 1; }
endef

deb:
	$(need_wheelhouse)
	sh packaging/build-deb.sh $(WHEELHOUSE) dist

rpm:
	$(need_wheelhouse)
	sh packaging/build-rpm.sh $(WHEELHOUSE) dist

packages: wheels
	$(MAKE) deb rpm

clean:
	rm -rf $(VENV) $(ANSIBLE_VENV) .cache .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info build
