"""Token-level distillation losses on the stored top-k + tail buckets. Pure functions, float32 inside.

The teacher stores, per completion position, k token ids `I`, their raw logprobs `l` and the tail mass
`log(1 - sum exp(l))`. The student's full-vocabulary distribution is reduced to the same k + 1 buckets
(the k ids, then everything else), and the divergence is taken between the two (k+1)-bucket distributions:

    P = (exp l_1, ..., exp l_k, exp tail_T)      Q = (exp s_1, ..., exp s_k, exp tail_S)

On buckets every divergence is >= 0 and a lower bound of the full-vocabulary divergence (data processing
inequality); with k = V the tail is empty and it equals the dense divergence exactly.

Temperature T != 1 is applied to both bucket distributions alike (P_T ∝ P^(1/T), Q_T ∝ Q^(1/T), the tail
treated as one outcome), because the teacher's tail cannot be re-tempered token by token from what is stored.
Ratios inside the top-k are exactly those of the full-vocabulary tempered distributions; the tail bucket's
share is that of a single token of the tail's mass, which is smaller than the true tempered tail when T > 1.
The loss is scaled by T², as is conventional, so gradients keep their size across temperatures.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "confidence_kl")
# Teacher logprobs of -inf (vLLM can emit them) are zero-probability buckets; where a divergence divides by
# the teacher's probability (reverse KL) they are floored here instead of making the loss infinite.
TEACHER_LOGPROB_FLOOR = -100.0


def student_buckets(logits: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student log-probabilities of the teacher's k ids and of the tail bucket, from dense logits.

    logits: (N, V) (any dtype; float32 inside). topk_ids: (N, k). Returns (N, k) and (N,), both exact: the tail
    is a logsumexp over the ids outside the top-k, not log(1 - sum), which cancels when the top-k holds most mass.
    """
    z = logits.float()  # (N, V)
    lse = z.logsumexp(-1)  # (N,)
    s_topk = z.gather(-1, topk_ids) - lse[:, None]  # (N, k)
    rest = z.scatter(-1, topk_ids, float("-inf")).logsumexp(-1)  # (N,); -inf when k = V
    return s_topk, rest - lse


def buckets(topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor) -> torch.Tensor:
    """(N, k) + (N,) -> (N, k + 1) log-probabilities of the bucket distribution."""
    return torch.cat([topk_logprobs.float(), tail_logprob.float()[:, None]], dim=-1)


