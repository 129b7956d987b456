# The two commands the README promises, on a fresh machine with Python 3.11 and pip:
#   make bench   set up .venv, build seqfuse, run the quick benchmark table
#   make test    set up .venv, build seqfuse, run the C++ kernel tests and the whole pytest suite
#   make gpu-check  (on a GPU machine) confirm the CUDA kernels: tools/gpu_check.sh
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
CMAKE_BUILD := build/cmake

.PHONY: all build test test-python test-cpp bench wheel wheel-check gpu-check clean

all: test

$(DEPS): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# Editable install once, then incremental in-place rebuilds of the extension.
$(VENV)/.seqfuse-installed: $(DEPS) setup.py pyproject.toml
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.seqfuse-installed
	$(PY) setup.py --quiet build_ext --inplace

test-cpp: $(DEPS)
	$(VENV)/bin/cmake -S . -B $(CMAKE_BUILD) -DSEQFUSE_WERROR=$(if $(CI),ON,OFF) >/dev/null
	$(VENV)/bin/cmake --build $(CMAKE_BUILD) -j2
	$(VENV)/bin/ctest --test-dir $(CMAKE_BUILD) --output-on-failure

test-python: build
	$(PY) -m pytest -q tests seqfuse --doctest-modules

test: test-cpp test-python

bench: build
	$(PY) -m seqfuse.bench --quick

wheel: $(DEPS)
	rm -f dist/seqfuse-*.whl
	$(PY) -m pip wheel --quiet --no-build-isolation --no-deps -w dist .

# The wheel installs into a fresh virtualenv (pulling the torch it pins) and works there.
wheel-check: wheel
	rm -rf build/wheel-venv
	$(PYTHON) -m venv build/wheel-venv
	build/wheel-venv/bin/python -m pip install --quiet dist/seqfuse-*.whl
	cd build && wheel-venv/bin/python ../.ci/smoke_installed.py

# On a machine with a GPU and a CUDA torch (no virtualenv, no network): build for
# the local GPU, CUDA tests, compute-sanitizer, the GPU table; summary in build/gpu-check.
gpu-check:
	tools/gpu_check.sh

clean:
	rm -rf build dist $(CMAKE_BUILD) seqfuse/_C*.so seqfuse/_build_info.py *.egg-info
