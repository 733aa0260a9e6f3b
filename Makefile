# prism-jax: `make train` and `make test` do all set-up on a fresh machine.
EXP ?= prism_tiny
WORKDIR ?= runs/$(EXP)
ARGS ?=
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup data train test test-fast bench clean help

help:
	@echo "make train [EXP=prism_tiny] [WORKDIR=runs/EXP] [ARGS='key=value ...']"
	@echo "make test | make bench | make data | make setup"

setup: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

data: setup
	$(PY) -m prism_jax.data --exp $(EXP) $(ARGS)

train: data
	$(PY) -m prism_jax.train --exp $(EXP) --workdir $(WORKDIR) $(ARGS)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) -m benchmarks.train_step --configs tiny small

clean:
	rm -rf runs
