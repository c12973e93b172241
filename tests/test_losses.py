"""Loss properties against dense float64 references."""

import torch

from llm_distill.losses import forward_kl, student_buckets, token_losses


def teacher_buckets(logits: torch.Tensor, k: int):
    lp = torch.log_softmax(logits.double(), -1)
    top, ids = lp.topk(k, -1)
    tail = lp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, top.float(), tail.float()


def test_identical_distributions_give_zero():
    torch.manual_seed(0)
    z = torch.randn(32, 50) * 3
    ids, t_top, t_tail = teacher_buckets(z, 5)
    s_top, s_tail = student_buckets(z, ids)
    kl = forward_kl(s_top, s_tail, t_top, t_tail)
    assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-6)


def test_nonnegative_and_below_dense_kl():
    torch.manual_seed(1)
    t, s = torch.randn(64, 40) * 2, torch.randn(64, 40) * 2
    dense = torch.nn.functional.kl_div(torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1),
                                       log_target=True, reduction="none").sum(-1)
    for k in (1, 3, 10, 39):
        ids, t_top, t_tail = teacher_buckets(t, k)
        kl = forward_kl(*student_buckets(s, ids), t_top, t_tail)
        assert (kl >= -1e-6).all()
        assert (kl <= dense.float() + 1e-5).all(), "bucketed KL is a lower bound of the full-vocabulary KL"


def test_full_k_equals_dense_kl_float64():
    torch.manual_seed(2)
    V = 30
    t, s = torch.randn(16, V) * 2, torch.randn(16, V) * 2
    ids, t_top, t_tail = teacher_buckets(t, V)
    assert torch.isinf(t_tail).all()
    kl = forward_kl(*student_buckets(s, ids), t_top, t_tail)
    p = torch.softmax(t.double(), -1)
    dense = (p * (torch.log_softmax(t.double(), -1) - torch.log_softmax(s.double(), -1))).sum(-1)
    assert torch.allclose(kl.double(), dense, atol=1e-5)


def test_gradient_matches_dense_autograd_at_full_k():
    torch.manual_seed(3)
    V = 20
    t = torch.randn(8, V)
    s = torch.randn(8, V, dtype=torch.float64, requires_grad=True)
    ids, t_top, t_tail = teacher_buckets(t, V)
    forward_kl(*student_buckets(s, ids), t_top, t_tail).sum().backward()
    s2 = s.detach().clone().requires_grad_(True)
    p = torch.softmax(t.double(), -1)
    (p * (torch.log(p) - torch.log_softmax(s2, -1))).sum().backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-5)  # d/dz = softmax(z) - p


def test_student_buckets_sum_to_one():
    z = torch.randn(10, 25) * 4
    ids = torch.randint(0, 25, (10, 1)).expand(10, 1)
    top, tail = student_buckets(z, torch.randperm(25)[:6].expand(10, 6))
    total = top.exp().sum(-1) + tail.exp()
    assert torch.allclose(total, torch.ones(10), atol=1e-5)


def test_teacher_minus_inf_entries_are_handled():
    """vLLM can return -inf logprobs; they are zero-probability buckets, not NaN."""
    z = torch.randn(4, 12, requires_grad=True)
    ids, t_top, t_tail = teacher_buckets(torch.randn(4, 12), 4)
    t_top[:, -1] = float("-inf")
    kl = forward_kl(*student_buckets(z, ids), t_top, t_tail)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(z.grad).all()


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
