# KD vs CE-only (the shipped recipes) over seeds, tasks and amounts of teacher data, evaluated on held-out prompts:
#     python benchmarks/kd_vs_ce.py                                  (bundled exact task, seeds 0-4, the recipes' 5,000 steps)
#     python benchmarks/kd_vs_ce.py --tasks exact choice check       (the three bundled tasks, one table)
#     python benchmarks/kd_vs_ce.py --tasks choice --train-limits 500 1250 2500 5000   (data efficiency)
#     python benchmarks/kd_vs_ce.py --seeds 0 1 2 --max-steps 1000 --jobs 2
#     python benchmarks/kd_vs_ce.py --teacher T --train-prompts train.jsonl --heldout heldout.jsonl --out runs/x
#     python benchmarks/kd_vs_ce.py --arm kd_sum recipes/tiny/train_kd.yaml kd_weight=1 ce_weight=1 --arm ...
#     python benchmarks/kd_vs_ce.py --arm kd recipes/tiny/train_kd.yaml --arm ce_only recipes/tiny/train_ce.yaml \
#         --arm gkd recipes/tiny/train_gkd.yaml 'teacher={teacher}'            (with the on-policy recipe)
#         ({teacher} in an arm's overrides is the task's teacher)
# A task is data/<task>_task (or data/tiny_task for `exact`): its teacher/, train.jsonl and heldout.jsonl. Per task
# and train limit N the teacher answers the first N train prompts with `recipes/tiny/generate.yaml`; each student
# is trained by `llm-distill train <recipe> dataset=... seed=S` in its own process (--jobs at once), then each
# seed's students are evaluated with the teacher by `llm-distill evaluate recipes/tiny/evaluate.yaml` (greedy
# exact match against the held-out references, KL(T||S) per token on the teacher's held-out answers, and with
# --answer-samples the sampled answers: share right, and total variation to the teacher's answer distribution).
# Finished students and reports are reused, so an interrupted run continues and a new --arm only trains what is
# new. Prints one table: per setting and arm the mean over seeds with a 95% t-interval and every seed's value,
# and per arm the paired difference to CE-only.
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


TASK_DIRS = {"exact": "data/tiny_task", "choice": "data/choice_task", "check": "data/check_task"}


