# make quickstart   set up .venv and run the whole chain on the bundled tiny task (CPU, no downloads)
# make test         set up .venv (with test extras and vLLM's classes, CPU only) and run the test suite
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

# vLLM's real classes for the contract tests (tests/test_vllm.py) on CPU: the vllm wheel with --no-deps plus
# the few light packages its output/params modules import, pinned in requirements-vllm-contract.txt (a 336 MB
# download, about a minute). When it cannot be installed, make goes on and those tests skip, saying why.
$(VENV)/.vllm-contract: $(VENV)/.installed requirements-vllm-contract.txt
	if $(VENV)/bin/pip install -q --no-deps -r requirements-vllm-contract.txt; then touch $@; \
	else echo "make: vllm contract packages not installed; tests/test_vllm.py will be skipped"; fi

# Tests run in up to 4 worker processes (pytest-xdist): most of their time is spent in the subprocesses they
# launch (CLI runs, kills and resumes, 2-process DDP), each on its own temp dirs and a free port.
test: install $(VENV)/.vllm-contract
	$(VENV)/bin/python -m pytest -q -n auto --maxprocesses 4 tests

.PHONY: install quickstart test
