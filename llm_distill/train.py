"""Student training: one explicit Accelerate loop over a teacher dataset.

    llm-distill train recipes/tiny/train_kd.yaml dataset=runs/teacher_data output_dir=runs/student
    accelerate launch --multi_gpu --num_processes 2 -m llm_distill train recipes/tiny/train_kd.yaml ...

Loss per optimiser step = (kd_weight * sum of token KL + ce_weight * sum of token CE) / completion tokens of the
whole step (every micro-batch on every process), so gradient accumulation and the number of processes do not
change the loss or its gradient.

On-policy distillation (GKD): with `onpolicy_fraction` λ > 0 a step, chosen with probability λ from (seed, step),
trains instead on the student's own samples for the step's prompts, scored by `teacher` in this process; its
loss is the KD term (or, with onpolicy_objective=minillm, MiniLLM's policy gradient of the sequence-level
reverse KL; experimental), normalised the same way. With onpolicy_teacher_backend=vllm the teacher is a vLLM
engine colocated on the training GPU (one training process only).

    llm-distill train recipes/tiny/train_kd.yaml onpolicy_fraction=0.5 teacher=data/tiny_task/teacher
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import torch

from .config import TrainConfig, config_to_dict
from .data import RUN_FILE, default_permissions, encode_prompt, read_provenance, write_run_record
from .errors import UserError
from .generate import _accepts, _cache_kwarg, _left_pad, _sample_inverse_cdf, decode_batch, sample_seed
from .losses import (buckets, divergence, fused_head_loss, kd_per_token, minillm_surrogate, restrict_topk,
                     student_buckets, student_logprobs, token_losses)
from .models import context_length, count_parameters, eos_ids, load_tokenizer, tokenizer_hash
from .packing import use_packed_sdpa
from .validate import check_model_dir, check_output_path, check_teacher_dataset, one_line, read_json


class TeacherRows(torch.utils.data.Dataset):
    """Rows of a teacher dataset as (prompt ids, completion ids, teacher top-k) examples for the student."""

    def __init__(self, ds, tokenizer, retokenize: bool, with_topk: bool, max_len: int):
        self.ds, self.tok, self.retokenize, self.with_topk, self.max_len = ds, tokenizer, retokenize, with_topk, max_len
        columns = ["id", "prompt_token_ids", "completion_token_ids"] if not retokenize else \
            ["id", "messages", "completion"] + (["finish_reason"] if "finish_reason" in ds.column_names else [])
        if with_topk:
            columns += ["topk_token_ids", "topk_logprobs", "tail_logprob"]
        self.ds = ds.select_columns([c for c in columns if c != "id" or "id" in ds.column_names])

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        row = self.ds[i]
        row.setdefault("id", f"row {i}")
        if self.retokenize:  # CE only: the text is re-encoded with the student's tokenizer and template
            prompt = encode_prompt(self.tok, row["messages"])
            completion = self.tok(row["completion"], add_special_tokens=False)["input_ids"]
            if row.get("finish_reason", "stop") == "stop":
                completion = completion + [self.tok.eos_token_id]
        else:
            prompt, completion = row["prompt_token_ids"], row["completion_token_ids"]
        room = self.max_len - len(prompt)
        if room < 1:
            raise UserError(f"dataset row {row['id']!r}: prompt has {len(prompt)} tokens, more than max_seq_len="
                            f"{self.max_len}; raise max_seq_len or drop long prompts")
        ex = {"prompt": prompt, "completion": completion[:room]}
        if self.with_topk:
            ex["topk_ids"] = row["topk_token_ids"][:room]
            ex["topk_logprobs"] = row["topk_logprobs"][:room]
            ex["tail"] = row["tail_logprob"][:room]
            ex["id"] = row["id"]
        return ex


def collate(examples: list[dict], pad_id: int, packing: bool = False) -> dict:
    """Right-pad prompt + completion; label position t-1 with completion token t; align the teacher's top-k.

    With packing the rows are concatenated into one sequence instead (B = 1, no padding, no attention_mask):
    `position_ids` restart at 0 for each row, which is how transformers recognises packed rows and keeps their
    attention apart (with use_cache off). Labels and top-k sit at the same offsets inside each row either way.
    Builds each tensor once for the whole batch (one torch.tensor call per field), which keeps the KD batch's
    extra top-k data cheap to assemble.
    """
    lens = [len(e["prompt"]) + len(e["completion"]) for e in examples]
    T = sum(lens) if packing else max(lens)
    B = 1 if packing else len(examples)
    ids, mask, labels = [], [], []
    positions, offset = [], 0  # packing: position ids; where the current row starts in the packed sequence
    with_topk = "topk_ids" in examples[0]
    pos_b, pos_t, top_ids, top_lp, tails = [], [], [], [], []
    with_pg = "teacher_lp" in examples[0]  # MiniLLM rows: per-token teacher logprob and sampling logprob
    teacher_lp, sample_lp = [], []
    for b, e in enumerate(examples):
        p, c = len(e["prompt"]), len(e["completion"])
        pad = 0 if packing else T - p - c
        ids.append(e["prompt"] + e["completion"] + [pad_id] * pad)
        mask.append([1] * (p + c) + [0] * pad)
        # Logits at position j predict token j + 1: completion token t sits at p + t, so it is predicted at p + t - 1.
        labels.append([-100] * (p - 1) + e["completion"] + [-100] * (pad + 1))
        positions.append(list(range(p + c)))
        if with_topk and c:
            pos_b += [0 if packing else b] * c
            pos_t += range(offset + p - 1, offset + p + c - 1)
            top_ids += e["topk_ids"]
            top_lp += e["topk_logprobs"]
            tails += e["tail"]
            if with_pg:
                teacher_lp += e["teacher_lp"]
                sample_lp += e["sample_lp"]
        offset += p + c if packing else 0
    if packing:
        if with_pg:
            raise ValueError("collate: MiniLLM rows are not packed (their reward-to-go runs along each row)")
        flat = [[x for row in rows for x in row] for rows in (ids, labels, positions)]
        batch = {"input_ids": torch.tensor(flat[:1], dtype=torch.long),  # (1, T)
                 "position_ids": torch.tensor(flat[2:], dtype=torch.long), "labels": torch.tensor(flat[1:2], dtype=torch.long)}
    else:
        batch = {"input_ids": torch.tensor(ids, dtype=torch.long),
                 "attention_mask": torch.tensor(mask, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}
    if with_topk:
        k = len(top_ids[0]) if top_ids else 1
        lp = torch.tensor(top_lp, dtype=torch.float32).view(-1, k)  # (M, k) over all completion positions
        tail = torch.tensor(tails, dtype=torch.float32)  # (M,)
        bad = torch.isnan(lp).any(-1) | torch.isnan(tail)
        if bool(bad.any()):
            row = examples[pos_b[int(bad.nonzero()[0])]]
            raise UserError(f"dataset row {row.get('id')!r}: teacher logprobs contain NaN; regenerate that row")
        bi, ti = torch.tensor(pos_b, dtype=torch.long), torch.tensor(pos_t, dtype=torch.long)
        batch["topk_ids"] = torch.zeros((B, T, k), dtype=torch.long)  # (B, T, k)
        batch["topk_logprobs"] = torch.zeros((B, T, k), dtype=torch.float32)  # (B, T, k)
        batch["tail_logprob"] = torch.zeros((B, T), dtype=torch.float32)  # (B, T)
        batch["topk_ids"][bi, ti] = torch.tensor(top_ids, dtype=torch.long).view(-1, k)
        batch["topk_logprobs"][bi, ti] = lp
        batch["tail_logprob"][bi, ti] = tail
        if with_pg:
            batch["teacher_token_logprob"] = torch.zeros((B, T), dtype=torch.float32)  # (B, T)
            batch["sample_logprob"] = torch.zeros((B, T), dtype=torch.float32)  # (B, T)
            batch["teacher_token_logprob"][bi, ti] = torch.tensor(teacher_lp, dtype=torch.float32)
            batch["sample_logprob"][bi, ti] = torch.tensor(sample_lp, dtype=torch.float32)
    return batch


class StudentLoss(torch.nn.Module):
    """The student and its token losses in one forward, so that DDP (or any wrapper) sees a single call.

    With chunk_size > 0 only completion positions reach the vocabulary projection, chunk by chunk: with
    loss_impl="chunked" through `losses.student_logprobs` (recomputed in backward), with "fused" through
    `losses.fused_head_loss` (gradients computed in the forward pass); with chunk_size 0 or loss_impl="dense"
    the model's own full logits are used (the dense reference).
    forward(batch) -> (kd_sum, ce_sum): sums over the batch's completion tokens; the caller normalises. The
    fused loss keeps the gradient of kd_weight * kd_sum + ce_weight * ce_sum, so the caller's loss must weight the
    sums so (times any scale); pass `ce_weight=` to forward when a batch's CE weight differs (on-policy: 0).
    A packed batch (`position_ids`, no attention_mask; `collate(packing=True)`) runs as one sequence.
    A MiniLLM batch (with teacher_token_logprob and sample_logprob) returns (surrogate_sum, rkl_sum) instead:
    the policy-gradient surrogate (`losses.minillm_surrogate`) and, detached, the sampled estimate of the
    sequence-level reverse KL, sum of log q - log p over the tokens (for logging).
    """

    def __init__(self, model, vocab: int, chunk_size: int, kd_weight: float, ce_weight: float,
                 kd_topk: int | None = None, minillm: dict | None = None, loss_impl: str = "chunked", **kd_options):
        super().__init__()
        self.model, self.vocab, self.chunk_size = model, vocab, chunk_size
        self.loss_impl = "dense" if not chunk_size else loss_impl
        self.minillm = minillm or {}  # single_step, length_norm
        self.kd_weight, self.ce_weight, self.kd_topk, self.kd_options = kd_weight, ce_weight, kd_topk, kd_options
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        # FSDP's transformer-based auto wrap reads the layer classes to shard from the prepared module.
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, input_ids, attention_mask=None, labels=None, topk_ids=None, topk_logprobs=None,
                tail_logprob=None, teacher_token_logprob=None, sample_logprob=None, position_ids=None,
                ce_weight=None):
        kd = self.kd_weight > 0
        if kd and self.kd_topk:
            topk_ids, topk_logprobs, tail_logprob = restrict_topk(topk_ids, topk_logprobs, tail_logprob, self.kd_topk)
        # use_cache off: with a cache object transformers does not look for packed rows in position_ids.
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": False}
        if teacher_token_logprob is not None:
            return self._minillm(inputs, labels, topk_ids, topk_logprobs, tail_logprob, teacher_token_logprob,
                                 sample_logprob)
        if self.loss_impl == "dense":
            logits = self.model(**inputs).logits[..., :self.vocab]
            kd_sum, ce_sum, _ = token_losses(logits, labels, topk_ids, topk_logprobs, tail_logprob,
                                             self.kd_weight, self.ce_weight, **self.kd_options)
            return kd_sum, ce_sum
        mask = labels != -100  # (B, T)
        hidden = self.model.get_decoder()(**inputs).last_hidden_state
        h = hidden[mask]  # (N, d): prompt positions never reach the vocabulary projection
        head = self.model.get_output_embeddings()  # bias-free Linear (V', d), called per chunk
        if self.loss_impl == "fused":
            kd_sum, ce_sum = fused_head_loss(
                h, head.weight, labels[mask], topk_ids[mask] if kd else None, topk_logprobs[mask] if kd else None,
                tail_logprob[mask] if kd else None, vocab=self.vocab, kd_weight=self.kd_weight,
                ce_weight=self.ce_weight if ce_weight is None else ce_weight, chunk_size=self.chunk_size,
                softcap=self.softcap, **self.kd_options)
            return kd_sum, ce_sum if self.ce_weight > 0 else ce_sum * 0.0  # logged CE is 0 when unweighted
        label_lp, s_topk, s_tail = student_logprobs(h, head, labels[mask], topk_ids[mask] if kd else None,
                                                    self.vocab, self.chunk_size, self.softcap)
        ce_sum = -label_lp.sum() if self.ce_weight > 0 else label_lp.sum() * 0.0
        kd_sum = kd_per_token(s_topk, s_tail, topk_logprobs[mask], tail_logprob[mask],
                              **self.kd_options).sum() if kd else label_lp.sum() * 0.0
        return kd_sum, ce_sum

    def _minillm(self, inputs, labels, topk_ids, topk_logprobs, tail_logprob, teacher_token_logprob,
                 sample_logprob):
        """MiniLLM surrogate on a batch of the student's own samples (labels = the sampled tokens). Its gradient
        flows through per-token log-probabilities, so the fused loss uses the chunked projection here."""
        mask = labels != -100  # (B, T)
        if self.loss_impl == "dense":
            z = self.model(**inputs).logits[..., :self.vocab][mask]  # (N, V)
            label_lp = torch.log_softmax(z.float(), -1).gather(-1, labels[mask][:, None]).squeeze(-1)  # (N,)
            s_topk, s_tail = student_buckets(z, topk_ids[mask])  # (N, k), (N,)
        else:
            hidden = self.model.get_decoder()(**inputs).last_hidden_state
            label_lp, s_topk, s_tail = student_logprobs(hidden[mask], self.model.get_output_embeddings(), labels[mask],
                                                        topk_ids[mask], self.vocab, self.chunk_size, self.softcap)
        single = None
        if self.minillm.get("single_step", True):
            # Exact expectation over the current token, on the teacher's k + 1 buckets (a lower bound of the
            # full-vocabulary reverse KL, equal to it when k = V).
            kl = divergence("reverse_kl", buckets(topk_logprobs[mask], tail_logprob[mask]), buckets(s_topk, s_tail))
            single = torch.zeros(mask.shape, dtype=kl.dtype, device=kl.device).index_put((mask,), kl)  # (B, T)
        q = torch.zeros(mask.shape, dtype=label_lp.dtype, device=label_lp.device).index_put((mask,), label_lp)  # (B, T)
        surrogate = minillm_surrogate(q, teacher_token_logprob, sample_logprob, mask, single,
                                      self.minillm.get("length_norm", True))
        rkl = ((q.detach() - teacher_token_logprob) * mask).sum()
        return surrogate.sum(), rkl


def check_chunked_head(model, vocab: int, input_ids: torch.Tensor) -> None:
    """The chunked path rebuilds logits as hidden @ W^T; refuse models whose head does more (scales, biases)."""
    was_training = model.training
    model.eval()  # dropout would make the two passes differ
    with torch.no_grad():
        ref = model(input_ids=input_ids[:1, :8]).logits[0, :, :vocab].float()
        h = model.get_decoder()(input_ids=input_ids[:1, :8]).last_hidden_state[0]
        z = model.get_output_embeddings()(h)[:, :vocab].float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            z = cap * torch.tanh(z / cap)
    model.train(was_training)
    if not torch.allclose(z, ref, atol=1e-3, rtol=1e-3):
        raise UserError(f"train: this model's output head is not a plain linear projection "
                        f"({type(model).__name__}); set loss_chunk_size=0 to use its full logits")


def fused_head_problem(model, distributed_type: str) -> str | None:
    """Why the fused loss cannot run here (None when it can): it multiplies by the head's weight directly."""
    if distributed_type in ("FSDP", "DEEPSPEED"):
        return f"{distributed_type} shards the head's weight, which the fused loss reads directly"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return (f"the output head is a {type(head).__module__}.{type(head).__name__}, not a plain bias-free "
                "torch.nn.Linear (LoRA on the head?)")
    return None


