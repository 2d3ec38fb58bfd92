# The README's two commands: `make run` and `make test`. Both build everything on a fresh machine.
PYTHON      ?= python3
VENV        ?= .venv
# torch arrives as a pinned local CPU wheel; never let pip resolve a newer (CUDA) build.
TORCH_SPEC  ?= torch==2.13.0
# Elsewhere, point pip at PyTorch's CPU wheels: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# Triton runs the GPU kernels' tests on CPU through its interpreter (TRITON_INTERPRET=1); the
# range covers the GPU machine's 3.6 and this machine's 3.9.
TRITON_SPEC ?= triton>=3.6,<3.10
PYTEST_ARGS ?=
# Data the checkout's studies read (cifar10-jpeg.tar.gz) when it sits beside the checkout:
# appended to the user's own GROUPNORM_DATA (a search path) for the test and run targets.
SHARED_DATA := $(abspath ../shared/data)
DATA_PATH   := $(if $(wildcard $(SHARED_DATA)),$(if $(GROUPNORM_DATA),$(GROUPNORM_DATA):)$(SHARED_DATA),$(GROUPNORM_DATA))
BIN          = $(VENV)/bin
# one stamp per torch spec: changing TORCH_SPEC reinstalls instead of keeping the old torch
STAMP        = $(VENV)/.installed-$(subst =,_,$(subst <,_,$(subst >,_,$(subst $(space),_,$(TORCH_SPEC)))))
space       := $(subst ,, )
PIP_TORCH    = $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

.PHONY: install data run test test-slow lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_TORCH) "$(TORCH_SPEC)" numpy
	$(BIN)/pip install -q $(PIP_TORCH) "$(TORCH_SPEC)" "$(TRITON_SPEC)" -e ".[dev]"
	rm -f $(VENV)/.installed*
	touch $@

install: $(STAMP)

# Real Fashion-MNIST from Debian (IDX files in /usr/share/datasets/fashion-mnist/), where apt exists.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "warning: could not install dataset-fashion-mnist; tests that need it will skip"; \
	else echo "note: dataset-fashion-mnist not installed (needs root + apt); tests that need it will skip"; fi

run test test-slow bench: export GROUPNORM_DATA := $(DATA_PATH)

run: install data
	$(BIN)/python -m groupnorm reproduce --preset quick --jobs 2 --out runs/quick

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
