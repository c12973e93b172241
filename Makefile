# make quickstart   set up .venv and run the whole chain on the bundled tiny task (CPU, no downloads)
# make test         set up .venv (with test extras) and run the test suite
PYTHON ?= python3
VENV ?= .venv
# torch is pinned first so pip takes the CPU build here instead of a multi-GB CUDA build;
# on a GPU machine install the torch build you want before `pip install -e .[vllm]`.
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/llm-distill quickstart

test: install
	$(VENV)/bin/python -m pytest -q tests

.PHONY: install quickstart test
