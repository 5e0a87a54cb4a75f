# The two commands of the README:
#   make demo   set up, train on the embedded diabetes data, explain it, say where to look
#   make test   set up, run the whole test suite
# Both are idempotent: the virtualenv is made once and re-installed only when
# pyproject.toml changes. The pinned CPU torch wheel is installed first, so that
# the package's torch range is already satisfied (an open range with no torch
# installed would pull a CUDA build of several GB).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Two pytest-xdist workers; the tests that share a server or a registry study share a
# worker (tests/conftest.py). PYTEST_WORKERS= runs the suite in one process.
PYTEST_WORKERS ?= -n 2 --dist loadgroup

.PHONY: install demo test test-fast ui-deps lint clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/mlflow-xai train
	$(BIN)/mlflow-xai explain
	@echo
	@echo "Look at it:  $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db   then open http://127.0.0.1:5000"
	@echo "             experiment 'mlflow-xai': the train run (params, metric charts, checkpoints/, tensorboard/, xai/training.html)"
	@echo "             and the explain run (artifacts xai/report.html, xai/weights/, xai/activations/, xai/gradients/)"

test: install
	$(BIN)/python -m pytest -q $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q $(PYTEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check mlflow_xai tests benchmarks
