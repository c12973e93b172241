# Teacher generation throughput: the transformers backend batched (prompts sorted by length, KV cache) vs one
# prompt at a time, on the bundled tiny teacher and held-out prompts:
#     python benchmarks/generate_batched.py             (CPU, about 1 minute; on the GPU when CUDA is available)
#     python benchmarks/generate_batched.py 200 128 3   (prompts, batch size, rounds; 128 as in recipes/tiny)
# Both sides run `TransformersBackend.generate` (greedy, k=20, max_new_tokens=16, top-k + tail captured every
# step), alternating batched and single rounds so machine noise hits both; the ratio of total tokens/s over
# the rounds, measured in this one run, is what to read.
import sys
import time
from pathlib import Path

import torch

from llm_distill.data import encode_prompt, load_prompts
from llm_distill.generate import TransformersBackend

ROOT = Path(__file__).resolve().parents[1]


def main(prompts: int = 200, batch_size: int = 128, rounds: int = 3) -> None:
    torch.set_num_threads(1)
    backends = {bs: TransformersBackend(str(ROOT / "data/tiny_task/teacher"), device="auto", k=20, temperature=0.0,
                                        max_new_tokens=16, batch_size=bs) for bs in (batch_size, 1)}
    tok = backends[1].tokenizer
    data = load_prompts(str(ROOT / "data/tiny_task/heldout.jsonl"), prompts)
    ids = [encode_prompt(tok, p.messages) for p in data]
    keys = [p.id for p in data]
    backends[1].generate(ids[:4], keys[:4])  # warm-up
    totals = {bs: [0, 0.0] for bs in backends}
    outputs = {}
    for r in range(rounds):
        for bs in (backends if r % 2 == 0 else list(backends)[::-1]):
            t0 = time.perf_counter()
            out = backends[bs].generate(ids, keys)
            totals[bs][1] += time.perf_counter() - t0
            totals[bs][0] += sum(len(s[0].token_ids) for s in out)
            outputs[bs] = [s[0].token_ids for s in out]
    same = sum(a == b for a, b in zip(outputs[batch_size], outputs[1]))
    single = totals[1][0] / totals[1][1]
    print(f"tiny teacher ({sum(p.numel() for p in backends[1].model.parameters()):,} params), {len(ids)} held-out "
          f"prompts x {rounds} rounds, greedy, k=20, max_new_tokens=16, torch threads {torch.get_num_threads()}, "
          f"{backends[1].device} {backends[1].model.dtype}; "
          f"{same}/{len(ids)} completions identical between the two")
    print("| mode | tokens | seconds | tokens/s | vs one at a time |")
    print("|---|---:|---:|---:|---:|")
    for bs, label in ((1, "one prompt at a time"), (batch_size, f"batched ({batch_size}, length-sorted)")):
        n, sec = totals[bs]
        print(f"| {label} | {n:,} | {sec:.1f} | {n / sec:.0f} | {n / sec / single:.1f}x |")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
