"""Shared fixtures: a tiny local teacher/student and prompts, built once per session (no downloads)."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# load_teacher_dataset converts parquet to an Arrow cache: keep the tests' caches out of ~/.cache (the CLI runs
# inherit this).
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="llm_distill_test_hf_datasets_"))

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT, check=True):
    """Run the real `llm-distill` entry point in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "llm_distill", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"llm-distill {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    from llm_distill.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "teacher", hidden_size=32, num_layers=2, seed=1)


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    from llm_distill.tiny_task import make_records, write_jsonl

    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    write_jsonl(make_records(12, seed=3), path)
    return path


@pytest.fixture(scope="session")
def teacher_data(tmp_path_factory, tiny_teacher, prompts_file):
    """A teacher dataset written by the real CLI (sampled at T=1, 2 samples per prompt, k=8)."""
    out = tmp_path_factory.mktemp("gen") / "teacher_data"
    run_cli("generate", f"model={tiny_teacher}", f"prompts={prompts_file}", f"output_dir={out}", "num_samples=2",
            "temperature=1.0", "max_new_tokens=12", "logprobs=8", "batch_size=5", "seed=0")
    return out


STUDENT_CONFIG = ["student_config.model_type=llama", "student_config.hidden_size=16",
                  "student_config.intermediate_size=32", "student_config.num_hidden_layers=1",
                  "student_config.num_attention_heads=2", "student_config.num_key_value_heads=2",
                  "student_config.max_position_embeddings=128"]


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path