def train_and_evaluate(a, arms: dict, teacher: str, train_prompts: str, heldout: str, out: Path,
                       limit: int | None) -> dict:
    """One setting (a task at one amount of teacher data): generate, train every (seed, arm), evaluate per seed;
    returns {seed: report models}."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    data = Path(a.teacher_data).resolve() if a.teacher_data else out / "teacher_data"
    if not a.teacher_data and not (data / "provenance.json").is_file():
        run(cli("generate", "recipes/tiny/generate.yaml", f"model={teacher}", f"prompts={train_prompts}",
                f"output_dir={data}", "overwrite=true", *([f"limit={limit}"] if limit else []), *a.generate_set),
            out / "logs" / "generate.log")

    jobs = []
    for seed in a.seeds:
        for name, (recipe, extra) in arms.items():
            student = out / f"{name}-seed{seed}"
            if not finished(student):
                steps = [f"max_steps={a.max_steps}"] if a.max_steps else []
                jobs.append((cli("train", recipe, f"dataset={data}", f"output_dir={student}", f"seed={seed}",
                                 "overwrite=true", *steps, *a.set, *[e.replace("{teacher}", teacher) for e in extra]),
                         out / "logs" / f"{name}-seed{seed}.log"))
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
        if (ev / "report.json").is_file():
            done = json.loads((ev / "report.json").read_text())["models"]
            if set(names) <= set(done) and (not a.answer_samples or "answer_tv" in done[names[0]]):
                return
        limit_eval = [f"limit={a.eval_limit}"] if a.eval_limit else []
        run(cli("evaluate", str(out / "evaluate.yaml"), f"prompts={heldout}", f"teacher={teacher}",
                f"output_dir={ev}", "overwrite=true", "plot=false", "latency_prompts=0",
                f"answer_samples={a.answer_samples}",
                *[f"students.{n}={out / f'{n}-seed{seed}'}" for n in names], *limit_eval),
            out / "logs" / f"eval-seed{seed}.log")
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(evaluate, a.seeds))
    return {s: json.loads((out / f"eval-seed{s}" / "report.json").read_text())["models"] for s in a.seeds}


def fmt_interval(values: list[float], digits: int, unit: str = "") -> str:
    m, sd, h = interval(values)
    if h is None:
        return f"{m:.{digits}f}{unit}"
    return f"{m:.{digits}f}{unit} [{m - h:.{digits}f}, {m + h:.{digits}f}] ({sd:.{digits}f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", nargs="+", default=["exact"], choices=sorted(TASK_DIRS),
                    help="bundled tasks (exact: data/tiny_task; choice: data/choice_task; check: data/check_task)")
    ap.add_argument("--train-limits", type=int, nargs="+", default=[0],
                    help="teacher sequences: the first N train prompts (0: all of them)")
    ap.add_argument("--teacher", help="another teacher (with --train-prompts and --heldout) instead of --tasks")
    ap.add_argument("--train-prompts")
    ap.add_argument("--heldout")
    ap.add_argument("--generate-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for generate")
    ap.add_argument("--answer-samples", type=int, default=16,
                    help="answers sampled at T=1 per held-out prompt and model (0: greedy metrics only)")
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
    for name in arms:  # the name becomes an evaluate override `students.<name>=...`, where a dot would nest it
        if not name.replace("_", "").replace("-", "").isalnum():
            ap.error(f"--arm name '{name}' may hold only letters, digits, '_' and '-' (e.g. ce_lr1e-3, not ce_lr1.5e-3)")
    base = Path(a.out).resolve()
    if a.teacher:
        tasks = {"custom": (a.teacher, a.train_prompts, a.heldout)}
    else:
        tasks = {t: tuple(str(ROOT / TASK_DIRS[t] / f) for f in ("teacher", "train.jsonl", "heldout.jsonl"))
                 for t in a.tasks}
    settings = {}
    for task, (teacher, train_prompts, heldout) in tasks.items():
        for limit in a.train_limits:
            # The single default setting keeps the directory layout of earlier runs (their students are reused).
            sub = base if (len(tasks) == 1 and a.train_limits == [0] and task in ("exact", "custom")) else \
                base / (task + (f"-n{limit}" if limit else ""))
            settings[(task, limit)] = sub, train_and_evaluate(a, arms, teacher, train_prompts, heldout, sub,
                                                              limit or None)

    results = {"seeds": a.seeds, "max_steps": a.max_steps, "arms": {n: [r, e] for n, (r, e) in arms.items()},
               "set": a.set, "generate_set": a.generate_set, "settings": []}
    print(f"\n{len(a.seeds)} seeds {a.seeds}" + (f", {a.max_steps} steps" if a.max_steps else "") + "\n")
    print("| task | teacher sequences | student | exact match, mean [95% CI] (sd) | per seed | "
          "sampled exact (T=1) | TV to teacher's answers | KL(T‖S)/token, mean [95% CI] | per seed |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for (task, limit), (_, reports) in settings.items():
        first = reports[a.seeds[0]]
        row = {"task": task, "train_limit": limit, "teacher": first["teacher"], "students": {}}
        t = first["teacher"]
        n_seq = limit or "all"
        print(f"| {task} | {n_seq} | teacher | {t.get('exact_match', float('nan')) * 100:.1f}% | — | "
              f"{t['sampled_exact_match'] * 100:.1f}% | {t['answer_tv']:.3f} (floor) | 0 | — |"
              if "answer_tv" in t else f"| {task} | {n_seq} | teacher | {t.get('exact_match', 0) * 100:.1f}% | — | "
              "| | 0 | — |")
        for name in arms:
            ms = [reports[s][name] for s in a.seeds]
            r = {k: [m.get(k) for m in ms] for k in ("exact_match", "kl", "sampled_exact_match", "answer_tv")}
            r["exact_match"] = [v * 100 for v in r["exact_match"]]
            if None not in r["sampled_exact_match"]:
                r["sampled_exact_match"] = [v * 100 for v in r["sampled_exact_match"]]
            row["students"][name] = r
            sampled = fmt_interval(r["sampled_exact_match"], 1, "%") if None not in r["sampled_exact_match"] else ""
            tv = fmt_interval(r["answer_tv"], 3) if None not in r["answer_tv"] else ""
            print(f"| {task} | {n_seq} | {name} | {fmt_interval(r['exact_match'], 1, '%')} | "
                  f"{' / '.join(f'{v:.1f}' for v in r['exact_match'])} | {sampled} | {tv} | "
                  f"{fmt_interval(r['kl'], 3)} | {' / '.join(f'{v:.3f}' for v in r['kl'])} |")
        results["settings"].append(row)
    # Optimisation per run, from each student's metrics.jsonl: pre-clipping gradient norm, share of steps clipped
    # at max_grad_norm (over the run, and over its last fifth), train CE of the last logged window.
    print("\n| task | teacher sequences | student | grad norm, mean over steps | clipped steps | clipped, last 20% "
          "of steps | final train CE |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for ((task, limit), (out, _)), row in zip(settings.items(), results["settings"]):
        for name in arms:
            logs = [[json.loads(l) for l in (out / f"{name}-seed{s}" / "metrics.jsonl").open()] for s in a.seeds]
            logs = [[m for m in run if "grad_norm" in m] for run in logs]
            tail = [run[len(run) * 4 // 5:] for run in logs]
            mean = lambda runs, k: statistics.mean(statistics.mean(m[k] for m in run) for run in runs)  # noqa: E731
            r = row["students"][name]
            r.update(grad_norm=mean(logs, "grad_norm"), clip_fraction=mean(logs, "clip_fraction"),
                     clip_fraction_last=mean(tail, "clip_fraction"),
                     # a run with ce_weight 0 does not compute its CE (it logs 0): None, printed as a dash
                     train_ce=[run[-1]["ce"] if json.loads((out / f"{name}-seed{s}" / "run.json").read_text())
                               ["config"]["ce_weight"] > 0 else None for run, s in zip(logs, a.seeds)])
            ce_text = " / ".join("—" if v is None else f"{v:.3f}" for v in r["train_ce"])
            print(f"| {task} | {limit or 'all'} | {name} | {r['grad_norm']:.2f} | {r['clip_fraction']:.0%} | "
                  f"{r['clip_fraction_last']:.0%} | {ce_text} |")
    if "ce_only" in arms and len(arms) > 1:
        print("\n| task | teacher sequences | vs ce_only (paired by seed) | exact match difference, mean [95% CI] | "
              "seeds ahead | KL lower in | sampled exact difference | TV lower in |")
        print("|---|---:|---|---:|---:|---:|---:|---:|")
        for row in results["settings"]:
            ce = row["students"]["ce_only"]
            for name, r in row["students"].items():
                if name == "ce_only":
                    continue
                d = [x - y for x, y in zip(r["exact_match"], ce["exact_match"])]
                m, _, h = interval(d)
                ci = f" [{m - h:+.1f}, {m + h:+.1f}]" if h is not None else ""
                lower = sum(x < y for x, y in zip(r["kl"], ce["kl"]))
                sampled = tv = ""
                if None not in r["sampled_exact_match"] + ce["sampled_exact_match"]:
                    ds = [x - y for x, y in zip(r["sampled_exact_match"], ce["sampled_exact_match"])]
                    sampled = f"{statistics.mean(ds):+.1f}"
                    tv = f"{sum(x < y for x, y in zip(r['answer_tv'], ce['answer_tv']))} of {len(d)}"
                print(f"| {row['task']} | {row['train_limit'] or 'all'} | {name} | {m:+.1f}{ci} | "
                      f"{sum(x > 0 for x in d)} of {len(d)} | {lower} of {len(d)} | {sampled} | {tv} |")
    base.mkdir(parents=True, exist_ok=True)
    (base / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults: {base / 'results.json'}")


if __name__ == "__main__":
    main()
