"""Teacher top-k logprobs for responses that already exist: one forward pass per batch (teacher forcing).

    llm-distill score model=data/tiny_task/teacher responses=answers.jsonl output_dir=runs/scored

`responses` is a JSONL file, one `{"messages": [...], "completion": "..."}` per line (or `messages` ending with
the assistant turn, which is then the completion), or a dataset directory with `messages` + `completion`
(a generate output, for example: its token ids are reused when its provenance has this teacher's tokenizer).
`backend: vllm` scores with vLLM (prompt logprobs; CUDA only), as generate does.
The output has generate's schema, with `finish_reason: given`, and is written by the same chunked, resumable,
shardable writer (chunks.py), so `llm-distill merge` joins score shards too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .chunks import ChunkedRun, finished, parse_shard, partial_dir, sha256_json, shard_of
from .config import ScoreConfig, config_to_dict
from .data import (prompt_from_record, check_output_dir, encode_prompt, load_teacher_dataset,
                   read_provenance)
from .errors import UserError
from .validate import check_model_dir
from .backends import build_backend
from .generate import (Progress, dataset_features, filter_long, rows_table, run_settings,
                       teacher_provenance)
from .models import tokenizer_hash


def _records(path: str, limit: int | None):
    """(where, record) pairs from JSONL or a datasets directory."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: responses file not found")
    if p.is_dir():
        ds = load_teacher_dataset(str(p))
        from .validate import check_teacher_dataset

        cols = set(ds.column_names)
        check_teacher_dataset(str(p), ds, need="tokens" if {"prompt_token_ids", "completion_token_ids"} <= cols
                              else "text" if "completion" in cols else "messages")
        keep = [c for c in ("id", "prompt_id", "messages", "completion", "finish_reason", "prompt_token_ids",
                            "completion_token_ids") if c in ds.column_names]
        ds = ds.select_columns(keep)
        for i in range(len(ds) if limit is None else min(limit, len(ds))):
            yield f"{path}: row {i}", ds[i]
        return
    from .validate import jsonl_lines

    n = 0
    for lineno, line in jsonl_lines(path):
        if limit is not None and n >= limit:
            return
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); each line must be "
                            "one JSON object") from None
        n += 1
        yield f"{path}:{lineno}", rec


def load_responses(path: str, limit: int | None) -> list[dict]:
    """Validated rows: id, prompt_id, messages (the prompt), completion text, finish_reason, optional token ids."""
    rows, seen = [], {}
    for index, (where, rec) in enumerate(_records(path, limit)):
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected a JSON object with 'messages' and 'completion'")
        msgs = rec.get("messages")
        completion = rec.get("completion")
        if completion is None and isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) \
                and msgs[-1].get("role") == "assistant":
            completion, msgs = msgs[-1].get("content"), msgs[:-1]
        if not isinstance(completion, str):
            raise UserError(f"{where}: no response to score; give 'completion' (a string) or end 'messages' with the "
                            "assistant turn")
        prompt = prompt_from_record({"messages": msgs, "id": rec.get("id", f"r{index}")}, where, index)
        row = {"id": prompt.id, "prompt_id": str(rec.get("prompt_id") or prompt.id), "messages": prompt.messages,
               "completion": completion, "finish_reason": rec.get("finish_reason") or "stop", "where": where}
        for key in ("prompt_token_ids", "completion_token_ids"):
            if rec.get(key) is not None:
                row[key] = list(rec[key])
        if row["id"] in seen:
            raise UserError(f"{where}: duplicate id {row['id']!r} (first at {seen[row['id']]}); ids must be unique")
        seen[row["id"]] = where
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no responses found")
    return rows


