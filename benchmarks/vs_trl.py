# Our offline top-k KD train step vs TRL's GKDTrainer (lmbda=0: online teacher forward every step) and TRL's
# SFTTrainer, same student, teacher, data, batch size, steps and max length, float32 (on the GPU when CUDA is
# available, else the CPU).
#
# TRL is NOT a dependency of llm_distill: it lives in a separate benchmark environment (git-ignored):
#     python -m venv benchmarks/.venv-trl
#     benchmarks/.venv-trl/bin/pip install torch==2.13.0          # pinned first: unpinned pulls GBs of CUDA
#     benchmarks/.venv-trl/bin/pip install -e . trl==1.16.0        # TRL 1.16 runs on transformers 5.x
#     benchmarks/.venv-trl/bin/python benchmarks/vs_trl.py         # about 5 minutes on 2 cores (+1 the first time: teacher pass)
#     benchmarks/.venv-trl/bin/python benchmarks/vs_trl.py --quick # about 2 minutes
#     benchmarks/.venv-trl/bin/python benchmarks/vs_trl.py --larger  # 4.2 M random teacher, 535 k student
#
# Setup (identical for the three unless listed under "what differs", which the script also prints):
#   teacher  data/tiny_task/teacher (1.06 M params, Llama, the bundled char tokenizer, vocab 86)
#   student  recipes/tiny/train_kd.yaml's student_config (137 k params, 7.7x smaller), same seed-0 init
#   data     the teacher's greedy completions on the first 2,000 bundled train prompts, written by
#            `llm-distill generate` (recipes/tiny/generate.yaml: top-20 logprobs stored); TRL gets the same token
#            ids (prompt + completion, completion mask), no re-tokenisation
#   batch    32 sequences, 1 process, no gradient accumulation, max length 128, AdamW (torch, not fused),
#            lr 3e-3 cosine with 50 warm-up steps, grad clipping 1.0, no length grouping (TRL's default)
#   ours     `llm_distill.train.main` (the `llm-distill train` code path) with recipes/tiny/train_kd.yaml:
#            forward KL on the stored top-20 + tail bucket, plus CE, fused head + loss on completion positions only;
#            twice: padded micro-batches, and packed ones (`packing: true`, same rows)
#   TRL GKD  trl.experimental.gkd.GKDTrainer, lmbda=0 (never on-policy), seq_kd=False, beta=0 (forward KL,
#            full vocabulary), temperature=1: teacher forward on every batch, full student and teacher logits
#   TRL SFT  trl.SFTTrainer, completion-only NLL on the same tokens (its fused, chunked LM head)
# Timing: the three trainers run in threads of one process, set up one after another (model loading, dataset
# preparation and Accelerate setup are outside any timing); then their steps are interleaved in blocks of
# --block steps (ours, ours packed, GKD, SFT, ours, ...: only one runs at a time), so that load from other jobs on
# a shared machine hits all three alike. The first step of each block is not timed (it starts on another
# trainer's caches), and every trainer runs on --threads 1 OpenMP thread (with more, the teams of the trainers'
# threads outnumber the cores and OpenMP throttles them all). A step's time is one full iteration of the
# trainer's loop (data loading, collation, forward, backward, clipping, optimiser and scheduler step, its own
# logging). The first WARMUP steps are dropped, the next STEPS are timed. Tokens are the non-padding tokens (attention mask) and the completion tokens of the timed steps'
# batches; tokens/s = their sum / the sum of the step times. The median-step column divides medians of per-step
# rates instead (robust to the few steps that another job's burst hits).
import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "bench" / "vs_trl"
TEACHER = ROOT / "data" / "tiny_task" / "teacher"
RECIPE = ROOT / "recipes" / "tiny" / "train_kd.yaml"
N_PROMPTS = 2000
DATA = OUT / "teacher_data"
STUDENT: dict = {}  # student_config overrides (--larger)
SIZES: dict = {}
MAX_LEN = 128
WARMUP = 10

