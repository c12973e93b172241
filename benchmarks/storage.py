# Bytes on disk per completion token of the teacher dataset at k = 5 / 20 / 50, and the KD error from storing
# the top-k logprobs as float16:
#     python benchmarks/storage.py            (CPU, about 1 minute; 400 held-out prompts of the bundled task)
#     python benchmarks/storage.py 100        (fewer prompts)
# Two datasets per k: the bundled tiny teacher's real output (vocabulary 86, so its ids repeat a lot and
# compress unusually well), and a synthetic worst case at Qwen2.5's vocabulary (151,936) whose top-k ids are
# uniform random, so nothing but the ids' unused high bits compresses. Sizes: the published directory as generate
# writes it (data/part-*.parquet, zstd over byte-stream-split columns, chunks.parquet_options, + provenance.json
# and run.json; the synthetic one through the same chunks.write_parts), and the Arrow cache file that
# data.load_teacher_dataset converts it to on first load (uncompressed, memory-mapped by train).
# KD error: forward KL(P || Q) on the k+1 buckets with the teacher's exact float32 top-k vs the stored float16
# top-k (tail float32 in both), for a student Q = the teacher at temperature 2 (a blurred student, KL ~ 0.1-1);
# plus KL(P32 || P16) itself, the divergence between the exact and the stored teacher buckets.
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from llm_distill import generate
from llm_distill.chunks import parquet_options, write_parts
from llm_distill.config import GenerateConfig, load_config
from llm_distill.data import load_teacher_dataset
from llm_distill.generate import Completion, dataset_features, rows_table
from llm_distill.losses import buckets, divergence, student_buckets

ROOT = Path(__file__).resolve().parents[1]
PER_TOKEN = ["completion_token_ids", "topk_token_ids", "topk_logprobs", "token_logprob", "tail_logprob"]


def sizes(table: pa.Table) -> dict:
    """Bytes of the table as Arrow IPC (what the datasets cache holds) and as zstd parquet (the published parts)."""
    out = {}
    for name, t in (("all", table), ("per_token", table.select(PER_TOKEN))):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, t.schema) as w:
            w.write_table(t)
        buf = io.BytesIO()
        pq.write_table(t, buf, **parquet_options(t.schema))
        out[name] = (sink.getvalue().size, buf.getbuffer().nbytes)
    return out


def published(directory: Path, work: Path) -> tuple[pa.Table, int, int]:
    """(table, bytes of every file in the published directory, bytes of the Arrow cache the reader makes)."""
    dir_bytes = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    ds = load_teacher_dataset(str(directory), cache_dir=str(work / "cache" / directory.name))
    cache_bytes = sum(Path(c["filename"]).stat().st_size for c in ds.cache_files)
    return ds.data.table, dir_bytes, cache_bytes


def tiny_teacher_table(k: int, prompts: int, work: Path):
    out = work / f"k{k}"
    cfg = load_config(GenerateConfig, str(ROOT / "recipes/tiny/generate.yaml"), values_={
        "model": str(ROOT / "data/tiny_task/teacher"), "prompts": str(ROOT / "data/tiny_task/heldout.jsonl"),
        "output_dir": str(out), "limit": prompts, "logprobs": k, "overwrite": True})
    generate.main(cfg)
    return published(out, work)


