"""Teacher generation: completions plus per-position raw top-k logprobs into a `datasets` directory.

    llm-distill generate recipes/tiny/generate.yaml model=data/tiny_task/teacher output_dir=runs/teacher_data

The transformers backend runs its own batched decode loop (left padding, KV cache) so that every step's raw
logits (log-softmax at T=1, before temperature or top-p, like vLLM's `raw_logprobs`) are reduced to top-k on the
fly: nothing of size (steps, vocab) is kept.
"""

from __future__ import annotations

import datetime
import inspect
import json
import time
from dataclasses import dataclass

import torch

from . import __version__
from .config import GenerateConfig, config_to_dict
from .data import (PROVENANCE_FILE, SCHEMA_VERSION, check_output_dir, encode_prompt, load_prompts, publish,
                   staging_dir, write_run_record)
from .errors import UserError
from .models import (chat_template_hash, context_length, eos_ids, load_model, load_tokenizer, resolve_device,
                     resolve_dtype, tokenizer_hash)


def dataset_features():
    from datasets import Features, Sequence, Value

    return Features({
        "id": Value("string"),
        "prompt_id": Value("string"),
        "messages": [{"role": Value("string"), "content": Value("string")}],
        "prompt_token_ids": Sequence(Value("int32")),
        "completion": Value("string"),
        "completion_token_ids": Sequence(Value("int32")),
        "topk_token_ids": Sequence(Sequence(Value("int32"))),
        "topk_logprobs": Sequence(Sequence(Value("float32"))),
        "token_logprob": Sequence(Value("float32")),
        "tail_logprob": Sequence(Value("float32")),
        "finish_reason": Value("string"),
    })