DIFFERENCES = [
    "ours reads the teacher's stored top-20 + tail (generated once, offline); GKD runs the teacher's forward "
    "on every batch and compares the full (86-token) distributions",
    "ours: forward KL + CE (the recipe); GKD: forward KL only (beta=0); SFT: CE only",
    "ours projects only completion positions onto the vocabulary (fused head + loss); GKD computes full student "
    "and teacher logits at every position; SFT uses TRL's fused chunked LM head (and logs entropy and token accuracy)",
    "ours pads right; GKD's ChatML collator pads left; SFT pads right. Data order differs (each trainer's own "
    "seeded shuffle), hence tokens/s, not steps/s, is compared",
    "at these sizes (vocabulary 86, students of 137 k / 535 k params) fixed per-step work (Python, optimiser, "
    "data) is a large share of every step; in FLOPs alone a GKD step adds a teacher forward (2 x teacher params per "
    "token) to the student's forward + backward (6 x student params per token)",
]


def teacher_data() -> Path:
    """The teacher's greedy completions + top-20 on N_PROMPTS bundled train prompts (`llm-distill generate`)."""
    out = DATA
    if not (TEACHER / "config.json").is_file():  # --larger: a randomly initialised teacher, same char tokenizer
        from llm_distill.tiny import save_tiny_model

        save_tiny_model(TEACHER, hidden_size=256, num_layers=4, seed=0)
    if not (out / "provenance.json").is_file():
        from llm_distill import generate
        from llm_distill.config import GenerateConfig, load_config

        cfg = load_config(GenerateConfig, str(ROOT / "recipes/tiny/generate.yaml"), values_={
            "model": str(TEACHER), "prompts": str(ROOT / "data/tiny_task/train.jsonl"),
            "output_dir": str(out), "limit": N_PROMPTS, "overwrite": True})
        generate.main(cfg)
    return out


def train_config(steps: int, output_dir: Path, packing: bool = False):
    from llm_distill.config import TrainConfig, load_config

    return load_config(TrainConfig, str(RECIPE), values_={
        "dataset": str(DATA), "output_dir": str(output_dir), "max_steps": WARMUP + steps, "student_config": STUDENT,
        "log_every": WARMUP, "group_by_length": False, "max_seq_len": MAX_LEN, "save_every": 0,
        "report_to": "none", "overwrite": True, "packing": packing})


class Baton:
    """Step-level round robin between trainers running in threads of one process.

    Each trainer calls `boundary(name)` once per step, at the same point of its loop; only the trainer holding
    the baton runs, so its steps alternate with the others' (ours, GKD, SFT, ours, ...) and load from other jobs
    on the machine hits all of them alike. The time from getting the baton to the next boundary is one full loop
    iteration of that trainer. Setups run one after another before any step is timed.
    """

    def __init__(self, names, durations_wanted: int, block: int = 1):
        self.cv = threading.Condition()
        self.names, self.wanted, self.block = list(names), durations_wanted, block
        self.run_len: dict = {n: 0 for n in names}  # steps since the trainer last got the baton
        self.cold = {n: [] for n in names}  # per duration: the first step after getting the baton
        self.active = list(names)
        self.arrived: set = set()
        self.turn = None
        self.resumed: dict = {}
        self.durations = {n: [] for n in names}
        self.error = None

    def _wait(self, name):
        self.cv.wait_for(lambda: self.turn == name or self.error is not None)
        if self.error is not None:
            raise RuntimeError("another trainer failed")
        self.resumed[name] = time.perf_counter()

    def _next(self, name):
        return self.active[(self.active.index(name) + 1) % len(self.active)]

    def boundary(self, name):
        import torch

        if torch.cuda.is_available():  # the step's queued GPU work belongs to its own time, not the next trainer's
            torch.cuda.synchronize()
        now = time.perf_counter()
        with self.cv:
            if name not in self.arrived:  # first boundary: set up; wait until every trainer is
                self.arrived.add(name)
                if len(self.arrived) == len(self.names):
                    self.turn = self.names[0]
                self.cv.notify_all()
                self._wait(name)
                return
            self.durations[name].append(now - self.resumed[name])
            self.cold[name].append(self.run_len[name] == 0)
            self.run_len[name] += 1
            if len(self.durations[name]) >= self.wanted:  # done: leave the rotation, finish after everyone
                nxt = self._next(name)
                self.active.remove(name)
                self.turn = nxt if self.active else None
                self.cv.notify_all()
                self.cv.wait_for(lambda: not self.active or self.error is not None)
                return
            if self.run_len[name] < self.block:  # keep the baton: the next step of the same block
                self.resumed[name] = now
                return
            self.run_len[name] = 0
            self.turn = self._next(name)
            self.cv.notify_all()
            self._wait(name)

    def fail(self, e):
        with self.cv:
            self.error = e
            self.cv.notify_all()