def check_packing(model, prompts: list[list[int]]) -> None:
    """Packed rows must not attend to each other: two rows run packed must give each row's own hidden states."""
    a, b = list(prompts[0][:8]), list(prompts[-1][:5])
    was_training = model.training
    model.eval()  # dropout would make the passes differ
    dec = model.get_decoder()
    with torch.no_grad():
        packed = dec(input_ids=torch.tensor([a + b]), position_ids=torch.tensor([list(range(len(a))) +
                                                                                  list(range(len(b)))]),
                     use_cache=False).last_hidden_state[0]  # (len a + len b, d)
        alone = torch.cat([dec(input_ids=torch.tensor([r]), use_cache=False).last_hidden_state[0] for r in (a, b)])
    model.train(was_training)
    if not torch.allclose(packed, alone, atol=1e-4, rtol=1e-4):
        raise UserError(f"train: packing=true, but this student's attention crosses packed rows "
                        f"({type(model).__name__}, attn_implementation="
                        f"{getattr(model.config, '_attn_implementation', '?')}); set packing=false")


def onpolicy_step(seed: int, step: int, fraction: float) -> bool:
    """Whether optimiser step `step` is on-policy: a pure function of (seed, step), so every process makes the
    same choice and a resumed run makes the same choices as an uninterrupted one."""
    if fraction <= 0:
        return False
    return sample_seed(seed, "onpolicy-step", step) / 2 ** 63 < fraction