@dataclass
class Completion:
    token_ids: list          # emitted ids, EOS included when the model stopped
    topk_ids: torch.Tensor   # (C, k) int
    topk_logprobs: torch.Tensor  # (C, k) float32, raw log-softmax at T=1, sorted descending
    token_logprob: torch.Tensor  # (C,) raw logprob of the emitted token
    tail_logprob: torch.Tensor   # (C,) log of the probability mass outside the top-k
    finish_reason: str       # "stop" | "length"


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Next token per row from (B, V) logits: greedy at T=0, else temperature + nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _cache_kwarg(model) -> str:
    """Name of the KV-cache argument: `cache` in newer transformers 5.x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def decode_batch(model, prompt_ids: list[list[int]], *, pad_id: int, stop_ids: list[int], vocab_size: int,
                 max_new_tokens: int, k: int, temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> list[Completion]:
    """Generate for a batch of token-id prompts, capturing raw top-k logprobs at every completion position."""
    device = next(model.parameters()).device
    B = len(prompt_ids)
    L = max(len(p) for p in prompt_ids)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((B, L), dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):  # left padding: every row's next token is at the last column
        input_ids[i, L - len(p):] = torch.tensor(p, device=device)
        attn[i, L - len(p):] = 1
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    stop = torch.tensor(stop_ids, device=device)
    k = min(k, vocab_size)

    cache_arg = _cache_kwarg(model)
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=True)
    past, logits = getattr(out, cache_arg), out.logits[:, -1, :vocab_size]  # (B, V): padded vocab rows dropped
    pos = position_ids[:, -1:]  # (B, 1)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    steps = []  # per step: (token (B,), topk ids (B,k), topk lp (B,k), token lp (B,), tail (B,))
    for _ in range(max_new_tokens):
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V) raw, T=1
        token = _sample(logits.float(), temperature, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        top_lp, top_ids = logprobs.topk(k, dim=-1)  # (B, k), sorted descending
        # Exact tail: logsumexp of everything outside the top-k (not 1 - sum, which cancels badly).
        tail = logprobs.scatter(-1, top_ids, float("-inf")).logsumexp(-1)  # (B,)
        tok_lp = logprobs.gather(-1, token.clamp(max=vocab_size - 1)[:, None]).squeeze(-1)
        steps.append((token, top_ids, top_lp, tok_lp, tail, finished.clone()))
        finished |= torch.isin(token, stop)
        if bool(finished.all()):
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


def main(cfg: GenerateConfig) -> str:
    """Run the teacher over the prompts and write the dataset; returns the output directory."""
    from datasets import Dataset
    from tqdm.auto import tqdm

    prompts = load_prompts(cfg.prompts, cfg.limit)
    check_output_dir(cfg.output_dir, "generate", config_to_dict(cfg), cfg.overwrite)
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, device, resolve_dtype(cfg.dtype, device))
    ctx = context_length(model)
    encoded = []
    for pr in prompts:
        ids = encode_prompt(tokenizer, pr.messages, cfg.model)
        if ctx is not None and len(ids) + cfg.max_new_tokens > ctx:
            raise UserError(f"{pr.where}: prompt {pr.id!r} has {len(ids)} tokens; with max_new_tokens="
                            f"{cfg.max_new_tokens} that exceeds the model context of {ctx}; shorten it or lower "
                            "max_new_tokens")
        encoded.append(ids)

    vocab_size = len(tokenizer)
    stop_ids = eos_ids(model, tokenizer)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    # Longest first: similar lengths share a batch (little padding) and an OOM shows up at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    jobs = [(i, s) for i in order for s in range(cfg.num_samples)]
    rows_by_job = {}
    n_tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(jobs), desc="generate", unit="seq")
    for start in range(0, len(jobs), cfg.batch_size):
        batch = jobs[start:start + cfg.batch_size]
        outs = decode_batch(model, [encoded[i] for i, _ in batch], pad_id=tokenizer.pad_token_id,
                            stop_ids=stop_ids, vocab_size=vocab_size, max_new_tokens=cfg.max_new_tokens,
                            k=cfg.logprobs, temperature=cfg.temperature, top_p=cfg.top_p, generator=generator)
        for (i, s), c in zip(batch, outs):
            pr = prompts[i]
            rows_by_job[(i, s)] = {
                "id": f"{pr.id}#{s}",
                "prompt_id": pr.id,
                "messages": pr.messages,
                "prompt_token_ids": encoded[i],
                "completion": tokenizer.decode(c.token_ids, skip_special_tokens=True),
                "completion_token_ids": c.token_ids,
                "topk_token_ids": c.topk_ids.tolist(),
                "topk_logprobs": c.topk_logprobs.tolist(),
                "token_logprob": c.token_logprob.tolist(),
                "tail_logprob": c.tail_logprob.tolist(),
                "finish_reason": c.finish_reason,
            }
            n_tokens += len(c.token_ids)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - t0):.0f}")
    bar.close()
    rows = [rows_by_job[job] for job in sorted(rows_by_job)]  # prompt order, whatever the batching

    tmp = staging_dir(cfg.output_dir)
    Dataset.from_list(rows, features=dataset_features()).save_to_disk(str(tmp))
    provenance = {
        "schema_version": SCHEMA_VERSION,
        "llm_distill_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "teacher": cfg.model,
        "teacher_revision": getattr(model.config, "_commit_hash", None),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "chat_template_hash": chat_template_hash(tokenizer),
        "vocab_size": vocab_size,
        "backend": cfg.backend,
        "backend_version": __import__("transformers").__version__,
        "sampling": {"n": cfg.num_samples, "temperature": cfg.temperature, "top_p": cfg.top_p,
                     "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed},
        "k": cfg.logprobs,
        "logprobs_mode": "raw",
        "num_rows": len(rows),
        "completion_tokens": n_tokens,
    }
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    write_run_record(tmp, "generate", config_to_dict(cfg))
    publish(tmp, cfg.output_dir)
    elapsed = time.perf_counter() - t0
    print(f"generate: {len(rows)} completions, {n_tokens} tokens in {elapsed:.1f}s "
          f"({n_tokens / max(elapsed, 1e-9):.0f} tok/s) -> {cfg.output_dir}")
    return cfg.output_dir
