# Quickstart: `make demo` (train + export the digits models), `make test` (lint + whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export KERAS_BACKEND := tensorflow
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: venv test lint demo bench clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m train.density --preset=digits_density
	$(PY) -m train.classifier --preset=digits_classifier

bench: venv
	$(PY) -m benchmarks.run --preset=bench_cifar_small

clean:
	rm -rf $(VENV) build *.egg-info
