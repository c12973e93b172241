"""After an in-process vLLM engine has run, the CLI ends its own process early only when it is that process's entry
point, never inside a caller that imported `main` (tests, notebooks). (A finished multi-process train, WORLD_SIZE > 1,
leaves early whatever the entry point: every rank runs under a launcher.)"""

import subprocess
import sys

import pytest

from llm_distill import cli, vllm_backend


def test_an_imported_main_returns_to_its_caller_after_an_engine_ran(monkeypatch, tmp_path):
    """A stage that ran an engine, called through an imported `main`, returns its status instead of ending the
    caller's process."""
    from llm_distill import export

    ran = []
    monkeypatch.setattr(cli.os, "_exit", lambda status: pytest.fail(f"main ended the caller's process ({status})"))
    monkeypatch.setattr(vllm_backend, "ENGINES_STARTED", 1)
    monkeypatch.setattr(export, "main", ran.append)  # the stage itself is not under test
    assert not cli._is_process_entry()  # pytest is this process's entry point
    assert cli.main(["export", f"adapter={tmp_path / 'a'}", f"output_dir={tmp_path / 'o'}"]) == 0
    assert len(ran) == 1


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
