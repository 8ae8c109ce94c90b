# `make demo`: set up .venv and pretrain SimCLR on digits end to end (local Ray, sqlite MLflow, shards built on first use).
# `make test`: set up .venv (with the dev extra), lint (ruff) and run the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/simclr_digits.yaml
ARGS   ?=

.PHONY: setup demo test test-fast bench clean slurm-deps

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# DeepSpeed's CPU comm op (JIT-compiled at the first engine otherwise, ~40 s): built once here, as part of the
	# install, into .venv/torch_extensions (pretrain.engine); a no-op where CUDA is (NCCL needs no op).
	$(PY) -c "from pretrain.engine import prebuild_ops; prebuild_ops()"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pretrain train --config $(CONFIG) $(ARGS)

test: $(STAMP) slurm-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_kernels.py --quick

# Debian's Slurm daemons and munge, for tests/cluster/test_slurm.py (a private 2-node Slurm cluster). Installed where
# this is root with apt-get (this project's machines and CI); elsewhere those tests skip, saying why.
slurm-deps:
	@if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
		&& command -v munged >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing Debian's Slurm and munge for the Slurm tests ..."; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client \
			munge >/dev/null; \
	else echo "No Slurm here and no root apt-get to install it: the Slurm tests will skip."; fi

clean:
	rm -rf $(VENV) runs .pytest_cache
