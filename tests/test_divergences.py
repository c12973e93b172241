"""The divergence family on top-k + tail buckets, against independent dense float64 references."""

import pytest
import torch

from llm_distill.losses import (DIVERGENCES, buckets, divergence, kd_per_token, restrict_topk, student_buckets,
                                student_logprobs, token_losses)


def teacher_buckets(logits, k):
    lp = torch.log_softmax(logits.double(), -1)
    top, ids = lp.topk(k, -1)
    return ids, top.float(), lp.scatter(-1, ids, float("-inf")).logsumexp(-1).float()


def dense(name, lp, lq, beta=0.5, alpha=0.1):
    """Textbook definitions on full float64 distributions (no shared code with the library)."""
    p, q = lp.exp(), lq.exp()

    def kl(a, b):
        return (a * (a.log() - b.log())).nan_to_num(0.0).sum(-1)

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_reverse_kl":
        return kl(q, (1 - alpha) * p + alpha * q)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "confidence_kl":
        c = p.max(-1).values
        return c * kl(p, q) + (1 - c) * kl(q, (1 - alpha) * p + alpha * q)
    raise ValueError(name)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_nonnegative_zero_on_identical_and_bounded_by_dense(name):
    torch.manual_seed(0)
    t, s = torch.randn(64, 40) * 2, torch.randn(64, 40) * 2
    full = dense(name, torch.log_softmax(t.double(), -1), torch.log_softmax(s.double(), -1))
    for k in (1, 5, 39):
        ids, t_top, t_tail = teacher_buckets(t, k)
        d = divergence(name, buckets(t_top, t_tail), buckets(*student_buckets(s, ids)))
        assert (d >= -1e-6).all()
        assert (d <= full.float() + 1e-5).all(), "bucketed divergence is a lower bound of the dense one"
        same = divergence(name, buckets(t_top, t_tail), buckets(*student_buckets(t, ids)))
        assert torch.allclose(same, torch.zeros_like(same), atol=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("beta,alpha", [(0.5, 0.1), (0.1, 0.5), (0.9, 0.9)])
def test_full_k_equals_dense_and_gradients_match_autograd(name, beta, alpha):
    torch.manual_seed(1)
    V = 24
    t = torch.randn(8, V) * 2
    s = (torch.randn(8, V) * 2).double().requires_grad_(True)
    ids, t_top, t_tail = teacher_buckets(t, V)
    d = divergence(name, buckets(t_top, t_tail), buckets(*student_buckets(s, ids)), beta=beta, alpha=alpha)
    s2 = s.detach().clone().requires_grad_(True)
    ref = dense(name, torch.log_softmax(t.double(), -1), torch.log_softmax(s2, -1), beta, alpha)
    assert torch.allclose(d.double(), ref, atol=1e-5)
    d.sum().backward()
    ref.sum().backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-4)


def test_beta_and_alpha_limits():
    torch.manual_seed(2)
    t, s = torch.randn(16, 30), torch.randn(16, 30)
    ids, t_top, t_tail = teacher_buckets(t, 6)
    P, Q = buckets(t_top, t_tail), buckets(*student_buckets(s, ids))
    fwd, rev = divergence("forward_kl", P, Q), divergence("reverse_kl", P, Q)
    assert torch.allclose(divergence("jsd", P, Q, beta=0.0), fwd)
    assert torch.allclose(divergence("jsd", P, Q, beta=1.0), rev)
    assert torch.allclose(divergence("skew_kl", P, Q, alpha=0.0), fwd, atol=1e-6)
    assert torch.allclose(divergence("skew_reverse_kl", P, Q, alpha=0.0), rev, atol=1e-6)
    assert torch.allclose(divergence("skew_kl", P, Q, alpha=1.0), torch.zeros(16))
    # close to the ends the mixture forms approach 0 smoothly (GKD's JSD is not continuous at 0 and 1 by definition)
    assert (divergence("jsd", P, Q, beta=1e-4) < 1e-3 * fwd + 1e-6).all()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_minus_inf_teacher_entries_stay_finite(name):
    z = torch.randn(4, 12, requires_grad=True)
    ids, t_top, t_tail = teacher_buckets(torch.randn(4, 12), 4)
    t_top[:, -1] = float("-inf")
    t_tail[0] = float("-inf")
    d = divergence(name, buckets(t_top, t_tail), buckets(*student_buckets(z, ids)))
    d.sum().backward()
    assert torch.isfinite(d).all() and torch.isfinite(z.grad).all()


def test_temperature_is_exact_inside_the_topk_and_scaled_by_t_squared():
    """With no tail (k = V), bucket-level tempering is full-vocabulary tempering."""
    torch.manual_seed(3)
    V, T = 20, 2.5
    t, s = torch.randn(8, V) * 3, torch.randn(8, V) * 3
    ids, t_top, t_tail = teacher_buckets(t, V)
    got = kd_per_token(*student_buckets(s, ids), t_top, t_tail, temperature=T)
    ref = dense("forward_kl", torch.log_softmax(t.double() / T, -1), torch.log_softmax(s.double() / T, -1))
    assert torch.allclose(got.double(), T ** 2 * ref, atol=1e-5)


