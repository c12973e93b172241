# How different are the KD and CE gradients on a teacher dataset? For a student (a fresh one from
# recipes/tiny/train_kd.yaml's student_config, or a trained checkpoint), over N batches of the recipe's size:
# the parameter-gradient norms of the per-token KD term and of CE, their cosine, and how often each weighting
# (kd 1 + ce 1, kd 0.5 + ce 0.5, CE only) would be clipped at max_grad_norm = 1.
#     python benchmarks/kd_ce_gradients.py runs/tiny/teacher_data                  (fresh student, 20 batches)
#     python benchmarks/kd_ce_gradients.py runs/tiny/teacher_data runs/tiny/ce 20   (a trained student)
#     python benchmarks/kd_ce_gradients.py runs/tiny/teacher_data - 20 divergences={reverse_kl: 1} temperature=2
# (trailing key=value pairs are options of losses.kd_per_token: divergences, temperature, beta, alpha)
import statistics
import sys
from pathlib import Path

import torch
import yaml

from llm_distill.config import TrainConfig, build_config
from llm_distill.data import load_teacher_dataset, read_provenance
from llm_distill.models import load_tokenizer
from llm_distill.train import StudentLoss, TeacherRows, build_student, collate

ROOT = Path(__file__).resolve().parents[1]


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def main(data: str, student: str | None = None, batches: int = 20, kd_options: dict | None = None) -> None:
    torch.manual_seed(0)
    recipe = yaml.safe_load((ROOT / "recipes/tiny/train_kd.yaml").read_text())
    cfg = build_config(TrainConfig, {**recipe, "dataset": data, "student": student,
                                     "student_config": None if student else recipe["student_config"]}, "recipe")
    tok = load_tokenizer(student or read_provenance(data)["teacher"])
    model = build_student(cfg, tok)
    ds = load_teacher_dataset(data)
    rows = TeacherRows(ds, tok, retokenize=False, with_topk=True, max_len=128)
    # kd_weight = ce_weight = 1 with the chunked (autograd) loss: each sum's gradient is taken on its own.
    loss = StudentLoss(model, len(tok), 1024, 1.0, 1.0, loss_impl="chunked", **(kd_options or {}))
    g = torch.Generator().manual_seed(0)
    stats = {k: [] for k in ("kd", "ce", "cos", "sum", "half", "frac_uncertain")}
    for _ in range(batches):
        idx = torch.randint(len(rows), (cfg.micro_batch_size,), generator=g).tolist()
        b = collate([rows[i] for i in idx], tok.pad_token_id)
        n = int((b["labels"] != -100).sum())
        grads = []
        for part in (0, 1):
            model.zero_grad(set_to_none=True)
            kd_sum, ce_sum = loss(**b)
            ((kd_sum if part == 0 else ce_sum) / n).backward()
            grads.append(flat_grad(model).clone())
        gk, gc = grads
        stats["kd"].append(float(gk.norm()))
        stats["ce"].append(float(gc.norm()))
        stats["cos"].append(float(torch.nn.functional.cosine_similarity(gk, gc, dim=0)))
        stats["sum"].append(float((gk + gc).norm()))
        stats["half"].append(float((0.5 * gk + 0.5 * gc).norm()))
        top1 = b["topk_logprobs"][..., 0][b["labels"] != -100].exp()
        stats["frac_uncertain"].append(float((top1 < 0.9).float().mean()))
    print(f"student: {student or 'fresh (recipe student_config, seed 0)'}; {batches} batches of {cfg.micro_batch_size}; "
          f"KD options {kd_options or 'default (forward KL, T = 1)'}")
    print("| quantity | mean | min | max |\n|---|---:|---:|---:|")
    for k, label in (("kd", "‖∇ KD‖"), ("ce", "‖∇ CE‖"), ("cos", "cos(∇ KD, ∇ CE)"), ("sum", "‖∇ (KD + CE)‖"),
                     ("half", "‖∇ (0.5 KD + 0.5 CE)‖"), ("frac_uncertain", "positions with teacher top-1 < 0.9")):
        v = stats[k]
        print(f"| {label} | {statistics.mean(v):.4f} | {min(v):.4f} | {max(v):.4f} |")
    for k, label in (("sum", "kd 1 + ce 1"), ("half", "kd 0.5 + ce 0.5"), ("ce", "CE only")):
        print(f"clipped at max_grad_norm 1: {label}: {sum(x > 1 for x in stats[k])} of {batches} batches")


if __name__ == "__main__":
    opts = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in sys.argv[4:])}
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None,
         int(sys.argv[3]) if len(sys.argv) > 3 else 20, opts)
