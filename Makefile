# cmtrace: install, demo, tests. Run as root (sudo make ...): the set-up installs apt packages and
# the tests load BPF programs. See README.md, sections Installation and Running the tests.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Where the set-up installs (the virtualenv, test interpreters, installed.txt); scripts read it too.
CMTRACE_HOME ?= /opt/cmtrace
export CMTRACE_HOME
VENV := $(CMTRACE_HOME)/venv
PYTHON := $(VENV)/bin/python
RUFF := $(VENV)/bin/ruff
# Extra pytest arguments, e.g. make test PYTEST_ARGS='-k doctor'
PYTEST_ARGS ?=

.PHONY: help root setup install uninstall demo interpreters test test-full pytest unit vm-test bench lint

help:
	@echo "make demo          set up, then trace the built-in leaking demo program"
	@echo "make test          set up, install test interpreters, run the tests, then the VM stage"
	@echo "make test-full     make test with every recorder x interpreter cell (CMTRACE_TEST_FULL=1; CI runs a slice)"
	@echo "make unit          the unit tests only: seconds, no root, no set-up (PYTHON=... to choose)"
	@echo "make install       set up only (apt packages, headers link, tracefs, $(VENV), /usr/local/bin/cmtrace)"
	@echo "make uninstall     remove what the set-up created (recorded in /opt/cmtrace/installed.txt)"
	@echo "make interpreters  install the CPython builds the tests run on (/opt/cmtrace/pythons)"
	@echo "make vm-test       only the VM stage (Debian VM built and booted locally, tests inside it)"
	@echo "make bench         run every benchmark under benchmarks/"
	@echo "make lint          ruff format --check + ruff check + mypy"

root:
	@[ "$$(id -u)" = 0 ] || { echo "make: run as root: sudo make $(MAKECMDGOALS)" >&2; exit 2; }

setup install: root
	@scripts/setup.sh

uninstall: root
	@scripts/setup.sh --uninstall

demo: setup
	$(VENV)/bin/cmtrace demo

interpreters: root
	@scripts/install-interpreters.sh

# The host tests, then the VM stage; inside the VM guest (CMTRACE_IN_VM=1) the VM stage is
# skipped so nothing nests. Both run even if the first fails; the target fails if either did.
test: setup interpreters
	@rc=0; \
	$(PYTHON) -m pytest -v $(PYTEST_ARGS) tests/ || rc=$$?; \
	if [ -n "$$CMTRACE_IN_VM" ]; then \
		echo "make test: inside the VM guest (CMTRACE_IN_VM=$$CMTRACE_IN_VM): VM stage skipped"; \
	else \
		scripts/vm/vm-test.sh || rc=$$((rc ? rc : $$?)); \
	fi; \
	exit $$rc

# Every cell of the matrix (tests/integration/conftest.py cell_left_out): CI runs a slice.
test-full:
	@CMTRACE_TEST_FULL=1 $(MAKE) test

pytest: setup interpreters
	$(PYTHON) -m pytest -v $(PYTEST_ARGS) tests/

# The unit layer (tests/unit): pure Python over hand-built tables and the saved traces in
# tests/data, so no root, no BPF and no set-up run. It tests this checkout's code, wherever it is
# (tests/conftest.py), with any Python that has the dependencies: make unit PYTHON=python3.
unit:
	$(PYTHON) -m pytest -q $(PYTEST_ARGS) tests/unit

vm-test: root
	@scripts/vm/vm-test.sh

bench: setup
	@if [ -x benchmarks/run_all.sh ]; then benchmarks/run_all.sh; else \
		rc=0; found=0; \
		for b in benchmarks/*.py benchmarks/*.sh; do \
			[ -e "$$b" ] || continue; case $${b##*/} in _*) continue;; esac; \
			found=1; echo "== $$b"; \
			case $$b in *.py) $(PYTHON) "$$b" || rc=$$?;; *) bash "$$b" || rc=$$?;; esac; \
		done; \
		[ $$found = 1 ] || echo "make bench: no benchmark under benchmarks/ yet"; \
		exit $$rc; \
	fi

# mypy: build/mypy/cmtrace/analysis links to analysis/ so mypy finds cmtrace.analysis there
# ([tool.mypy] mypy_path; setuptools' package-dir is invisible to it).
lint:
	$(RUFF) format --check .
	$(RUFF) check .
	@mkdir -p build/mypy/cmtrace && ln -sfn ../../../analysis build/mypy/cmtrace/analysis && \
		ln -sfn ../../../probes build/mypy/cmtrace/probes
	$(PYTHON) -m mypy
