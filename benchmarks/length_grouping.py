# Train-step throughput and padding with TrainConfig.group_by_length on vs off, and with packing (rows of each
# random micro-batch concatenated, `packing: true`, no grouping), on a teacher dataset of mixed lengths:
#     python benchmarks/length_grouping.py           (CPU, about 5 minutes, plus a one-off 1-minute teacher pass)
#     python benchmarks/length_grouping.py --quick   (about 2 minutes, noisier)
#
# Data: 2,000 prompts built from the bundled task's train questions as multi-turn chats: 0, 1 or 2 earlier
# question/answer turns (answers are the references) before the final question, so prompts run from ~35 to ~110
# tokens; the bundled teacher answers them with `llm-distill generate` (recipes/tiny/generate.yaml, top-20).
# Training: `llm_distill.train.main` with recipes/tiny/train_kd.yaml (137 k student, KD + CE, micro-batch 32),
# max_seq_len 128: group_by_length true, false, and false with packing, everything else equal (the padded and
# packed runs see the same rows in the same order). The runs go in threads of one process, set up one after
# another, then their steps interleave one by one (one runs at a time), so that load from other jobs on a shared
# machine hits all alike. A step's time is one full iteration
# of train's loop; the first 10 steps are dropped. Padding fraction = padded positions / all positions of the
# timed batches (train logs the same figure per window in metrics.jsonl as `padding_fraction`; the script checks
# they agree); tokens/s = non-padding tokens / step time, what train logs as `tokens_per_s` (the logged value
# cannot be used directly here: with two runs interleaved each one's wall time includes the other's steps).
import argparse
import json
import random
import statistics
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "bench" / "length_grouping"
TEACHER = ROOT / "data" / "tiny_task" / "teacher"
N_PROMPTS = 2000
MAX_LEN = 128
MAX_PROMPT = MAX_LEN - 16  # room for the teacher's max_new_tokens
WARMUP = 10


def mixed_prompts() -> Path:
    """Multi-turn prompts of 0-2 earlier turns from the bundled train questions, each within MAX_PROMPT tokens."""
    from llm_distill.data import encode_prompt
    from llm_distill.models import load_tokenizer

    path = OUT / "prompts.jsonl"
    if path.is_file():
        return path
    tok = load_tokenizer(str(TEACHER))
    src = [json.loads(l) for l in (ROOT / "data/tiny_task/train.jsonl").read_text().splitlines() if l.strip()]
    rng = random.Random(0)
    out = []
    for i in range(N_PROMPTS):
        final = src[i]
        for turns in range(rng.randint(0, 2), -1, -1):  # fewer turns if it does not fit
            msgs = []
            for r in rng.sample(src, turns):
                msgs += [r["messages"][0], {"role": "assistant", "content": r["reference"]}]
            msgs.append(final["messages"][0])
            if len(encode_prompt(tok, msgs)) <= MAX_PROMPT:
                break
        out.append({"id": f"m{i:05d}", "task": final["task"], "messages": msgs})
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def teacher_data() -> Path:
    out = OUT / "teacher_data"
    if not (out / "provenance.json").is_file():
        from llm_distill import generate
        from llm_distill.config import GenerateConfig, load_config

        prompts = mixed_prompts()
        generate.main(load_config(GenerateConfig, str(ROOT / "recipes/tiny/generate.yaml"), values_={
            "model": str(TEACHER), "prompts": str(prompts), "output_dir": str(out), "overwrite": True}))
    return out


def config(name: str, max_steps: int):
    from llm_distill.config import TrainConfig, load_config

    group, packing = SETUPS[name]
    return load_config(TrainConfig, str(ROOT / "recipes/tiny/train_kd.yaml"), values_={
        "dataset": str(OUT / "teacher_data"), "output_dir": str(OUT / name), "max_steps": max_steps,
        "log_every": WARMUP, "group_by_length": group, "packing": packing, "max_seq_len": MAX_LEN,
        "report_to": "none", "overwrite": True})


SETUPS = {"grouped": (True, False), "ungrouped": (False, False), "packed": (False, True)}  # group_by_length, packing


