# resist_mpi: `make demo` trains ResIST on 4 ranks, `make test` runs the test suite.
# Both run `make setup` first, which is idempotent (a stamp file skips work already done).
SHELL := /bin/bash
PY    ?= python3
VENV  ?= .venv
NP    ?= 4
# Open MPI refuses to run as root and to oversubscribe cores unless told; CI and containers need both.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_rmaps_base_oversubscribe := 1
# Keep torch from spawning one thread per core in every rank (ranks share the cores).
export OMP_NUM_THREADS ?= 1
MPIRUN ?= mpirun --oversubscribe
STAMP := $(VENV)/.resist-setup-stamp

.PHONY: setup mpi demo test test-tiers test-fast lint docs horovod bench clean

setup: $(STAMP) cluster-deps

# MPI: use what the machine has (e.g. a cluster module); install Open MPI with apt only when absent.
mpi:
	@if command -v mpirun >/dev/null && command -v mpicc >/dev/null; then \
	  echo "setup: using MPI at $$(command -v mpirun)"; \
	elif command -v apt-get >/dev/null; then \
	  echo "setup: no MPI found, installing Open MPI with apt"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openmpi-bin libopenmpi-dev; \
	else \
	  echo "setup: no mpirun/mpicc and no apt-get: load your cluster's MPI module (e.g. 'module load openmpi') and rerun" >&2; exit 1; \
	fi

# tests/e2e/test_scheduler.py starts a one-node SLURM (and its PBS qsub wrapper) on localhost. Where the
# daemons are missing and apt-get exists (CI: a fresh machine, as root), install them; otherwise
# that test skips itself and says why. Never fatal: `make test` runs the rest either way.
SLURM_DEBS := slurmctld slurmd munge slurm-client slurm-wlm-torque
.PHONY: scheduler-deps
scheduler-deps:
	@export PATH="$$PATH:/usr/sbin:/sbin"; have() { command -v "$$1" >/dev/null; }; \
	if have sbatch && have qsub && have slurmctld && have slurmd && have munged; then \
	  :; \
	elif have apt-get && [ "$$(id -u)" = 0 ]; then \
	  echo "setup: installing SLURM and munge with apt for tests/e2e/test_scheduler.py"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SLURM_DEBS); } >/dev/null \
	    || echo "setup: apt could not install $(SLURM_DEBS); tests/e2e/test_scheduler.py will skip" >&2; \
	else \
	  echo "setup: no SLURM here; tests/e2e/test_scheduler.py will skip (needs root + apt-get install $(SLURM_DEBS))"; \
	fi

# tests/e2e/test_multinode.py builds a simulated cluster from network namespaces (resist_mpi/tools/cluster.py):
# it needs root and iproute2 (ip, tc). Installed with apt where missing and possible; otherwise that
# test skips itself and says why. Never fatal.
.PHONY: cluster-deps
cluster-deps:
	@export PATH="$$PATH:/usr/sbin:/sbin"; \
	if command -v ip >/dev/null && command -v tc >/dev/null; then \
	  :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "setup: installing iproute2 with apt for tests/e2e/test_multinode.py"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2; } >/dev/null \
	    || echo "setup: apt could not install iproute2; tests/e2e/test_multinode.py will skip" >&2; \
	else \
	  echo "setup: no iproute2 here; tests/e2e/test_multinode.py will skip (needs root + apt-get install iproute2)"; \
	fi

$(STAMP): pyproject.toml | mpi
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,plot,docs]'
	@touch $(STAMP)

demo: setup
	$(MPIRUN) -np $(NP) $(VENV)/bin/python -m resist_mpi.train --config configs/demo.yaml --out runs/demo --overwrite

# The unit tier runs its ranks as threads of one process: in pytest-xdist workers, each pinned to a CPU
# of its own (tests/unit/conftest.py), they hand the interpreter lock to each other without crossing
# cores, and the workers use every CPU (docs/testing.md).
UNIT := $(VENV)/bin/python -m pytest tests/unit -q -n auto

# Everything: the linter, the docs site (warnings are errors), then every test tier (the slowest tests
# listed at the end of each, so a log shows where the time goes). The launching tests run in two
# workers, each file in one of two groups (tests/conftest.py); the unit tier runs beside them, on the
# cores they leave idle while they start processes and wait for peers (docs/testing.md), its output
# kept in build/unit-tier.log and printed after theirs. Either tier failing fails the target.
LAUNCHING := $(VENV)/bin/python -m pytest tests -q --ignore=tests/unit --durations=40 -n 2 --dist loadgroup
test: setup scheduler-deps horovod-or-warn lint docs
	@$(MAKE) --no-print-directory test-tiers

# The two tiers at once, nothing else (`make test` without its set-up).
test-tiers:
	@mkdir -p build
	@echo "the unit tier runs beside the launching tests; its output follows theirs"
	@$(UNIT) --durations=10 > build/unit-tier.log 2>&1 & unit=$$!; \
	$(LAUNCHING); launching=$$?; \
	wait $$unit; units=$$?; echo "== the unit tier (tests/unit) =="; cat build/unit-tier.log; \
	test $$launching -eq 0 && test $$units -eq 0

# The unit tier without the slow tests: one process, no launches (ranks as threads), a few minutes.
test-fast: setup
	$(UNIT) -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

# The docs site (mkdocs.yml, docs/) into build/site; a broken link or a page left out of nav fails.
docs: setup
	$(VENV)/bin/mkdocs build --strict -q -d build/site

# A failed Horovod build skips its tests with a warning on a user's machine; under CI=true (.ci/run
# sets it) it fails the run, so CI never passes with a backend silently untested.
HOROVOD_BUILD ?= $(MAKE) --no-print-directory horovod
.PHONY: horovod-or-warn
horovod-or-warn:
	@$(HOROVOD_BUILD) || { \
	  if [ "$${CI:-}" = true ]; then echo "make test: the Horovod build failed under CI=true (see above)" >&2; exit 1; fi; \
	  echo "make test: WARNING: the Horovod build failed (see above); its tests will be skipped" >&2; }

# Horovod backend (optional): built from source once, the wheel cached outside the repo
# (RESIST_WHEEL_CACHE, default ~/.cache/resist_mpi/wheels); see scripts/build_horovod.sh.
horovod: setup
	VENV=$(VENV) scripts/build_horovod.sh

# The CUDA path in one command (exchange test + short demo on cuda vs cpu, mpi and horovod, 1 and
# 2 ranks on one GPU); one summary line. On a machine without CUDA it fails with one line.
.PHONY: gpu-check
gpu-check:
	@test -x $(VENV)/bin/python || $(MAKE) -s setup
	@$(VENV)/bin/python scripts/gpu_check.py

bench: setup
	$(MPIRUN) -np $(NP) $(VENV)/bin/python benchmarks/comm_bench.py --json runs/comm_bench.json

clean:
	rm -rf runs .pytest_cache build *.egg-info
