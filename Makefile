# Two commands for a fresh clone:
#   make demo   set up, then run the main job on the embedded default (no servers needed)
#   make test   set up, then run the whole test suite (what CI runs)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup demo test test-unit bench lint clean

setup: $(VENV)/.installed

# llama-cpp-python ships only as source. Its default build is -march=native, which on a CPU that
# reports AMX compiles AMX tile code that dies with a general protection fault (ldtilecfg) in VMs
# that do not grant the AMX state; so it is built once per machine for a portable x86-64 level
# (AVX2/FMA/F16C, no AVX-512, no AMX) into a wheel directory that pip installs from.
LLAMA_CPP_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
# The directory is named after the flags, so a build with other LLAMA_CMAKE_ARGS never reuses this one.
LLAMA_FLAGS_ID := $(shell printf '%s' '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-8)
LLAMA_WHEELS ?= $(HOME)/.cache/echolm/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_FLAGS_ID)

$(LLAMA_WHEELS)/.built:
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PYTHON) -m pip wheel -q --no-deps --no-cache-dir -w $(LLAMA_WHEELS) \
		llama-cpp-python==$(LLAMA_CPP_VERSION)
	touch $@

$(VENV)/.installed: pyproject.toml $(LLAMA_WHEELS)/.built
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --find-links $(LLAMA_WHEELS) --only-binary llama-cpp-python -e '.[test,plots]'
	touch $@

demo: setup
	$(BIN)/echolm demo

test: setup
	$(BIN)/python -m pytest -q -rs --durations=15

test-unit: setup
	$(BIN)/python -m pytest -q -m "not integration"

bench: setup
	$(BIN)/python bench/bench_stages.py
	$(BIN)/python bench/bench_pipeline.py

clean:
	rm -rf .echolm out .pytest_cache
