# A KD train step (forward KL on top-20 + tail, plus CE) vs a CE-only step on the same tiny student and batches,
# each with padded and with packed micro-batches (`packing: true`):
#     python benchmarks/kd_step.py            (CPU, about 2 minutes; generates the tiny teacher data if needed)
# On a machine with CUDA the same command times the steps on the GPU (fp32, synchronised before each stop).
# The timed step includes collating the batch (the top-k tensors are the KD step's extra data). The loss is
# train's default (loss_impl auto: the fused loss for this student). Batches are random rows of the bundled
# task's teacher data (no grouping by length); the padded and packed runs see the same rows.
# Steps interleave (the four runs in turn, the order alternating) so that machine noise hits all alike; the
# ratios of medians are what to read. tokens/s = non-padding tokens of the step / its median time.
import statistics
import sys
import time
from pathlib import Path

import torch

from llm_distill import generate
from llm_distill.config import GenerateConfig, TrainConfig, load_config
from llm_distill.models import load_tokenizer
from llm_distill.packing import use_packed_sdpa
from llm_distill.train import StudentLoss, TeacherRows, build_student, collate, fused_head_problem

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
    impl = "chunked" if fused_head_problem(build_student(cfg, tok), "NO") else "fused"  # what loss_impl=auto picks
    for name, kd_w, packing in (("ce_only", 0.0, False), ("kd+ce", 1.0, False), ("ce_only packed", 0.0, True),
                                ("kd+ce packed", 1.0, True)):
        model = build_student(cfg, tok).to(DEVICE)
        if packing:
            use_packed_sdpa(model)  # as train does with packing: true
        runners[name] = (StudentLoss(model, len(tok), cfg.loss_chunk_size, kd_w, 1.0, loss_impl=impl),
                         torch.optim.AdamW(model.parameters(), lr=1e-3), packing)
    times = {name: [] for name in runners}
    real, positions = {name: 0 for name in runners}, {name: 0 for name in runners}
    names = list(runners)
    for block in range(blocks + 1):  # block 0 warms up
        for j, ex in enumerate(examples):
            for name in (names if j % 2 else names[::-1]):  # interleaved, order alternating: noise hits all
                loss_fn, opt, packing = runners[name]
                sync()
                t0 = time.perf_counter()
                b = collate(ex if name.startswith("kd") else
                            [{"prompt": e["prompt"], "completion": e["completion"]} for e in ex],
                            tok.pad_token_id, packing)  # the CE-only loader carries no top-k
                b = {k: v.to(DEVICE, non_blocking=True) for k, v in b.items()}
                kd, ce = loss_fn(**b)
                tokens = int((b["labels"] != -100).sum())
                ((kd + ce) / tokens).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync()
                if block:
                    times[name].append(time.perf_counter() - t0)
                    n_real = int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                    real[name] += n_real
                    positions[name] += b["input_ids"].numel()
    med = {name: statistics.median(t) for name, t in times.items()}
    steps = blocks * steps_per_block
    print(f"tiny student ({sum(p.numel() for p in runners['ce_only'][0].parameters()):,} params), "
          f"micro-batch {cfg.micro_batch_size}, k=20, {steps} steps each, {impl} loss, torch threads "
          f"{torch.get_num_threads()}, {torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'CPU'}")
    print("| step (collate + forward + backward + AdamW) | padding | median ms | tokens/s | vs CE-only (same batching) "
          "| packed vs padded (tokens/s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, label in (("ce_only", "CE only"), ("kd+ce", "KD (forward KL, top-20 + tail) + CE")):
        for suffix in ("", " packed"):
            n = name + suffix
            rate = real[n] / steps / med[n]
            gain = (med[name] / med[n]) if suffix else 1.0  # same rows, same real tokens: the time ratio
            print(f"| {label}{', packed' if suffix else ', padded'} | {1 - real[n] / positions[n]:.1%} | "
                  f"{med[n] * 1e3:.2f} | {rate:,.0f} | {med[n] / med['ce_only' + suffix]:.2f}x | {gain:.2f}x |")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
