# Held-out exact match on the bundled task: forward KL on top-k + tail vs the renormalised top-k (tail dropped,
# as axolotl / ms-swift do), at small k, same steps and seeds:
#     python benchmarks/tail_vs_renormalized.py          (CPU, about 8 minutes: 3 seeds x 2 variants)
#     python benchmarks/tail_vs_renormalized.py 5 0,1,2  (k, seeds)
import json
import statistics
import sys
from pathlib import Path

from llm_distill import evaluate, generate, train
from llm_distill.config import EvaluateConfig, GenerateConfig, TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "bench" / "tail_vs_renormalized"


def main(k: int = 5, seeds=(0, 1, 2)) -> None:
    data = OUT / "teacher_data"
    gen = load_config(GenerateConfig, str(ROOT / "recipes/tiny/generate.yaml"), values_={
        "model": str(ROOT / "data/tiny_task/teacher"), "prompts": str(ROOT / "data/tiny_task/train.jsonl"),
        "output_dir": str(data), "overwrite": True})
    if not (data / "provenance.json").is_file():
        generate.main(gen)
    students = {}
    for seed in seeds:
        for variant, renorm in (("tail", False), ("renormalized", True)):
            out = OUT / f"{variant}-k{k}-seed{seed}"
            train.main(load_config(TrainConfig, str(ROOT / "recipes/tiny/train_kd.yaml"), values_={
                "dataset": str(data), "output_dir": str(out), "seed": seed, "kd_topk": k, "max_steps": 1500,
                "renormalized_topk": renorm, "overwrite": True}))
            students[f"{variant}-seed{seed}"] = str(out)
    ev = load_config(EvaluateConfig, str(ROOT / "recipes/tiny/evaluate.yaml"), values_={
        "output_dir": str(OUT / "eval"), "overwrite": True})
    ev.students = students
    report = evaluate.main(ev)
    print(f"\nforward KL + CE at k={k}, {len(seeds)} seeds, 400 held-out prompts")
    print("| KD target | exact match (mean ± sd) | per seed | KL(T‖S)/token (full top-20 + tail) |")
    print("|---|---:|---:|---:|")
    for variant in ("tail", "renormalized"):
        ms = [report["models"][f"{variant}-seed{s}"] for s in seeds]
        em = [m["exact_match"] for m in ms]
        sd = statistics.stdev(em) if len(em) > 1 else 0.0
        print(f"| top-{k} + tail | " if variant == "tail" else f"| top-{k} renormalised, no tail | ", end="")
        print(f"{statistics.mean(em):.1%} ± {sd:.1%} | {' / '.join(f'{e:.1%}' for e in em)} | "
              f"{statistics.mean(m['kl'] for m in ms):.3f} |")
    (OUT / "summary.json").write_text(json.dumps({"k": k, "seeds": list(seeds), "report": report["models"]}, indent=2))


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[0]) if args else 5, tuple(int(s) for s in args[1].split(",")) if len(args) > 1 else (0, 1, 2))
