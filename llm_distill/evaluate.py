"""Evaluation: teacher and students on held-out prompts, one report (JSON + Markdown + per-example JSONL).

    llm-distill evaluate recipes/tiny/evaluate.yaml students.kd=runs/quickstart/kd-seed0

Every model answers greedily. Metrics per model: exact match against references (where the prompts have them),
ROUGE-L F1 and exact agreement against the teacher's answers, mean token KL(teacher || student) and NLL of the
teacher's held-out completions (same tokenizer only), parameters, and generation tokens/s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config import EvaluateConfig, config_to_dict
from .data import check_output_dir, encode_prompt, load_prompts, publish, staging_dir, write_run_record
from .errors import UserError
from .generate import decode_batch
from .models import (context_length, count_parameters, eos_ids, load_model, load_tokenizer, resolve_device,
                     resolve_dtype, tokenizer_hash)
from .train import StudentLoss, check_chunked_head, collate


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: surrounding and repeated whitespace do not count."""
    return " ".join(text.split())


def rouge_l(targets: list[str], predictions: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [scorer.score(t, p)["rougeL"].fmeasure for t, p in zip(targets, predictions)]


def greedy_answers(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int, k: int):
    """Greedy completions for every prompt (batched, longest first) and the generation throughput."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    results = [None] * len(prompt_ids)
    stop = eos_ids(model, tokenizer)
    t0, n_tokens = time.perf_counter(), 0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        outs = decode_batch(model, [prompt_ids[i] for i in idx], pad_id=tokenizer.pad_token_id, stop_ids=stop,
                            vocab_size=len(tokenizer), max_new_tokens=max_new_tokens, k=k)
        for i, c in zip(idx, outs):
            results[i] = c
            n_tokens += len(c.token_ids)
    elapsed = time.perf_counter() - t0
    return results, n_tokens, elapsed


@torch.no_grad()
def teacher_kl(model, tokenizer, examples: list[dict], batch_size: int) -> tuple[float, float]:
    """Mean per-token KL(teacher || student) on the k + 1 buckets and student NLL of the teacher's tokens."""
    vocab = len(tokenizer)
    try:
        check_chunked_head(model, vocab, torch.tensor([examples[0]["prompt"]], device=model.device))
        chunk = 1024
    except UserError:
        chunk = 0  # a head that is not a plain projection: use the model's full logits
    loss = StudentLoss(model, vocab, chunk, kd_weight=1.0, ce_weight=1.0)  # forward KL at T = 1, and NLL
    kd = ce = 0.0
    n = 0
    for s in range(0, len(examples), batch_size):
        b = {k: v.to(model.device) for k, v in collate(examples[s:s + batch_size], tokenizer.pad_token_id).items()}
        kd_sum, ce_sum = loss(**b)
        kd, ce, n = kd + float(kd_sum), ce + float(ce_sum), n + int((b["labels"] != -100).sum())
    # KL >= 0; a model compared with itself can land at -1e-8 through float32 rounding.
    return max(kd / max(n, 1), 0.0), ce / max(n, 1)


def markdown_table(report: dict) -> str:
    cols = [("params", "params", "{:,}"), ("exact_match", "exact match", "{:.1%}"),
            ("rouge_l_vs_teacher", "ROUGE-L vs teacher", "{:.3f}"), ("agreement", "agrees w/ teacher", "{:.1%}"),
            ("kl", "KL(T||S)/token", "{:.4f}"), ("nll", "NLL/token", "{:.4f}"),
            ("tokens_per_s", "gen tok/s", "{:.0f}")]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in report["models"].items():
        cells = [fmt.format(m[key]) if m.get(key) is not None else "n/a" for key, _, fmt in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(cfg: EvaluateConfig) -> dict:
    prompts = load_prompts(cfg.prompts, cfg.limit)
    check_output_dir(cfg.output_dir, "evaluate", config_to_dict(cfg), cfg.overwrite)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    refs = [p.reference for p in prompts]
    has_refs = all(r is not None for r in refs)
    models = ([("teacher", cfg.teacher)] if cfg.teacher else []) + list(cfg.students.items())
    for name, path in models:  # fail before any work on a missing model
        if not isinstance(path, str) or not path:
            raise UserError(f"evaluate: model '{name}' needs a path")
        load_tokenizer(path)

    report = {"prompts": cfg.prompts, "num_prompts": len(prompts), "models": {}, "notes": []}
    if not has_refs:
        report["notes"].append("prompts have no (or only some) references: exact match not computed")
    answers: dict[str, list[str]] = {}
    teacher_examples, teacher_hash = None, None
    for name, path in models:
        tokenizer = load_tokenizer(path)
        model = load_model(path, device, dtype)
        ctx = context_length(model)
        ids = []
        for p in prompts:
            enc = encode_prompt(tokenizer, p.messages, path)
            if ctx is not None and len(enc) + cfg.max_new_tokens > ctx:
                raise UserError(f"{p.where}: prompt {p.id!r} has {len(enc)} tokens; with max_new_tokens="
                                f"{cfg.max_new_tokens} it exceeds {name}'s context of {ctx}")
            ids.append(enc)
        is_teacher = name == "teacher" and cfg.teacher
        outs, n_tokens, elapsed = greedy_answers(model, tokenizer, ids, cfg.max_new_tokens, cfg.batch_size,
                                                 cfg.logprobs if is_teacher else 1)
        texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True).strip() for c in outs]
        answers[name] = texts
        m = {"path": path, "params": count_parameters(model), "tokens_per_s": n_tokens / max(elapsed, 1e-9),
             "seconds": elapsed, "mean_completion_tokens": n_tokens / len(prompts)}
        if has_refs:
            hits = [normalize_answer(t) == normalize_answer(r) for t, r in zip(texts, refs)]
            m["exact_match"] = sum(hits) / len(hits)
            by_task: dict[str, list[bool]] = {}
            for p, h in zip(prompts, hits):
                by_task.setdefault(p.task or "all", []).append(h)
            m["exact_match_by_task"] = {t: sum(v) / len(v) for t, v in sorted(by_task.items())}
        if is_teacher:
            teacher_hash = tokenizer_hash(tokenizer)
            teacher_examples = [{"prompt": pid, "completion": c.token_ids, "topk_ids": c.topk_ids.tolist(),
                                 "topk_logprobs": c.topk_logprobs.tolist(), "tail": c.tail_logprob.tolist(),
                                 "id": p.id} for pid, c, p in zip(ids, outs, prompts) if c.token_ids]
        if cfg.teacher:
            m["rouge_l_vs_teacher"] = sum(rouge_l(answers["teacher"], texts)) / len(texts)
            m["agreement"] = sum(normalize_answer(a) == normalize_answer(b)
                                 for a, b in zip(answers["teacher"], texts)) / len(texts)
            if teacher_examples and tokenizer_hash(tokenizer) == teacher_hash:
                m["kl"], m["nll"] = teacher_kl(model, tokenizer, teacher_examples, cfg.batch_size)
            else:
                report["notes"].append(f"{name}: tokenizer differs from the teacher's, KL/NLL not computed")
        report["models"][name] = m
        print(f"evaluate: {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items()
                                                if isinstance(v, float)))
        del model

    tmp = staging_dir(cfg.output_dir)
    (tmp / "report.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(report)
    notes = "".join(f"\n- {n}" for n in report["notes"])
    (tmp / "report.md").write_text(f"# Evaluation on {cfg.prompts} ({len(prompts)} prompts)\n\n{table}\n{notes}\n")
    with (tmp / "examples.jsonl").open("w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": p.id, "task": p.task, "prompt": p.messages[-1]["content"],
                                "reference": p.reference, **{n: answers[n][i] for n in answers}}) + "\n")
    write_run_record(tmp, "evaluate", config_to_dict(cfg))
    publish(tmp, cfg.output_dir)
    print(table)
    return report
