"""Evaluation: teacher and students on held-out prompts, one report (JSON + Markdown + per-example JSONL).

    llm-distill evaluate recipes/tiny/evaluate.yaml students.kd=runs/quickstart/kd-seed0

Every model (full directory or LoRA adapter) answers every prompt, greedily or sampled over several seeds.
Per model: exact match against references (normalised per task type; with `references: [...]` an answer in the
set of right answers counts) and ROUGE-L F1 against references and against the teacher's answers
(`rouge-score`), agreement with the teacher, mean token KL(teacher || student) and NLL of the teacher's held-out
completions (same tokenizer only), parameters, size on disk, generation tokens/s and per-prompt latency; with
`answer_samples`, the answer distributions sampled at T = 1 (share right, right answers covered, total variation
to the teacher's); 95% bootstrap intervals over prompts. Writes report.json, report.md, report.png (quality vs
size and speed) and examples.jsonl (every answer side by side).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backends import build_backend
from .config import EvaluateConfig, config_to_dict
from .data import check_output_dir, encode_prompt, load_prompts, publish, staging_dir, write_run_record
from .decoding import decode_batch
from .errors import UserError
from .models import (context_length, count_parameters, eos_ids, load_model, load_tokenizer, resolve_device,
                     resolve_dtype, tokenizer_hash)
from .student import StudentLoss, check_chunked_head, collate
from .validate import check_model_dir, one_line


def normalize_answer(text: str, mode: str = "whitespace") -> str:
    """Exact-match normalisation: `whitespace` collapses spaces, `lower` also case-folds, `number` keeps the last
    number in the text (so "The answer is 1,234." matches "1234")."""
    if mode == "number":
        nums = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
        return nums[-1] if nums else ""
    out = " ".join(text.split())
    return out.lower() if mode == "lower" else out


def rouge_l(targets: list, predictions: list[str]) -> list[float]:
    """ROUGE-L F1 per pair; a target that is a list (several right answers) scores against the best of them."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [scorer.score_multi(t, p)["rougeL"].fmeasure if isinstance(t, list) else
            scorer.score(t, p)["rougeL"].fmeasure for t, p in zip(targets, predictions)]


def is_right(answer: str, valid: list[str], mode: str) -> float:
    """1.0 when the normalised answer equals any normalised right answer."""
    a = normalize_answer(answer, mode)
    return float(any(a == normalize_answer(v, mode) for v in valid))


def sample_answers(model, tokenizer, prompt_ids: list[list[int]], n: int, max_new_tokens: int, batch_size: int,
                   seed: int) -> list[list[str]]:
    """n answers per prompt sampled at T = 1 (the model's own distribution): (prompts,) -> (prompts, n)."""
    flat = [p for p in prompt_ids for _ in range(n)]
    outs, _, _ = answer_all(model, tokenizer, flat, max_new_tokens, batch_size, 1, temperature=1.0, seed=seed)
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True).strip() for c in outs]
    return [texts[i * n:(i + 1) * n] for i in range(len(prompt_ids))]


def total_variation(a: list[str], b: list[str]) -> float:
    """Total variation distance between two empirical answer distributions (equal-size samples)."""
    from collections import Counter

    ca, cb = Counter(a), Counter(b)
    return 0.5 * sum(abs(ca[x] / len(a) - cb[x] / len(b)) for x in ca.keys() | cb.keys())


