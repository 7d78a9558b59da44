# Two commands for a fresh clone:
#   make demo   set up, then run the main job on the embedded default (no servers needed)
#   make test   set up, then run the whole test suite (what CI runs)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup demo test test-unit bench lint clean

setup: $(VENV)/.installed

# pip keeps the compiled llama-cpp-python wheel in its cache, so only the first setup on a machine compiles it.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,plots]'
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