def onpolicy_vllm_kwargs(cfg: TrainConfig) -> dict:
    """VLLMBackend keyword arguments of the on-policy teacher (onpolicy_teacher_backend=vllm): top-k =
    onpolicy_logprobs, its share of the training GPU, the run's seed. It only scores (prompt logprobs), so the
    sampling arguments keep their defaults. Its context is capped at max_seq_len, the longest sequence it is
    given, so that the KV cache for a long-context teacher fits in its share."""
    return {"k": cfg.onpolicy_logprobs, "gpu_memory_utilization": cfg.onpolicy_teacher_gpu_memory_utilization,
            "seed": cfg.seed, "max_model_len": cfg.max_seq_len}


@torch.no_grad()
def sample_mixture(student, teacher, prompt_ids: list[list[int]], *, pad_id: int, stop_ids: list[int], vocab: int,
                   max_new_tokens: int, temperature: float, alpha: float, row_seeds: list[int]):
    """Sample from π = α·p_teacher + (1 - α)·q_student, both tempered, one KV-cached decode loop per model.

    Each row draws one uniform per step from its own seed (batching-independent, as `decode_batch` does).
    Returns per row (token ids, log π of each token); with α = 0 the teacher is not run.
    """
    device = next(student.parameters()).device
    B = len(prompt_ids)
    input_ids, attn, pos = _left_pad(prompt_ids, pad_id, device)
    uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s),
                                       dtype=torch.float64) for s in row_seeds]).to(device)  # (B, S)
    models = [student] + ([teacher] if alpha > 0 else [])
    state = []  # per model: [cache argument name, cache, last logits (B, V)]
    for m in models:
        keep = {"logits_to_keep": 1} if _accepts(m, "logits_to_keep") else {}
        out = m(input_ids=input_ids, attention_mask=attn, position_ids=pos, use_cache=True, **keep)
        arg = _cache_kwarg(m)
        state.append([arg, getattr(out, arg), out.logits[:, -1, :vocab].float()])
    pos = pos[:, -1:]  # (B, 1)
    stop = torch.tensor(stop_ids, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logps, alive = [], [], []
    for t in range(max_new_tokens):
        log_pi = torch.log_softmax(state[0][2] / temperature, -1)  # (B, V)
        if alpha > 0:
            log_pi = torch.logaddexp(math.log1p(-alpha) + log_pi,
                                     math.log(alpha) + torch.log_softmax(state[1][2] / temperature, -1))
        token = _sample_inverse_cdf(log_pi, 1.0, 1.0, uniforms[:, t])  # softmax(log π) = π
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        logps.append(log_pi.gather(-1, token.clamp(max=vocab - 1)[:, None]).squeeze(-1))
        alive.append(~done)
        done = done | torch.isin(token, stop)
        if bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=1)
        pos = pos + 1
        for m, st in zip(models, state):
            out = m(input_ids=token[:, None], attention_mask=attn, position_ids=pos, use_cache=True, **{st[0]: st[1]})
            st[1], st[2] = getattr(out, st[0]), out.logits[:, -1, :vocab].float()
    tok, lp, live = (torch.stack(x, 1).cpu() for x in (tokens, logps, alive))  # (B, S) each
    return [(tok[i, live[i]].tolist(), lp[i, live[i]].tolist()) for i in range(B)]


