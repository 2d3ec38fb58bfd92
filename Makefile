# The README's two commands: `make run` and `make test`. Both build everything on a fresh machine.
PYTHON      ?= python3
VENV        ?= .venv
# torch arrives as a pinned local CPU wheel; never let pip resolve a newer (CUDA) build.
TORCH_SPEC  ?= torch==2.13.0
# Triton runs the GPU kernels' tests on CPU through its interpreter (TRITON_INTERPRET=1).
TRITON_SPEC ?= triton
PYTEST_ARGS ?=
BIN          = $(VENV)/bin
STAMP        = $(VENV)/.installed

.PHONY: install data run test test-slow lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" numpy
	$(BIN)/pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)" -e ".[dev]"
	touch $@

install: $(STAMP)

# Real Fashion-MNIST from Debian (IDX files in /usr/share/datasets/fashion-mnist/), where apt exists.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "warning: could not install dataset-fashion-mnist; tests that need it will skip"; \
	else echo "note: dataset-fashion-mnist not installed (needs root + apt); tests that need it will skip"; fi

run: install data
	$(BIN)/python -m groupnorm reproduce --preset quick --out runs/quick

test: install data
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: install data
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks

bench: install
	$(BIN)/python -m groupnorm bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