def main(cfg: ScoreConfig) -> str:
    shard = parse_shard(cfg.shard)
    inputs = [cfg.responses, cfg.model]
    if finished(cfg.output_dir) and not cfg.overwrite:
        check_output_dir(cfg.output_dir, "score", config_to_dict(cfg), cfg.overwrite, inputs)
        shutil.rmtree(partial_dir(cfg.output_dir), ignore_errors=True)
        print(f"score: {cfg.output_dir} is already complete with these settings; nothing to do")
        return cfg.output_dir
    check_output_dir(cfg.output_dir, "score", config_to_dict(cfg), cfg.overwrite, inputs)
    if cfg.backend != "server":  # a served teacher needs only its tokenizer here
        check_model_dir(cfg.model, "teacher")  # a missing or broken folder is one line, at once
    rows = load_responses(cfg.responses, cfg.limit)
    responses_sha = sha256_json([[r["id"], r["messages"], r["completion"]] for r in rows])
    backend = build_backend(cfg)
    try:
        return _score(cfg, backend, rows, responses_sha, shard)
    finally:
        backend.close()  # engines and their processes end here, on errors too (not at interpreter exit)


def _score(cfg: ScoreConfig, backend, rows: list, responses_sha: str, shard) -> str:
    tok = backend.tokenizer
    k = min(cfg.logprobs, backend.vocab_size)
    # Token ids from a dataset written with this very tokenizer are reused (no second tokenisation);
    # otherwise the prompt goes through the chat template and the completion is tokenised as plain text.
    reuse = Path(cfg.responses).is_dir() and read_provenance(cfg.responses).get("tokenizer_hash") == tokenizer_hash(tok)
    mine = [r for r in rows if shard is None or shard_of(r["id"], shard[1]) == shard[0]]
    for r in mine:
        if not (reuse and "prompt_token_ids" in r and "completion_token_ids" in r):
            r["prompt_token_ids"] = encode_prompt(tok, r["messages"], cfg.model)
            ids = tok(r["completion"], add_special_tokens=False)["input_ids"]
            if cfg.append_eos and r["finish_reason"] != "length":
                ids = ids + [tok.eos_token_id]
            r["completion_token_ids"] = ids
        if not r["completion_token_ids"]:
            raise UserError(f"{r['where']}: the completion is empty (no tokens to score)")
    ctx = backend.context_length()
    kept, skipped = filter_long(
        mine, [len(r["prompt_token_ids"]) + len(r["completion_token_ids"]) for r in mine], ctx, 0, cfg.on_long_prompt,
        lambda r, n: f"{r['where']}: row {r['id']!r} has {n} prompt + completion tokens, more than the model "
                     f"context of {ctx}; shorten it")
    features = dataset_features(k)
    settings = run_settings(cfg, tok, responses_sha)
    run = ChunkedRun(cfg.output_dir, "score", settings, features, cfg.overwrite)
    chunks = [kept[s:s + cfg.chunk_size] for s in range(0, len(kept), cfg.chunk_size)]
    done = run.done() & set(range(len(chunks)))
    progress = Progress("score", len(kept), sum(len(chunks[i]) for i in done))
    if done:
        print(f"score: resuming {cfg.output_dir}: {len(done)} of {len(chunks)} chunks already written")
    with run.refusing():
        for index, chunk in enumerate(chunks):
            if index in done:
                continue
            outs = backend.score([r["prompt_token_ids"] for r in chunk], [r["completion_token_ids"] for r in chunk],
                                 [r["id"] for r in chunk], progress)
            run.write_chunk(index, rows_table(chunk, outs, tok, k, features))
    did = progress.close()
    provenance = {
        **teacher_provenance("score", cfg, backend, tok, k, None),
        "responses": cfg.responses,
        "responses_sha256": responses_sha,
        "shard": cfg.shard or None,
        "num_prompts": len(kept),
        "skipped_long_prompts": {"count": len(skipped), "ids": [r["id"] for r in skipped[:100]]},
    }
    prov = run.finalize(len(chunks), [r["id"] for r in kept], provenance, config_to_dict(cfg))
    skip_note = f"; skipped {len(skipped)} rows longer than the context" if skipped else ""
    print(f"score: {prov['num_rows']} responses, {prov['completion_tokens']} tokens; this process scored "
          f"{did}{skip_note} -> {cfg.output_dir}")
    return cfg.output_dir
