"""Teacher generation: completions plus per-position raw top-k logprobs into a teacher dataset (parquet).

    llm-distill generate recipes/tiny/generate.yaml model=data/tiny_task/teacher output_dir=runs/teacher_data
    llm-distill generate recipes/tiny/generate.yaml shard=0/2 output_dir=runs/part0   # one of N processes
    llm-distill merge inputs=[runs/part0,runs/part1] output_dir=runs/teacher_data

The transformers backend (`TransformersBackend`) runs its own batched decode loop (left padding, KV cache) so
that every step's raw logits (log-softmax at T=1, before temperature or top-p, like vLLM's `raw_logprobs`) are
reduced to top-k on the fly: nothing of size (steps, vocab) is kept. Its `score` method gives the same values
for responses that already exist, by one forward pass (`llm-distill score`).

Work is written in chunks of `chunk_size` prompts (see chunks.py): a killed run, rerun with the same command,
continues at the first unfinished chunk and ends with every prompt x sample exactly once.

What is reproducible. Greedy decoding is a function of the logits. Sampling draws, for sample s of prompt `id`,
one uniform per step from a generator seeded by (seed, id, s) and inverts the CDF of the tempered, nucleus-cut
distribution, so the draw does not depend on batching, on the order of prompts, on resume or on the shard.
A resumed run recomputes whole chunks with the same batches as a straight run, so its rows are bit-identical
(same machine, batch_size and thread count). A shard batches prompts differently, so its logits can differ from
a straight run's in the last bits (kernels depend on batch shape); a token then differs only when an argmax is
a near-tie or a uniform falls within that rounding of a CDF boundary.
"""

from __future__ import annotations

import datetime
import inspect
import shutil
import time

import numpy as np
import torch

from . import __version__
from .chunks import (RESUMABLE_CHANGES, ChunkedRun, crash_point, finished, parse_shard, partial_dir, sha256_json,
                     shard_of)
from .config import GenerateConfig, config_to_dict
from .data import SCHEMA_VERSION, check_output_dir, encode_prompt, load_prompts
from .errors import UserError
from .teacher import Completion, check_logprobs, sample_seed  # noqa: F401 (re-exported)
from .validate import check_model_dir
from .models import (chat_template_hash, context_length, eos_ids, load_model, load_tokenizer, resolve_device,
                     resolve_dtype, tokenizer_hash)

# Storage dtypes: ids int32; the k top logprobs float16 (the bulk of the bytes; their rounding error on the KD
# loss is measured in benchmarks/storage.py); the emitted token's logprob and the tail stay float32, because
# the tail is computed exactly at capture and cannot be rebuilt from rounded top-k values.
TOPK_LOGPROB_DTYPE = "float16"


def dataset_features(k: int | None = None):
    """The teacher dataset schema; with `k` the top-k columns are fixed-size lists (no per-position offsets)."""
    from datasets import Features, List, Value

    length = k if k is not None else -1
    return Features({
        "id": Value("string"),
        "prompt_id": Value("string"),
        "messages": [{"role": Value("string"), "content": Value("string")}],
        "prompt_token_ids": List(Value("int32")),
        "completion": Value("string"),
        "completion_token_ids": List(Value("int32")),
        "topk_token_ids": List(List(Value("int32"), length=length)),
        "topk_logprobs": List(List(Value(TOPK_LOGPROB_DTYPE), length=length)),
        "token_logprob": List(Value("float32")),
        "tail_logprob": List(Value("float32")),
        "finish_reason": Value("string"),
    })


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
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


