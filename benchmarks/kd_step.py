# A KD train step (forward KL on top-20 + tail, plus CE) vs a CE-only step on the same tiny student and batches:
#     python benchmarks/kd_step.py            (CPU, about 1 minute; generates the tiny teacher data if needed)
# On a machine with CUDA the same command times the steps on the GPU (fp32, synchronised before each stop).
# The timed step includes collating the batch (the top-k tensors are the KD step's extra data).
# Steps interleave (CE, KD, KD, CE, ...) so that machine noise hits both alike; the ratio of medians is what
# to read.
import statistics
import sys
import time
from pathlib import Path

import torch

from llm_distill import generate
from llm_distill.config import GenerateConfig, TrainConfig, load_config
from llm_distill.models import load_tokenizer
from llm_distill.train import StudentLoss, TeacherRows, build_student, collate

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def teacher_data() -> str:
    out = ROOT / "runs" / "bench" / "teacher_data"
    if not (out / "provenance.json").is_file():
        cfg = load_config(GenerateConfig, str(ROOT / "recipes/tiny/generate.yaml"), values_={
            "model": str(ROOT / "data/tiny_task/teacher"), "prompts": str(ROOT / "data/tiny_task/train.jsonl"),
            "output_dir": str(out), "limit": 2000, "overwrite": True})
        generate.main(cfg)
    return str(out)


def main(steps_per_block: int = 20, blocks: int = 6) -> None:
    from llm_distill.data import load_teacher_dataset

    cfg = load_config(TrainConfig, str(ROOT / "recipes/tiny/train_kd.yaml"), values_={"dataset": teacher_data()})
    tok = load_tokenizer(str(ROOT / "data/tiny_task/teacher"))
    rows = TeacherRows(load_teacher_dataset(cfg.dataset), tok, retokenize=False, with_topk=True, max_len=128)
    g = torch.Generator().manual_seed(0)
    examples = [[rows[int(i)] for i in torch.randint(0, len(rows), (cfg.micro_batch_size,), generator=g)]
                for _ in range(steps_per_block)]
    runners = {}
    for name, kd_w in (("ce_only", 0.0), ("kd+ce", 1.0)):
        model = build_student(cfg, tok).to(DEVICE)
        runners[name] = (StudentLoss(model, len(tok), cfg.loss_chunk_size, kd_w, 1.0),
                         torch.optim.AdamW(model.parameters(), lr=1e-3))
    times = {name: [] for name in runners}
    names = list(runners)
    for block in range(blocks + 1):  # block 0 warms up
        for j, ex in enumerate(examples):
            for name in (names if j % 2 else names[::-1]):  # interleaved, order alternating: noise hits both
                loss_fn, opt = runners[name]
                sync()
                t0 = time.perf_counter()
                b = collate(ex if name == "kd+ce" else [{"prompt": e["prompt"], "completion": e["completion"]} for e in ex],
                            tok.pad_token_id)  # the CE-only loader carries no top-k
                b = {k: v.to(DEVICE, non_blocking=True) for k, v in b.items()}
                kd, ce = loss_fn(**b)
                tokens = int((b["labels"] != -100).sum())
                ((kd + ce) / tokens).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
                if block:
                    times[name].append(time.perf_counter() - t0)
    ce, kd = statistics.median(times["ce_only"]), statistics.median(times["kd+ce"])
    print(f"tiny student ({sum(p.numel() for p in runners['ce_only'][0].parameters()):,} params), "
          f"micro-batch {cfg.micro_batch_size}, k=20, {blocks * steps_per_block} steps each, torch threads "
          f"{torch.get_num_threads()}, {torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'CPU'}")
    print("| step (collate + forward + backward + AdamW) | median ms | vs CE-only |")
    print("|---|---:|---:|")
    print(f"| CE only | {ce * 1e3:.2f} | 1.00x |")
    print(f"| KD (forward KL, top-20 + tail) + CE | {kd * 1e3:.2f} | {kd / ce:.2f}x |")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