def temper(logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """Bucket-level temperature: log of P^(1/T) / Z over the last axis (identity at T = 1)."""
    if temperature == 1.0:
        return logp
    return torch.log_softmax(logp / temperature, dim=-1)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last axis with 0 log 0 = 0; P's -inf entries contribute nothing (and no NaN grads)."""
    p = logp.exp()
    live = p > 0
    diff = torch.where(live, logp, torch.zeros_like(logp)) - torch.where(live, logq, torch.zeros_like(logq))
    return (torch.where(live, p * diff, torch.zeros_like(p))).sum(-1)


def _mix(logp: torch.Tensor, logq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w P + (1 - w) Q), stable; a bucket empty on both sides stays -inf without a NaN gradient."""
    if w <= 0.0 or w >= 1.0:
        return logq if w <= 0.0 else logp
    empty = torch.isneginf(logp) & torch.isneginf(logq)
    zero = torch.zeros_like(logp)
    mixed = torch.logaddexp(torch.where(empty, zero, logp) + math.log(w),
                            torch.where(empty, zero, logq) + math.log1p(-w))
    return torch.where(empty, torch.full_like(mixed, float("-inf")), mixed)


def divergence(name: str, t: torch.Tensor, s: torch.Tensor, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """Per-position divergence between teacher buckets `t` and student buckets `s`, both (N, k+1) log-probs.

    forward_kl       KL(P || Q)
    reverse_kl       KL(Q || P)
    jsd              beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q (GKD's generalised JSD);
                     beta = 0 is defined as forward KL and beta = 1 as reverse KL, as in GKD/TRL
    skew_kl          KL(P || alpha P + (1 - alpha) Q)                      (DistiLLM)
    skew_reverse_kl  KL(Q || (1 - alpha) P + alpha Q)                      (DistiLLM)
    tvd              1/2 sum |P - Q|
    confidence_kl    c KL(P || Q) + (1 - c) skew_reverse_kl, c = the teacher's top-1 probability (a constant):
                     forward KL, whose gradient is CE's, where the teacher is sure of one token; mode-seeking
                     where it spreads, so that the student commits to one of the teacher's likely tokens instead
                     of copying a spread it lacks the capacity to place (and the teacher's wrong mass with it).
                     The skew bounds reverse KL's log(q/p) at log(1/alpha) on buckets the teacher gives ~0.

    `t`'s first bucket must be the teacher's top-1 (the top-k is stored sorted; `validate` checks it).
    """
    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        return _kl(t, s)
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return _kl(s, t.clamp(min=TEACHER_LOGPROB_FLOOR))
    if name == "jsd":
        m = _mix(t, s, beta)
        return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    if name == "skew_kl":
        return _kl(t, _mix(t, s, alpha)) if alpha < 1.0 else torch.zeros_like(t[:, 0])
    if name == "skew_reverse_kl":
        return _kl(s, _mix(t, s, 1.0 - alpha)) if alpha < 1.0 else torch.zeros_like(t[:, 0])
    if name == "tvd":
        return 0.5 * (t.exp() - s.exp()).abs().sum(-1)
    if name == "confidence_kl":
        c = t[:, 0].exp().detach()  # (N,) the teacher's top-1 probability: a weight, not a target
        return c * _kl(t, s) + (1.0 - c) * _kl(s, _mix(t, s, 1.0 - alpha))
    raise ValueError(f"unknown divergence {name!r}; choose from {', '.join(DIVERGENCES)}")


def token_losses(logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor | None,
                 topk_logprobs: torch.Tensor | None, tail_logprob: torch.Tensor | None,
                 kd_weight: float, ce_weight: float, **kd_options) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Dense reference path: summed KD and CE over the completion positions of a batch of full logits.

    logits: (B, T, V); labels: (B, T) with -100 where no completion token is predicted;
    topk_ids / topk_logprobs: (B, T, k); tail_logprob: (B, T). Returns (kd_sum, ce_sum, n_tokens).
    """
    mask = labels != -100  # (B, T)
    z = logits[mask]  # (N, V)
    zero = z.sum() * 0.0  # keeps the graph connected when a weight is 0
    ce_sum = F.cross_entropy(z.float(), labels[mask], reduction="sum") if ce_weight > 0 else zero
    kd_sum = zero
    if kd_weight > 0:
        s_topk, s_tail = student_buckets(z, topk_ids[mask])
        kd_sum = kd_per_token(s_topk, s_tail, topk_logprobs[mask], tail_logprob[mask], **kd_options).sum()
    return kd_sum, ce_sum, int(mask.sum())


def restrict_topk(topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor, k: int):
    """Use only the first k of the stored ids (they are sorted); the dropped ones join the tail, exactly.

    (..., K) ids/logprobs and (...,) tail -> (..., k), (..., k), (...,).
    """
    if k >= topk_ids.shape[-1]:
        return topk_ids, topk_logprobs, tail_logprob
    dropped = topk_logprobs[..., k:].float().logsumexp(-1)
    return topk_ids[..., :k], topk_logprobs[..., :k], torch.logaddexp(tail_logprob.float(), dropped)


def kd_per_token(s_topk: torch.Tensor, s_tail: torch.Tensor, t_topk: torch.Tensor, t_tail: torch.Tensor, *,
                 divergences: dict | None = None, temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                 renormalized_topk: bool = False) -> torch.Tensor:
    """The token-level KD term per position: sum of weight * divergence, times T². Returns (N,).

    s_topk, t_topk: (N, k) student/teacher logprobs at the teacher's ids; s_tail, t_tail: (N,).
    renormalized_topk drops both tails and renormalises the top-k (the biased axolotl / ms-swift way); it exists
    only so the two can be compared.
    """
    if renormalized_topk:
        t = torch.log_softmax(t_topk.float(), -1)  # (N, k)
        s = torch.log_softmax(s_topk.float(), -1)  # (N, k)
    else:
        t, s = buckets(t_topk, t_tail), buckets(s_topk, s_tail)  # (N, k + 1)
        # The stored teacher buckets sum to 1 only up to the float16 rounding of the top-k (the tail is float32,
        # from the unrounded values): off by up to ~3e-4 on the bundled teacher. Unnormalised, KL(P || Q) can be
        # negative and its gradient is (sum P) Q - P instead of Q - P, a bias of the size of a near-one-hot
        # teacher's whole non-argmax mass. Renormalising costs one logsumexp over k + 1.
        t = t - t.logsumexp(-1, keepdim=True)
    t, s = temper(t, temperature), temper(s, temperature)
    total = torch.zeros_like(s[:, 0])
    for name, weight in (divergences or {"forward_kl": 1.0}).items():
        if weight:
            total = total + weight * divergence(name, t, s, beta=beta, alpha=alpha)
    return total * temperature ** 2


def _chunk_logprobs(h: torch.Tensor, head, topk_ids: torch.Tensor | None, labels: torch.Tensor,
                    vocab: int, softcap: float | None):
    if isinstance(head, torch.Tensor):
        z = (h @ head[:vocab].T).float()  # (c, V): padded embedding rows beyond the tokenizer are dropped
    else:  # the model's head module: its own hooks run, so ZeRO-3 / FSDP can gather a sharded weight
        z = head(h)[..., :vocab].float()  # (c, V)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    lse = z.logsumexp(-1)  # (c,)
    label_lp = z.gather(-1, labels[:, None]).squeeze(-1) - lse  # (c,)
    if topk_ids is None:
        return label_lp, None, None
    s_topk = z.gather(-1, topk_ids) - lse[:, None]  # (c, k)
    s_tail = z.scatter(-1, topk_ids, float("-inf")).logsumexp(-1) - lse  # (c,)
    return label_lp, s_topk, s_tail


def student_logprobs(hidden: torch.Tensor, head, labels: torch.Tensor,
                     topk_ids: torch.Tensor | None, vocab: int, chunk_size: int = 1024, softcap: float | None = None):
    """Student logprobs from final hidden states, never holding more than one (chunk, V) block of logits.

    hidden: (N, d) at completion positions only; head: the output projection, either its (V', d) weight
    (V' >= vocab) or the bias-free linear module itself;
    labels: (N,); topk_ids: (N, k) or None. Returns label logprobs (N,), top-k logprobs (N, k) and tail (N,)
    (the last two None without topk_ids). Each chunk is recomputed in the backward pass (activation
    checkpointing), so peak memory is O(chunk_size * V) instead of O(N * V).
    """
    head_trains = head.requires_grad if isinstance(head, torch.Tensor) else \
        any(p.requires_grad for p in head.parameters())
    outs = []
    for i in range(0, hidden.shape[0], chunk_size):
        args = (hidden[i:i + chunk_size], head, None if topk_ids is None else topk_ids[i:i + chunk_size],
                labels[i:i + chunk_size], vocab, softcap)
        if torch.is_grad_enabled() and (hidden.requires_grad or head_trains):
            outs.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            outs.append(_chunk_logprobs(*args))
    label_lp = torch.cat([o[0] for o in outs])
    if topk_ids is None:
        return label_lp, None, None
    return label_lp, torch.cat([o[1] for o in outs]), torch.cat([o[2] for o in outs])


def minillm_surrogate(student_lp: torch.Tensor, teacher_lp: torch.Tensor, sample_lp: torch.Tensor,
                      mask: torch.Tensor, single_step_kl: torch.Tensor | None = None,
                      length_norm: bool = False) -> torch.Tensor:
    """Per-token surrogate whose gradient is MiniLLM's policy gradient of the sequence-level reverse KL(q ‖ p).

    Experimental. For samples y drawn from π (the student q itself, or a teacher mixture), per token
        r_t = log p(y_t | y_<t) - log q(y_t | y_<t)                         (reward; teacher full-vocab logprob)
        w_t = q(y_t | y_<t) / π(y_t | y_<t)                                  (per-token importance weight)
        G_t = sum over t' >= t of r_t'   (t' > t with the single-step decomposition; their mean with length_norm)
        surrogate_t = -w_t * G_t * log q(y_t) [+ w_t * KL_t(q ‖ p) with single_step_kl]
    with w and G treated as constants. With π = q and without length normalisation, E_y[∇ Σ_t surrogate_t] is
    exactly ∇ KL(q ‖ p) of the sequence distributions (REINFORCE; E[∇ log q] = 0 removes the -log q term's own
    gradient); the single-step part replaces the sampled r_t by its exact expectation over y_t
    (`single_step_kl`: the per-position reverse KL, with grad), which lowers the variance. Per-token weights
    and length normalisation are MiniLLM's approximations (biased, lower variance).

    student_lp: (B, C) log q of the sampled tokens, with grad; teacher_lp, sample_lp: (B, C); mask: (B, C)
    bool, the sampled tokens of each row (other entries are ignored); single_step_kl: (B, C) or None.
    Returns (B, C), zero off the mask; the caller sums and normalises.
    """
    m = mask.float()  # (B, C)
    q = student_lp.float()
    q_const = q.detach()
    r = (teacher_lp.float() - q_const) * m  # (B, C)
    w = torch.exp(q_const - sample_lp.float()) * m  # (B, C)
    to_go = r.flip(-1).cumsum(-1).flip(-1)  # (B, C): sum over t' >= t
    count = m.flip(-1).cumsum(-1).flip(-1)  # (B, C): tokens t' >= t
    if single_step_kl is not None:
        to_go, count = to_go - r, count - m  # future tokens only: r_t itself is replaced by its expectation
    if length_norm:
        to_go = to_go / count.clamp(min=1.0)
    out = -w * to_go * q
    if single_step_kl is not None:
        out = out + w * single_step_kl.float()
    return out * m


def _fused_chunk(h, weight, labels, topk_ids, t_topk, t_tail, vocab: int, softcap: float | None,
                 kd_weight: float, ce_weight: float, kd_options: dict, want_grad: bool):
    """One chunk of `fused_head_loss`: (kd_sum, ce_sum, grad of kd_weight*kd + ce_weight*ce w.r.t. the logits).

    h: (c, d); weight: (vocab, d), already sliced to the real vocabulary; labels: (c,); topk_ids, t_topk: (c, k)
    or None without KD; t_tail: (c,). Everything vocabulary-sized is one (c, V) buffer, reused in place: logits,
    then exp(logits - max), then the gradient.
    """
    z = (h @ weight.T).float()  # (c, V)
    dcap = None
    if softcap:
        z.div_(softcap).tanh_()
        dcap = 1.0 - z * z if want_grad else None  # d(cap * tanh(x / cap)) / dx, a second (c, V) buffer
        z.mul_(softcap)
    z_lab = z.gather(1, labels[:, None]).squeeze(1)  # (c,)
    if topk_ids is not None:
        z_top = z.gather(1, topk_ids)  # (c, k)
        z.scatter_(1, topk_ids, float("-inf"))  # the tail: every id outside the top-k
        m = z.max(1).values  # (c,) max over the tail; -inf when k = V
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = z.sub_(m[:, None]).exp_()  # (c, V) exp(z - m) on the tail, 0 on the top-k
        rest = e.sum(1)  # (c,)
        lse_rest = rest.log() + m  # (c,) exact tail logsumexp (no 1 - sum cancellation); -inf when k = V
        # A repeated id (vLLM can list the sampled token twice) is one token of the vocabulary: counted once.
        srt, order = topk_ids.sort(1)
        repeat = torch.zeros_like(topk_ids, dtype=torch.bool).scatter_(1, order[:, 1:], srt[:, 1:] == srt[:, :-1])
        lse = torch.logaddexp(lse_rest, z_top.masked_fill(repeat, float("-inf")).logsumexp(1))  # (c,)
        s_top, s_tail = z_top - lse[:, None], lse_rest - lse  # (c, k), (c,)
    else:
        m = z.max(1).values
        e = z.sub_(m[:, None]).exp_()  # (c, V) exp(z - m)
        rest = e.sum(1)
        lse = rest.log() + m
        lse_rest, s_top, s_tail = lse, None, None
    label_lp = z_lab - lse  # (c,)
    kd_on, ce_on = topk_ids is not None and kd_weight > 0, ce_weight > 0
    if not want_grad:
        kd = kd_per_token(s_top, s_tail, t_topk, t_tail, **kd_options).sum() if topk_ids is not None else None
        return kd, -label_lp.sum(), None
    # Gradient of the (c, k + 1) bucket loss w.r.t. the student's bucket and label log-probabilities by autograd
    # on those small tensors (every divergence, temperature and option of kd_per_token alike), then the closed
    # form of their gradient w.r.t. the logits.
    leaves = [x.detach().requires_grad_(True) for x in (label_lp,) + ((s_top, s_tail) if topk_ids is not None else ())]
    with torch.enable_grad():
        ce = -leaves[0].sum()
        kd = kd_per_token(leaves[1], leaves[2], t_topk, t_tail, **kd_options).sum() if topk_ids is not None else None
        total = (ce_weight * ce if ce_on else 0.0) + (kd_weight * kd if kd_on else 0.0)
        grads = torch.autograd.grad(total, leaves, allow_unused=True) if torch.is_tensor(total) and \
            total.requires_grad else [None] * len(leaves)
    g_lab = grads[0] if grads[0] is not None else torch.zeros_like(label_lp)  # (c,)
    G = g_lab.clone()  # (c,) sum of all upstream gradients: d lse / d z = softmax
    if topk_ids is not None:
        g_top = grads[1] if grads[1] is not None else torch.zeros_like(s_top)  # (c, k)
        g_tail = grads[2] if grads[2] is not None else torch.zeros_like(s_tail)  # (c,)
        G = G + g_top.sum(1) + g_tail
        # On a tail id v: d s_tail / d z_v = exp(z_v - lse_rest) = e_v exp(m - lse_rest), minus G softmax_v.
        tail_share = torch.where(rest > 0, torch.exp(m - lse_rest), torch.zeros_like(rest))
        a = g_tail * tail_share - G * torch.exp(m - lse)  # (c,)
    else:
        a = -G * torch.exp(m - lse)
    gz = e.mul_(a[:, None])  # (c, V) gradient w.r.t. the logits, in e's buffer
    if topk_ids is not None:
        gz.scatter_(1, topk_ids, -G[:, None] * s_top.exp())  # set first: a repeated id is softmax'd once ...
        gz.scatter_add_(1, topk_ids, g_top)  # ... and gets each of its buckets' gradients
    gz.scatter_add_(1, labels[:, None], g_lab[:, None])
    if dcap is not None:
        gz.mul_(dcap)
    return kd.detach() if kd is not None else None, ce.detach(), gz


class _FusedHeadLoss(torch.autograd.Function):
    """KD and CE sums from hidden states and the head weight, with their gradients computed in the forward pass.

    The gradients kept are those of kd_weight * kd_sum + ce_weight * ce_sum; backward scales them by the one
    factor its incoming gradients imply, so the caller's loss must weight the two sums in that ratio (any
    overall scale, e.g. a token normaliser, is free). Backward may run once.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, topk_ids, t_topk, t_tail, spec):
        vocab, chunk, softcap = spec["vocab"], spec["chunk_size"], spec["softcap"]
        kd_w, ce_w, want_h, want_w = spec["kd_weight"], spec["ce_weight"], spec["want_h"], spec["want_w"]
        dtype = spec["dtype"]
        w = weight[:vocab].to(dtype)  # (V, d): padded embedding rows beyond the tokenizer are dropped
        h_all = hidden.to(dtype)
        grad_h = torch.zeros_like(hidden) if want_h else None  # (N, d)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None  # (V', d), fp32 accumulation
        kd_sum = torch.zeros((), device=hidden.device)
        ce_sum = torch.zeros((), device=hidden.device)
        want = want_h or want_w
        with torch.autocast(hidden.device.type, enabled=False):
            for i in range(0, hidden.shape[0], chunk):
                sl = slice(i, i + chunk)
                h = h_all[sl]
                kd, ce, gz = _fused_chunk(h, w, labels[sl], None if topk_ids is None else topk_ids[sl],
                                          None if t_topk is None else t_topk[sl], None if t_tail is None else t_tail[sl],
                                          vocab, softcap, kd_w, ce_w, spec["kd_options"], want)
                ce_sum += ce
                if kd is not None:
                    kd_sum += kd
                if gz is None:
                    continue
                if want_h:
                    grad_h[sl] = (gz.to(dtype) @ w).to(grad_h.dtype)  # (c, d)
                if want_w:
                    if dtype == torch.float32:
                        grad_w[:vocab].addmm_(gz.T, h)  # (V, d) += (V, c) @ (c, d), no (V, d) temporary
                    else:
                        grad_w[:vocab] += (gz.to(dtype).T @ h).float()
        ctx.grads = (grad_h, grad_w.to(weight.dtype) if want_w else None)
        ctx.weights = (kd_w, ce_w, topk_ids is not None)
        return kd_sum, ce_sum

    @staticmethod
    def backward(ctx, g_kd, g_ce):
        grad_h, grad_w = ctx.grads
        ctx.grads = None  # backward runs once; free the buffers as soon as autograd has them
        kd_w, ce_w, kd_live = ctx.weights
        kd_w = kd_w if kd_live else 0.0  # without top-k the KD sum is the constant 0: its gradient is irrelevant
        # The scale s with (g_kd, g_ce) = s (kd_w, ce_w); a sum of weight 0 has no gradient kept.
        s = (g_kd * kd_w + g_ce * ce_w) / ((kd_w ** 2 + ce_w ** 2) or 1.0)
        bad = (g_kd - s * kd_w).abs() * (1.0 if kd_live else 0.0) + (g_ce - s * ce_w).abs()
        ok = bad <= 1e-5 * (g_kd.abs() + g_ce.abs()) + 1e-30
        if g_kd.device.type == "cpu":
            if not bool(ok):
                raise RuntimeError(f"fused head loss: the loss weights the KD and CE sums {float(g_kd):g} : "
                                   f"{float(g_ce):g}, not {kd_w:g} : {ce_w:g} as the loss was built with")
        else:
            torch._assert_async(ok)  # no host sync on the GPU
        return (None if grad_h is None else grad_h.mul_(s.to(grad_h.dtype)),
                None if grad_w is None else grad_w.mul_(s.to(grad_w.dtype)), None, None, None, None, None)


def fused_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    topk_ids: torch.Tensor | None, t_topk: torch.Tensor | None, t_tail: torch.Tensor | None, *,
                    vocab: int, kd_weight: float, ce_weight: float, chunk_size: int = 1024,
                    softcap: float | None = None, **kd_options) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KD (on the top-k + tail buckets) and CE over completion positions, head projection fused in.

    hidden: (N, d) at completion positions; weight: the head's (V', d) weight (V' >= vocab); labels: (N,);
    topk_ids, t_topk: (N, k) and t_tail: (N,), or None for CE only. Returns (kd_sum, ce_sum), the same values as
    `student_logprobs` + `kd_per_token` (kd_sum is 0 without top-k). Per chunk of positions the logits, the bucket
    log-probabilities, the divergences, CE and their gradient w.r.t. the logits are computed in one pass, then
    the hidden states' gradient and the weight's gradient (accumulated in one (V', d) float32 buffer) right there:
    backward recomputes nothing and no (N, V) tensor lives beyond one chunk. The gradient kept is that of
    kd_weight * kd_sum + ce_weight * ce_sum, so a loss built from the two sums must weight them in that ratio
    (times any scale); another ratio raises in backward. Matmuls run in the autocast dtype when autocast is on
    (as the model's own head would), else in float32; the softmax and divergences in float32.
    """
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else torch.float32
    grad = torch.is_grad_enabled()
    spec = {"vocab": vocab, "chunk_size": chunk_size, "softcap": softcap, "kd_weight": kd_weight,
            "ce_weight": ce_weight, "kd_options": kd_options, "dtype": dtype,
            "want_h": grad and hidden.requires_grad, "want_w": grad and weight.requires_grad}
    return _FusedHeadLoss.apply(hidden, weight, labels, topk_ids, t_topk, t_tail, spec)
