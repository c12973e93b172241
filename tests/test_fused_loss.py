"""The fused head + divergence loss against the dense reference: values and gradients for every divergence and
option, in float32 and against float64 logits."""

import pytest
import torch

from llm_distill.losses import DIVERGENCES, fused_head_loss, kd_per_token, restrict_topk, student_buckets


def problem(N=29, d=12, V=40, Vpad=48, K=6, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g)
    W = torch.randn(Vpad, d, generator=g) * scale / d ** 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    t = torch.log_softmax(torch.randn(N, V, generator=g) * 2, -1)
    top, ids = t.topk(K, -1)
    tail = t.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return h, W, labels, ids, top, tail


def dense_reference(h, W, labels, ids, top, tail, V, kd_w, ce_w, softcap=None, dtype=torch.float32, **opts):
    """Full logits, log_softmax and the bucket divergences by autograd; returns (kd, ce, grad_h, grad_W)."""
    h = h.detach().to(dtype).requires_grad_(True)
    W = W.detach().to(dtype).requires_grad_(True)
    z = h @ W[:V].T  # (N, V)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    lse = z.logsumexp(-1)
    ce = -(z.gather(-1, labels[:, None]).squeeze(-1) - lse).sum()
    kd = torch.zeros((), dtype=dtype)
    if ids is not None:
        if dtype == torch.float64:  # student_buckets works in float32: build the buckets here in float64
            s_top = z.gather(-1, ids) - lse[:, None]
            s_tail = z.scatter(-1, ids, float("-inf")).logsumexp(-1) - lse
        else:
            s_top, s_tail = student_buckets(z, ids)
        kd = kd_per_token(s_top.double() if dtype == torch.float64 else s_top,
                          s_tail.double() if dtype == torch.float64 else s_tail, top, tail, **opts).sum()
    (kd_w * kd + ce_w * ce).backward()
    return kd.detach(), ce.detach(), h.grad, W.grad


def fused(h, W, labels, ids, top, tail, V, kd_w, ce_w, chunk=8, softcap=None, scale=0.37, **opts):
    h = h.detach().clone().requires_grad_(True)
    W = W.detach().clone().requires_grad_(True)
    kd, ce = fused_head_loss(h, W, labels, ids, top, tail, vocab=V, kd_weight=kd_w, ce_weight=ce_w,
                             chunk_size=chunk, softcap=softcap, **opts)
    ((kd_w * kd + ce_w * ce) * scale).backward()  # any overall scale (the token normaliser) is free
    return kd.detach(), ce.detach(), h.grad / scale, W.grad / scale


def close(a, b, tol=2e-5):
    return torch.allclose(a.double(), b.double(), rtol=tol, atol=tol * max(1.0, float(b.double().abs().max())))


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_every_divergence_matches_dense(name, temperature):
    h, W, labels, ids, top, tail = problem(seed=hash(name) % 1000)
    opts = dict(divergences={name: 1.0}, temperature=temperature, beta=0.3, alpha=0.2)
    got = fused(h, W, labels, ids, top, tail, 40, 1.0, 0.5, **opts)
    ref = dense_reference(h, W, labels, ids, top, tail, 40, 1.0, 0.5, **opts)
    for a, b, what in zip(got, ref, ("kd", "ce", "grad_h", "grad_W")):
        assert close(a, b), (what, float((a - b).abs().max()))
    assert torch.equal(got[3][40:], torch.zeros(8, 12)), "padded vocabulary rows get no gradient"
    # against float64 logits: the float32 fused loss is within float32 rounding of the exact one
    ref64 = dense_reference(h, W, labels, ids, top, tail, 40, 1.0, 0.5, dtype=torch.float64, **opts)
    for a, b, what in zip(got, ref64, ("kd", "ce", "grad_h", "grad_W")):
        assert close(a, b, 1e-4), (what, float((a - b).abs().max()))


