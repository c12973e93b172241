# Peak memory and time of the fused and chunked KD + CE losses vs a dense implementation (full logits +
# log_softmax), forward and backward, at Qwen2.5's vocabulary (151,936) and 4,096 completion tokens:
#     python benchmarks/loss_memory.py            (CPU: about 5 minutes, ~15 GB RAM for the dense run)
# "fused" is `losses.fused_head_loss` (gradients computed in the forward pass, loss_impl=fused), "chunked" is
# `losses.student_logprobs` (each chunk recomputed in backward, loss_impl=chunked).
# Each variant runs in a fresh process; "peak" is the process's peak RSS above what it held once the inputs
# and the parameter gradient buffer were allocated, i.e. the memory the loss itself needs.
# On a machine with CUDA the same command runs on the GPU; "peak" is then torch.cuda.max_memory_allocated above
# what was allocated before the loss (the caching allocator's reserve is not counted).
import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from llm_distill.losses import fused_head_loss, kd_per_token, student_buckets, student_logprobs

V, N, D, K = 151_936, 4_096, 896, 20
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def inputs():
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(N, D, generator=g) * 0.5).requires_grad_(True)
    W = (torch.randn(V, D, generator=g) * 0.05).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g)
    t_logits = torch.randn(N, K, generator=g) * 2  # teacher top-k as a slice of a random distribution
    t_top = torch.log_softmax(torch.cat([t_logits, torch.zeros(N, 1)], -1), -1)
    t_top, _ = t_top.sort(-1, descending=True)
    ids = torch.randint(0, V, (N, K), generator=g)
    out = h, W, labels, ids, t_top[:, :K].contiguous(), t_top[:, K:].logsumexp(-1)
    return [t.detach().to(DEVICE).requires_grad_(t.requires_grad) for t in out]


def run(variant: str, chunk: int) -> dict:
    torch.set_num_threads(2)
    h, W, labels, ids, t_top, t_tail = inputs()
    W.grad, h.grad = torch.zeros_like(W), torch.zeros_like(h)  # parameter gradients exist in any training step

    def step() -> torch.Tensor:
        if variant == "fused":
            kd, ce = fused_head_loss(h, W, labels, ids, t_top, t_tail, vocab=V, kd_weight=1.0, ce_weight=1.0,
                                     chunk_size=chunk)
            loss = (kd + ce) / N
            loss.backward()
            return loss
        if variant == "dense":
            z = h @ W.T  # (N, V) fp32
            logp = torch.log_softmax(z, -1)
            lab = logp.gather(-1, labels[:, None]).squeeze(-1)
            s_top, s_tail = student_buckets(z, ids)
        else:
            lab, s_top, s_tail = student_logprobs(h, W, labels, ids, vocab=V, chunk_size=chunk)
        loss = (kd_per_token(s_top, s_tail, t_top, t_tail).sum() - lab.sum()) / N
        loss.backward()
        return loss

    if DEVICE.type == "cuda":  # a warm-up step (cuBLAS handles, kernel selection), then the measured one
        step()
        W.grad.zero_(), h.grad.zero_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        base = rss_mb()
        t0 = time.perf_counter()
        loss = step()
        seconds = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"variant": variant, "chunk": chunk, "peak_mb": peak, "seconds": seconds, "loss": float(loss),
            "grad_h": h.grad.double().norm().item(), "grad_W": W.grad.double().norm().item()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant")
    ap.add_argument("--chunk", type=int, default=0)
    ap.add_argument("--chunks", default="256,1024")
    a = ap.parse_args()
    if a.variant:
        print(json.dumps(run(a.variant, a.chunk)))
        return
    results = []
    chunks = [int(c) for c in a.chunks.split(",")]
    for variant, chunk in [("dense", 0)] + [(v, c) for c in chunks for v in ("chunked", "fused")]:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--chunk", str(chunk)],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    dense = results[0]
    print(f"loss at V={V:,}, {N:,} completion tokens, hidden {D}, k={K}; forward + backward, fp32, "
          f"{torch.cuda.get_device_name() if DEVICE.type == 'cuda' else 'CPU'}")
    print("| variant | peak MB above inputs | vs dense | seconds | vs dense | loss | max rel. grad diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        gd = max(abs(r["grad_h"] - dense["grad_h"]) / dense["grad_h"], abs(r["grad_W"] - dense["grad_W"]) / dense["grad_W"])
        name = "dense (full logits + log_softmax)" if r["variant"] == "dense" else \
            f"{r['variant']}, {r['chunk']} positions"
        print(f"| {name} | {r['peak_mb']:,.0f} | {r['peak_mb'] / dense['peak_mb']:.3f}x | {r['seconds']:.3g} | "
              f"{r['seconds'] / dense['seconds']:.2f}x | {r['loss']:.6f} | {gd:.1e} |")


if __name__ == "__main__":
    main()
