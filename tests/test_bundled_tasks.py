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


@pytest.mark.parametrize("builder", [True, False])
def test_quickstart_says_how_to_get_a_teacher_it_cannot_train(builder, tmp_path):
    """The check task's teacher has a tokenizer of its own: quickstart names its make.py (or, for a data dir
    without one, what to put there) in one line, exits non-zero and writes nothing."""
    data = tmp_path / "task"
    data.mkdir()
    for name in ("train.jsonl", "heldout.jsonl") + (("make.py",) if builder else ()):
        (data / name).write_text((ROOT / "data" / "check_task" / name).read_text())
    proc = run_cli("quickstart", f"data_dir={data}", f"output_dir={tmp_path / 'qs'}", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no teacher" in lines[0] and "'sub'" in lines[0], lines
    assert ("make.py" in lines[0]) == builder and ("put a checkpoint there" in lines[0]) != builder
    assert not (tmp_path / "qs").exists() and not (data / "teacher").exists()


@pytest.mark.parametrize("task,family", [("tiny_task", "exact"), ("choice_task", "choice")])
def test_quickstart_trains_a_missing_teacher_of_the_tasks_family(task, family, tmp_path, monkeypatch):
    """Without teacher/, quickstart trains one for the family of the held-out rows' task type."""
    from llm_distill import quickstart, tiny_task
    from llm_distill.config import QuickstartConfig

    class Trained(Exception):
        pass

    def train_teacher(data_dir, work, family="exact"):
        raise Trained(family)

    data = tmp_path / "task"
    data.mkdir()
    for name in ("train.jsonl", "heldout.jsonl"):
        (data / name).write_text((ROOT / "data" / task / name).read_text())
    monkeypatch.setattr(tiny_task, "train_teacher", train_teacher)
    with pytest.raises(Trained) as got:
        quickstart.main(QuickstartConfig(data_dir=str(data), recipes_dir=str(ROOT / "recipes" / "tiny"),
                                         output_dir=str(tmp_path / "qs")))
    assert str(got.value) == family
