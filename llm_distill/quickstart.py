"""The whole chain on the bundled tiny task, on CPU, with no downloads:

    llm-distill quickstart                 # one seed (a few minutes on 2 cores)
    llm-distill quickstart seeds=[0,1,2]   # the README's figures
    llm-distill quickstart data_dir=data/choice_task   # the second bundled task (several right answers)
    llm-distill quickstart data_dir=data/check_task    # the third (an imperfect teacher, its own tokenizer)

teacher (data/tiny_task/teacher) -> generate on train prompts -> train a KD student and a CE-only student with
the same steps and seed -> evaluate all on the held-out prompts -> print the table.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from . import evaluate, generate, train
from .config import EvaluateConfig, GenerateConfig, QuickstartConfig, TrainConfig, load_config
from .data import read_provenance, write_run_record
from .errors import UserError
from .validate import check_output_path


def main(cfg: QuickstartConfig) -> dict:
    data, recipes, out = Path(cfg.data_dir), Path(cfg.recipes_dir), Path(cfg.output_dir)
    # The quickstart replaces its own previous output, and nothing else: an empty directory or one whose run.json
    # says quickstart, never the working directory or a folder holding the task data or recipes.
    check_output_path(str(out), "quickstart", [str(data), str(recipes)], overwrite=True)
    for f in (data / "train.jsonl", data / "heldout.jsonl", recipes / "generate.yaml"):
        if not f.exists():
            raise UserError(f"{f}: not found; run the quickstart from the repository root (or set data_dir/recipes_dir)")
    teacher = data / "teacher"
    if not (teacher / "config.json").is_file():
        from .tiny_task import FAMILIES, train_teacher

        # The family is the held-out rows' task type; a task with a builder of its own (data/check_task, with its
        # own tokenizer) is rebuilt by its make.py.
        with (data / "heldout.jsonl").open() as f:
            first = json.loads(f.readline() or "{}")
        kind = first.get("task") if isinstance(first, dict) else None
        family = next((name for name, kinds in FAMILIES.items() if kind in kinds), None)
        if family is None:
            fix = (f"build it with {data / 'make.py'}" if (data / "make.py").is_file() else
                   "put a checkpoint there (config.json, weights, tokenizer) or set data_dir to a bundled task")
            raise UserError(f"{teacher}: no teacher, and quickstart trains one only for the bundled exact and choice "
                            f"task types (held-out row 1 has task {kind!r}); {fix}")
        print(f"quickstart: no teacher at {teacher}; training it (a few minutes)")
        with tempfile.TemporaryDirectory() as work:
            train_teacher(data, work, family=family)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_run_record(out, "quickstart", dataclasses.asdict(cfg))
    limit = {"limit": cfg.limit} if cfg.limit else {}

    gen = load_config(GenerateConfig, str(recipes / "generate.yaml"), values_={
        "model": str(teacher), "prompts": str(data / "train.jsonl"), "output_dir": str(out / "teacher_data"), **limit})
    generate.main(gen)

    students = {}
    for seed in cfg.seeds:
        for kind in ("kd", "ce"):
            values = {"dataset": gen.output_dir, "output_dir": str(out / f"{kind}-seed{seed}"), "seed": seed}
            if cfg.max_steps:
                values["max_steps"] = cfg.max_steps
            tc = load_config(TrainConfig, str(recipes / f"train_{kind}.yaml"), values_=values)
            rows = read_provenance(gen.output_dir).get("num_rows") or 0
            if 0 < rows < tc.micro_batch_size * tc.grad_accum_steps:  # a small `limit`: one step sees every row once
                tc = dataclasses.replace(tc, micro_batch_size=max(rows // tc.grad_accum_steps, 1))
            train.main(tc)
            students[f"{'kd' if kind == 'kd' else 'ce_only'}-seed{seed}"] = values["output_dir"]

    ev = load_config(EvaluateConfig, str(recipes / "evaluate.yaml"), values_={
        "prompts": str(data / "heldout.jsonl"), "teacher": str(teacher), "output_dir": str(out / "eval"),
        "train_prompts": str(data / "train.jsonl"), **limit})
    ev = dataclasses.replace(ev, students=students)  # this run's students, not the recipe's
    report = evaluate.main(ev)

    summary = summarize(report, cfg.seeds)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\nquickstart summary (held-out exact match, mean over seeds):")
    for name, s in summary.items():
        spread = f" ± {s['exact_match_std']:.1%}" if s.get("exact_match_std") is not None else ""
        print(f"  {name:8s} {s['exact_match']:.1%}{spread}  ROUGE-L vs teacher {s['rouge_l_vs_teacher']:.3f}  "
              f"params {s['params']:,}")
    print(f"report: {out / 'eval' / 'report.md'}")
    return summary


def summarize(report: dict, seeds: list) -> dict:
    """Average each student kind over seeds."""
    groups = {"teacher": ["teacher"], "kd": [f"kd-seed{s}" for s in seeds], "ce_only": [f"ce_only-seed{s}" for s in seeds]}
    out = {}
    for kind, names in groups.items():
        ms = [report["models"][n] for n in names if n in report["models"]]
        if not ms:
            continue
        em = [m.get("exact_match", 0.0) for m in ms]
        out[kind] = {"exact_match": statistics.mean(em),
                     "exact_match_std": statistics.stdev(em) if len(em) > 1 else None,
                     "rouge_l_vs_teacher": statistics.mean(m.get("rouge_l_vs_teacher", 0.0) for m in ms),
                     "params": ms[0]["params"], "seeds": len(ms)}
    return out
