# KD vs CE-only (the shipped recipes) over seeds on one task's teacher data, evaluated on held-out prompts:
#     python benchmarks/kd_vs_ce.py                                  (bundled task, seeds 0-4, 2,500 steps)
#     python benchmarks/kd_vs_ce.py --seeds 0 1 2 --max-steps 1000 --jobs 2
#     python benchmarks/kd_vs_ce.py --teacher T --train-prompts train.jsonl --heldout heldout.jsonl --out runs/x
#     python benchmarks/kd_vs_ce.py --arm kd_sum recipes/tiny/train_kd.yaml kd_weight=1 ce_weight=1 --arm ...
# Each student is trained by `llm-distill train <recipe> dataset=... seed=S` in its own process (--jobs at once),
# then each seed's students are evaluated with the teacher by `llm-distill evaluate recipes/tiny/evaluate.yaml`
# (greedy exact match, KL(T||S) per token on the teacher's held-out answers). Finished students and reports are
# reused, so an interrupted run continues and a new --arm only trains what is new. Prints one table: per arm the
# mean over seeds with a 95% t-interval and every seed's value, and per arm the paired difference to CE-only.
import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Two-sided 95% Student-t quantiles by degrees of freedom (seeds - 1); beyond 30 the normal value.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    return T95.get(df) or next((T95[d] for d in sorted(T95) if d >= df), 1.96)


def interval(values: list[float]) -> tuple[float, float | None, float | None]:
    """Mean, sd and the half-width of its 95% t-interval over seeds (None with one seed)."""
    m = statistics.mean(values)
    if len(values) < 2:
        return m, None, None
    sd = statistics.stdev(values)
    return m, sd, t95(len(values) - 1) * sd / len(values) ** 0.5


def run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TQDM_DISABLE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc:
        raise SystemExit(f"kd_vs_ce: {' '.join(cmd[2:5])} failed (exit {rc}); see {log}")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llm_distill", *args]


