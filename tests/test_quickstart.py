"""The quickstart chain (generate -> train KD and CE-only -> evaluate) end to end through the CLI."""

import json
import shutil

from conftest import run_cli

from llm_distill.tiny_task import make_records, write_jsonl


def test_quickstart_end_to_end(tiny_teacher, tmp_path):
    data = tmp_path / "task"
    write_jsonl(make_records(16, seed=11, prefix="t"), data / "train.jsonl")
    write_jsonl(make_records(8, seed=12, prefix="h"), data / "heldout.jsonl")
    shutil.copytree(tiny_teacher, data / "teacher")
    out = tmp_path / "qs"
    proc = run_cli("quickstart", f"data_dir={data}", f"output_dir={out}", "max_steps=3", "seeds=[0,1]")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"teacher", "kd", "ce_only"}
    assert summary["kd"]["seeds"] == 2 and summary["kd"]["params"] == summary["ce_only"]["params"]
    report = json.loads((out / "eval" / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "kd-seed0", "ce_only-seed0", "kd-seed1", "ce_only-seed1"}
    assert "quickstart summary" in proc.stdout and "| teacher |" in proc.stdout