def tiny_teacher_kd_error(table: pa.Table, k: int):
    """Recompute the exact float32 logits of the stored completions; compare float32 and float16 top-k."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ROOT / "data/tiny_task/teacher").eval()
    rows = table.select(["prompt_token_ids", "completion_token_ids", "topk_logprobs"]).to_pylist()
    kl_stored, kd32, kd16 = [], [], []
    for r in rows:
        p, c = r["prompt_token_ids"], r["completion_token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1].float()  # (C, V)
        lp = torch.log_softmax(logits, -1)
        top32, ids = lp.topk(k, -1)  # (C, k)
        tail = lp.scatter(-1, ids, float("-inf")).logsumexp(-1)  # (C,)
        top16 = top32.half().float()
        assert torch.allclose(top16, torch.tensor(r["topk_logprobs"]), rtol=2e-3, atol=1e-3), "stored = rounded float32"
        s_top, s_tail = student_buckets(logits / 2, ids)  # the blurred student, (C, k) and (C,)
        s = buckets(s_top, s_tail)
        p32, p16 = buckets(top32, tail), buckets(top16, tail)
        kl_stored.append(divergence("forward_kl", p32, p16))
        kd32.append(divergence("forward_kl", p32, s))
        kd16.append(divergence("forward_kl", p16, s))
    kl_stored, kd32, kd16 = (torch.cat(x).double() for x in (kl_stored, kd32, kd16))
    return float(kl_stored.mean()), float(kd32.mean()), float((kd16 - kd32).abs().mean()), \
        float(((kd16 - kd32).abs().sum() / kd32.abs().sum()))


def synthetic_table(k: int, positions: int, vocab: int = 151_936, seed: int = 0):
    """Worst case for compression: uniform random top-k ids over a real vocabulary; logprobs of a peaked
    random distribution (Gaussian logits, scale 4). 16-token completions, like the tiny task's."""
    g = torch.Generator().manual_seed(seed)
    comps, meta, C = [], [], 16
    kl_stored, kd32, kd16 = [], [], []
    for i in range(positions // C):
        logits = torch.randn(C, vocab, generator=g) * 4  # (C, V)
        lp = torch.log_softmax(logits, -1)
        top, _ = lp.topk(k, -1)
        ids = torch.randint(0, vocab, (C, k), generator=g)  # ids as a real model's: no structure to exploit
        tail = lp.scatter(-1, lp.topk(k, -1).indices, float("-inf")).logsumexp(-1)
        tok = ids[:, 0].tolist()
        comps.append(Completion(tok, ids, top, top[:, 0], tail, "length"))
        meta.append({"id": f"s{i}#0", "prompt_id": f"s{i}", "messages": [{"role": "user", "content": "x" * 40}],
                     "prompt_token_ids": list(range(40)), "completion": "w" * 4 * C})  # ~4 characters per token
        s_top, s_tail = student_buckets(logits / 2, lp.topk(k, -1).indices)
        p32, p16, s = buckets(top, tail), buckets(top.half().float(), tail), buckets(s_top, s_tail)
        kl_stored.append(divergence("forward_kl", p32, p16))
        kd32.append(divergence("forward_kl", p32, s))
        kd16.append(divergence("forward_kl", p16, s))
    table = rows_table(meta, comps, None, k, dataset_features(k))
    kl_stored, kd32, kd16 = (torch.cat(x).double() for x in (kl_stored, kd32, kd16))
    return table, (float(kl_stored.mean()), float(kd32.mean()), float((kd16 - kd32).abs().mean()),
                   float((kd16 - kd32).abs().sum() / kd32.abs().sum()))


def main(prompts: int = 400) -> None:
    torch.set_num_threads(1)
    print("| data | k | tokens | published dir B/token (all / per-token) | Arrow cache B/token (all / per-token) "
          "| KL(P32‖P16)/token | KD(P32‖Q)/token | abs. KD error | rel. KD error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for k in (5, 20, 50):
            table, dir_bytes, cache_bytes = tiny_teacher_table(k, prompts, work)
            tokens = sum(len(x) for x in table.column("completion_token_ids").to_pylist())
            s = sizes(table)
            err = tiny_teacher_kd_error(table, k)
            print(f"| tiny teacher (V=86) | {k} | {tokens:,} | {dir_bytes / tokens:.1f} / "
                  f"{s['per_token'][1] / tokens:.1f} | {cache_bytes / tokens:.1f} / {s['per_token'][0] / tokens:.1f} "
                  f"| {err[0]:.2e} | {err[1]:.4f} | {err[2]:.2e} | {err[3]:.2e} |")
        for k in (5, 20, 50):
            table, err = synthetic_table(k, 2048)
            out = work / f"synthetic{k}"
            write_parts([table], out, table.schema)
            table, dir_bytes, cache_bytes = published(out, work)
            tokens = 2048
            s = sizes(table)
            print(f"| synthetic worst case (V=151,936) | {k} | {tokens:,} | {dir_bytes / tokens:.1f} / "
                  f"{s['per_token'][1] / tokens:.1f} | {cache_bytes / tokens:.1f} / {s['per_token'][0] / tokens:.1f} "
                  f"| {err[0]:.2e} | {err[1]:.4f} | {err[2]:.2e} | {err[3]:.2e} |")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
