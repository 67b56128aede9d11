# Two commands a new machine needs: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= work/demo
# Test processes (pytest-xdist, one test file per process at a time): see docs/BENCHMARKS.md "Test suite time".
TEST_WORKERS ?= 4

.PHONY: demo test lint install clean
install: $(VENV)/.installed

# torch==2.13.0 first: with no torch present, a bare requirement may pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(BIN)/weightzoo demo --workdir $(WORKDIR)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) work .pytest_cache