def finished(student: Path) -> bool:
    f = student / "trainer_state.json"
    return f.is_file() and json.loads(f.read_text()).get("finished", False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--teacher", default="data/tiny_task/teacher")
    ap.add_argument("--train-prompts", default="data/tiny_task/train.jsonl")
    ap.add_argument("--heldout", default="data/tiny_task/heldout.jsonl")
    ap.add_argument("--teacher-data", help="an existing teacher dataset (else generated with recipes/tiny/generate.yaml)")
    ap.add_argument("--out", default="runs/bench/kd_vs_ce")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--max-steps", type=int, help="override the recipes' max_steps (ablations)")
    ap.add_argument("--jobs", type=int, default=2, help="training processes at once")
    ap.add_argument("--arm", nargs="+", action="append", metavar=("NAME RECIPE", "KEY=VALUE"),
                    help="a student kind: name, train recipe, overrides (default: kd and ce_only, the shipped recipes)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every arm")
    ap.add_argument("--eval-limit", type=int, help="only the first N held-out prompts")
    a = ap.parse_args()
    arms = {x[0]: (x[1], x[2:]) for x in a.arm} if a.arm else {
        "kd": ("recipes/tiny/train_kd.yaml", []), "ce_only": ("recipes/tiny/train_ce.yaml", [])}
    out = Path(a.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)

    data = Path(a.teacher_data).resolve() if a.teacher_data else out / "teacher_data"
    if not a.teacher_data and not (data / "provenance.json").is_file():
        run(cli("generate", "recipes/tiny/generate.yaml", f"model={a.teacher}", f"prompts={a.train_prompts}",
                f"output_dir={data}", "overwrite=true"), out / "logs" / "generate.log")

    jobs = []
    for seed in a.seeds:
        for name, (recipe, extra) in arms.items():
            student = out / f"{name}-seed{seed}"
            if not finished(student):
                steps = [f"max_steps={a.max_steps}"] if a.max_steps else []
                jobs.append((cli("train", recipe, f"dataset={data}", f"output_dir={student}", f"seed={seed}",
                                 "overwrite=true", *steps, *a.set, *extra), out / "logs" / f"{name}-seed{seed}.log"))
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(lambda j: run(*j), jobs))

    # The shipped evaluate recipe without its students (overrides would merge into its mapping, not replace it).
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes/tiny/evaluate.yaml").read_text())
    recipe.pop("students", None)
    (out / "evaluate.yaml").write_text(yaml.safe_dump(recipe))

    def evaluate(seed: int) -> None:
        ev = out / f"eval-seed{seed}"
        names = sorted(arms)
        if (ev / "report.json").is_file() and set(names) <= set(json.loads((ev / "report.json").read_text())["models"]):
            return
        limit = [f"limit={a.eval_limit}"] if a.eval_limit else []
        run(cli("evaluate", str(out / "evaluate.yaml"), f"prompts={a.heldout}", f"teacher={a.teacher}",
                f"output_dir={ev}", "overwrite=true", "plot=false", "latency_prompts=0",
                *[f"students.{n}={out / f'{n}-seed{seed}'}" for n in names], *limit), out / "logs" / f"eval-seed{seed}.log")
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(evaluate, a.seeds))

    reports = {s: json.loads((out / f"eval-seed{s}" / "report.json").read_text())["models"] for s in a.seeds}
    results = {"seeds": a.seeds, "max_steps": a.max_steps, "arms": {n: [r, e] for n, (r, e) in arms.items()},
               "set": a.set, "teacher": reports[a.seeds[0]]["teacher"], "students": {}}
    print(f"\n{len(a.seeds)} seeds {a.seeds}" + (f", {a.max_steps} steps" if a.max_steps else "") +
          f"; teacher exact match {results['teacher'].get('exact_match', float('nan')):.1%}\n")
    print("| student | exact match, mean [95% CI] (sd) | per seed | KL(T‖S)/token, mean [95% CI] | per seed |")
    print("|---|---:|---:|---:|---:|")
    for name in arms:
        em = [reports[s][name]["exact_match"] * 100 for s in a.seeds]
        kl = [reports[s][name]["kl"] for s in a.seeds]
        results["students"][name] = {"exact_match": em, "kl": kl}
        (m, sd, h), (km, _, kh) = interval(em), interval(kl)
        ci = f" [{m - h:.1f}, {m + h:.1f}] ({sd:.1f})" if h is not None else ""
        kci = f" [{km - kh:.3f}, {km + kh:.3f}]" if kh is not None else ""
        print(f"| {name} | {m:.1f}%{ci} | {' / '.join(f'{v:.1f}' for v in em)} | {km:.3f}{kci} | "
              f"{' / '.join(f'{v:.3f}' for v in kl)} |")
    # Optimisation per run, from each student's metrics.jsonl: pre-clipping gradient norm, share of steps clipped
    # at max_grad_norm (over the run, and over its last fifth), train CE of the last logged window.
    print("\n| student | grad norm, mean over steps | clipped steps | clipped, last 20% of steps | final train CE |")
    print("|---|---:|---:|---:|---:|")
    for name in arms:
        logs = [[json.loads(l) for l in (out / f"{name}-seed{s}" / "metrics.jsonl").open()] for s in a.seeds]
        logs = [[m for m in run if "grad_norm" in m] for run in logs]
        tail = [run[len(run) * 4 // 5:] for run in logs]
        mean = lambda runs, k: statistics.mean(statistics.mean(m[k] for m in run) for run in runs)  # noqa: E731
        results["students"][name].update(grad_norm=mean(logs, "grad_norm"), clip_fraction=mean(logs, "clip_fraction"),
                                         clip_fraction_last=mean(tail, "clip_fraction"),
                                         train_ce=[run[-1]["ce"] for run in logs])
        r = results["students"][name]
        print(f"| {name} | {r['grad_norm']:.2f} | {r['clip_fraction']:.0%} | {r['clip_fraction_last']:.0%} | "
              f"{' / '.join(f'{v:.3f}' for v in r['train_ce'])} |")
    if "ce_only" in arms and len(arms) > 1:
        print("\n| vs ce_only (paired by seed) | exact match difference, mean [95% CI] | seeds ahead | KL lower in |")
        print("|---|---:|---:|---:|")
        base = results["students"]["ce_only"]
        for name, r in results["students"].items():
            if name == "ce_only":
                continue
            d = [x - y for x, y in zip(r["exact_match"], base["exact_match"])]
            m, _, h = interval(d)
            ahead = sum(x > 0 for x in d)
            lower = sum(x < y for x, y in zip(r["kl"], base["kl"]))
            ci = f" [{m - h:+.1f}, {m + h:+.1f}]" if h is not None else ""
            print(f"| {name} | {m:+.1f}{ci} | {ahead} of {len(d)} | {lower} of {len(d)} |")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()