def _sample_inverse_cdf(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
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


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _cache_kwarg(model) -> str:
    """Name of the KV-cache argument: `cache` in newer transformers 5.x, `past_key_values` before."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L = len(prompt_ids), max(len(p) for p in prompt_ids)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    for i, p in enumerate(prompt_ids):  # left padding: every row's last token is at the last column
        input_ids[i, L - len(p):] = torch.tensor(p)
        attn[i, L - len(p):] = 1
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    return input_ids.to(device), attn.to(device), position_ids.to(device)


def _topk_tail(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    input_ids, attn, position_ids = _left_pad(prompt_ids, pad_id, device)
    stop = torch.tensor(stop_ids, device=device)
    k = min(k, vocab_size)
    uniforms = None
    if temperature > 0 and row_seeds is not None:
        uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s),
                                           dtype=torch.float64) for s in row_seeds]).to(device)  # (B, S)

    cache_arg = _cache_kwarg(model)
    # Only the last position's logits are needed from the prompt pass: (B, L, V) would not fit at real V.
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=True, **keep)
    past, logits = getattr(out, cache_arg), out.logits[:, -1, :vocab_size]  # (B, V): padded vocab rows dropped
    pos = position_ids[:, -1:]  # (B, 1)
    finished_ = torch.zeros(B, dtype=torch.bool, device=device)
    steps = []  # per step: (token (B,), topk ids (B,k), topk lp (B,k), token lp (B,), tail (B,), done (B,))
    for t in range(max_new_tokens):
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V) raw, T=1
        if temperature == 0 or uniforms is None:
            token = _sample(logits.float(), temperature, top_p, generator)
        else:
            token = _sample_inverse_cdf(logits.float(), temperature, top_p, uniforms[:, t])
        token = torch.where(finished_, torch.full_like(token, pad_id), token)
        top_lp, top_ids, tail = _topk_tail(logprobs, k)
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
    input_ids, attn, position_ids = _left_pad(seqs, pad_id, device)
    k = min(k, vocab_size)
    c_max = max(len(c) for c in completion_ids)
    # Left padding puts every completion at the end, so only the last c_max + 1 positions need logits.
    keep = {"logits_to_keep": c_max + 1} if _accepts(model, "logits_to_keep") else {}
    logits = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, **keep).logits
    logits = logits[:, -(c_max + 1):-1, :vocab_size]  # (B, c_max, V): column j predicts the token after it
    results = []
    for i, c in enumerate(completion_ids):
        logprobs = torch.log_softmax(logits[i, c_max - len(c):].float(), dim=-1)  # (C, V)
        top_lp, top_ids, tail = _topk_tail(logprobs, k)
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


# The engine fields a config may carry (GenerateConfig, ScoreConfig) and the backend arguments they feed.
ENGINE_FIELDS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "max_num_batched_tokens",
                 "enforce_eager")
SERVER_FIELDS = {"server_urls": "urls", "server_model": "served_model", "server_concurrency": "concurrency",
                 "server_timeout": "timeout", "server_retries": "retries"}


def build_backend(cfg, **overrides):
    """The teacher backend (teacher.TeacherBackend) a stage config asks for: `cfg.backend` is `transformers`,
    `vllm` or `server`; `cfg.model` the teacher (for `server`: the local tokenizer of the served model). Fields a
    config lacks (score has no sampling fields) take the backends' defaults; `overrides` replace config fields.
    The one place a backend is built from a config, so every stage gets the same one for the same fields."""
    def get(name, default=None):
        return overrides[name] if name in overrides else getattr(cfg, name, default)

    backend, model = get("backend", "transformers"), get("model")
    common = dict(k=get("logprobs", 20), num_samples=get("num_samples", 1), temperature=get("temperature", 1.0),
                  top_p=get("top_p", 1.0), max_new_tokens=get("max_new_tokens", 256), seed=get("seed", 0))
    if backend == "vllm":
        from .vllm_backend import VLLMBackend

        engine = {name: get(name) for name in ENGINE_FIELDS if name in overrides or hasattr(cfg, name)}
        return VLLMBackend(model, dtype=get("dtype", "auto"), **common, **engine)
    if backend == "server":
        from .server_backend import ServerBackend

        server = {arg: get(name) for name, arg in SERVER_FIELDS.items() if name in overrides or hasattr(cfg, name)}
        return ServerBackend(model, **common, **server)
    return TransformersBackend(model, device=get("device", "auto"), dtype=get("dtype", "auto"),
                               batch_size=get("batch_size", 16), **common)


# ---------------------------------------------------------------------------------------------------------------
# Rows -> Arrow, built column by column from numpy (no per-value Python objects for the top-k data).


def _list_array(chunks: list[np.ndarray], value_type, fixed: int | None = None):
    """One Arrow list column from per-row numpy arrays: (C,) -> list<value>, (C, k) -> list<fixed_size_list[k]>."""
    import pyarrow as pa

    lengths = np.array([len(c) for c in chunks], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([c.reshape(-1) for c in chunks]) if chunks else np.zeros(0)
    values = pa.array(flat, type=value_type)
    if fixed is not None:
        values = pa.FixedSizeListArray.from_arrays(values, fixed)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def rows_table(meta: list[dict], completions: list[Completion], tokenizer, k: int, features):
    """Arrow table of teacher rows: `meta` gives id, prompt_id, messages, prompt_token_ids (and completion text
    when given); the Completion gives the rest."""
    import pyarrow as pa

    schema = features.arrow_schema
    texts = [m["completion"] if "completion" in m else tokenizer.decode(c.token_ids, skip_special_tokens=True)
             for m, c in zip(meta, completions)]
    cols = {
        "id": pa.array([m["id"] for m in meta], pa.string()),
        "prompt_id": pa.array([m["prompt_id"] for m in meta], pa.string()),
        "messages": pa.array([m["messages"] for m in meta], schema.field("messages").type),
        "prompt_token_ids": _list_array([np.asarray(m["prompt_token_ids"], np.int32) for m in meta], pa.int32()),
        "completion": pa.array(texts, pa.string()),
        "completion_token_ids": _list_array([np.asarray(c.token_ids, np.int32) for c in completions], pa.int32()),
        "topk_token_ids": _list_array([c.topk_ids.numpy().astype(np.int32).reshape(-1, k) for c in completions],
                                      pa.int32(), k),
        "topk_logprobs": _list_array([c.topk_logprobs.float().numpy().astype(np.float16).reshape(-1, k)
                                      for c in completions], pa.float16(), k),
        "token_logprob": _list_array([c.token_logprob.float().numpy() for c in completions], pa.float32()),
        "tail_logprob": _list_array([c.tail_logprob.float().numpy() for c in completions], pa.float32()),
        "finish_reason": pa.array([c.finish_reason for c in completions], pa.string()),
    }
    return pa.Table.from_arrays([cols[name].cast(schema.field(name).type) for name in schema.names], schema=schema)


# ---------------------------------------------------------------------------------------------------------------
# The stage.


def run_settings(cfg, tokenizer, prompts_sha: str) -> dict:
    """What a resumed run must share with the run it continues: every setting that changes rows, plus
    fingerprints of the prompts, tokenizer and chat template (a path can stay the same while its content changes)."""
    settings = {k: v for k, v in config_to_dict(cfg).items() if k not in RESUMABLE_CHANGES}
    settings.update(schema_version=SCHEMA_VERSION, topk_logprob_dtype=TOPK_LOGPROB_DTYPE, prompts_sha256=prompts_sha,
                    tokenizer_hash=tokenizer_hash(tokenizer), chat_template_hash=chat_template_hash(tokenizer))
    return settings


class Progress:
    """A progress bar over sequences showing the teacher's tokens/s; the backends' `progress(seqs, tokens)`."""

    def __init__(self, desc: str, total: int, initial: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="seq", initial=initial)
        self.tokens, self.t0 = 0, time.perf_counter()

    def __call__(self, seqs: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(seqs)
        self.bar.set_postfix(tok_s=f"{self.tokens / max(time.perf_counter() - self.t0, 1e-9):.0f}")

    def close(self) -> str:
        """Closes the bar; returns what this process did, for the stage's last line."""
        self.bar.close()
        elapsed = time.perf_counter() - self.t0
        return f"{self.tokens} tokens in {elapsed:.1f}s ({self.tokens / max(elapsed, 1e-9):.0f} tok/s)"


def teacher_provenance(stage: str, cfg, backend, tokenizer, k: int, sampling: dict | None) -> dict:
    """The provenance fields generate and score share: who made the rows, with what, stored how."""
    return {
        "schema_version": SCHEMA_VERSION,
        "llm_distill_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "stage": stage,
        "teacher": cfg.model,
        "teacher_revision": backend.revision,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "chat_template_hash": chat_template_hash(tokenizer),
        "vocab_size": backend.vocab_size,
        "backend": backend.name,
        "backend_version": backend.version,
        # What the backend ran (the servers' models and vLLM versions; the dtype `auto` resolved to).
        "backend_details": getattr(backend, "details", None),
        "dtype": cfg.dtype,
        "sampling": sampling,
        "k": k,
        "logprobs_mode": "raw",
        "storage": {"topk_logprobs": TOPK_LOGPROB_DTYPE, "token_logprob": "float32", "tail_logprob": "float32",
                    "ids": "int32"},
    }


def filter_long(items: list, lengths: list[int], ctx: int | None, extra: int, policy: str,
                describe) -> tuple[list, list]:
    """Drop (policy skip) or refuse (policy error) items whose length + extra exceeds the context; returns
    (kept, skipped ids)."""
    kept, skipped = [], []
    for item, n in zip(items, lengths):
        if ctx is not None and n + extra > ctx:
            if policy == "error":
                raise UserError(describe(item, n) + "; or set on_long_prompt=skip to skip such prompts (counted)")
            skipped.append(item)
        else:
            kept.append(item)
    return kept, skipped


def main(cfg: GenerateConfig) -> str:
    """Run the teacher over the prompts and write the dataset; returns the output directory."""
    shard = parse_shard(cfg.shard)
    inputs = [cfg.prompts, cfg.model]
    if finished(cfg.output_dir) and not cfg.overwrite:
        check_output_dir(cfg.output_dir, "generate", config_to_dict(cfg), cfg.overwrite, inputs)  # refuses another run
        shutil.rmtree(partial_dir(cfg.output_dir), ignore_errors=True)  # left if killed right after publishing
        print(f"generate: {cfg.output_dir} is already complete with these settings; nothing to do "
              "(overwrite=true regenerates it)")
        return cfg.output_dir
    check_output_dir(cfg.output_dir, "generate", config_to_dict(cfg), cfg.overwrite, inputs)
    if cfg.backend != "server":  # a served teacher needs only its tokenizer here
        check_model_dir(cfg.model, "teacher")  # a missing or broken folder is one line, at once
    prompts = load_prompts(cfg.prompts, cfg.limit)
    prompts_sha = sha256_json([[p.id, p.messages] for p in prompts])
    backend = build_backend(cfg)
    try:
        return _generate(cfg, backend, prompts, prompts_sha, shard)
    finally:
        backend.close()  # engines and their processes end here, on errors too (not at interpreter exit)


def _generate(cfg: GenerateConfig, backend, prompts: list, prompts_sha: str, shard) -> str:
    tokenizer = backend.tokenizer
    k = min(cfg.logprobs, backend.vocab_size)
    ctx = backend.context_length()

    mine = [p for p in prompts if shard is None or shard_of(p.id, shard[1]) == shard[0]]
    encoded = {p.id: encode_prompt(tokenizer, p.messages, cfg.model) for p in mine}
    kept, skipped = filter_long(
        mine, [len(encoded[p.id]) for p in mine], ctx, cfg.max_new_tokens, cfg.on_long_prompt,
        lambda p, n: (f"{p.where}: prompt {p.id!r} has {n} tokens; with max_new_tokens={cfg.max_new_tokens} that "
                      f"exceeds the model context of {ctx}; shorten it or lower max_new_tokens"))
    features = dataset_features(k)
    run = ChunkedRun(cfg.output_dir, "generate", run_settings(cfg, tokenizer, prompts_sha), features, cfg.overwrite)
    chunks = [kept[s:s + cfg.chunk_size] for s in range(0, len(kept), cfg.chunk_size)]
    done = run.done() & set(range(len(chunks)))

    progress = Progress("generate", len(kept) * cfg.num_samples, sum(len(chunks[i]) for i in done) * cfg.num_samples)
    if done:
        print(f"generate: resuming {cfg.output_dir}: {len(done)} of {len(chunks)} chunks already written")
    with run.refusing():
        for index, chunk in enumerate(chunks):
            if index in done:
                continue
            outs = backend.generate([encoded[p.id] for p in chunk], [p.id for p in chunk], progress)
            meta, comps = [], []
            for p, samples in zip(chunk, outs):
                for s, c in enumerate(samples):
                    meta.append({"id": f"{p.id}#{s}", "prompt_id": p.id, "messages": p.messages,
                                 "prompt_token_ids": encoded[p.id]})
                    comps.append(c)
            run.write_chunk(index, rows_table(meta, comps, tokenizer, k, features))
    did = progress.close()

    provenance = {
        **teacher_provenance("generate", cfg, backend, tokenizer, k, {
            "n": cfg.num_samples, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}),
        "prompts_sha256": prompts_sha,
        "shard": cfg.shard or None,
        "num_prompts": len(kept),
        "skipped_long_prompts": {"count": len(skipped), "ids": [p.id for p in skipped[:100]]},
    }
    expected = [f"{p.id}#{s}" for p in kept for s in range(cfg.num_samples)]
    prov = run.finalize(len(chunks), expected, provenance, config_to_dict(cfg))
    skip_note = (f"; skipped {len(skipped)} prompts longer than the context ({', '.join(p.id for p in skipped[:5])}"
                 f"{', ...' if len(skipped) > 5 else ''})" if skipped else "")
    print(f"generate: {prov['num_rows']} completions, {prov['completion_tokens']} tokens; this process generated "
          f"{did}{skip_note} "
          f"-> {cfg.output_dir}")
    return cfg.output_dir
