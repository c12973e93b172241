"""Teacher generation: completions plus per-position raw top-k logprobs into a teacher dataset (parquet).

    llm-distill generate recipes/tiny/generate.yaml model=data/tiny_task/teacher output_dir=runs/teacher_data
    llm-distill generate recipes/tiny/generate.yaml shard=0/2 output_dir=runs/part0   # one of N processes
    llm-distill merge inputs=[runs/part0,runs/part1] output_dir=runs/teacher_data

The transformers backend (`decoding.TransformersBackend`) runs its own batched decode loop (left padding, KV cache) so
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
import shutil
import time

import numpy as np

from . import __version__
from .chunks import (RESUMABLE_CHANGES, ChunkedRun, finished, parse_shard, partial_dir, sha256_json,
                     shard_of)
from .config import GenerateConfig, config_to_dict
from .data import SCHEMA_VERSION, check_output_dir, encode_prompt, load_prompts
from .errors import UserError
from .backends import build_backend
from .decoding import TransformersBackend, decode_batch, score_batch  # noqa: F401 (re-exported)
from .teacher import Completion  # noqa: F401 (re-exported)
from .models import chat_template_hash, tokenizer_hash
from .validate import check_model_dir

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
