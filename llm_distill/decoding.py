"""Decoding, scoring and sampling with a transformers model in this process, and the teacher backend built on them.

    decode_batch        batched KV-cached generation capturing raw top-k logprobs (generate, evaluate, on-policy)
    score_batch         raw top-k logprobs of given completions by one forward pass (score, on-policy teacher)
    sample_mixture      sampling from a mixture of student and teacher (MiniLLM's on-policy samples)
    TransformersBackend the `teacher.TeacherBackend` on these functions (`backend: transformers`)

Sampling is by inverse CDF with one uniform per row and step from a seed of (seed, prompt id, sample), so a
row's draws do not depend on batching, order, resume or shard (see `generate` for what is reproducible).
"""

from __future__ import annotations

import inspect
import math

import torch

from .chunks import crash_point
from .models import context_length, eos_ids, load_model, load_tokenizer, resolve_device, resolve_dtype
from .teacher import Completion, check_logprobs, sample_seed
from .validate import check_model_dir


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Next token per row from (B, V) logits with one shared generator (evaluate's sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_inverse_cdf(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """Next token per row from (B, V) logits and one uniform per row u (B,): the inverse CDF of the tempered,
    nucleus-cut distribution over ids sorted by probability (stable sort, so ties break the same way always)."""
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    if top_p < 1.0:
        sorted_p = sorted_p * (sorted_p.cumsum(-1) - sorted_p < top_p)  # always keeps the most likely token
    cdf = sorted_p.double().cumsum(-1)  # (B, V); float64 so the cut points do not drift at large V
    target = (u.double() * cdf[:, -1])[:, None]  # (B, 1), strictly below the total mass
    j = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
    return order.gather(-1, j).squeeze(-1)


def accepts(model, name: str) -> bool:
    """Whether the model's forward takes argument `name` (transformers versions differ)."""
    return name in inspect.signature(model.forward).parameters


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument: `cache` in newer transformers 5.x, `past_key_values` before."""
    return "cache" if accepts(model, "cache") else "past_key_values"


def left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L) input ids, attention mask and position ids of left-padded prompts (every row ends at column L-1)."""
    B, L = len(prompt_ids), max(len(p) for p in prompt_ids)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    for i, p in enumerate(prompt_ids):  # left padding: every row's last token is at the last column
        input_ids[i, L - len(p):] = torch.tensor(p)
        attn[i, L - len(p):] = 1
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    return input_ids.to(device), attn.to(device), position_ids.to(device)


def topk_tail(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, V) raw logprobs -> top-k logprobs (N, k) descending, their ids (N, k), exact tail (N,)."""
    top_lp, top_ids = logprobs.topk(k, dim=-1)
    # Exact tail: logsumexp of everything outside the top-k (not 1 - sum, which cancels badly).
    tail = logprobs.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    return top_lp, top_ids, tail


@torch.no_grad()
def decode_batch(model, prompt_ids: list[list[int]], *, pad_id: int, stop_ids: list[int], vocab_size: int,
                 max_new_tokens: int, k: int, temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, row_seeds: list[int] | None = None) -> list[Completion]:
    """Generate for a batch of token-id prompts, capturing raw top-k logprobs at every completion position.

    Sampling (temperature > 0) uses `row_seeds` (one per row: per-row uniforms, batching-independent) when given,
    else `generator` (one stream for the whole batch).
    """
    device = next(model.parameters()).device
    B = len(prompt_ids)
    input_ids, attn, position_ids = left_pad(prompt_ids, pad_id, device)
    stop = torch.tensor(stop_ids, device=device)
    k = min(k, vocab_size)
    uniforms = None
    if temperature > 0 and row_seeds is not None:
        uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s),
                                           dtype=torch.float64) for s in row_seeds]).to(device)  # (B, S)

    cache_arg = cache_kwarg(model)
    # Only the last position's logits are needed from the prompt pass: (B, L, V) would not fit at real V.
    keep = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=True, **keep)
    past, logits = getattr(out, cache_arg), out.logits[:, -1, :vocab_size]  # (B, V): padded vocab rows dropped
    pos = position_ids[:, -1:]  # (B, 1)
    finished_ = torch.zeros(B, dtype=torch.bool, device=device)
    steps = []  # per step: (token (B,), topk ids (B,k), topk lp (B,k), token lp (B,), tail (B,), done (B,))
    for t in range(max_new_tokens):
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V) raw, T=1
        if temperature == 0 or uniforms is None:
            token = sample_top_p(logits.float(), temperature, top_p, generator)
        else:
            token = sample_inverse_cdf(logits.float(), temperature, top_p, uniforms[:, t])
        token = torch.where(finished_, torch.full_like(token, pad_id), token)
        top_lp, top_ids, tail = topk_tail(logprobs, k)
        tok_lp = logprobs.gather(-1, token.clamp(max=vocab_size - 1)[:, None]).squeeze(-1)
        steps.append((token, top_ids, top_lp, tok_lp, tail, finished_.clone()))
        finished_ |= torch.isin(token, stop)
        if bool(finished_.all()):
            break
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=1)
        pos = pos + 1
        out = model(input_ids=token[:, None], attention_mask=attn, position_ids=pos, use_cache=True,
                    **{cache_arg: past})
        past, logits = getattr(out, cache_arg), out.logits[:, -1, :vocab_size]

    tokens = torch.stack([s[0] for s in steps], 1).cpu()  # (B, S)
    top_ids = torch.stack([s[1] for s in steps], 1).cpu()  # (B, S, k)
    top_lp = torch.stack([s[2] for s in steps], 1).cpu()  # (B, S, k)
    tok_lp = torch.stack([s[3] for s in steps], 1).cpu()  # (B, S)
    tails = torch.stack([s[4] for s in steps], 1).cpu()  # (B, S)
    done_before = torch.stack([s[5] for s in steps], 1).cpu()  # (B, S): row had already stopped
    results = []
    for i in range(B):
        n = int((~done_before[i]).sum())
        ids = tokens[i, :n].tolist()
        stopped = bool(n > 0 and ids[-1] in stop_ids)
        results.append(Completion(ids, top_ids[i, :n], top_lp[i, :n], tok_lp[i, :n], tails[i, :n],
                                  "stop" if stopped else "length"))
    return results


@torch.no_grad()
def score_batch(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], *, pad_id: int,
                vocab_size: int, k: int) -> list[Completion]:
    """Raw top-k logprobs of given completions by one forward pass (the values `decode_batch` would store)."""
    device = next(model.parameters()).device
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
    input_ids, attn, position_ids = left_pad(seqs, pad_id, device)
    k = min(k, vocab_size)
    c_max = max(len(c) for c in completion_ids)
    # Left padding puts every completion at the end, so only the last c_max + 1 positions need logits.
    keep = {"logits_to_keep": c_max + 1} if accepts(model, "logits_to_keep") else {}
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, **keep).logits
    logits = logits[:, -(c_max + 1):-1, :vocab_size]  # (B, c_max, V): column j predicts the token after it
    results = []
    for i, c in enumerate(completion_ids):
        logprobs = torch.log_softmax(logits[i, c_max - len(c):].float(), dim=-1)  # (C, V)
        top_lp, top_ids, tail = topk_tail(logprobs, k)
        tok_lp = logprobs.gather(-1, torch.tensor(c, device=device)[:, None]).squeeze(-1)  # (C,)
        results.append(Completion(list(c), top_ids.cpu(), top_lp.cpu(), tok_lp.cpu(), tail.cpu(), "given"))
    return results


_batches_done = 0


def _count_batch() -> None:
    global _batches_done
    _batches_done += 1
    crash_point(f"batch:{_batches_done}")  # test hook: die mid-chunk, after this process's N-th batch


class TransformersBackend:
    """Teacher on `transformers`: batched generation and scoring with raw top-k logprobs.

    The vLLM backend (vllm_backend.py) offers the same `generate` and `score` and returns the same `Completion`s.
    """

    name = "transformers"

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto", k: int = 20, num_samples: int = 1,
                 temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256, seed: int = 0,
                 batch_size: int = 16, tokenizer=None):
        import transformers

        check_model_dir(model, "teacher")  # config.json and whole weight files, before anything is loaded
        self.device = resolve_device(device)
        self.tokenizer = tokenizer or load_tokenizer(model)
        self.model = load_model(model, self.device, resolve_dtype(dtype, self.device))
        self.version = transformers.__version__
        self.revision = getattr(self.model.config, "_commit_hash", None)
        self.k, self.n, self.temperature, self.top_p = k, num_samples, temperature, top_p
        self.max_new_tokens, self.seed, self.batch_size = max_new_tokens, seed, batch_size
        self.vocab_size = len(self.tokenizer)
        self.stop_ids = eos_ids(self.model, self.tokenizer)

    def context_length(self) -> int | None:
        return context_length(self.model)

    def close(self) -> None:
        self.model = None  # frees the weights (the GPU memory with them) when nothing else holds the model

    def generate(self, prompt_ids: list[list[int]], prompt_keys: list[str] | None = None,
                 progress=None) -> list[list[Completion]]:
        """`n` completions per prompt. `prompt_keys` (the prompt ids) seed the sampling, so a prompt's samples do
        not depend on which other prompts share its batch. `progress(sequences, tokens)` is called per batch."""
        keys = prompt_keys or [str(i) for i in range(len(prompt_ids))]
        # Longest first: similar lengths share a batch (little padding) and an OOM shows up at once.
        order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
        jobs = [(i, s) for i in order for s in range(self.n)]
        results: list[list] = [[None] * self.n for _ in prompt_ids]
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start:start + self.batch_size]
            seeds = [sample_seed(self.seed, keys[i], s) for i, s in batch]
            outs = decode_batch(self.model, [prompt_ids[i] for i, _ in batch], pad_id=self.tokenizer.pad_token_id,
                                stop_ids=self.stop_ids, vocab_size=self.vocab_size,
                                max_new_tokens=self.max_new_tokens, k=self.k, temperature=self.temperature,
                                top_p=self.top_p, row_seeds=seeds)
            for (i, s), c in zip(batch, outs):
                check_logprobs(c, f"prompt {keys[i]!r} sample {s}")
                results[i][s] = c
            _count_batch()
            if progress:
                progress(len(batch), sum(len(c.token_ids) for c in outs))
        return results

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], prompt_keys: list[str] | None = None,
              progress=None) -> list[Completion]:
        """Top-k logprobs of the given completions (teacher forcing), batched by length."""
        keys = prompt_keys or [str(i) for i in range(len(prompt_ids))]
        order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]) - len(completion_ids[i]), i))
        results: list = [None] * len(prompt_ids)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            outs = score_batch(self.model, [prompt_ids[i] for i in idx], [completion_ids[i] for i in idx],
                               pad_id=self.tokenizer.pad_token_id, vocab_size=self.vocab_size, k=self.k)
            for i, c in zip(idx, outs):
                check_logprobs(c, f"row {keys[i]!r}")
                results[i] = c
            _count_batch()
            if progress:
                progress(len(idx), sum(len(c.token_ids) for c in outs))
        return results


@torch.no_grad()
def sample_mixture(student, teacher, prompt_ids: list[list[int]], *, pad_id: int, stop_ids: list[int], vocab: int,
                   max_new_tokens: int, temperature: float, alpha: float, row_seeds: list[int]):
    """Sample from π = α·p_teacher + (1 - α)·q_student, both tempered, one KV-cached decode loop per model.

    Each row draws one uniform per step from its own seed (batching-independent, as `decode_batch` does).
    Returns per row (token ids, log π of each token); with α = 0 the teacher is not run.
    """
    device = next(student.parameters()).device
    B = len(prompt_ids)
    input_ids, attn, pos = left_pad(prompt_ids, pad_id, device)
    uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s),
                                       dtype=torch.float64) for s in row_seeds]).to(device)  # (B, S)
    models = [student] + ([teacher] if alpha > 0 else [])
    state = []  # per model: [cache argument name, cache, last logits (B, V)]
    for m in models:
        keep = {"logits_to_keep": 1} if accepts(m, "logits_to_keep") else {}
        out = m(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True, **keep)
        arg = cache_kwarg(m)
        state.append([arg, getattr(out, arg), out.logits[:, -1, :vocab].float()])
    pos = pos[:, -1:]  # (B, 1)
    stop = torch.tensor(stop_ids, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logps, alive = [], [], []
    for t in range(max_new_tokens):
        log_pi = torch.log_softmax(state[0][2] / temperature, -1)  # (B, V)
        if alpha > 0:
            log_pi = torch.logaddexp(math.log1p(-alpha) + log_pi,
                                     math.log(alpha) + torch.log_softmax(state[1][2] / temperature, -1))
        token = sample_inverse_cdf(log_pi, 1.0, 1.0, uniforms[:, t])  # softmax(log π) = π
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        logps.append(log_pi.gather(-1, token.clamp(max=vocab - 1)[:, None]).squeeze(-1))
        alive.append(~done)
        done = done | torch.isin(token, stop)
        if bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=1)
        pos = pos + 1
        for m, st in zip(models, state):
            out = m(input_ids=token[:, None], attention_mask=attn, position_ids=pos, use_cache=True, **{st[0]: st[1]})
            st[1], st[2] = getattr(out, st[0]), out.logits[:, -1, :vocab].float()
    tok, lp, live = (torch.stack(x, 1).cpu() for x in (tokens, logps, alive))  # (B, S) each
    return [(tok[i, live[i]].tolist(), lp[i, live[i]].tolist()) for i in range(B)]
