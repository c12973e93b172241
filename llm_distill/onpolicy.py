"""On-policy distillation (GKD, MiniLLM): which steps are on-policy, the student's samples for the step's prompts,
the teacher's scores of them, and the step's micro-batches built from both.

A step is on-policy with probability `onpolicy_fraction` λ, chosen from (seed, step) alone. Its micro-batches
replace the offline ones and go through the ordinary training step with an objective: `distill` with CE weight
0 for GKD (the KD term on the student's own tokens), `minillm` for MiniLLM's policy gradient of the sequence-level
reverse KL. Nothing here knows about the optimiser, processes or logging:

    batches, objective = onpolicy_batches(student, teacher, rows, step, cfg, pad_id=..., stop_ids=..., vocab=...,
                                          max_len=...)
"""

from __future__ import annotations

from .backends import build_backend
from .config import TrainConfig
from .decoding import decode_batch, sample_mixture
from .errors import UserError
from .models import tokenizer_hash
from .student import collate
from .teacher import sample_seed


def onpolicy_step(seed: int, step: int, fraction: float) -> bool:
    """Whether optimiser step `step` is on-policy: a pure function of (seed, step), so every process makes the
    same choice and a resumed run makes the same choices as an uninterrupted one."""
    if fraction <= 0:
        return False
    return sample_seed(seed, "onpolicy-step", step) / 2 ** 63 < fraction


def onpolicy_vllm_kwargs(cfg: TrainConfig) -> dict:
    """VLLMBackend keyword arguments of the on-policy teacher (onpolicy_teacher_backend=vllm): top-k =
    onpolicy_logprobs, its share of the training GPU, the run's seed. It only scores (prompt logprobs), so the
    sampling arguments keep their defaults. Its context is capped at max_seq_len, the longest sequence it is
    given, so that the KV cache for a long-context teacher fits in its share."""
    return {"k": cfg.onpolicy_logprobs, "gpu_memory_utilization": cfg.onpolicy_teacher_gpu_memory_utilization,
            "seed": cfg.seed, "max_model_len": cfg.max_seq_len}


def build_teacher(cfg: TrainConfig, device: str, tokenizer, tok_path: str):
    """The teacher that scores the student's samples, refused unless it shares the student's vocabulary."""
    if cfg.onpolicy_teacher_backend == "vllm":
        # One engine on this (single) process's GPU, started while the student is still on the CPU, so that
        # its share of the GPU's memory is free.
        kwargs = onpolicy_vllm_kwargs(cfg)
        teacher = build_backend(None, backend="vllm", model=cfg.teacher, logprobs=kwargs.pop("k"), **kwargs)
    else:
        # Every process scores its own samples with its own copy of the teacher, on its own device.
        teacher = build_backend(None, backend="transformers", model=cfg.teacher, device=device,
                                logprobs=cfg.onpolicy_logprobs,
                                batch_size=cfg.micro_batch_size * cfg.grad_accum_steps)
    if tokenizer_hash(teacher.tokenizer) != tokenizer_hash(tokenizer):
        raise UserError(f"{cfg.teacher}: the teacher's tokenizer differs from the student's ({tok_path}); "
                        "on-policy distillation scores the student's token ids, so they must share the vocabulary")
    return teacher


def sample_student(student, teacher, prompts: list[list[int]], seeds: list[int], cfg: TrainConfig, *, pad_id: int,
                   stop_ids: list[int], vocab: int) -> list[tuple[list[int], list[float] | None]]:
    """Per prompt (token ids, log of each token's sampling probability, or None for GKD): the student's sample,
    drawn with its current weights without dropout; MiniLLM may mix the teacher into the sampling distribution."""
    student.eval()  # no dropout while sampling (the training forward keeps it)
    if cfg.onpolicy_objective == "minillm":
        mix_teacher = teacher.model if cfg.minillm_teacher_mix > 0 else None  # transformers only (config)
        outs = sample_mixture(student, mix_teacher, prompts, pad_id=pad_id, stop_ids=stop_ids, vocab=vocab,
                              max_new_tokens=cfg.onpolicy_max_new_tokens, temperature=cfg.onpolicy_temperature,
                              alpha=cfg.minillm_teacher_mix, row_seeds=seeds)
    else:
        outs = [(c.token_ids, None) for c in decode_batch(
            student, prompts, pad_id=pad_id, stop_ids=stop_ids, vocab_size=vocab,
            max_new_tokens=cfg.onpolicy_max_new_tokens, k=1, temperature=cfg.onpolicy_temperature,
            row_seeds=seeds)]
    student.train()
    return outs


def scored_examples(teacher, row_ids: list[int], prompts: list[list[int]], samples: list, step: int,
                    max_len: int) -> list[dict]:
    """The samples (cut to max_len) scored by the teacher, as `collate` examples: top-k + tail per position, and
    for MiniLLM the teacher's and the sampler's logprob of each sampled token."""
    completions = [ids[:max_len - len(p)] for (ids, _), p in zip(samples, prompts)]
    scored = teacher.score(prompts, completions)  # the `score` stage's code: top-k + tail per position
    examples = []
    for r, p, c, (_, sample_lp), sc in zip(row_ids, prompts, completions, samples, scored):
        ex = {"prompt": p, "completion": c, "topk_ids": sc.topk_ids.tolist(),
              "topk_logprobs": sc.topk_logprobs.tolist(), "tail": sc.tail_logprob.tolist(),
              "id": f"student sample for row {r} at step {step}"}
        if sample_lp is not None:
            ex["teacher_lp"], ex["sample_lp"] = sc.token_logprob.tolist(), sample_lp[:len(c)]
        examples.append(ex)
    return examples


def onpolicy_batches(student, teacher, rows: list[tuple[int, list[int]]], step: int, cfg: TrainConfig, *,
                     pad_id: int, stop_ids: list[int], vocab: int, max_len: int) -> tuple[list[dict], str]:
    """This process's micro-batches of step `step` with the student's own samples for its prompts, scored by the
    teacher, and the objective they train (`distill` for GKD, `minillm`).

    rows: (dataset row index, prompt ids) of every micro-batch of the step, in order. Sampled once for the whole
    step with the current weights; each row's draws come from a seed of (seed, step, row), so they do not depend
    on batching or on resume. The samples are then split into grad_accum_steps micro-batches of micro_batch_size.
    """
    row_ids = [r for r, _ in rows]
    prompts = [p for _, p in rows]
    seeds = [sample_seed(cfg.seed, f"onpolicy:{step}", r) for r in row_ids]
    samples = sample_student(student, teacher, prompts, seeds, cfg, pad_id=pad_id, stop_ids=stop_ids, vocab=vocab)
    examples = scored_examples(teacher, row_ids, prompts, samples, step, max_len)
    mb = cfg.micro_batch_size
    pack = cfg.packing and cfg.onpolicy_objective == "gkd"  # MiniLLM's reward-to-go runs along each row
    batches = [collate(examples[i * mb:(i + 1) * mb], pad_id, pack) for i in range(cfg.grad_accum_steps)]
    return batches, "minillm" if cfg.onpolicy_objective == "minillm" else "distill"
