"""Sequence-level objectives as pure functions: MiniLLM's surrogate against exact gradients of the sequence
reverse KL (all sequences enumerated), and the teacher-ensemble combination against a hand-computed case."""

import itertools
import math

import pytest
import torch

from llm_distill.ensemble import combine_topk
from llm_distill.losses import minillm_surrogate

V, L = 3, 2  # vocabulary and sequence length of the toy autoregressive models


def _toy(seed: int):
    """Student logits (with grad) and teacher logits of a 2-token autoregressive model: position 0 has its own
    logits, position 1 depends on token 0."""
    g = torch.Generator().manual_seed(seed)
    student = [torch.randn(V, generator=g, dtype=torch.float64).requires_grad_(),
               torch.randn(V, V, generator=g, dtype=torch.float64).requires_grad_()]
    teacher = [torch.randn(V, generator=g, dtype=torch.float64), torch.randn(V, V, generator=g, dtype=torch.float64)]
    return student, teacher


def _per_token(logits, seqs):
    """(S, L) log-probabilities of every sequence's tokens, and (S, L) per-position full-vocab log-softmax rows."""
    first = torch.log_softmax(logits[0], -1)  # (V,)
    second = torch.log_softmax(logits[1], -1)  # (V, V): row = token 0
    lp = torch.stack([torch.stack([first[a], second[a, b]]) for a, b in seqs])  # (S, L)
    rows = [[first, second[a]] for a, _ in seqs]
    return lp, rows


def _reverse_kl(rows_q, rows_p):
    return torch.stack([torch.stack([(q.exp() * (q - p)).sum() for q, p in zip(rq, rp)])
                        for rq, rp in zip(rows_q, rows_p)])  # (S, L)


@pytest.mark.parametrize("single_step", [False, True])
def test_minillm_surrogate_is_an_unbiased_reverse_kl_gradient(single_step):
    """E_{y~q}[∇ Σ_t surrogate_t] (every sequence, weighted by q(y)) equals autograd's ∇ KL(q ‖ p) of the sequence
    distributions, with and without the single-step decomposition."""
    student, teacher = _toy(0)
    seqs = list(itertools.product(range(V), repeat=L))
    q_lp, q_rows = _per_token(student, seqs)
    p_lp, p_rows = _per_token(teacher, seqs)
    q_seq = q_lp.sum(-1)
    dense = (q_seq.exp() * (q_seq - p_lp.sum(-1))).sum()  # KL(q ‖ p) over all V^L sequences
    want = torch.autograd.grad(dense, student, retain_graph=True)

    mask = torch.ones(len(seqs), L, dtype=torch.bool)
    single = _reverse_kl(q_rows, p_rows) if single_step else None
    surrogate = minillm_surrogate(q_lp, p_lp, q_lp.detach(), mask, single, length_norm=False)  # (S, L)
    expected = (q_seq.detach().exp()[:, None] * surrogate).sum()  # the REINFORCE expectation, exactly
    got = torch.autograd.grad(expected, student)
    for w, g in zip(want, got):
        assert torch.allclose(g, w, atol=1e-12), (g, w)


def test_minillm_teacher_mixed_sampling_reweights_to_the_same_gradient():
    """Sampling one token from π = α p + (1 - α) q with weight q / π gives ∇ KL(q ‖ p) exactly (one position)."""
    student, teacher = _toy(1)
    alpha = 0.3
    q = torch.log_softmax(student[0], -1)  # (V,)
    p = torch.log_softmax(teacher[0], -1)
    want = torch.autograd.grad((q.exp() * (q - p)).sum(), student[0], retain_graph=True)[0]
    pi = torch.logaddexp(math.log(alpha) + p, math.log(1 - alpha) + q.detach())  # (V,)
    surrogate = minillm_surrogate(q[:, None], p[:, None], pi[:, None], torch.ones(V, 1, dtype=torch.bool))  # (V, 1)
    got = torch.autograd.grad((pi.exp()[:, None] * surrogate).sum(), student[0])[0]
    assert torch.allclose(got, want, atol=1e-12)


def test_minillm_surrogate_values_by_hand():
    """Length normalisation, importance weights and the mask on a 3-token row and a 2-token row (hand-computed)."""
    q = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]], dtype=torch.float64)  # (B, C) log q of the tokens
    p = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -1.7, 0.0]], dtype=torch.float64)
    pi = torch.tensor([[-1.0, -2.0, -1.0], [-0.3, -0.7, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    r = [[-0.5, 1.0, 0.0], [0.1, -1.0]]  # log p - log q
    w = [[1.0, 1.0, math.exp(0.5)], [1.0, 1.0]]
    out = minillm_surrogate(q, p, pi, mask, length_norm=True)
    for b, row in enumerate(r):
        for t in range(len(row)):
            mean_to_go = sum(row[t:]) / len(row[t:])
            assert out[b, t].item() == pytest.approx(-w[b][t] * mean_to_go * q[b, t].item())
    assert out[1, 2] == 0
    kl = torch.full((2, 3), 0.25, dtype=torch.float64)
    out = minillm_surrogate(q, p, pi, mask, kl, length_norm=False)  # future rewards only, plus w * KL_t
    for b, row in enumerate(r):
        for t in range(len(row)):
            assert out[b, t].item() == pytest.approx(-w[b][t] * sum(row[t + 1:]) * q[b, t].item() + w[b][t] * 0.25)


def test_combine_topk_by_hand():
    """Teacher A: {0: .5, 1: .3}, tail .2; teacher B: {1: .6, 2: .2}, tail .2. Mean on the union, unknown entries
    left in each tail: {1: .45, 0: .25, 2: .10}, tail .20; keep the top 2 -> {1: .45, 0: .25}, tail .30."""
    ids = [torch.tensor([[0, 1]]), torch.tensor([[1, 2]])]
    lps = [torch.tensor([[0.5, 0.3]]).log(), torch.tensor([[0.6, 0.2]]).log()]
    tails = [torch.tensor([0.2]).log(), torch.tensor([0.2]).log()]
    out_ids, out_lp, tail = combine_topk(ids, lps, tails, 2)
    assert out_ids.tolist() == [[1, 0]]
    assert out_lp.exp().tolist()[0] == pytest.approx([0.45, 0.25])
    assert tail.exp().item() == pytest.approx(0.30)
    # Teachers with different k, k = 3, and a teacher with an empty tail (k = V): still a distribution.
    ids = [torch.tensor([[2, 0, 1]]), torch.tensor([[2]])]
    lps = [torch.tensor([[0.7, 0.2, 0.1]]).log(), torch.tensor([[0.9]]).log()]
    tails = [torch.tensor([float("-inf")]), torch.tensor([0.1]).log()]
    out_ids, out_lp, tail = combine_topk(ids, lps, tails, 3)
    assert out_ids.tolist() == [[2, 0, 1]]
    assert out_lp.exp().tolist()[0] == pytest.approx([0.8, 0.1, 0.05])
    assert tail.exp().item() == pytest.approx(0.05)
    with pytest.raises(ValueError):
        combine_topk(ids, lps, tails, 4)
