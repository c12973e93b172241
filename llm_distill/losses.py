"""Token-level distillation losses on the stored top-k + tail buckets. Pure functions, float32 inside.

The teacher stores, per completion position, k token ids `I`, their raw logprobs `l` and the tail mass
`log(1 - sum exp(l))`. The student's full-vocabulary distribution is reduced to the same k + 1 buckets
(the k ids, then everything else), and the divergence is taken between the two (k+1)-bucket distributions:

    P = (exp l_1, ..., exp l_k, exp tail_T)      Q = (exp s_1, ..., exp s_k, exp tail_S)

On buckets every divergence is >= 0 and a lower bound of the full-vocabulary divergence (data processing
inequality); with k = V the tail is empty and it equals the dense divergence exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def student_buckets(logits: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student log-probabilities of the teacher's k ids and of the tail bucket.

    logits: (N, V) student logits (any dtype; computed in float32). topk_ids: (N, k) teacher ids.
    Returns (N, k) logprobs and (N,) tail logprob, both exact: the tail is a logsumexp over the ids
    outside the top-k, not log(1 - sum), which cancels catastrophically when the top-k holds most mass.
    """
    z = logits.float()  # (N, V)
    lse = z.logsumexp(-1)  # (N,)
    s_topk = z.gather(-1, topk_ids) - lse[:, None]  # (N, k)
    rest = z.scatter(-1, topk_ids, float("-inf")).logsumexp(-1)  # (N,); -inf when k = V
    return s_topk, rest - lse


def _plogp_ratio(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q) with the 0 * log 0 = 0 convention (teacher -inf entries contribute nothing)."""
    p = logp.exp()
    safe_logp = torch.where(p > 0, logp, torch.zeros_like(logp))
    return torch.where(p > 0, p * (safe_logp - logq), torch.zeros_like(p))


def forward_kl(s_topk: torch.Tensor, s_tail: torch.Tensor, t_topk: torch.Tensor, t_tail: torch.Tensor) -> torch.Tensor:
    """KL(P_teacher || Q_student) per position on the k + 1 buckets.

    s_topk, t_topk: (N, k) logprobs; s_tail, t_tail: (N,) tail logprobs. Returns (N,) >= 0 (up to rounding).
    """
    t_topk, t_tail = t_topk.float(), t_tail.float()
    # When the teacher tail is empty (k = V) the student tail is too; -inf - -inf must not become NaN.
    s_tail = torch.where(torch.isinf(t_tail) & torch.isinf(s_tail), torch.zeros_like(s_tail), s_tail)
    return _plogp_ratio(t_topk, s_topk).sum(-1) + _plogp_ratio(t_tail, s_tail)


def token_losses(logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor | None,
                 topk_logprobs: torch.Tensor | None, tail_logprob: torch.Tensor | None,
                 kd_weight: float, ce_weight: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed KD and CE over the completion positions of a batch (the caller normalises by step tokens).

    logits: (B, T, V); labels: (B, T) with -100 where no completion token is predicted;
    topk_ids / topk_logprobs: (B, T, k); tail_logprob: (B, T). Returns (kd_sum, ce_sum, n_tokens).
    """
    mask = labels != -100  # (B, T)
    z = logits[mask]  # (N, V): only completion positions are reduced over the vocabulary
    zero = z.sum() * 0.0  # keeps the graph connected when a weight is 0
    ce_sum = F.cross_entropy(z.float(), labels[mask], reduction="sum") if ce_weight > 0 else zero
    kd_sum = zero
    if kd_weight > 0:
        s_topk, s_tail = student_buckets(z, topk_ids[mask])
        kd_sum = forward_kl(s_topk, s_tail, topk_logprobs[mask], tail_logprob[mask]).sum()
    return kd_sum, ce_sum, int(mask.sum())
