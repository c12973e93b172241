# Held-out exact match on the bundled task: offline KD vs on-policy KD (GKD, λ = 0.5) vs MiniLLM-style sequence
# reverse KL (λ = 0.5), same optimiser steps, batch, learning rate and seeds:
#     python benchmarks/onpolicy_vs_offline.py               (2,500 steps as in the quickstart, seeds 0,1,2: about
#                                                           75 min on a 2-core CPU, then ~3 min of evaluation)
#     python benchmarks/onpolicy_vs_offline.py 400 0,1,2     (steps, seeds)
# Finished students are reused, so seeds can be trained by separate invocations in parallel
# (`... 2500 0 & ... 2500 1 & ...`) and a last invocation with all seeds evaluates them together.
import json
import statistics
import sys
import time
from pathlib import Path

from llm_distill import evaluate, generate, train
from llm_distill.config import EvaluateConfig, GenerateConfig, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "bench" / "onpolicy_vs_offline"
TEACHER = str(ROOT / "data/tiny_task/teacher")
# Every variant: the KD recipe (forward KL on top-20 + tail, plus CE on the teacher's greedy answers). The
# on-policy variants replace half of the steps (drawn per step) by steps on the student's own samples (T = 1,
# up to 16 tokens) scored by the teacher in-process; ce_weight applies to the offline steps only.
VARIANTS = {
    "offline": {},
    "onpolicy": {"onpolicy_fraction": 0.5, "teacher": TEACHER, "onpolicy_max_new_tokens": 16},
    "minillm": {"onpolicy_fraction": 0.5, "teacher": TEACHER, "onpolicy_max_new_tokens": 16,
                "onpolicy_objective": "minillm", "minillm_teacher_mix": 0.2, "minillm_single_step": True,
                "minillm_length_norm": True},
}


def main(steps: int = 2500, seeds=(0, 1, 2)) -> None:
    data = OUT / "teacher_data"
    if not (data / "provenance.json").is_file():
        generate.main(load_config(GenerateConfig, str(ROOT / "recipes/tiny/generate.yaml"), values_={
            "model": TEACHER, "prompts": str(ROOT / "data/tiny_task/train.jsonl"), "output_dir": str(data),
            "overwrite": True}))
    students, seconds = {}, {}
    for seed in seeds:
        for variant, extra in VARIANTS.items():
            out = OUT / f"{variant}-{steps}-seed{seed}"
            if not (out / "trainer_state.json").is_file():  # finished students are reused
                t0 = time.perf_counter()
                train.main(load_config(TrainConfig, str(ROOT / "recipes/tiny/train_kd.yaml"), values_={
                    "dataset": str(data), "output_dir": str(out), "seed": seed, "max_steps": steps, "overwrite": True,
                    "log_every": 100, **extra}))
                (out / "bench_seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
            students[f"{variant}-seed{seed}"] = str(out)
            seconds[f"{variant}-seed{seed}"] = json.loads((out / "bench_seconds.json").read_text())["seconds"]
    if len(seeds) < 2:
        return  # a training-only invocation; evaluate with all seeds
    ev = load_config(EvaluateConfig, str(ROOT / "recipes/tiny/evaluate.yaml"), values_={
        "output_dir": str(OUT / f"eval-{steps}"), "overwrite": True, "latency_prompts": 0, "plot": False})
    ev.students = students
    report = evaluate.main(ev)
    print(f"\nKD recipe, {steps} steps x 32 sequences, {len(seeds)} seeds, 400 held-out prompts (greedy)")
    print("| variant | exact match (mean ± sd) | per seed | KL(T‖S)/token | train s/run (mean) |")
    print("|---|---:|---:|---:|---:|")
    names = {"offline": "offline KD (forward KL + CE)", "onpolicy": "on-policy KD, λ = 0.5 (GKD, forward KL)",
             "minillm": "MiniLLM-style, λ = 0.5 (α = 0.2, single-step, length norm)"}
    summary = {}
    for variant in VARIANTS:
        ms = [report["models"][f"{variant}-seed{s}"] for s in seeds]
        em = [m["exact_match"] for m in ms]
        secs = statistics.mean(seconds[f"{variant}-seed{s}"] for s in seeds)
        summary[variant] = {"exact_match": em, "kl": [m["kl"] for m in ms], "seconds": secs}
        print(f"| {names[variant]} | {statistics.mean(em):.1%} ± {statistics.stdev(em):.1%} | "
              f"{' / '.join(f'{e:.1%}' for e in em)} | {statistics.mean(m['kl'] for m in ms):.3f} | {secs:.0f} |")
    (OUT / f"summary-{steps}.json").write_text(json.dumps({"steps": steps, "seeds": list(seeds), "summary": summary,
                                                          "report": report["models"]}, indent=2))


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[0]) if args else 2500, tuple(int(s) for s in args[1].split(",")) if len(args) > 1 else (0, 1, 2))
