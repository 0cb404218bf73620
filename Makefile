# ffc_ray: every target installs what it needs into .venv first, so a fresh machine needs only
# `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k pool -x"`.
PYTEST_ARGS ?=
TB_PORT ?= 6006

.PHONY: install test test-all test-kernels lint demo bench tensorboard clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first and pinned: an unpinned torch pulls several GB of CUDA wheels.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The CI suite (unit + one shared local Ray + end to end) without the slow-marked tests, so it
# stays within 15 minutes on a 2-core CPU machine.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not launch" $(PYTEST_ARGS)

# The suite on torch's portable and AVX2 CPU kernels (issue 18: float comparisons must not
# depend on the kernels a CPU picks); the plain `make test` covers the machine's own.
test-kernels: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -m "not slow and not launch" $(PYTEST_ARGS)
	ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -q -m "not slow and not launch" $(PYTEST_ARGS)

# Everything but the real cluster launch: adds the slow tests (sweeps, fault tolerance, training
# to an accuracy target). The launch itself: `make cluster-launch-test`.
test-all: $(STAMP)
	$(PY) -m pytest -q -m "not launch" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check ffc_ray tests benchmarks clusters
	$(PY) -m ruff format --check ffc_ray tests benchmarks clusters

demo: $(STAMP)
	$(VENV)/bin/ffc-ray demo

bench: $(STAMP)
	$(PY) benchmarks/pool_index.py
	$(PY) benchmarks/head_cost.py

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir runs --host 127.0.0.1 --port $(TB_PORT)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs build *.egg-info

-include clusters/cluster.mk