def test_renormalized_topk_ignores_the_tail_and_tail_aware_does_not():
    """A student matching the teacher's top-k ratios but with far more tail mass: the renormalised loss
    calls it perfect, the tail-aware loss does not."""
    t_top = torch.log(torch.tensor([[0.5, 0.3, 0.1]]))
    t_tail = torch.log(torch.tensor([0.1]))
    s_top = torch.log(torch.tensor([[0.25, 0.15, 0.05]]))
    s_tail = torch.log(torch.tensor([0.55]))
    renorm = kd_per_token(s_top, s_tail, t_top, t_tail, renormalized_topk=True)
    aware = kd_per_token(s_top, s_tail, t_top, t_tail)
    assert abs(float(renorm)) < 1e-6 and float(aware) > 0.1


def test_restrict_topk_moves_mass_to_the_tail_exactly():
    z = torch.randn(5, 30)
    ids, top, tail = teacher_buckets(z, 10)
    ids3, top3, tail3 = restrict_topk(ids, top, tail, 3)
    ref_ids, ref_top, ref_tail = teacher_buckets(z, 3)
    assert torch.equal(ids3, ref_ids) and torch.allclose(top3, ref_top)
    assert torch.allclose(tail3, ref_tail, atol=1e-6)


def test_chunked_equals_unchunked_values_and_gradients():
    torch.manual_seed(4)
    N, d, V, Vpad, k = 37, 16, 50, 64, 5
    h = torch.randn(N, d, requires_grad=True)
    W = torch.randn(Vpad, d, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    ids, t_top, t_tail = teacher_buckets(torch.randn(N, V), k)
    lab, s_top, s_tail = student_logprobs(h, W, labels, ids, vocab=V, chunk_size=8)
    loss = kd_per_token(s_top, s_tail, t_top, t_tail, divergences={"jsd": 1.0, "tvd": 0.5}).sum() - lab.sum()
    loss.backward()
    h2, W2 = h.detach().clone().requires_grad_(True), W.detach().clone().requires_grad_(True)
    z = h2 @ W2[:V].T  # dense logits, padded rows sliced away
    s_top2, s_tail2 = student_buckets(z, ids)
    lab2 = torch.log_softmax(z, -1).gather(-1, labels[:, None]).squeeze(-1)
    loss2 = kd_per_token(s_top2, s_tail2, t_top, t_tail, divergences={"jsd": 1.0, "tvd": 0.5}).sum() - lab2.sum()
    loss2.backward()
    assert torch.allclose(loss, loss2, atol=1e-6, rtol=1e-6)
    assert torch.allclose(h.grad, h2.grad, atol=1e-6) and torch.allclose(W.grad, W2.grad, atol=1e-6)
    assert torch.equal(W.grad[V:], torch.zeros(Vpad - V, d)), "padded vocabulary rows get no gradient"


def test_student_buckets_sum_to_one():
    z = torch.randn(10, 25) * 4
    top, tail = student_buckets(z, torch.randperm(25)[:6].expand(10, 6))
    total = top.exp().sum(-1) + tail.exp()
    assert torch.allclose(total, torch.ones(10), atol=1e-5)


def test_token_losses_only_count_labelled_positions():
    torch.manual_seed(4)
    B, T, V, k = 2, 6, 15, 4
    logits = torch.randn(B, T, V)
    labels = torch.full((B, T), -100)
    labels[0, 2:4] = torch.tensor([1, 2])
    labels[1, 1:2] = torch.tensor([3])
    ids, top, tail = teacher_buckets(logits.reshape(-1, V), k)
    kd, ce, n = token_losses(logits, labels, ids.view(B, T, k), top.view(B, T, k), tail.view(B, T), 1.0, 1.0)
    assert n == 3
    assert abs(float(kd)) < 1e-5  # teacher == student at labelled positions
    ref = torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100], reduction="sum")
    assert torch.allclose(ce, ref)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_float16_rounded_teacher_buckets_are_renormalised(name):
    """Stored float16 top-k logprobs plus a float32 tail need not sum to 1: each divergence must still be >= 0,
    0 for the student that equals the (normalised) teacher, and its gradient must vanish there (unnormalised,
    forward KL's gradient is (sum P) Q - P there)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 40, generator=g, dtype=torch.float64) * 3
    ids, top, tail = teacher_buckets(logits, 8)
    top = top + torch.where(torch.arange(8) == 0, 2e-3, 0.0)  # as if the top-1 rounded up: buckets sum past 1
    assert float(buckets(top, tail).exp().sum(-1).min()) > 1.0
    t = buckets(top, tail)
    t = t - t.logsumexp(-1, keepdim=True)  # the normalised teacher
    z = t.clone().requires_grad_(True)  # the student's bucket logits (N, k + 1)
    s = torch.log_softmax(z, -1)
    d = kd_per_token(s[:, :8], s[:, 8], top, tail, divergences={name: 1.0})
    assert float(d.min()) >= -1e-6
    assert float(d.abs().max()) < 1e-5
    if name != "tvd":  # |P - Q| has no gradient at P = Q
        d.sum().backward()
        assert float(z.grad.abs().max()) < 1e-5