def measure(steps: int) -> dict:
    """Both runs in threads of this process, their steps interleaved one by one (vs_trl.Baton).

    The step boundary is the collation at the top of train.main's loop; a step's time is one full loop
    iteration. The non-padding tokens, positions and completion tokens of each step come from its batch.
    """
    from llm_distill import train
    from vs_trl import Baton

    names = list(SETUPS)
    baton = Baton(names, WARMUP + steps)
    counts = {n: [] for n in names}
    orig = train.collate

    def collate_at_boundary(examples, pad_id, packing=False):
        name = threading.current_thread().name
        baton.boundary(name)
        batch = orig(examples, pad_id, packing)
        n = batch["input_ids"].numel()  # a packed batch has no attention_mask: every position is a token
        seen = int(batch["attention_mask"].sum()) if "attention_mask" in batch else n
        counts[name].append((seen, n, int((batch["labels"] != -100).sum())))
        return batch

    train.collate = collate_at_boundary  # a module global, looked up per call by train.main's loop
    threads = []
    try:
        for name in names:  # set up one after another
            def target(name=name):
                try:
                    train.main(config(name, WARMUP + steps + 1))  # the extra last step runs after all timing
                except BaseException as e:  # noqa: BLE001
                    baton.fail(e)
                    raise
            t = threading.Thread(target=target, name=name)
            t.start()
            threads.append(t)
            with baton.cv:
                baton.cv.wait_for(lambda: name in baton.arrived or baton.error is not None)
        for t in threads:
            t.join()
    finally:
        train.collate = orig
    if baton.error is not None:
        raise SystemExit(f"length_grouping: a run failed: {baton.error!r}")
    out = {}
    for n in names:
        d = baton.durations[n][WARMUP:WARMUP + steps]
        c = counts[n][WARMUP:WARMUP + steps]
        assert len(d) == len(c) == steps
        # padding_fraction as train logs it in metrics.jsonl (windows of WARMUP steps), checked against the count
        recs = [json.loads(l) for l in (OUT / n / "metrics.jsonl").read_text().splitlines() if l.strip()]
        logged = [r["padding_fraction"] for r in recs if "padding_fraction" in r and WARMUP < r["step"] <= WARMUP + steps]
        for r in recs:
            if "padding_fraction" in r and WARMUP < r["step"] <= WARMUP + steps:
                w = counts[n][r["step"] - WARMUP:r["step"]]
                assert abs(r["padding_fraction"] - (1 - sum(x[0] for x in w) / sum(x[1] for x in w))) < 1e-9
        out[n] = {"seconds": d, "seen": [x[0] for x in c], "positions": [x[1] for x in c],
                  "completion": [x[2] for x in c], "logged_padding_fraction": logged}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300, help="timed steps per setting and round (a multiple of 10)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds (fresh runs each round)")
    ap.add_argument("--quick", action="store_true", help="100 timed steps")
    ap.add_argument("--threads", type=int, default=1,
                    help="OpenMP threads per run (0: torch's default); the runs share one process, and with more than "
                         "one thread each OpenMP throttles their teams (see vs_trl.py --threads)")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.rounds = 100, 1
    if a.threads:  # before torch is first imported: OpenMP reads it once, for every thread
        import os

        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import logging

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    try:  # the generate output's own reader where there is one (parquet parts), else a save_to_disk directory
        from llm_distill.data import load_teacher_dataset as load_from_disk
    except ImportError:
        from datasets import load_from_disk

    ds = load_from_disk(str(teacher_data()))
    lengths = [len(p) + len(c) for p, c in zip(ds["prompt_token_ids"], ds["completion_token_ids"])]
    rounds = []
    for r in range(a.rounds):
        res = measure(a.steps)
        rounds.append(res)
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(
            f"{n} {sum(v['seen']) / sum(v['seconds']):,.0f} tokens/s, padding "
            f"{1 - sum(v['seen']) / sum(v['positions']):.1%}" for n, v in res.items()), flush=True)

    def tot(n, key):
        return sum(sum(r[n][key]) for r in rounds)

    def rate(n, key):
        return tot(n, key) / tot(n, "seconds")

    def med_rate(n):
        return statistics.median(s / t for r in rounds for s, t in zip(r[n]["seen"], r[n]["seconds"]))

    on, off = "grouped", "ungrouped"
    print()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; {len(ds)} rows, lengths (prompt + "
          f"completion) {min(lengths)}-{max(lengths)} tokens, mean {statistics.mean(lengths):.1f}; micro-batch 32; "
          f"{WARMUP} warm-up + {a.steps} timed steps per setting and round, {a.rounds} round(s), steps interleaved")
    print()
    print("| batching | padding fraction | tokens/s (non-padding) | completion tokens/s | ms/step (median) | "
          "tokens/s vs random padded |")
    print("|---|---:|---:|---:|---:|---:|")
    for n, label in ((off, "random rows, padded (group_by_length off)"), (on, "group_by_length on"),
                     ("packed", "random rows, packed (packing on)")):
        ms = statistics.median(t for r in rounds for t in r[n]["seconds"]) * 1e3
        rat = "1.00x" if n == off else f"**{rate(n, 'seen') / rate(off, 'seen'):.2f}x**"
        print(f"| {label} | {1 - tot(n, 'seen') / tot(n, 'positions'):.1%} | {rate(n, 'seen'):,.0f} | "
              f"{rate(n, 'completion'):,.0f} | {ms:.1f} | {rat} |")
    print()
    print(f"(median per-step rates: grouped / padded = {med_rate(on) / med_rate(off):.2f}x, packed / padded = "
          f"{med_rate('packed') / med_rate(off):.2f}x; padding_fraction logged in "
          f"metrics.jsonl, mean over the timed windows: off {statistics.mean(x for r in rounds for x in r[off]['logged_padding_fraction']):.1%}, "
          f"on {statistics.mean(x for r in rounds for x in r[on]['logged_padding_fraction']):.1%})")
    (OUT / "results.json").write_text(json.dumps({"args": vars(a), "rounds": rounds}))


if __name__ == "__main__":
    main()
