"""Teacher ensembles: one KD target from several teachers' top-k for the same completions.

    llm-distill generate recipes/tiny/generate.yaml model=teacher_a output_dir=runs/a
    llm-distill score model=teacher_b responses=runs/a output_dir=runs/b        # same completions, teacher B
    llm-distill ensemble inputs=[runs/a,runs/b] output_dir=runs/ab
    llm-distill train recipes/tiny/train_kd.yaml dataset=runs/ab

Per completion position the target is the mean of the teachers' distributions, restricted to what is stored:
an id's mixture probability is the mean over teachers of its probability where that teacher has it in its
top-k; where a teacher does not, its probability is unknown and stays inside that teacher's tail. So the result
is a valid (k+1)-bucket distribution (it sums to 1) whose top-k entries lower-bound the true mixture's, exactly
as each teacher's own buckets do. The top k ids of the mixture are kept and everything else joins the tail.

Inputs must hold the same rows (ids), with identical prompt and completion token ids, from teachers with the
same tokenizer; anything else is refused naming the input and row.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .chunks import write_parts
from .config import EnsembleConfig, config_to_dict
from .data import (PROVENANCE_FILE, SCHEMA_VERSION, check_output_dir, load_teacher_dataset, publish, staging_dir,
                   write_run_record)
from .errors import UserError
from .validate import check_provenance, check_teacher_dataset


def combine_topk(topk_ids: list[torch.Tensor], topk_logprobs: list[torch.Tensor], tails: list[torch.Tensor],
                 k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean of n teachers' bucket distributions on the union of their top-k, cut back to the top k + tail.

    topk_ids[i], topk_logprobs[i]: (N, k_i) for teacher i; tails[i]: (N,) its log tail mass; k <= max k_i (so
    every position has at least k distinct ids). Returns ids (N, k), logprobs (N, k) sorted descending and the
    log tail (N,), computed in float64: tail = mean of the teachers' tails + the mixture mass of the union ids
    not kept (a logsumexp, not 1 - sum).
    """
    n = len(topk_ids)
    if not 1 <= k <= max(t.shape[-1] for t in topk_ids):
        raise ValueError(f"k={k} must be between 1 and the largest teacher k")
    ids = torch.cat([t.long() for t in topk_ids], -1)  # (N, K) with K = sum of k_i
    p = torch.cat([t.double() for t in topk_logprobs], -1).exp() / n  # (N, K): p_i(id) / n
    ids_s, order = ids.sort(dim=-1, stable=True)  # equal ids become neighbours
    p_s = p.gather(-1, order)
    first = torch.ones_like(ids_s, dtype=torch.bool)
    first[:, 1:] = ids_s[:, 1:] != ids_s[:, :-1]
    group = first.long().cumsum(-1) - 1  # (N, K): index of the distinct id within the row
    mass = torch.zeros_like(p_s).scatter_add(-1, group, p_s)  # (N, K): mixture probability per distinct id
    gid = torch.zeros_like(ids_s).scatter(-1, group, ids_s)  # (N, K): the distinct ids
    used = torch.zeros_like(first).scatter(-1, group, torch.ones_like(first))  # (N, K): slots holding an id
    top, pick = torch.where(used, mass, torch.full_like(mass, -1.0)).topk(k, -1)  # (N, k)
    kept = torch.zeros_like(first).scatter(-1, pick, torch.ones_like(pick, dtype=torch.bool))
    dropped = torch.where(used & ~kept, mass, torch.zeros_like(mass)).sum(-1)  # (N,)
    teacher_tails = torch.stack([t.double() for t in tails]).logsumexp(0) - math.log(n)  # (N,)
    tail = torch.logaddexp(teacher_tails, dropped.log())
    return gid.gather(-1, pick), top.log(), tail


def _load(path: str):
    f = Path(path) / PROVENANCE_FILE
    if not f.is_file():
        raise UserError(f"{path}: not a finished generate/score output (no {PROVENANCE_FILE})")
    prov = check_provenance(path)
    ds = load_teacher_dataset(path)
    if "topk_token_ids" not in ds.column_names:
        raise UserError(f"{path}: has no teacher top-k (topk_token_ids); write it with generate or score")
    prov["_k"] = check_teacher_dataset(path, ds, need="kd")["k"]  # NaN, out-of-range ids, ... never reach the mix
    return ds, prov


