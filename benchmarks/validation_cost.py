# What the full teacher-dataset check costs: `validate.check_teacher_dataset` (every row, vectorised over the
# Arrow columns) as a fraction of a train start-up, on the bundled task's data:
#     python benchmarks/validation_cost.py          (CPU, about 3 minutes, plus a one-off teacher pass of ~2 minutes)
#     python benchmarks/validation_cost.py 2        (rounds; default 5)
#
# Data: the bundled teacher over the 5,000 bundled train prompts with recipes/tiny/generate.yaml (greedy, top-20),
# written once to runs/bench/validation_cost/teacher_data. Train start-up: the wall time of
# `llm-distill train recipes/tiny/train_kd.yaml dataset=... max_steps=1 report_to=none` in a fresh process
# (imports, dataset load from the warm Arrow cache, the check, tokenizer, alignment check, student build, one
# step, save): what a user waits for before training proper begins. Check: the call train makes, timed in this
# process on the same opened dataset (`need="kd"`, the student tokenizer's vocabulary). Rounds alternate one
# start-up and five checks, so load from other jobs hits both alike; medians are reported.
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "bench" / "validation_cost"
DATA = OUT / "teacher_data"


def teacher_data() -> Path:
    if not (DATA / "provenance.json").is_file():
        subprocess.run([sys.executable, "-m", "llm_distill", "generate", "recipes/tiny/generate.yaml",
                        f"output_dir={DATA}"], cwd=ROOT, check=True)
    return DATA


def startup() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llm_distill", "train", "recipes/tiny/train_kd.yaml", f"dataset={DATA}",
                    f"output_dir={OUT / 'student'}", "max_steps=1", "report_to=none", "overwrite=true"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main(rounds: int = 5) -> None:
    from llm_distill.data import load_teacher_dataset
    from llm_distill.models import load_tokenizer
    from llm_distill.validate import check_teacher_dataset

    teacher_data()
    ds = load_teacher_dataset(str(DATA))
    vocab = len(load_tokenizer(str(ROOT / "data" / "tiny_task" / "teacher")))
    startup()  # warm: the Arrow cache, the page cache
    starts, checks = [], []
    for _ in range(rounds):
        starts.append(startup())
        for _ in range(5):
            t0 = time.perf_counter()
            info = check_teacher_dataset(str(DATA), ds, need="kd", vocab_size=vocab)
            checks.append(time.perf_counter() - t0)
    positions = int(sum(len(x) for x in ds.data.column("completion_token_ids").to_pylist()))
    s, c = statistics.median(starts), statistics.median(checks)
    print(f"teacher dataset: {info['num_rows']:,} rows, {positions:,} completion positions, k = {info['k']}")
    print("| | median seconds |")
    print("|---|---:|")
    print(f"| train start-up (max_steps=1, fresh process) | {s:.2f} |")
    print(f"| full dataset check (check_teacher_dataset) | {c:.3f} |")
    print(f"| check / start-up | {c / s:.1%} |")
    print(f"check throughput: {positions * info['k'] / c / 1e6:.1f} M top-k entries/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