@pytest.mark.parametrize("case", ["mixed", "renormalized", "kd_topk", "ce_only", "kd_only", "full_k", "softcap",
                                  "minus_inf_teacher", "one_chunk", "peaked"])
def test_options_match_dense(case):
    h, W, labels, ids, top, tail = problem(K=40 if case == "full_k" else 6, scale=30.0 if case == "peaked" else 2.0)
    kd_w, ce_w, chunk, softcap = 0.7, 1.3, 5, None
    opts = {"divergences": {"forward_kl": 0.5, "jsd": 1.0, "tvd": 0.25}, "temperature": 1.5}
    if case == "renormalized":
        opts["renormalized_topk"] = True
    if case == "kd_topk":  # what StudentLoss does with kd_topk before the loss
        ids, top, tail = restrict_topk(ids, top, tail, 2)
    if case == "ce_only":
        ids = top = tail = None
        kd_w = 0.0
    if case == "kd_only":
        ce_w = 0.0
    if case == "softcap":
        softcap = 3.0
    if case == "minus_inf_teacher":
        top = top.clone()
        top[:, -1] = float("-inf")
        tail = tail.clone()
        tail[:3] = float("-inf")
        opts["divergences"] = {"reverse_kl": 1.0, "skew_reverse_kl": 0.5}
    if case == "one_chunk":
        chunk = 1000
    got = fused(h, W, labels, ids, top, tail, 40, kd_w, ce_w, chunk=chunk, softcap=softcap, **opts)
    ref = dense_reference(h, W, labels, ids, top, tail, 40, kd_w, ce_w, softcap=softcap, **opts)
    for a, b, what in zip(got, ref, ("kd", "ce", "grad_h", "grad_W")):
        assert torch.isfinite(a).all(), what
        assert close(a, b), (case, what, float((a - b).abs().max()))


def test_repeated_topk_ids_match_dense():
    """A position whose top-k holds the same id twice (vLLM can emit the sampled token twice)."""
    h, W, labels, ids, top, tail = problem()
    ids = ids.clone()
    ids[:, 3] = ids[:, 1]
    got = fused(h, W, labels, ids, top, tail, 40, 1.0, 1.0)
    ref = dense_reference(h, W, labels, ids, top, tail, 40, 1.0, 1.0)
    for a, b, what in zip(got, ref, ("kd", "ce", "grad_h", "grad_W")):
        assert close(a, b), (what, float((a - b).abs().max()))


def test_another_weight_ratio_is_refused_and_no_grad_computes_values():
    h, W, labels, ids, top, tail = problem()
    hh = h.clone().requires_grad_(True)
    kd, ce = fused_head_loss(hh, W, labels, ids, top, tail, vocab=40, kd_weight=1.0, ce_weight=1.0)
    with pytest.raises(RuntimeError, match="weights the KD and CE sums"):
        (kd + 2 * ce).backward()
    with torch.no_grad():
        kd0, ce0 = fused_head_loss(h, W, labels, ids, top, tail, vocab=40, kd_weight=1.0, ce_weight=1.0)
    ref = dense_reference(h, W, labels, ids, top, tail, 40, 1.0, 1.0)
    assert close(kd0, ref[0]) and close(ce0, ref[1])


def test_frozen_head_and_bf16_autocast():
    """A frozen head (LoRA elsewhere) gets no gradient buffer; under bf16 autocast the matmuls run in bf16 and
    the result stays close to float32."""
    h, W, labels, ids, top, tail = problem()
    hh = h.clone().requires_grad_(True)
    kd, ce = fused_head_loss(hh, W, labels, ids, top, tail, vocab=40, kd_weight=1.0, ce_weight=1.0)
    (kd + ce).backward()
    ref = dense_reference(h, W, labels, ids, top, tail, 40, 1.0, 1.0)
    assert W.grad is None and close(hh.grad, ref[2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(h, W, labels, ids, top, tail, 40, 1.0, 1.0)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=0.05, atol=0.05 * float(b.abs().max()))