def run_ours(steps: int, packing: bool) -> None:
    """`llm_distill.train.main` on the recipe; the step boundary is the collation at the top of each step, which
    `measure` hooks (`ours_boundary`)."""
    from llm_distill import train

    # WARMUP + steps durations take one boundary more; that extra last step runs after all timing.
    train.main(train_config(steps + 1, OUT / threading.current_thread().name, packing))


def ours_boundary(baton: Baton, tokens: dict, orig):
    """train.collate for both of ours (padded, packed; threads named after them): the step boundary, then the
    batch's non-padding and completion tokens."""
    def collate_at_boundary(examples, pad_id, packing=False):
        me = threading.current_thread().name
        baton.boundary(me)  # before step s's collation: closes step s-1's loop iteration
        batch = orig(examples, pad_id, packing)
        n = batch["input_ids"].numel()  # a packed batch has no attention_mask: every position is a token
        tokens[me].append((int(batch["attention_mask"].sum()) if "attention_mask" in batch else n,
                           int((batch["labels"] != -100).sum())))
        return batch

    return collate_at_boundary


def run_trl(kind: str, baton: Baton, steps: int, tokens: list) -> None:
    """TRL's trainer; the step boundary is `on_step_end` (after the optimiser and scheduler step)."""
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    from llm_distill.models import load_tokenizer
    from llm_distill.train import build_student

    cfg = train_config(steps + 1, OUT / kind)
    tok = load_tokenizer(str(TEACHER))
    student = build_student(cfg, tok)  # the same seed-0 initialisation as ours
    common = dict(output_dir=str(OUT / kind), per_device_train_batch_size=cfg.micro_batch_size,
                  gradient_accumulation_steps=1, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
                  lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps, max_grad_norm=cfg.max_grad_norm,
                  weight_decay=cfg.weight_decay, optim="adamw_torch", max_length=MAX_LEN, seed=cfg.seed,
                  use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False, report_to="none", save_strategy="no",
                  logging_steps=10 ** 6, disable_tqdm=True, dataloader_num_workers=0)

    class Boundary(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            baton.boundary(kind)

    def count(inputs):
        labels = inputs["labels"]
        tokens.append((int(inputs["attention_mask"].sum()), int((labels[:, 1:] != -100).sum())))

    if kind == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        class Trainer(GKDTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                count(inputs)
                return super().training_step(model, inputs, num_items_in_batch)

        teacher = AutoModelForCausalLM.from_pretrained(str(TEACHER), dtype=torch.float32)
        SIZES.update(teacher=sum(p.numel() for p in teacher.parameters()),
                     student=sum(p.numel() for p in student.parameters()))
        args = GKDConfig(**common, lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0)
        trainer = Trainer(model=student, teacher_model=teacher, args=args, train_dataset=trl_dataset(True),
                          processing_class=tok, callbacks=[Boundary()])
    else:
        from trl import SFTConfig, SFTTrainer

        class Trainer(SFTTrainer):
            def training_step(self, model, inputs, num_items_in_batch=None):
                count(inputs)
                return super().training_step(model, inputs, num_items_in_batch)

        args = SFTConfig(**common, completion_only_loss=True, packing=False, padding_free=False)
        trainer = Trainer(model=student, args=args, train_dataset=trl_dataset(False), processing_class=tok,
                          callbacks=[Boundary()])
    trainer.train()


def trl_dataset(with_prompt: bool):
    try:  # the generate output's own reader where there is one (parquet parts), else a save_to_disk directory
        from llm_distill.data import load_teacher_dataset as load_from_disk
    except ImportError:
        from datasets import load_from_disk

    ds = load_from_disk(str(DATA))

    def to_ids(row):
        p, c = row["prompt_token_ids"], row["completion_token_ids"]
        ex = {"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)}
        if with_prompt:
            ex["prompt"] = ""  # read (and unused) by GKD's ChatML collator when completion_mask is given
        return ex

    return ds.map(to_ids, remove_columns=ds.column_names)


def measure(steps: int, block: int) -> dict:
    """One round: the four trainers in threads of this process, their steps interleaved by the baton in blocks of
    `block` steps."""
    from llm_distill import train

    names = ["ours", "ours_packed", "gkd", "sft"]
    baton = Baton(names, WARMUP + steps, block)
    tokens = {n: [] for n in names}
    threads = []
    orig = train.collate
    train.collate = ours_boundary(baton, tokens, orig)  # a module global, looked up per call by train.main's loop
    for n in names:  # set up one after another: each starts once the previous one waits at its first boundary
        def target(n=n):
            try:
                if n.startswith("ours"):
                    run_ours(steps, packing=n == "ours_packed")
                else:
                    run_trl(n, baton, steps, tokens[n])
            except BaseException as e:  # noqa: BLE001
                baton.fail(e)
                raise
        t = threading.Thread(target=target, name=n)
        t.start()
        threads.append(t)
        with baton.cv:
            baton.cv.wait_for(lambda: n in baton.arrived or baton.error is not None)
        if baton.error is not None:
            break
    for t in threads:
        t.join()
    train.collate = orig
    if baton.error is not None:
        raise SystemExit(f"vs_trl: a trainer failed: {baton.error!r}")
    out = {}
    for n in names:
        d = baton.durations[n][WARMUP:WARMUP + steps]
        cold = baton.cold[n][WARMUP:WARMUP + steps]
        # ours: duration i is step i+1 (its boundary opens a step); TRL: duration i is step i+2 (closes a step).
        first = WARMUP if n.startswith("ours") else WARMUP + 1
        tk = tokens[n][first:first + steps]
        assert len(d) == len(tk) == len(cold) == steps, (n, len(d), len(tk))
        # The first step after a hand-over starts on another trainer's caches, which no single-trainer run does:
        # with block > 1 it is left out (a precaution; its cost was not measured apart).
        keep = [i for i in range(steps) if not (cold[i] and block > 1)]
        out[n] = {"seconds": [d[i] for i in keep], "tokens": [tk[i][0] for i in keep],
                  "completion_tokens": [tk[i][1] for i in keep]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200, help="timed steps per trainer and round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds (fresh trainers each round)")
    ap.add_argument("--threads", type=int, default=1,
                    help="OpenMP/torch threads of every trainer (0: torch's default). The trainers share one process; "
                         "with more than one thread each, their OpenMP thread teams together outnumber the cores and "
                         "the runtime throttles (workers sleep after every parallel region), which costs a step of "
                         "many small ops more than one of few large ones (measured: our step 23 ms alone at 2 "
                         "threads, 38 ms next to one idle second trainer)")
    ap.add_argument("--block", type=int, default=20,
                    help="steps a trainer runs before handing over (1: strict alternation); the first step of "
                         "each block, which starts on another trainer's caches, is not timed")
    ap.add_argument("--quick", action="store_true", help="50 timed steps, 1 round")
    ap.add_argument("--larger", action="store_true",
                    help="a randomly initialised 4.2 M teacher (hidden 256, 4 layers) and a 535 k student (hidden 128, "
                         "2 layers), 1,000 prompts: less of each step is fixed overhead")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.rounds = 50, 1
    global TEACHER, DATA, STUDENT, N_PROMPTS
    if a.larger:
        TEACHER, DATA, N_PROMPTS = OUT / "teacher_h256_l4", OUT / "teacher_data_h256_l4", 1000
        STUDENT = {"hidden_size": 128, "intermediate_size": 512}
    if a.threads:  # before torch is first imported (by trl): OpenMP reads it once, for every thread
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    try:
        import trl
    except ImportError:
        sys.exit("vs_trl: TRL is not installed in this Python. Set up the separate benchmark environment:\n"
                 "    python -m venv benchmarks/.venv-trl\n"
                 "    benchmarks/.venv-trl/bin/pip install torch==2.13.0\n"
                 "    benchmarks/.venv-trl/bin/pip install -e . trl==1.16.0\n"
                 "    benchmarks/.venv-trl/bin/python benchmarks/vs_trl.py")
    import logging

    import torch
    import transformers

    import llm_distill

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    teacher_data()
    names = {"ours": "ours (offline top-20 KD + CE)", "ours_packed": "ours, packing on",
             "gkd": "TRL GKD (lmbda=0, beta=0)", "sft": "TRL SFT"}
    rounds = []
    for r in range(a.rounds):
        res = measure(a.steps, a.block)
        rounds.append(res)
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(
            f"{n} {sum(v['tokens']) / sum(v['seconds']):,.0f} tokens/s ({statistics.median(v['seconds']) * 1e3:.1f} "
            f"ms/step median)" for n, v in res.items()), flush=True)

    def total(n, key):
        return sum(sum(r[n][key]) for r in rounds) / sum(sum(r[n]["seconds"]) for r in rounds)

    def med_rate(n, key):  # median over steps of the per-step rate: robust to the few steps hit by other jobs
        return statistics.median(t / s for r in rounds for t, s in zip(r[n][key], r[n]["seconds"]))

    print()
    print(f"llm_distill {getattr(llm_distill, '__version__', '?')}, trl {trl.__version__}, transformers "
          f"{transformers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs ({platform.machine()})"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"))
    print(f"teacher {SIZES['teacher']:,} params ({TEACHER.relative_to(ROOT)}), student {SIZES['student']:,} params "
          f"({SIZES['teacher'] / SIZES['student']:.1f}x smaller)")
    print(f"{N_PROMPTS} rows, batch 32, max length {MAX_LEN}; {WARMUP} warm-up + {a.steps} timed steps per trainer "
          f"and round, {a.rounds} round(s), steps interleaved ours/GKD/SFT in blocks of {a.block} (the first step of "
          f"each block, which pays the switch between trainers, untimed)" if a.block > 1 else
          f"and round, {a.rounds} round(s), steps interleaved ours/GKD/SFT one by one")
    print()
    print("| trainer | tokens/s (non-padding) | completion tokens/s | ms/step (median) | ours vs it | "
          "ours vs it (median-step rates) |")
    print("|---|---:|---:|---:|---:|---:|")
    for n, name in names.items():
        ms = statistics.median(s for r in rounds for s in r[n]["seconds"]) * 1e3
        rat = total("ours", "tokens") / total(n, "tokens")
        rat_m = med_rate("ours", "tokens") / med_rate(n, "tokens")
        print(f"| {name} | {total(n, 'tokens'):,.0f} | {total(n, 'completion_tokens'):,.0f} | {ms:.1f} | "
              + ("1.00x | 1.00x |" if n == "ours" else f"**{rat:.2f}x** | {rat_m:.2f}x |"))
    gkd, sft = (total("ours", "tokens") / total(n, "tokens") for n in ("gkd", "sft"))
    pgkd, pown = (total("ours_packed", "tokens") / total(n, "tokens") for n in ("gkd", "ours"))
    print()
    print(f"targets: ours >= 3.5x TRL GKD: {gkd:.2f}x padded, {pgkd:.2f}x packed "
          f"({'met' if max(gkd, pgkd) >= 3.5 else 'NOT met'}); ours >= 0.9x TRL SFT: {sft:.2f}x "
          f"({'met' if sft >= 0.9 else 'NOT met'}); packed vs padded: {pown:.2f}x")
    cg = total("ours", "completion_tokens") / total("gkd", "completion_tokens")
    cs = total("ours", "completion_tokens") / total("sft", "completion_tokens")
    print(f"(completion tokens/s ratios: vs GKD {cg:.2f}x, vs SFT {cs:.2f}x)")
    print()
    print("What differs between the setups:")
    for d in DIFFERENCES:
        print(f"- {d}")
    (OUT / "results.json").write_text(json.dumps({"args": vars(a), "rounds": rounds}))


if __name__ == "__main__":
    main()