def _flat(ds, column: str, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(positions,) or (positions, k) values of a per-token list column, and the row offsets (rows + 1,)."""
    col = ds.data.column(column).combine_chunks()
    values = col.values.flatten() if k else col.values
    arr = values.to_numpy(zero_copy_only=False)
    return (arr.reshape(-1, k) if k else arr), col.offsets.to_numpy()


def main(cfg: EnsembleConfig) -> str:
    from .generate import TOPK_LOGPROB_DTYPE, dataset_features, rows_table
    from .teacher import Completion

    check_output_dir(cfg.output_dir, "ensemble", config_to_dict(cfg), cfg.overwrite, cfg.inputs)
    loaded = [_load(p) for p in cfg.inputs]
    (ref, ref_prov), ref_path = loaded[0], cfg.inputs[0]
    ref_ids = ref.data.column("id").to_pylist()
    if len(set(ref_ids)) != len(ref_ids):
        raise UserError(f"{ref_path}: ids are not unique")
    parts = []
    for path, (ds, prov) in zip(cfg.inputs, loaded):
        for key in ("tokenizer_hash", "logprobs_mode"):
            if prov.get(key) != ref_prov.get(key):
                raise UserError(f"{path}: {key} {prov.get(key)!r} differs from {ref_path}'s {ref_prov.get(key)!r}; "
                                "an ensemble needs teachers with one tokenizer and raw logprobs")
        where = {rid: i for i, rid in enumerate(ds.data.column("id").to_pylist())}
        missing = [rid for rid in ref_ids if rid not in where]
        if missing or len(where) != len(ref_ids):
            raise UserError(f"{path}: holds other rows than {ref_path} (e.g. id {(missing or ['?'])[0]!r}); score "
                            f"the same completions with every teacher (llm-distill score responses={ref_path})")
        ds = ds.select([where[rid] for rid in ref_ids]).flatten_indices()  # the first input's row order
        for column in ("prompt_token_ids", "completion_token_ids"):
            a, b = ref.data.column(column).to_pylist(), ds.data.column(column).to_pylist()
            if a != b:
                i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                raise UserError(f"{path}: row {ref_ids[i]!r} has other {column} than in {ref_path}; the inputs must "
                                "hold the same completions, token for token")
        parts.append(ds)
    ks = [int(p.pop("_k") or p.get("k") or 1) for ds, p in loaded]
    k = cfg.logprobs or max(ks)
    if k > max(ks):
        raise UserError(f"ensemble: logprobs={k} is more than the largest stored k ({max(ks)})")

    # Per-position arrays of every input, in the first input's row order (offsets are then the same).
    ids_, lps_, tails_, toks_ = [], [], [], []
    for ds, ki in zip(parts, ks):
        ids, offsets = _flat(ds, "topk_token_ids", ki)
        ids_.append(torch.from_numpy(ids.astype(np.int64)))
        lps_.append(torch.from_numpy(_flat(ds, "topk_logprobs", ki)[0].astype(np.float32)))
        tails_.append(torch.from_numpy(_flat(ds, "tail_logprob")[0].astype(np.float32)))
        toks_.append(torch.from_numpy(_flat(ds, "token_logprob")[0].astype(np.float32)))
    out_ids, out_lp, out_tail = [], [], []
    chunk = 65536  # positions per combine call: (chunk, sum of k) float64 arrays
    for s in range(0, len(ids_[0]), chunk):
        a, b, c = combine_topk([x[s:s + chunk] for x in ids_], [x[s:s + chunk] for x in lps_],
                               [x[s:s + chunk] for x in tails_], k)
        out_ids.append(a)
        out_lp.append(b.float())
        out_tail.append(c.float())
    out_ids, out_lp, out_tail = torch.cat(out_ids), torch.cat(out_lp), torch.cat(out_tail)
    # The emitted token's full-vocabulary logprob is known for every teacher: the mixture's is exact.
    token_lp = (torch.stack([t.double() for t in toks_]).logsumexp(0) - math.log(len(parts))).float()

    meta_cols = ["id", "prompt_id", "messages", "prompt_token_ids", "completion", "completion_token_ids",
                 "finish_reason"]
    meta = ref.select_columns([c for c in meta_cols if c in ref.column_names]).to_list()
    comps = []
    for i, m in enumerate(meta):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        comps.append(Completion(m["completion_token_ids"], out_ids[lo:hi], out_lp[lo:hi], token_lp[lo:hi],
                                out_tail[lo:hi], m.get("finish_reason") or "given"))
        m.setdefault("prompt_id", m["id"])
    features = dataset_features(k)
    table = rows_table(meta, comps, None, k, features)
    tmp = staging_dir(cfg.output_dir)
    write_parts([table], tmp, features.arrow_schema)
    provenance = {
        **{key: ref_prov.get(key) for key in ("schema_version", "tokenizer_hash", "chat_template_hash", "vocab_size",
                                              "sampling", "prompts_sha256", "responses_sha256")},
        "schema_version": SCHEMA_VERSION,
        "llm_distill_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "stage": "ensemble",
        "teacher": ref_prov.get("teacher"),  # whose tokenizer train falls back to; every teacher is listed below
        "teachers": [{"path": str(path), "teacher": p.get("teacher"), "teacher_revision": p.get("teacher_revision"),
                      "stage": p.get("stage"), "k": ki, "backend": p.get("backend"), "dtype": p.get("dtype")}
                     for path, (_, p), ki in zip(cfg.inputs, loaded, ks)],
        "combination": "mean of probabilities on the union of the teachers' top-k (unknown entries stay in each "
                       "teacher's tail), top k kept, the rest in the tail",
        "k": k,
        "logprobs_mode": "raw",
        "storage": {"topk_logprobs": TOPK_LOGPROB_DTYPE, "token_logprob": "float32", "tail_logprob": "float32",
                    "ids": "int32"},
        "num_rows": len(meta),
        "completion_tokens": int(offsets[-1]),
    }
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    write_run_record(tmp, "ensemble", config_to_dict(cfg))
    publish(tmp, cfg.output_dir)
    print(f"ensemble: {len(parts)} teachers, {len(meta)} rows, {int(offsets[-1])} completion tokens, top-{k} + tail "
          f"-> {cfg.output_dir}")
    return cfg.output_dir
