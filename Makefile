# Two commands for users: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MPIEXEC := $(VENV)/bin/mpiexec
STAMP  := $(VENV)/.installed

.PHONY: install install-torch demo test test-unit test-mpi bench bench-smoke clean

install: $(STAMP)

# Re-runs only when the project's metadata changes; editable, so code edits need no reinstall.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[mpich,data,test,bench,torch]"
	touch $(STAMP)

# torch for ps.TorchModel and the bench's PyTorch baselines. The extra pins torch==2.13.0, a
# CPU build; `make install` (and so `make test`) installs it too, so the tests against torch
# run everywhere instead of skipping. For users psframe stays usable without it.
install-torch: install
	$(PY) -m pip install --quiet -e ".[torch]"

# 1 server + 3 workers, Sync, ps.models.CNN on the 5,000-image MNIST subset (about 30 s here).
demo: install
	timeout 600 $(MPIEXEC) -n 4 $(PY) -m mpi4py -m psframe train \
	  --model cnn --data mnist --policy sync --optimizer sgd --lr 0.05 \
	  --momentum 0.9 --batch-size 32 --epochs 15

# Unit tests, then MPI tests at 2, 3 and 4 ranks; one closing line for the whole run.
test: install
	$(PY) tests/run_suite.py

bench: install
	$(MPIEXEC) -n 2 $(PY) benchmarks/transport.py
	$(PY) benchmarks/overhead.py

# The whole harness in well under a minute: the smoke grid as fresh jobs, then its report.
bench-smoke: install
	rm -rf results/bench/smoke.jsonl results/bench/smoke.cells
	timeout 300 $(PY) -m psframe bench --config benchmarks/configs/smoke.toml
	$(PY) -m psframe report results/bench/smoke.jsonl

clean:
	rm -rf $(VENV) .test-logs
