# decomm: two commands do everything on a fresh machine.
#   make run   - set up (venv, MPI wheels, build) and run the main job: decentralized
#                training on the bundled digits data over a Base-(k+1) graph
#   make test  - set up and run the whole test suite (unit + MPI for 1..5 ranks)
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 25

.PHONY: setup run gossip test test-unit test-mpi lint bench clean

setup:
	@bash scripts/setup_env.sh

run: setup
	$(VENV)/bin/decomm-run -np $(NP) $(PY) examples/train.py --out runs/main

gossip: setup
	$(VENV)/bin/decomm-run -np $(NP) $(PY) examples/gossip.py

test: setup
	$(PY) scripts/run_tests.py

test-unit: setup
	$(PY) scripts/run_tests.py --only unit

test-mpi: setup
	$(PY) scripts/run_tests.py --only mpi

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/neighbor_allreduce.py

clean:
	rm -rf build *.egg-info decomm/*.so

.PHONY: docs
docs: setup
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html
