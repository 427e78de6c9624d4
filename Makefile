# Quickstart: `make demo` (train + export the digits models), `make test` (lint + whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export KERAS_BACKEND := tensorflow
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: venv test test-slow test-other-kernels lint demo bench clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .

# Under CI=true the tests marked `slow` (each over about 40 s on 2 cores) are left out to keep
# the run inside CI's 20-minute budget; `make test-slow` runs them.
CI_MARKS := $(if $(filter true,$(CI)),-m "not slow",)

# --dist loadfile: each test file runs in one worker (the files with the most tests first), so
# a module-scoped fixture (a trained run, an export that several tests inspect) is built once.
test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25 $(CI_MARKS) tests
	$(MAKE) --no-print-directory test-other-kernels

# The kernel-sensitive tests once more on the other CPU kernel set: TensorFlow uses oneDNN by
# default only on CPUs with AVX-512, and TF_ENABLE_ONEDNN_OPTS flips it either way, so a change
# that works on one kernel set only cannot pass.
KERNEL_TESTS := tests/test_lipschitz_operators.py tests/test_lipschitz_solvers.py \
	tests/test_lipschitz_fft_bound.py tests/test_lipschitz_layer.py tests/test_logdet.py \
	tests/test_benchmarks_measure.py tests/test_benchmarks_phases.py tests/test_convolution.py

test-other-kernels: venv
	@on=$$($(PY) tests/_onednn.py 2>/dev/null) && \
	flip=$$((1 - on)) && \
	echo "Kernel tests again with TF_ENABLE_ONEDNN_OPTS=$$flip (oneDNN was $$([ $$on = 1 ] && echo on || echo off))" && \
	TF_ENABLE_ONEDNN_OPTS=$$flip $(PY) -m pytest -q -n 2 --dist worksteal $(CI_MARKS) $(KERNEL_TESTS)

test-slow: venv
	$(PY) -m pytest -q -n 2 --dist loadfile -m slow tests

demo: venv
	$(PY) -m train.density --preset=digits_density
	$(PY) -m train.classifier --preset=digits_classifier

bench: venv
	$(PY) -m benchmarks.run --preset=bench_cifar_small

clean:
	rm -rf $(VENV) build *.egg-info
