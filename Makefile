# The install procedure. `make setup` is idempotent: it only reinstalls when requirements change.
# Install profiles: `make setup` = CPU (default, requirements.txt); `make setup DEVICE=cuda` = CUDA nodes
# (requirements-cuda.txt: CUDA builds of torch/fbgemm-gpu from the PyTorch index, DeepSpeed ops left to JIT).
# A venv holds one profile: to switch, `make clean` first or give another VENV=...
PY ?= python3
VENV ?= .venv
DEVICE ?= cpu
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# test processes (pytest-xdist, one file per process so module fixtures are built once): the suite is mostly
# single-threaded, so 2 processes on the 2-core reference machine halve its wall time; TEST_WORKERS=0 runs serially
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
TORCHREC := torchrec==1.8.0

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
ifeq ($(DEVICE),cpu)
STAMP := $(VENV)/.installed
OTHER_STAMP := $(VENV)/.installed-cuda
REQUIREMENTS := requirements.txt
export DS_ACCELERATOR := cpu
else ifeq ($(DEVICE),cuda)
STAMP := $(VENV)/.installed-cuda
OTHER_STAMP := $(VENV)/.installed
REQUIREMENTS := requirements-cuda.txt
export DS_BUILD_OPS := 0
else
$(error DEVICE=$(DEVICE): allowed values: cpu, cuda)
endif
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup test test-slow test-unit test-distributed test-integration demo clean

setup: $(STAMP)

$(STAMP): $(REQUIREMENTS) pyproject.toml
	@test ! -e $(OTHER_STAMP) || { echo "$(VENV) holds the other install profile: make clean (or VENV=...) before DEVICE=$(DEVICE)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r $(REQUIREMENTS)
	$(BIN)/pip install --quiet --no-deps $(TORCHREC)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q $(XDIST) tests $(PYTEST_ARGS)

# the slow tests alone (multi-node Ray with a node killed mid-run, 2-rank bench): CI runs them after `make test`
test-slow: setup
	COMEIR_SLOW_TESTS=1 $(BIN)/python -m pytest -q -m slow tests $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest -q $(XDIST) tests/unit $(PYTEST_ARGS)

test-distributed: setup
	$(BIN)/python -m pytest -q $(XDIST) tests/distributed $(PYTEST_ARGS)

test-integration: setup
	$(BIN)/python -m pytest -q $(XDIST) tests/integration $(PYTEST_ARGS)

demo: setup
	$(BIN)/python jobs/demo.py --pipeline configs/preprocess.yaml --config configs/comeir_cpu.yaml

clean:
	rm -rf $(VENV) runs
