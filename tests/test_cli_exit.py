"""The CLI ends its own process early (after an in-process vLLM engine has run, or after a multi-process train)
only when it is that process's entry point, never inside a caller that imported `main` (tests, notebooks)."""

import subprocess
import sys

from llm_distill import cli, vllm_backend


def test_an_imported_main_does_not_count_as_the_entry_point(monkeypatch):
    monkeypatch.setattr(vllm_backend, "ENGINES_STARTED", 1)
    assert not cli._is_process_entry()  # pytest is this process's entry point


def test_the_console_script_and_python_m_count_as_the_entry_point():
    def entry(code: str) -> str:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()

    plain = "from llm_distill import cli; print(cli._is_process_entry())"
    assert entry(plain) == "False"
    assert entry("import sys; sys.argv[0] = '/venv/bin/llm-distill'; " + plain) == "True"
    as_module = ("import runpy, sys; sys.argv = ['x', '--help']\n"
                 "import llm_distill.cli as c; c.main = lambda: print(c._is_process_entry()) or 0\n"
                 "runpy.run_module('llm_distill', run_name='__main__', alter_sys=True)")
    assert entry(as_module).splitlines()[-1] == "True"
