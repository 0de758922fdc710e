# The two commands a newcomer needs: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

# Torch is installed on its own, pinned, before the package: an unpinned resolve would
# pull a multi-gigabyte CUDA build instead of the CPU wheel.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev,hf]"
	touch $(STAMP)

demo: install
	$(PY) -m kdistill demo

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check kdistill tests benchmarks examples
	$(PY) -m ruff format --check kdistill tests benchmarks examples

# Liger-Kernel is a benchmark peer only; --no-deps keeps its triton (GPU) dependency out.
bench: install
	$(PY) -m pip install --quiet --no-deps "liger-kernel>=0.5"
	$(PY) -m kdistill bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