def build_student(cfg: TrainConfig, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.student:
        from .models import load_model

        return load_model(cfg.student, torch.device("cpu"), torch.float32).train()
    fields = dict(cfg.student_config)
    model_type = fields.pop("model_type")
    fields.setdefault("vocab_size", len(tokenizer))
    fields.setdefault("pad_token_id", tokenizer.pad_token_id)
    fields.setdefault("eos_token_id", tokenizer.eos_token_id)
    fields.setdefault("bos_token_id", tokenizer.bos_token_id)
    try:
        config = AutoConfig.for_model(model_type, **fields)
        torch.manual_seed(cfg.seed)
        return AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError, TypeError, AssertionError, ...
        raise UserError(f"train: student_config is not a valid '{model_type}' config ({one_line(e)})") from None


def check_alignment(ds, tokenizer, tok_path: str, n: int = 64) -> int:
    """Before token-level KD: the first n rows must mean the same under the student's tokenizer.

    The prompt ids must equal the student's own chat-template encoding (a template applied differently at capture
    and at training shifts every position), and the completion ids must decode to the stored text. Re-encoding
    that text may give other ids (a sampled, non-canonical split is normal); those rows are counted, not refused.
    Returns that count.
    """
    rows = ds.select(range(min(n, len(ds)))).select_columns(
        ["id", "messages", "prompt_token_ids", "completion", "completion_token_ids"])
    resplit = 0
    for row in rows:
        if encode_prompt(tokenizer, row["messages"], tok_path) != list(row["prompt_token_ids"]):
            raise UserError(f"dataset row {row['id']!r}: the stored prompt ids differ from the student tokenizer's "
                            f"chat-template encoding ({tok_path}); the teacher applied another chat template - "
                            "regenerate with the same template, or set kd_weight=0 to re-tokenise the text")
        text = tokenizer.decode(row["completion_token_ids"], skip_special_tokens=True)
        if text != row["completion"]:
            raise UserError(f"dataset row {row['id']!r}: completion_token_ids decode to {text[:40]!r} with the "
                            f"student tokenizer, not the stored {row['completion'][:40]!r}; the dataset does not "
                            "match this tokenizer")
        ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        resplit += ids != [t for t in row["completion_token_ids"] if t not in tokenizer.all_special_ids]
    return resplit


def save_student(model, tokenizer, directory: Path, state_dict: dict | None = None) -> None:
    """Save a model + tokenizer that load with AutoModelForCausalLM / AutoTokenizer and stop at EOS.

    state_dict: full weights gathered by `accelerator.get_state_dict` (needed when FSDP / ZeRO-3 shard them).
    """
    tmp = directory.parent / f".{directory.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    default_permissions(tmp)
    directory.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        f.replace(directory / f.name)
    tmp.rmdir()


STATE_FILE = "trainer_state.json"
# Settings that may differ when a run is resumed: they change what is logged or kept, not the weights.
RESUMABLE_CHANGES = {"log_every", "save_every", "keep_checkpoints", "resume", "overwrite", "report_to", "eval_every",
                     "output_dir"}  # output_dir: a run directory may be moved


def resume_point(cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from, None to start fresh; refuses an output_dir that holds another run.

    Every process calls this (so all of them raise together instead of some waiting forever).
    """
    out = Path(cfg.output_dir)
    check_output_path(cfg.output_dir, "train", [cfg.dataset, cfg.eval_dataset, cfg.student, cfg.teacher,
                                                cfg.tokenizer], cfg.overwrite)
    if cfg.overwrite or not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not (out / RUN_FILE).is_file():
        raise UserError(f"{out}: output_dir is not empty and was not written by train; choose another output_dir "
                        "or pass overwrite=true")
    old = read_json(out / RUN_FILE, "run record")
    if old.get("stage") != "train":
        raise UserError(f"{out}: holds a '{old.get('stage')}' run, not 'train'; choose another output_dir")
    new = config_to_dict(cfg)
    old_cfg = old.get("config") if isinstance(old.get("config"), dict) else {}
    diff = [k for k in sorted(set(old_cfg) | set(new))
            if k not in RESUMABLE_CHANGES and old_cfg.get(k) != new.get(k)]
    if diff:
        what = "; ".join(f"{k}: {old_cfg.get(k)!r} there, {new.get(k)!r} now" for k in diff[:3])
        raise UserError(f"{out}: holds a run with other settings ({what}); resuming would not reproduce it - "
                        "choose another output_dir, or pass overwrite=true to start over")
    if (out / STATE_FILE).is_file():
        raise UserError(f"{out}: this run has finished; pass overwrite=true to train again, or choose another "
                        "output_dir")
    if not cfg.resume:
        raise UserError(f"{out}: holds an unfinished run; resume=true continues it, overwrite=true starts over")
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / STATE_FILE).is_file())
    return done[-1] if done else None


def row_lengths(ds, retokenize: bool) -> list[int]:
    """Per-row length for batching, read from the Arrow columns without decoding the rows."""
    import pyarrow.compute as pc

    table = ds.data
    if retokenize:  # characters of the answer: a proxy that only has to order rows
        return pc.utf8_length(table.column("completion")).to_pylist()
    return pc.add(pc.list_value_length(table.column("prompt_token_ids")),
                  pc.list_value_length(table.column("completion_token_ids"))).to_pylist()


def epoch_batches(lengths: list[int], global_batch: int, epoch: int, seed: int, group_by_length: bool) -> list[list[int]]:
    """The global batches (row indices, one per optimiser step) of one epoch, the same on every process.

    A seeded permutation per epoch; an incomplete last global batch is filled up with rows from the start of
    the permutation (as accelerate's even batches do), so every process always has full micro-batches.
    With group_by_length, rows are sorted by length inside windows of 64 global batches and each batch is sorted
    too, so its micro-batches hold rows of similar length; the batch order is then shuffled. Batches depend on
    the global batch size only, so 1 process x 4 micro-batches and 4 processes x 1 see the same rows per step.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    fill = -len(order) % global_batch
    order += (order * (fill // len(order) + 1))[:fill]
    if group_by_length:
        window = 64 * global_batch
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: -lengths[i])]
    batches = [order[s:s + global_batch] for s in range(0, len(order), global_batch)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def _trackers(report_to: str) -> list[str] | None:
    if report_to == "none":
        return None
    if report_to == "auto":
        import importlib.util

        has_tb = importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
        return ["tensorboard"] if has_tb else None
    import accelerate.tracking
    from accelerate.utils import LoggerType

    names = [t.strip() for t in report_to.split(",") if t.strip()]
    known = [t.value for t in LoggerType if t.value != "all"]
    for name in names:
        if name not in known:
            raise UserError(f"train: report_to '{name}' is not a tracker; use auto, none, or a comma list of "
                            f"{', '.join(known)}")
        if not getattr(accelerate.tracking, f"is_{name}_available", lambda: True)():
            raise UserError(f"train: report_to={name}, but {name} is not installed (pip install {name}); or use "
                            "report_to=auto")
    return names


def main(cfg: TrainConfig) -> str:
    """Train; a run refused after it created its output directory (before a checkpoint) removes what it wrote, so
    that no run.json, metrics or tracker folder is left for a rerun to trip over."""
    started: dict = {}
    try:
        return _train(cfg, started)
    except UserError:
        out = Path(cfg.output_dir)
        if started.get("created") and not (out / STATE_FILE).is_file() \
                and not any((p / STATE_FILE).is_file() for p in (out / "checkpoints").glob("step-*")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, started: dict) -> str:
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    out = Path(cfg.output_dir)
    resume_from = resume_point(cfg)
    trackers = _trackers(cfg.report_to)
    # Without CUDA, cpu=True makes `accelerate launch --multi_gpu --num_processes N` run real DDP over gloo.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                              log_with=trackers, project_dir=str(out))
    world, rank = accelerator.num_processes, accelerator.process_index
    if accelerator.distributed_type.value == "DEEPSPEED" and cfg.grad_accum_steps > 1:
        raise UserError("train: under DeepSpeed keep grad_accum_steps=1 (DeepSpeed steps the optimiser inside "
                        "backward); raise micro_batch_size or the number of GPUs instead")
    if cfg.onpolicy_fraction > 0 and accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        # Sampling runs the unwrapped student outside the training forward; sharded weights are not whole there.
        raise UserError(f"train: on-policy steps (onpolicy_fraction > 0) run on one process or under DDP, not "
                        f"{accelerator.distributed_type.value}; use the DDP launch config")
    cfg.check_processes(world)
    if cfg.onpolicy_fraction > 0 and cfg.onpolicy_teacher_backend == "vllm":
        from .vllm_backend import require_vllm

        require_vllm("onpolicy_teacher_backend")  # no vllm or no CUDA: one line now, before any data or model
    for path, what in ((cfg.student, "student"), (cfg.teacher, "teacher")):
        if path:
            check_model_dir(path, what)  # cheap: config.json, whole weight files; before any data is read

    def load_teacher_data(path: str):
        if not Path(path).is_dir():
            raise UserError(f"{path}: dataset directory not found (write one with `llm-distill generate`)")
        from .data import load_teacher_dataset  # data/part-*.parquet, or an older save_to_disk directory

        try:
            ds = load_teacher_dataset(path)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{path}: not a datasets directory ({type(e).__name__})") from None
        if len(ds) == 0:
            raise UserError(f"{path}: the dataset has no rows")
        if "completion" not in ds.column_names or "messages" not in ds.column_names:
            raise UserError(f"{path}: needs 'messages' and 'completion' columns")
        return ds

    ds = load_teacher_data(cfg.dataset)
    prov = read_provenance(cfg.dataset)
    tok_path = cfg.student or cfg.tokenizer or prov.get("teacher")
    if not tok_path:
        raise UserError("train: no tokenizer for the fresh student; set tokenizer=path")
    tokenizer = load_tokenizer(tok_path)

    with_topk = "topk_token_ids" in ds.column_names
    if cfg.kd_weight > 0 and not with_topk:
        raise UserError(f"{cfg.dataset}: has no teacher logprobs (topk_token_ids); set kd_weight=0 to train on the "
                        "text only, or write the dataset with `llm-distill generate`")
    same_tokenizer = prov.get("tokenizer_hash") == tokenizer_hash(tokenizer)
    if cfg.kd_weight > 0 and not same_tokenizer:
        raise UserError(f"{cfg.dataset}: the teacher's tokenizer (hash {prov.get('tokenizer_hash')}) differs from the "
                        f"student's {tok_path} ({tokenizer_hash(tokenizer)}); token-level KD needs the same vocabulary "
                        "- use a student of the teacher's family, or set kd_weight=0 for CE on the re-tokenised text")
    retokenize = not same_tokenizer or "prompt_token_ids" not in ds.column_names
    # Every row, vectorised over the Arrow columns (ids in the vocabulary, k, lengths, logprob values), before
    # the student is built: a bad row is one line naming it, not a traceback at the step that reads it.
    need = "kd" if cfg.kd_weight > 0 else "text" if retokenize else "tokens"
    stored_k = check_teacher_dataset(cfg.dataset, ds, need=need, vocab_size=len(tokenizer))["k"]
    if cfg.kd_weight > 0 and cfg.kd_topk and stored_k and cfg.kd_topk > stored_k:
        raise UserError(f"train: kd_topk={cfg.kd_topk} is more than the {stored_k} ids per position stored in "
                        f"{cfg.dataset}; set kd_topk <= {stored_k} (or leave it empty for all of them)")
    if cfg.eval_dataset:
        eval_ds = load_teacher_data(cfg.eval_dataset)
        if cfg.kd_weight > 0 and "topk_token_ids" not in eval_ds.column_names:
            raise UserError(f"{cfg.eval_dataset}: eval_dataset has no teacher logprobs (topk_token_ids)")
        check_teacher_dataset(cfg.eval_dataset, eval_ds, need=need, vocab_size=len(tokenizer))
    resplit = check_alignment(ds, tokenizer, tok_path) if cfg.kd_weight > 0 else 0

    model = build_student(cfg, tokenizer)
    if cfg.packing:
        use_packed_sdpa(model)  # sdpa without a (tokens x tokens) block mask; checked below with the others
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora.get("r", 8), lora_alpha=cfg.lora.get("alpha", 16),
                          lora_dropout=cfg.lora.get("dropout", 0.0), task_type="CAUSAL_LM",
                          target_modules=cfg.lora.get("target_modules", "all-linear"))
        try:
            model = get_peft_model(model, lora)
        except Exception as e:  # noqa: BLE001 - peft raises ValueError for modules that match nothing, ...
            first = one_line(e, 160)
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise UserError(f"train: lora.target_modules {cfg.lora.get('target_modules', 'all-linear')!r} do not "
                            f"apply to this student ({first}); its linear layers are named {', '.join(names)}") from None
        if cfg.student and Path(cfg.student).exists():
            # Recorded in adapter_config.json: an absolute path loads the adapter from any working directory.
            for peft_cfg in model.peft_config.values():
                peft_cfg.base_model_name_or_path = str(Path(cfg.student).resolve())
    emb = model.get_input_embeddings().weight.shape[0]
    if emb < len(tokenizer):
        raise UserError(f"train: the student's embedding has {emb} rows but the tokenizer has {len(tokenizer)} tokens")
    max_len = cfg.max_seq_len or context_length(model) or 4096
    kd = with_topk and cfg.kd_weight > 0
    rows = TeacherRows(ds, tokenizer, retokenize, kd, max_len)
    lengths = row_lengths(rows.ds, retokenize)
    global_batch = cfg.micro_batch_size * cfg.grad_accum_steps * world
    if global_batch > len(rows):
        # Filling a step's batch would repeat every row many times over (100000 rows from 64 exhausts memory).
        raise UserError(f"train: a step takes micro_batch_size={cfg.micro_batch_size} x grad_accum_steps="
                        f"{cfg.grad_accum_steps} x {world} process(es) = {global_batch} rows, more than the "
                        f"{len(rows)} rows of {cfg.dataset}; lower micro_batch_size (at most "
                        f"{max(len(rows) // (cfg.grad_accum_steps * world), 1)} here) or add data")
    eval_rows = None
    if cfg.eval_dataset:
        if kd and read_provenance(cfg.eval_dataset).get("tokenizer_hash") != prov.get("tokenizer_hash"):
            raise UserError(f"{cfg.eval_dataset}: eval_dataset comes from another tokenizer than dataset")
        eval_rows = TeacherRows(eval_ds, tokenizer, retokenize, kd, max_len)

    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapter only
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    # Fused AdamW updates every parameter in one kernel (CPU and CUDA): at small sizes the per-tensor loop of the
    # default implementation is a visible part of a step. FSDP and DeepSpeed keep their default.
    fused = (accelerator.distributed_type.value in ("NO", "MULTI_CPU", "MULTI_GPU")
             and accelerator.device.type in ("cpu", "cuda"))
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate,
                                  fused=fused or None)
    scheduler = get_scheduler("constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler,
                              optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    vocab = len(tokenizer)  # padded embedding rows beyond the tokenizer get no probability
    teacher = None
    if cfg.onpolicy_fraction > 0:
        if cfg.onpolicy_teacher_backend == "vllm":
            from .vllm_backend import VLLMBackend

            # One engine on this (single) process's GPU, started while the student is still on the CPU, so that
            # its share of the GPU's memory is free.
            teacher = VLLMBackend(cfg.teacher, **onpolicy_vllm_kwargs(cfg))
        else:
            from .generate import TransformersBackend

            # Every process scores its own samples with its own copy of the teacher, on its own device.
            teacher = TransformersBackend(cfg.teacher, device=str(accelerator.device), k=cfg.onpolicy_logprobs,
                                          batch_size=cfg.micro_batch_size * cfg.grad_accum_steps)
        if tokenizer_hash(teacher.tokenizer) != tokenizer_hash(tokenizer):
            raise UserError(f"{cfg.teacher}: the teacher's tokenizer differs from the student's ({tok_path}); "
                            "on-policy distillation scores the student's token ids, so they must share the vocabulary")
        stop_ids = eos_ids(model, tokenizer)
    loss_impl = "dense" if not cfg.loss_chunk_size else cfg.loss_impl
    if loss_impl in ("auto", "fused"):
        problem = fused_head_problem(model, accelerator.distributed_type.value)
        if problem and loss_impl == "fused":
            raise UserError(f"train: loss_impl=fused cannot run: {problem}; use loss_impl=chunked")
        loss_impl = "chunked" if problem else "fused"
    if loss_impl != "dense":
        check_chunked_head(model, vocab, torch.tensor([rows[0]["prompt"]]))
    if cfg.packing:
        check_packing(model, [rows[0]["prompt"], rows[len(rows) - 1]["prompt"]])
    step_loss = StudentLoss(model, vocab, cfg.loss_chunk_size, cfg.kd_weight, cfg.ce_weight, cfg.kd_topk,
                            loss_impl=loss_impl,
                            divergences=cfg.kd_divergences, temperature=cfg.kd_temperature, beta=cfg.jsd_beta,
                            alpha=cfg.skew_alpha, renormalized_topk=cfg.renormalized_topk,
                            minillm={"single_step": cfg.minillm_single_step, "length_norm": cfg.minillm_length_norm})
    # The scheduler is stepped once per optimiser step by hand (a prepared one steps once per process), and is
    # registered so that save_state / load_state carry it.
    step_loss, optimizer = accelerator.prepare(step_loss, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    start = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from / "state"))  # weights, optimiser, scheduler, every process's RNG
        start = int(read_json(resume_from / STATE_FILE, "checkpoint state").get("step", 0))
    metrics_file = out / "metrics.jsonl"
    if accelerator.is_main_process:
        if cfg.overwrite and out.exists():
            shutil.rmtree(out)
        started["created"] = resume_from is None  # a failure from here on removes this fresh directory
        out.mkdir(parents=True, exist_ok=True)
        write_run_record(out, "train", config_to_dict(cfg))
        for stale in (out / "checkpoints").glob(".step-*.tmp"):  # a checkpoint a killed run did not finish
            shutil.rmtree(stale, ignore_errors=True)
        if metrics_file.exists():  # drop what a killed run logged after the checkpoint we continue from
            kept = [l for l in metrics_file.read_text().splitlines() if l and json.loads(l)["step"] <= start]
            metrics_file.write_text("".join(l + "\n" for l in kept))
        print(f"train: student {count_parameters(model):,} params ({sum(p.numel() for p in trainable):,} trained), "
              f"{len(rows)} rows, "
              f"{'KD + ' if cfg.kd_weight > 0 else ''}CE weights kd={cfg.kd_weight} ce={cfg.ce_weight}, "
              f"{world} process(es) ({accelerator.distributed_type.value}, "
              f"{accelerator.mixed_precision} mixed precision), {loss_impl} loss"
              + (", packed micro-batches" if cfg.packing else "")
              + (f"; {resplit} of the first 64 completions re-encode to other ids (sampled splits)" if resplit else "")
              + (f"; on-policy ({cfg.onpolicy_objective}) with probability {cfg.onpolicy_fraction} per step, teacher "
                 f"{cfg.teacher} ({cfg.onpolicy_teacher_backend})" if teacher is not None else "")
              + (f", resuming at step {start} from {resume_from}" if start else ""))
    accelerator.wait_for_everyone()
    if trackers:
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                   for k, v in config_to_dict(cfg).items()}
        accelerator.init_trackers("tensorboard", config=hparams)

    def to_device(b: dict) -> dict:
        return {k: v.to(accelerator.device) for k, v in b.items()}

    epoch_cache: dict = {}

    def micro_rows(step: int, i: int) -> list[int]:
        """Row indices of micro-batch i of this process for optimiser step `step` (1-based): a pure function of
        (step, i)."""
        epoch_len = -(-len(lengths) // global_batch)
        epoch, j = divmod(step - 1, epoch_len)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = epoch_batches(lengths, global_batch, epoch, cfg.seed, cfg.group_by_length)
        lo = (i * world + rank) * cfg.micro_batch_size
        return epoch_cache[epoch][j][lo:lo + cfg.micro_batch_size]

    def micro_batch(step: int, i: int) -> dict:
        return collate([rows[r] for r in micro_rows(step, i)], tokenizer.pad_token_id, cfg.packing)

    def onpolicy_batches(step: int) -> list[dict]:
        """This process's micro-batches of step `step` with the student's own samples for their prompts, scored
        by the teacher. Sampled once for the whole step (all its micro-batches) with the current weights; each
        row's draws come from a seed of (seed, step, row), so they do not depend on batching or on resume."""
        flat = [r for i in range(cfg.grad_accum_steps) for r in micro_rows(step, i)]
        prompts = [rows[r]["prompt"] for r in flat]
        seeds = [sample_seed(cfg.seed, f"onpolicy:{step}", r) for r in flat]
        student = accelerator.unwrap_model(step_loss).model
        student.eval()  # no dropout while sampling (the training forward keeps it)
        if cfg.onpolicy_objective == "minillm":
            mix_teacher = teacher.model if cfg.minillm_teacher_mix > 0 else None  # transformers only (config)
            outs = sample_mixture(student, mix_teacher, prompts, pad_id=tokenizer.pad_token_id, stop_ids=stop_ids,
                                  vocab=vocab, max_new_tokens=cfg.onpolicy_max_new_tokens,
                                  temperature=cfg.onpolicy_temperature, alpha=cfg.minillm_teacher_mix,
                                  row_seeds=seeds)
        else:
            outs = [(c.token_ids, None) for c in decode_batch(
                student, prompts, pad_id=tokenizer.pad_token_id, stop_ids=stop_ids, vocab_size=vocab,
                max_new_tokens=cfg.onpolicy_max_new_tokens, k=1, temperature=cfg.onpolicy_temperature,
                row_seeds=seeds)]
        student.train()
        completions = [ids[:max_len - len(p)] for (ids, _), p in zip(outs, prompts)]
        scored = teacher.score(prompts, completions)  # the `score` stage's code: top-k + tail per position
        examples = []
        for r, p, c, (_, sample_lp), sc in zip(flat, prompts, completions, outs, scored):
            ex = {"prompt": p, "completion": c, "topk_ids": sc.topk_ids.tolist(),
                  "topk_logprobs": sc.topk_logprobs.tolist(), "tail": sc.tail_logprob.tolist(),
                  "id": f"student sample for row {r} at step {step}"}
            if sample_lp is not None:
                ex["teacher_lp"], ex["sample_lp"] = sc.token_logprob.tolist(), sample_lp[:len(c)]
            examples.append(ex)
        mb = cfg.micro_batch_size
        pack = cfg.packing and cfg.onpolicy_objective == "gkd"  # MiniLLM's reward-to-go runs along each row
        return [collate(examples[i * mb:(i + 1) * mb], tokenizer.pad_token_id, pack)
                for i in range(cfg.grad_accum_steps)]

    @torch.no_grad()
    def evaluate_loss() -> dict:
        """KD and CE per completion token on eval_dataset, summed over every process's share of its rows."""
        step_loss.eval()
        share = list(range(rank, len(eval_rows), world))
        n_batches = -(-len(eval_rows) // (world * cfg.micro_batch_size))  # the same on every process
        sums = torch.zeros(3, device=accelerator.device)
        for n in range(n_batches):
            idx = share[n * cfg.micro_batch_size:(n + 1) * cfg.micro_batch_size]
            # A process without rows left still runs a forward (DDP forwards are collective) and adds nothing.
            b = to_device(collate([eval_rows[r] for r in (idx or share[:1])], tokenizer.pad_token_id, cfg.packing))
            kd_sum, ce_sum = step_loss(**b)
            if idx:
                sums += torch.stack([kd_sum.float(), ce_sum.float(), (b["labels"] != -100).sum().float()])
        sums = accelerator.reduce(sums, reduction="sum")
        step_loss.train()
        tokens = max(float(sums[2]), 1.0)
        kd_tok, ce_tok = float(sums[0]) / tokens, float(sums[1]) / tokens
        return {"eval_kd": kd_tok, "eval_ce": ce_tok, "eval_loss": cfg.kd_weight * kd_tok + cfg.ce_weight * ce_tok}

    def save_model(directory: Path) -> None:
        state = accelerator.get_state_dict(step_loss)  # full weights (gathered under FSDP / ZeRO-3); collective
        if accelerator.is_main_process:
            state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
            save_student(accelerator.unwrap_model(step_loss).model, tokenizer, directory, state_dict=state)

    def save_checkpoint(step: int) -> None:
        """checkpoints/step-N: the student + `state/`; written under a hidden name and renamed when complete."""
        root = out / "checkpoints"
        tmp, final = root / f".step-{step:06d}.tmp", root / f"step-{step:06d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "state"))  # every process adds its RNG state
        save_model(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "processes": world}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
            for old in done[:-cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    step_loss.train()
    bar = tqdm(total=cfg.max_steps, initial=start, desc="train", disable=not accelerator.is_main_process)
    # Loss sums stay on the device until a log step: a float() per step would make the host wait for the GPU
    # every step, so that it could not queue the next step's work while the current one runs.
    acc_dtype = torch.float32 if accelerator.device.type == "mps" else torch.float64

    def new_window() -> dict:
        return {"sums": torch.zeros(4, dtype=acc_dtype, device=accelerator.device),  # kd, ce, op_kd, op_rkl
                "tokens": 0, "seen": 0, "positions": 0, "t0": time.perf_counter(), "op_steps": 0, "op_tokens": 0,
                "norms": torch.zeros(3, dtype=acc_dtype, device=accelerator.device),  # norm sum, clipped, steps
                "norm_max": torch.zeros((), dtype=acc_dtype, device=accelerator.device)}

    window = new_window()
    for step in range(start + 1, cfg.max_steps + 1):
        onpolicy = onpolicy_step(cfg.seed, step, cfg.onpolicy_fraction)  # the same on every process
        micro = onpolicy_batches(step) if onpolicy else [micro_batch(step, i) for i in range(cfg.grad_accum_steps)]
        # CE on the student's own samples would teach it what it already says: on-policy steps use KD only.
        ce_weight = 0.0 if onpolicy else cfg.ce_weight
        step_tokens = sum(int((b["labels"] != -100).sum()) for b in micro)  # counted on the host, before the copy
        if world > 1:  # all micro-batches of all processes
            step_tokens = int(accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), reduction="sum"))
        # A packed batch has no attention_mask: every position is a token.
        window["seen"] += sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                              for b in micro)
        window["positions"] += sum(b["input_ids"].numel() for b in micro)
        kd_step = ce_step = torch.zeros((), device=accelerator.device)
        for i, b in enumerate(micro):
            b = to_device(b)
            # Gradients are all-reduced (averaged over processes) only on the last micro-batch.
            sync = contextlib.nullcontext() if i == len(micro) - 1 else accelerator.no_sync(step_loss)
            with sync:
                kd_sum, ce_sum = step_loss(**b, ce_weight=ce_weight)
                # x num_processes undoes DDP's gradient averaging: the gradient is that of the global token mean.
                loss = (cfg.kd_weight * kd_sum + ce_weight * ce_sum) * world / max(step_tokens, 1)
                accelerator.backward(loss)
            kd_step = kd_step + kd_sum.detach().float()
            ce_step = ce_step + ce_sum.detach().float()
        # The pre-clipping norm is logged either way (inf = measure only): how often clipping acts, and by how
        # much, tells whether the loss weights move the effective step size.
        norm = accelerator.clip_grad_norm_(step_loss.parameters(),
                                           cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if norm is not None:  # DeepSpeed clips inside its own step and returns no norm
            norm = norm.detach().to(device=accelerator.device, dtype=acc_dtype)
            clipped = (norm > cfg.max_grad_norm).to(acc_dtype) if cfg.max_grad_norm > 0 else norm * 0.0
            window["norms"] += torch.stack([norm, clipped, norm * 0.0 + 1.0])
            window["norm_max"] = torch.maximum(window["norm_max"], norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        part = slice(2, 4) if onpolicy else slice(0, 2)  # on-policy values are logged apart: another quantity
        window["sums"][part] += torch.stack([kd_step, ce_step]).to(acc_dtype)
        if onpolicy:
            window["op_steps"] += 1
            window["op_tokens"] += step_tokens
        else:
            window["tokens"] += step_tokens
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            seen, positions = accelerator.reduce(torch.tensor([window["seen"], window["positions"]],
                                                              device=accelerator.device), reduction="sum").tolist()
            w_kd, w_ce, op_kd, op_rkl = accelerator.reduce(window["sums"], reduction="sum").tolist()
            elapsed = time.perf_counter() - window["t0"]
            rec = {"step": step, "lr": scheduler.get_last_lr()[0],
                   "kd": w_kd / max(window["tokens"], 1), "ce": w_ce / max(window["tokens"], 1),
                   "completion_tokens": window["tokens"], "tokens_per_s": seen / max(elapsed, 1e-9),
                   "padding_fraction": 1 - seen / max(positions, 1)}
            rec["loss"] = cfg.kd_weight * rec["kd"] + cfg.ce_weight * rec["ce"]
            norm_sum, clipped, norm_steps = window["norms"].tolist()  # already global: grads are all-reduced
            if norm_steps:
                rec.update(grad_norm=norm_sum / norm_steps, grad_norm_max=float(window["norm_max"]),
                           clip_fraction=clipped / norm_steps)
            if cfg.onpolicy_fraction > 0:
                op_tokens = max(window["op_tokens"], 1)
                rec.update(onpolicy_steps=window["op_steps"], onpolicy_tokens=window["op_tokens"])
                if cfg.onpolicy_objective == "minillm":  # surrogate, and the sampled reverse KL per token
                    rec.update(onpolicy_surrogate=op_kd / op_tokens, onpolicy_rkl=op_rkl / op_tokens)
                else:
                    rec["onpolicy_kd"] = op_kd / op_tokens
            if eval_rows is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
                rec.update(evaluate_loss())
            if accelerator.is_main_process:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", kd=f"{rec['kd']:.4f}", ce=f"{rec['ce']:.4f}",
                                tok_s=f"{rec['tokens_per_s']:.0f}")
                with metrics_file.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=step)
            if not all(math.isfinite(v) for k, v in rec.items() if k in ("loss", "onpolicy_kd", "onpolicy_surrogate")):
                raise UserError(f"train: loss became {rec['loss']} at step {step}; lower learning_rate")
            window = new_window()
        elif eval_rows is not None and cfg.eval_every and step % cfg.eval_every == 0:
            ev = evaluate_loss()
            if accelerator.is_main_process:
                with metrics_file.open("a") as f:
                    f.write(json.dumps({"step": step, **ev}) + "\n")
            accelerator.log(ev, step=step)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            save_checkpoint(step)
    bar.close()
    accelerator.wait_for_everyone()
    save_model(out)
    if accelerator.is_main_process:
        # Written last: its presence means the final student is complete (a rerun then refuses to resume).
        (out / STATE_FILE).write_text(json.dumps({"step": cfg.max_steps, "finished": True}))
        print(f"train: saved student -> {out}")
    for tracker in accelerator.trackers:
        tracker.finish()
    # All processes leave together, and the process group is not torn down: the main process hosts the rendezvous
    # store, and a process that destroys its group after the main one has exited waits on that store forever
    # (seen under load: rank 1 hung at the end of a finished 2-process run). Exiting frees it all the same.
    accelerator.wait_for_everyone()
    return str(out)
