"""The three bundled tasks (data/*_task): prompts that parse, held-out rows with their references, and a committed
teacher that loads through from_pretrained and answers its own held-out prompts as recorded (greedy, the real
`llm-distill evaluate`)."""

import json

import pytest
from conftest import ROOT, run_cli

from llm_distill.tiny_task import FAMILIES

# Each teacher's greedy held-out exact match over all 400 prompts: 98.8% / 98.2% / 84.5%. The first 48 prompts
# (8 of each of the check task's six types) are held to a floor well under it: a teacher saved with another
# tokenizer, or a broken file, answers ~0%.
TASKS = {"tiny_task": 0.9, "choice_task": 0.9, "check_task": 0.7}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_bundled_task_and_its_teacher(task, tmp_path):
    data = ROOT / "data" / task
    train, heldout = read_jsonl(data / "train.jsonl"), read_jsonl(data / "heldout.jsonl")
    assert len(train) == 5000 and len(heldout) == 400
    assert all(r["messages"][-1]["role"] == "user" for r in train)  # prompts: the teacher writes the answers
    assert all(r.get("reference") or r.get("references") for r in heldout)
    train_q = {r["messages"][0]["content"] for r in train}
    assert not train_q & {r["messages"][0]["content"] for r in heldout}  # held-out prompts are unseen
    kinds = {r["task"] for r in heldout}
    # quickstart rebuilds a missing teacher for the families it knows; the check task has a builder of its own.
    assert any(kinds == set(k) for k in FAMILIES.values()) == (task != "check_task")

    out = tmp_path / "eval"
    run_cli("evaluate", "recipes/tiny/evaluate.yaml", f"prompts={data / 'heldout.jsonl'}",
            f"teacher={data / 'teacher'}", "students={}", f"output_dir={out}", "limit=48", "latency_prompts=0",
            "answer_samples=0", "plot=false")
    teacher = json.loads((out / "report.json").read_text())["models"]["teacher"]
    assert teacher["exact_match"] >= TASKS[task], teacher["exact_match"]


def test_quickstart_names_the_builder_of_a_teacher_it_cannot_train(tmp_path):
    data = tmp_path / "task"
    data.mkdir()
    for name in ("train.jsonl", "heldout.jsonl"):
        (data / name).write_text((ROOT / "data" / "check_task" / name).read_text())
    proc = run_cli("quickstart", f"data_dir={data}", f"output_dir={tmp_path / 'qs'}", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "no teacher" in last and "make.py" in last and "'sub'" in last, last
    assert not (tmp_path / "qs").exists()
