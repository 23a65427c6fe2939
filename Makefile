# Two commands a fresh clone needs: `make demo` and `make test`. Each creates .venv on first use
# and installs the exact versions in constraints.txt (the lock CI tested; `make lock` renews it).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := constraints.txt
# The lock pins the build backend too, so the editable install builds without isolation.
PIP_INSTALL := $(BIN)/python -m pip install --quiet --constraint $(LOCK)

.PHONY: demo test test-all lint install lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel

# Stamp files so `make test` after `make demo` only adds the test extras.
$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/python
	$(PIP_INSTALL) --no-build-isolation -e '.[cpu]'
	touch $@

$(VENV)/.installed-test: pyproject.toml $(LOCK) | $(BIN)/python
	$(PIP_INSTALL) --no-build-isolation -e '.[cpu,test]'
	touch $(VENV)/.installed $@

# Resolve pyproject.toml's ranges (and lock.in's pins) to the newest allowed releases, in a
# throwaway venv with pip-tools. Review the diff, run `make test`, commit both files.
lock:
	rm -rf build/lock-venv
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/python -m pip install --quiet pip-tools
	build/lock-venv/bin/pip-compile --quiet --extra cpu --extra test --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links --annotation-style line --upgrade \
		--output-file $(LOCK) pyproject.toml lock.in
	rm -rf build/lock-venv

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/onnxcompress demo

CODE := $(wildcard onnxcompress passes tests models benchmarks)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -m "not slow" -q

test-all: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
