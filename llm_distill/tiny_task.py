"""The bundled synthetic chat tasks and their tiny teachers.

    python data/tiny_task/make.py        # rewrites data/tiny_task/{train,heldout}.jsonl and trains teacher/
    python data/choice_task/make.py      # the same for the second task, data/choice_task/

`exact` (data/tiny_task): four task types of graded difficulty, each question with one right answer:
    add      "What is 47+85?"                 -> "132"   (two-digit operands)
    reverse  "Reverse the letters: planet"    -> "tenalp"
    sort     "Sort the digits: 5183"          -> "1358"
    max      "Which is larger, 47 or 85?"     -> "85"

`choice` (data/choice_task): three task types whose questions have several right answers; the teacher is trained
on a uniformly drawn right answer per question, so it learns a distribution over them (as a chat model does over
phrasings), and a student is good when it has learned the whole set, not one arbitrary member of it:
    between  "Name a number between 430 and 437."        -> any of 431 ... 436
    letter   "Name a letter in: planet"                   -> any of a, e, l, n, p, t
    odd      "Name an odd digit in: 58213"                -> any of 1, 3, 5
Held-out rows carry `references`, the full set of right answers; exact match counts an answer in the set.
"""

from __future__ import annotations

import json
import random
import shutil
import string
from pathlib import Path

import itertools

TASKS = ("add", "reverse", "sort", "max")
CHOICE_TASKS = ("between", "letter", "odd")
FAMILIES = {"exact": TASKS, "choice": CHOICE_TASKS}


def make_example(rng: random.Random, task: str) -> tuple[str, str]:
    """One (question, answer) pair of an `exact` task type."""
    if task == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"What is {a}+{b}?", str(a + b)
    if task == "reverse":
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        return f"Reverse the letters: {w}", w[::-1]
    if task == "sort":
        d = "".join(rng.choice(string.digits) for _ in range(rng.randint(3, 8)))
        return f"Sort the digits: {d}", "".join(sorted(d))
    if task == "max":
        a, b = rng.sample(range(100, 1000), 2)
        return f"Which is larger, {a} or {b}?", str(max(a, b))
    raise ValueError(task)


def make_choice_example(rng: random.Random, task: str) -> tuple[str, list[str]]:
    """One (question, every right answer) pair of a `choice` task type; answers in a fixed order."""
    if task == "between":  # the last digit is the choice: copy two digits, then one strictly between
        q, lo = rng.randint(10, 99), rng.randint(0, 6)
        hi = rng.randint(lo + 3, 9)
        return f"Name a number between {q}{lo} and {q}{hi}.", [f"{q}{d}" for d in range(lo + 1, hi)]
    if task == "letter":
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        return f"Name a letter in: {w}", sorted(set(w))
    if task == "odd":  # which digits are odd, among those given
        while True:
            d = "".join(rng.choice(string.digits) for _ in range(rng.randint(4, 7)))
            odd = sorted({c for c in d if int(c) % 2})
            if len(odd) >= 2:
                return f"Name an odd digit in: {d}", odd
    raise ValueError(task)


def make_records(n: int, seed: int, exclude: set[str] = frozenset(), prefix: str = "q",
                 distinct: bool = True, family: str = "exact") -> list[dict]:
    """n prompts in the JSONL schema (`id`, `task`, `messages`, `reference`; `choice` rows also `references`,
    every right answer, with `reference` one of them drawn at random), none in `exclude`.

    `distinct=False` allows repeats (the teacher's large training draw exceeds the two-digit additions).
    """
    rng = random.Random(seed)
    seen = set(exclude)
    tasks = FAMILIES[family]
    out = []
    while len(out) < n:
        task = tasks[len(out) % len(tasks)]
        if family == "exact":
            q, refs = make_example(rng, task)
        else:
            q, refs = make_choice_example(rng, task)
        if q in seen:
            continue
        if distinct:
            seen.add(q)
        rec = {"id": f"{prefix}{len(out):05d}", "task": task, "messages": [{"role": "user", "content": q}]}
        if family == "exact":
            rec["reference"] = refs
        else:
            rec.update(reference=rng.choice(refs), references=refs)
        out.append(rec)
    return out


def write_jsonl(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def build_task(data_dir: str | Path, n_train: int = 5000, n_heldout: int = 400, seed: int = 1234,
               family: str = "exact") -> None:
    """Write held-out and distillation-train prompt sets (disjoint questions)."""
    data_dir = Path(data_dir)
    heldout = make_records(n_heldout, seed, prefix="h", family=family)
    train = make_records(n_train, seed + 1, exclude={r["messages"][0]["content"] for r in heldout}, prefix="t",
                         family=family)
    if family == "choice":  # the distiller's prompts need no answers (the teacher gives them); the file stays small
        for r in train:
            r.pop("references"), r.pop("reference")
    write_jsonl(heldout, data_dir / "heldout.jsonl")
    write_jsonl(train, data_dir / "train.jsonl")


def train_teacher(data_dir: str | Path, work_dir: str | Path, n_examples: int = 40000, max_steps: int = 3000,
                  seed: int = 7, family: str = "exact") -> Path:
    """Train the tiny teacher with `llm-distill train` (CE only) on its own labelled questions.

    The teacher's data is drawn fresh (not the students' train prompts and not held-out questions), like a
    real teacher whose training data the distiller never sees. A `choice` question's label is one right answer
    drawn uniformly per example, so the teacher learns a distribution over the right answers.
    """
    from datasets import Dataset

    from . import train
    from .config import TrainConfig
    from .tiny import build_char_tokenizer

    data_dir, work_dir = Path(data_dir), Path(work_dir)
    avoid = set()
    for split in ("heldout", "train"):
        with (data_dir / f"{split}.jsonl").open() as f:
            avoid |= {json.loads(line)["messages"][0]["content"] for line in f}
    recs = make_records(n_examples, seed + 100, exclude=avoid, prefix="x", distinct=False, family=family)
    sft = work_dir / "teacher_sft"
    Dataset.from_list([{"messages": r["messages"], "completion": r["reference"]} for r in recs]).save_to_disk(str(sft))
    tok_dir = work_dir / "char_tokenizer"
    build_char_tokenizer().save_pretrained(tok_dir)
    cfg = TrainConfig(dataset=str(sft), output_dir=str(work_dir / "teacher"), tokenizer=str(tok_dir),
                      student_config=TEACHER_CONFIG, kd_weight=0.0, ce_weight=1.0, learning_rate=3e-3,
                      warmup_steps=100, max_steps=max_steps, micro_batch_size=64, seed=seed, log_every=100,
                      overwrite=True)
    train.main(cfg)
    target = data_dir / "teacher"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(work_dir / "teacher", target,
                    ignore=shutil.ignore_patterns("checkpoints", "run.json", "tensorboard", "trainer_state.json"))
    return target


# ~1.06 M parameters with the 86-token character vocabulary.
TEACHER_CONFIG = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128,
                  "tie_word_embeddings": True}
