# The install procedure. `make setup` is idempotent: it only reinstalls when requirements change.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR := cpu
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup test test-unit test-distributed test-integration demo clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps torchrec==1.8.0
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit $(PYTEST_ARGS)

test-distributed: setup
	$(BIN)/python -m pytest -q tests/distributed $(PYTEST_ARGS)

test-integration: setup
	$(BIN)/python -m pytest -q tests/integration $(PYTEST_ARGS)

demo: setup
	$(BIN)/python jobs/demo.py --pipeline configs/preprocess.yaml --config configs/comeir_cpu.yaml

clean:
	rm -rf $(VENV) runs
