# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv from the pinned requirements.txt on a fresh machine (Python 3.11, CPU torch 2.13.0).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
# DeepSpeed's CPU accelerator where there is no NVIDIA GPU; with one, DeepSpeed picks CUDA itself.
ifeq ($(shell command -v nvidia-smi),)
export DS_ACCELERATOR ?= cpu
endif

.PHONY: install test demo lint bench clean

$(STAMP): requirements.txt setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24" setuptools wheel
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# The package is (re)installed from the checkout each time, non-editable, so the installed layout
# (patches/ as megatron_eplb.patches) is what the tests exercise next to the checkout layout.
install: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --force-reinstall .

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(PY) examples/demo.py $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) benchmarks/policy_bench.py

clean:
	rm -rf $(VENV) build *.egg-info outputs