def bootstrap_ci(values: list[float], resamples: int, seed: int = 0) -> list[float] | None:
    """95% percentile interval of the mean over prompts, resampling prompts with replacement."""
    import numpy as np

    if resamples == 0 or len(values) < 2:
        return None
    x = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[idx].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def answer_all(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int, k: int,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
    """Completions for every prompt (batched, longest first) and the generation throughput."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    results = [None] * len(prompt_ids)
    stop = eos_ids(model, tokenizer)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    t0, n_tokens = time.perf_counter(), 0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        outs = decode_batch(model, [prompt_ids[i] for i in idx], pad_id=tokenizer.pad_token_id, stop_ids=stop,
                            vocab_size=len(tokenizer), max_new_tokens=max_new_tokens, k=k, temperature=temperature,
                            top_p=top_p, generator=generator)
        for i, c in zip(idx, outs):
            results[i] = c
            n_tokens += len(c.token_ids)
    elapsed = time.perf_counter() - t0
    return results, n_tokens, elapsed


def resolve_backend(name: str) -> str:
    """`auto` -> vllm when it imports and a CUDA device is visible, else transformers (on CPU, vLLM's engine is
    chosen only by name: `backend: vllm`)."""
    if name != "auto":
        return name
    import importlib.util

    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "transformers"


def answer_all_vllm(path: str, cfg: EvaluateConfig, prompt_ids: list[list[int]], k: int, seeds: list[int]):
    """Per seed: (completions, tokens, seconds) from one vLLM engine; then batch-1 latency; the engine is shut
    down before returning so that the transformers copy (for KL and NLL) has the GPU."""
    engine = build_backend(None, backend="vllm", model=path, logprobs=k, temperature=cfg.temperature, top_p=cfg.top_p,
                           max_new_tokens=cfg.max_new_tokens, dtype=cfg.dtype,
                           gpu_memory_utilization=cfg.gpu_memory_utilization)
    try:
        runs = []
        for seed in seeds:
            engine.seed = seed  # each request is seeded from (seed, prompt, sample)
            t0 = time.perf_counter()
            outs = [c[0] for c in engine.generate(prompt_ids, progress=lambda *_: None)]
            runs.append((outs, sum(len(c.token_ids) for c in outs), time.perf_counter() - t0))
        times = []
        for p in prompt_ids[:cfg.latency_prompts]:
            t0 = time.perf_counter()
            engine.generate([p], progress=lambda *_: None)
            times.append(time.perf_counter() - t0)
    finally:
        engine.close()  # before the transformers copy (for KL and NLL) loads: the GPU is its
    return runs, (statistics.median(times) if times else None)


def answer_all_server(path: str, cfg: EvaluateConfig, prompt_ids: list[list[int]], k: int, seeds: list[int]):
    """answer_all_vllm for a teacher behind vLLM servers (teacher_server_urls): per seed (completions, tokens,
    seconds), then batch-1 latency through the server, and the servers' context length."""
    client = build_backend(None, backend="server", model=path, server_urls=cfg.teacher_server_urls,
                           server_model=cfg.teacher_server_model, logprobs=k, temperature=cfg.temperature,
                           top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    try:
        runs = []
        for seed in seeds:
            client.seed = seed  # each request is seeded from (seed, prompt, sample)
            t0 = time.perf_counter()
            outs = [c[0] for c in client.generate(prompt_ids)] if prompt_ids else []
            runs.append((outs, sum(len(c.token_ids) for c in outs), time.perf_counter() - t0))
        times = []
        for p in prompt_ids[:cfg.latency_prompts]:
            t0 = time.perf_counter()
            client.generate([p])
            times.append(time.perf_counter() - t0)
        return runs, (statistics.median(times) if times else None), client.context_length()
    finally:
        client.close()


def latency(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int) -> float:
    """Median seconds to answer one prompt on its own (batch 1, greedy)."""
    stop = eos_ids(model, tokenizer)
    times = []
    for p in prompt_ids:
        t0 = time.perf_counter()
        decode_batch(model, [p], pad_id=tokenizer.pad_token_id, stop_ids=stop, vocab_size=len(tokenizer),
                     max_new_tokens=max_new_tokens, k=1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_for_eval(path: str, device, dtype):
    """A full model directory, or a PEFT/LoRA adapter directory (merged into its base for evaluation).

    Returns (model, tokenizer, info) where info records the adapter and the bytes on disk of what was given.
    """
    p = Path(path)
    info = {"adapter": False}
    if (p / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        try:
            model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - one line naming the adapter, whatever the loader raised
            raise UserError(f"{path}: cannot load the LoRA adapter or its base model ({one_line(e)})") from None
        info = {"adapter": True, "trainable_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)}
        model = model.merge_and_unload().to(device).eval()
        tok_path = path if (p / "tokenizer_config.json").is_file() else model.config._name_or_path
        tokenizer = load_tokenizer(tok_path)
    else:
        tokenizer, model = load_tokenizer(path), load_model(path, device, dtype)
    if p.is_dir():
        info["disk_bytes"] = sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin"))
    return model, tokenizer, info


def contamination(held_out, train_path: str) -> list[str]:
    """Ids of held-out prompts whose conversation also appears among the training prompts."""
    key = lambda msgs: json.dumps([(m["role"], " ".join(m["content"].split())) for m in msgs])  # noqa: E731
    seen = {key(p.messages) for p in load_prompts(train_path)}
    return [p.id for p in held_out if key(p.messages) in seen]


@torch.no_grad()
def teacher_kl(model, tokenizer, examples: list[dict], batch_size: int) -> tuple[float, float]:
    """Mean per-token KL(teacher || student) on the k + 1 buckets and student NLL of the teacher's tokens."""
    vocab = len(tokenizer)
    try:
        check_chunked_head(model, vocab, torch.tensor([examples[0]["prompt"]], device=model.device))
        chunk = 1024
    except UserError:
        chunk = 0  # a head that is not a plain projection: use the model's full logits
    loss = StudentLoss(model, vocab, chunk, kd_weight=1.0, ce_weight=1.0)  # forward KL at T = 1, and NLL
    kd = ce = 0.0
    n = 0
    for s in range(0, len(examples), batch_size):
        b = {k: v.to(model.device) for k, v in collate(examples[s:s + batch_size], tokenizer.pad_token_id).items()}
        kd_sum, ce_sum = loss(**b)
        kd, ce, n = kd + float(kd_sum), ce + float(ce_sum), n + int((b["labels"] != -100).sum())
    # KL >= 0; a model compared with itself can land at -1e-8 through float32 rounding.
    return max(kd / max(n, 1), 0.0), ce / max(n, 1)


COLUMNS = [("params", "params", "{:,}"), ("disk_mb", "MB on disk", "{:.1f}"),
           ("exact_match", "exact match [95% CI]", "{:.1%}"), ("rouge_l_vs_reference", "ROUGE-L vs ref", "{:.3f}"),
           ("rouge_l_vs_teacher", "ROUGE-L vs teacher", "{:.3f}"), ("agreement", "agrees w/ teacher", "{:.1%}"),
           ("sampled_exact_match", "exact, sampled T=1", "{:.1%}"),
           ("answer_coverage", "right answers covered", "{:.1%}"), ("answer_tv", "TV to teacher's answers", "{:.3f}"),
           ("kl", "KL(T‖S)/token", "{:.4f}"), ("nll", "NLL/token", "{:.4f}"), ("tokens_per_s", "gen tok/s", "{:.0f}"),
           ("latency_s", "latency/prompt", "{:.3f}s")]


def markdown_table(report: dict) -> str:
    cols = [c for c in COLUMNS if any(m.get(c[0]) is not None for m in report["models"].values())]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, m in report["models"].items():
        cells = []
        for key, _, fmt in cols:
            cell = fmt.format(m[key]) if m.get(key) is not None else "n/a"
            if m.get(f"{key}_ci"):
                cell += " [" + ", ".join(fmt.format(v) for v in m[f"{key}_ci"]) + "]"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Quality against parameters and against generation speed, one point per model, 95% CI bars."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "exact_match" if any("exact_match" in m for m in report["models"].values()) else "rouge_l_vs_teacher"
    models = {n: m for n, m in report["models"].items() if m.get(key) is not None}
    if not models:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, xkey, xlabel in ((axes[0], "params", "parameters"), (axes[1], "tokens_per_s", "generation tokens/s")):
        for name, m in models.items():
            if m.get(xkey) is None:  # a served teacher has no local size
                continue
            ci = m.get(f"{key}_ci") or [m[key], m[key]]
            ax.errorbar(m[xkey], m[key], yerr=[[m[key] - ci[0]], [ci[1] - m[key]]], fmt="o", capsize=3)
            ax.annotate(name, (m[xkey], m[key]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if xkey == "params":  # sizes span decades; short engineering labels (137k, 1M) keep minor ticks legible
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter())
            ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.EngFormatter())
            ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report['prompts']} ({report['num_prompts']} prompts)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _per_prompt(runs: list[list[float]]) -> list[float]:
    """Average each prompt's score over sampling runs: (runs, prompts) -> (prompts,)."""
    return [sum(col) / len(col) for col in zip(*runs)]


def main(cfg: EvaluateConfig) -> dict:
    models = ([("teacher", cfg.teacher)] if cfg.teacher else []) + list(cfg.students.items())
    # The output is checked first (writable, not an input, ...): evaluate's work all comes before its write.
    check_output_dir(cfg.output_dir, "evaluate", config_to_dict(cfg), cfg.overwrite,
                     [cfg.prompts, cfg.train_prompts] + [path for _, path in models])
    prompts = load_prompts(cfg.prompts, cfg.limit, allow_empty=True)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    refs = [p.valid_answers() for p in prompts]  # (prompts, right answers)
    has_refs = bool(prompts) and all(r is not None for r in refs)
    check_models(cfg, models)
    seeds = cfg.seeds if cfg.temperature > 0 else [0]
    protocol = "greedy" if cfg.temperature == 0 else f"T={cfg.temperature}, top_p={cfg.top_p}, seeds {seeds}"
    backend = resolve_backend(cfg.backend)
    if backend == "vllm":
        from .vllm_backend import require_vllm

        require_vllm()  # a one-line error on a machine without vLLM or CUDA, before any model loads
    report = start_report(cfg, prompts, protocol, backend, has_refs)
    held_out = HeldOut(prompts, refs, has_refs, [cfg.task_normalization.get(p.task, cfg.normalization)
                                                 for p in prompts], seeds)
    for name, path in models:
        evaluate_model(cfg, name, path, held_out, backend, device, dtype, report)
    write_report(cfg, report, prompts, held_out.answers, protocol)
    return report


def check_models(cfg: EvaluateConfig, models: list) -> None:
    """Fail before any work on a missing or broken model (or unreadable training prompts)."""
    for name, path in models:
        if not isinstance(path, str) or not path:
            raise UserError(f"evaluate: model '{name}' needs a path")
        if not (name == "teacher" and cfg.teacher_server_urls):  # a served teacher: only its tokenizer is here
            check_model_dir(path, f"model '{name}'")
        if not (Path(path) / "adapter_config.json").is_file():
            load_tokenizer(path)
    if cfg.train_prompts:
        load_prompts(cfg.train_prompts)  # read again by the contamination check; refused here, before any model runs


def start_report(cfg: EvaluateConfig, prompts: list, protocol: str, backend: str, has_refs: bool) -> dict:
    """The report before any model runs: the protocol, notes on what cannot be computed, contamination."""
    report = {"prompts": cfg.prompts, "num_prompts": len(prompts), "protocol": protocol, "backend": backend,
              "models": {}, "notes": []}
    if not prompts:
        report["notes"].append("the held-out set is empty: only size metrics are reported")
    elif not has_refs:
        report["notes"].append("prompts have no (or only some) references: exact match and ROUGE-L vs reference "
                               "not computed")
    if cfg.train_prompts and prompts:
        leaked = contamination(prompts, cfg.train_prompts)
        report["contaminated_ids"] = leaked
        if leaked:
            report["notes"].append(f"contamination: {len(leaked)} of {len(prompts)} held-out prompts also appear in "
                                   f"{cfg.train_prompts} (ids in report.json: contaminated_ids)")
            print(f"evaluate: warning: {len(leaked)} held-out prompts also appear in the training prompts")
    return report


@dataclass
class HeldOut:
    """The held-out prompts, and what later models are compared with, filled in as the models run (teacher
    first)."""

    prompts: list
    refs: list                # per prompt, its right answers (None without a reference)
    has_refs: bool
    modes: list               # per prompt, its answer normalisation
    seeds: list
    answers: dict = field(default_factory=dict)  # model name -> its first run's answers
    teacher_samples: list | None = None          # (prompts, answer_samples), normalised
    teacher_examples: list | None = None         # the teacher's completions as `collate` examples (KL, NLL)
    teacher_hash: str | None = None


def evaluate_model(cfg: EvaluateConfig, name: str, path: str, held: HeldOut, backend: str, device, dtype,
                   report: dict) -> None:
    """One model's answers and scores into report["models"][name]."""
    prompts, seeds = held.prompts, held.seeds
    is_teacher = name == "teacher" and bool(cfg.teacher)
    served = is_teacher and bool(cfg.teacher_server_urls)
    engine_runs = None
    if served:  # no local copy: answers, context and latency come from the servers
        model, tokenizer, info = None, load_tokenizer(path), {"adapter": False}
        engine_runs = answer_all_server(path, cfg, [encode_prompt(tokenizer, p.messages, path) for p in prompts],
                                        cfg.logprobs, seeds)
    elif backend == "vllm" and prompts and not (Path(path) / "adapter_config.json").is_file():
        tok = load_tokenizer(path)
        engine_runs = answer_all_vllm(path, cfg, [encode_prompt(tok, p.messages, path) for p in prompts],
                                      cfg.logprobs if is_teacher else 1, seeds)
    if not served:
        model, tokenizer, info = load_for_eval(path, device, dtype)
    m = {"path": path, "params": count_parameters(model) if model is not None else None}
    if served:
        m["servers"] = list(cfg.teacher_server_urls)
    if "disk_bytes" in info:
        m["disk_mb"] = info["disk_bytes"] / 2**20
    if info["adapter"]:
        m["adapter_trainable_params"] = info["trainable_params"]
    report["models"][name] = m
    if not prompts:
        return
    ids = encode_prompts(cfg, name, path, prompts, tokenizer, engine_runs[2] if served else context_length(model))
    runs, n_tokens, elapsed, first_outs = [], 0, 0.0, None
    for r, seed in enumerate(seeds):
        if engine_runs:
            outs, n, secs = engine_runs[0][r]
        else:
            outs, n, secs = answer_all(model, tokenizer, ids, cfg.max_new_tokens, cfg.batch_size,
                                       cfg.logprobs if is_teacher else 1, cfg.temperature, cfg.top_p, seed)
        first_outs = first_outs or outs
        runs.append([tokenizer.decode(c.token_ids, skip_special_tokens=True).strip() for c in outs])
        n_tokens, elapsed = n_tokens + n, elapsed + secs
    held.answers[name] = runs[0]
    m.update(tokens_per_s=n_tokens / max(elapsed, 1e-9), mean_completion_tokens=n_tokens / len(prompts) / len(runs))
    m["backend"] = "server" if served else "vllm" if engine_runs else "transformers"
    if engine_runs and engine_runs[1] is not None:
        m["latency_s"] = engine_runs[1]
    elif cfg.latency_prompts:
        m["latency_s"] = latency(model, tokenizer, ids[:cfg.latency_prompts], cfg.max_new_tokens)
    scores = answer_scores(cfg, held, runs)
    if cfg.answer_samples and model is not None:
        scores.update(sample_scores(cfg, held, model, tokenizer, ids, is_teacher))
    elif cfg.answer_samples and is_teacher:
        report["notes"].append("answer_samples: the served teacher is not sampled (no local copy); "
                               "answer_tv not computed")
    for key, vals in scores.items():
        m[key] = sum(vals) / len(vals)
        m[f"{key}_ci"] = bootstrap_ci(vals, cfg.bootstrap)
    if "exact_match" in scores:
        by_task: dict[str, list[float]] = {}
        for p, v in zip(prompts, scores["exact_match"]):
            by_task.setdefault(p.task or "all", []).append(v)
        m["exact_match_by_task"] = {t: sum(v) / len(v) for t, v in sorted(by_task.items())}
    if is_teacher:
        held.teacher_hash = tokenizer_hash(tokenizer)
        held.teacher_examples = [{"prompt": pid, "completion": c.token_ids, "topk_ids": c.topk_ids.tolist(),
                                  "topk_logprobs": c.topk_logprobs.tolist(), "tail": c.tail_logprob.tolist(),
                                  "id": p.id} for pid, c, p in zip(ids, first_outs, prompts) if c.token_ids]
    if held.teacher_examples and model is not None and tokenizer_hash(tokenizer) == held.teacher_hash:
        m["kl"], m["nll"] = teacher_kl(model, tokenizer, held.teacher_examples, cfg.batch_size)
    elif cfg.teacher:
        report["notes"].append(f"{name}: tokenizer differs from the teacher's; compared at the text level only "
                               "(KL/NLL not computed)")
    print(f"evaluate: {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float)))


def encode_prompts(cfg: EvaluateConfig, name: str, path: str, prompts: list, tokenizer, ctx: int | None) -> list:
    """Every prompt under the model's chat template, refused when it and max_new_tokens exceed the context."""
    ids = []
    for p in prompts:
        enc = encode_prompt(tokenizer, p.messages, path)
        if ctx is not None and len(enc) + cfg.max_new_tokens > ctx:
            raise UserError(f"{p.where}: prompt {p.id!r} has {len(enc)} tokens; with max_new_tokens="
                            f"{cfg.max_new_tokens} it exceeds {name}'s context of {ctx}")
        ids.append(enc)
    return ids


def answer_scores(cfg: EvaluateConfig, held: HeldOut, runs: list[list[str]]) -> dict[str, list[float]]:
    """Per-prompt scores of the answers (averaged over runs): against the references and the teacher's."""
    refs, modes = held.refs, held.modes
    scores: dict[str, list[float]] = {}
    if held.has_refs:
        scores["exact_match"] = _per_prompt([[is_right(t, r, md) for t, r, md in zip(texts, refs, modes)]
                                             for texts in runs])
        scores["rouge_l_vs_reference"] = _per_prompt([rouge_l(refs, texts) for texts in runs])
    if cfg.teacher:
        teacher = held.answers["teacher"]
        scores["rouge_l_vs_teacher"] = _per_prompt([rouge_l(teacher, texts) for texts in runs])
        scores["agreement"] = _per_prompt([[float(normalize_answer(a, md) == normalize_answer(b, md))
                                            for a, b, md in zip(teacher, texts, modes)]
                                           for texts in runs])
    return scores


def sample_scores(cfg: EvaluateConfig, held: HeldOut, model, tokenizer, ids: list, is_teacher: bool) -> dict:
    """answer_samples answers per prompt at T = 1: share right, right answers covered, TV to the teacher's."""
    refs, modes, n = held.refs, held.modes, cfg.answer_samples
    scores: dict[str, list[float]] = {}

    def draw(seed: int) -> list[list[str]]:  # (prompts, n) normalised answers
        texts = sample_answers(model, tokenizer, ids, n, cfg.max_new_tokens, cfg.batch_size, seed=seed)
        return [[normalize_answer(t, md) for t in row] for row, md in zip(texts, modes)]

    drawn = draw(1)
    if held.has_refs:
        scores["sampled_exact_match"] = [sum(is_right(t, r, md) for t in d) / n
                                         for d, r, md in zip(drawn, refs, modes)]
        scores["answer_coverage"] = [len({t for t in d if is_right(t, r, md)}) / min(len(set(r)), n)
                                     for d, r, md in zip(drawn, refs, modes)]
    if is_teacher:  # a second, independent draw of the teacher: the floor of answer_tv
        held.teacher_samples = drawn
        scores["answer_tv"] = [total_variation(a, b) for a, b in zip(drawn, draw(2))]
    elif held.teacher_samples is not None:
        scores["answer_tv"] = [total_variation(a, b) for a, b in zip(drawn, held.teacher_samples)]
    return scores


def write_report(cfg: EvaluateConfig, report: dict, prompts: list, answers: dict, protocol: str) -> None:
    """report.json, report.md (+ report.png) and examples.jsonl, published together."""
    tmp = staging_dir(cfg.output_dir)
    (tmp / "report.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(report)
    notes = "".join(f"\n- {n}" for n in report["notes"])
    (tmp / "report.md").write_text(f"# Evaluation on {cfg.prompts} ({len(prompts)} prompts, {protocol})\n\n"
                                   f"{table}\n{notes}\n" + ("\n![quality vs size and speed](report.png)\n"
                                                             if cfg.plot and prompts else ""))
    with (tmp / "examples.jsonl").open("w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": p.id, "task": p.task, "prompt": p.messages[-1]["content"],
                                "reference": p.reference, **({"references": p.references} if p.references else {}),
                                **{n: answers[n][i] for n in answers}}) + "\n")
    if cfg.plot and prompts:
        plot(report, tmp / "report.png")
    write_run_record(tmp, "evaluate", config_to_dict(cfg))
    publish(tmp, cfg.output_dir)
    print(table + notes)
