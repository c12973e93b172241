"""The student side of distillation: teacher-dataset rows as examples, batches, and the student's losses.

    TeacherRows   rows of a teacher dataset -> (prompt ids, completion ids, teacher top-k) examples
    collate       examples -> one padded (or packed) batch, labels and the teacher's top-k aligned to it
    StudentLoss   the student and its token losses in one forward: `DistillSums` (KD, CE) or `MiniLLMSums`

Used by `train` (offline and on-policy steps) and by `evaluate` (held-out KL and NLL), so that evaluating a
student does not import the trainer. The losses themselves are the pure functions of `losses`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch

from .data import encode_prompt
from .errors import UserError
from .losses import (buckets, divergence, fused_head_loss, kd_per_token, minillm_surrogate, restrict_topk,
                     student_buckets, student_logprobs, token_losses)


class TeacherRows(torch.utils.data.Dataset):
    """Rows of a teacher dataset as (prompt ids, completion ids, teacher top-k) examples for the student."""

    def __init__(self, ds, tokenizer, retokenize: bool, with_topk: bool, max_len: int):
        self.ds, self.tok, self.retokenize, self.with_topk, self.max_len = ds, tokenizer, retokenize, with_topk, max_len
        columns = ["id", "prompt_token_ids", "completion_token_ids"] if not retokenize else \
            ["id", "messages", "completion"] + (["finish_reason"] if "finish_reason" in ds.column_names else [])
        if with_topk:
            columns += ["topk_token_ids", "topk_logprobs", "tail_logprob"]
        self.ds = ds.select_columns([c for c in columns if c != "id" or "id" in ds.column_names])
        self.arrow = self.ds.with_format("arrow")  # `take` reads the top-k through it: built once, not per batch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return self.take([i])[0]

    def take(self, indices: list[int]) -> list[dict]:
        """The examples of many rows from one read of the dataset (datasets' per-row access is mostly fixed Python
        cost). With the teacher's top-k, those columns go from Arrow to numpy without Python lists: an example's
        topk_ids / topk_logprobs are then (c, k) arrays and its tail a (c,) array (`collate` takes either)."""
        if not self.with_topk or self.retokenize:
            cols = self.ds[list(indices)]  # {column: [value per row]}
            return [self.example({c: v[j] for c, v in cols.items()}, i) for j, i in enumerate(indices)]
        tbl = self.arrow[list(indices)]
        ids = tbl.column("id").to_pylist() if "id" in tbl.column_names else [f"row {i}" for i in indices]
        prompts, completions = (tbl.column(c).to_pylist() for c in ("prompt_token_ids", "completion_token_ids"))
        per_token = {key: _ragged(tbl.column(c)) for key, c in
                     (("topk_ids", "topk_token_ids"), ("topk_logprobs", "topk_logprobs"), ("tail", "tail_logprob"))}
        out = []
        for j, (row_id, prompt, completion) in enumerate(zip(ids, prompts, completions)):
            room = self.room(prompt, row_id)
            ex = {"prompt": prompt, "completion": completion[:room], "id": row_id}
            for key, (offsets, values) in per_token.items():
                ex[key] = values[offsets[j]:min(offsets[j + 1], offsets[j] + room)]
            out.append(ex)
        return out

    __getitems__ = take  # torch's DataLoader fetches a batch through it

    def example(self, row: dict, i: int) -> dict:
        """Row `i` of the dataset (its columns as read) as an example."""
        row.setdefault("id", f"row {i}")
        if self.retokenize:  # CE only: the text is re-encoded with the student's tokenizer and template
            prompt = encode_prompt(self.tok, row["messages"])
            completion = self.tok(row["completion"], add_special_tokens=False)["input_ids"]
            if row.get("finish_reason", "stop") == "stop":
                completion = completion + [self.tok.eos_token_id]
        else:
            prompt, completion = row["prompt_token_ids"], row["completion_token_ids"]
        room = self.room(prompt, row["id"])
        ex = {"prompt": prompt, "completion": completion[:room]}
        if self.with_topk:
            ex["topk_ids"] = row["topk_token_ids"][:room]
            ex["topk_logprobs"] = row["topk_logprobs"][:room]
            ex["tail"] = row["tail_logprob"][:room]
            ex["id"] = row["id"]
        return ex

    def room(self, prompt: list[int], row_id) -> int:
        """Completion tokens that fit after the prompt within max_len; refuses a prompt that leaves none."""
        room = self.max_len - len(prompt)
        if room < 1:
            raise UserError(f"dataset row {row_id!r}: prompt has {len(prompt)} tokens, more than max_seq_len="
                            f"{self.max_len}; raise max_seq_len or drop long prompts")
        return room


def _ragged(column) -> tuple[np.ndarray, np.ndarray]:
    """A per-token Arrow list column of B rows -> (row offsets (B + 1,), values (M, k) or (M,)) as numpy."""
    rows = column.combine_chunks()  # list<list<x>> or list<x>
    offsets = rows.offsets.to_numpy()
    tokens = rows.flatten()  # respects a sliced array's offset
    if pa.types.is_fixed_size_list(tokens.type):  # how generate writes the top-k: (k,) per token
        values = tokens.flatten().to_numpy(zero_copy_only=False).reshape(-1, tokens.type.list_size)
    elif pa.types.is_list(tokens.type) or pa.types.is_large_list(tokens.type):
        k = len(tokens[0]) if len(tokens) else 1
        values = tokens.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)  # one k per dataset (validated)
    else:
        values = tokens.to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values


def _stack(parts: list, dtype: torch.dtype) -> torch.Tensor:
    """The examples' per-token values (numpy arrays from TeacherRows.take, or lists) as one tensor along the first
    axis."""
    if parts and all(isinstance(x, np.ndarray) for x in parts):
        return torch.from_numpy(np.concatenate(parts)).to(dtype)
    return torch.tensor([v for x in parts for v in x], dtype=dtype)


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
            top_ids.append(e["topk_ids"])
            top_lp.append(e["topk_logprobs"])
            tails.append(e["tail"])
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
        ids_k = _stack(top_ids, torch.long)
        k = ids_k.shape[-1] if ids_k.dim() == 2 else 1
        lp = _stack(top_lp, torch.float32).view(-1, k)  # (M, k) over all completion positions
        tail = _stack(tails, torch.float32)  # (M,)
        bad = torch.isnan(lp).any(-1) | torch.isnan(tail)
        if bool(bad.any()):
            row = examples[pos_b[int(bad.nonzero()[0])]]
            raise UserError(f"dataset row {row.get('id')!r}: teacher logprobs contain NaN; regenerate that row")
        bi, ti = torch.tensor(pos_b, dtype=torch.long), torch.tensor(pos_t, dtype=torch.long)
        batch["topk_ids"] = torch.zeros((B, T, k), dtype=torch.long)  # (B, T, k)
        batch["topk_logprobs"] = torch.zeros((B, T, k), dtype=torch.float32)  # (B, T, k)
        batch["tail_logprob"] = torch.zeros((B, T), dtype=torch.float32)  # (B, T)
        batch["topk_ids"][bi, ti] = ids_k.view(-1, k)
        batch["topk_logprobs"][bi, ti] = lp
        batch["tail_logprob"][bi, ti] = tail
        if with_pg:
            batch["teacher_token_logprob"] = torch.zeros((B, T), dtype=torch.float32)  # (B, T)
            batch["sample_logprob"] = torch.zeros((B, T), dtype=torch.float32)  # (B, T)
            batch["teacher_token_logprob"][bi, ti] = torch.tensor(teacher_lp, dtype=torch.float32)
            batch["sample_logprob"][bi, ti] = torch.tensor(sample_lp, dtype=torch.float32)
    return batch


OBJECTIVES = ("distill", "minillm")


class DistillSums(NamedTuple):
    """What `StudentLoss` returns for objective="distill": sums over the batch's completion tokens (the caller
    normalises). Unpacks as (kd, ce)."""

    kd: torch.Tensor  # () sum of the token KD divergence (0 when kd_weight is 0)
    ce: torch.Tensor  # () sum of the token cross-entropy on the labels (0 when ce_weight is 0)

    def weighted(self, kd_weight: float, ce_weight: float) -> torch.Tensor:
        """The summed loss whose gradient the fused head keeps: kd_weight * kd + ce_weight * ce."""
        return kd_weight * self.kd + ce_weight * self.ce


class MiniLLMSums(NamedTuple):
    """What `StudentLoss` returns for objective="minillm" on the student's own samples. Unpacks as
    (surrogate, rkl)."""

    surrogate: torch.Tensor  # () sum of the policy-gradient surrogate (`losses.minillm_surrogate`)
    rkl: torch.Tensor        # () detached: sampled estimate of the sequence-level reverse KL, sum of log q - log p

    def weighted(self, kd_weight: float, ce_weight: float) -> torch.Tensor:
        """kd_weight * surrogate: the surrogate is the KD term of an on-policy step. The trainer passes
        ce_weight=0 there (no CE on the student's own samples); rkl is detached, so it never adds a gradient."""
        return kd_weight * self.surrogate + ce_weight * self.rkl


class StudentLoss(torch.nn.Module):
    """The student and its token losses in one forward, so that DDP (or any wrapper) sees a single call.

    With chunk_size > 0 only completion positions reach the vocabulary projection, chunk by chunk: with
    loss_impl="chunked" through `losses.student_logprobs` (recomputed in backward), with "fused" through
    `losses.fused_head_loss` (gradients computed in the forward pass); with chunk_size 0 or loss_impl="dense"
    the model's own full logits are used (the dense reference).
    forward(batch, objective=...) returns sums over the batch's completion tokens; the caller normalises:
      objective="distill" -> DistillSums(kd, ce). The fused loss keeps the gradient of kd_weight * kd +
        ce_weight * ce, so the caller's loss must weight the sums so (`DistillSums.weighted`, times any scale);
        pass `ce_weight=` when a batch's CE weight differs (on-policy GKD: 0).
      objective="minillm" -> MiniLLMSums(surrogate, rkl), on a batch of the student's own samples that carries
        teacher_token_logprob and sample_logprob (`collate` of on-policy rows).
    A packed batch (`position_ids`, no attention_mask; `collate(packing=True)`) runs as one sequence.
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
                ce_weight=None, objective: str = "distill"):
        if objective not in OBJECTIVES:
            raise ValueError(f"StudentLoss: objective {objective!r} is not one of {OBJECTIVES}")
        if objective == "minillm" and teacher_token_logprob is None:
            raise ValueError("StudentLoss: objective='minillm' needs teacher_token_logprob and sample_logprob")
        kd = self.kd_weight > 0
        if kd and self.kd_topk:
            topk_ids, topk_logprobs, tail_logprob = restrict_topk(topk_ids, topk_logprobs, tail_logprob, self.kd_topk)
        # use_cache off: with a cache object transformers does not look for packed rows in position_ids.
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": False}
        if objective == "minillm":
            return self._minillm(inputs, labels, topk_ids, topk_logprobs, tail_logprob, teacher_token_logprob,
                                 sample_logprob)
        return self._distill(inputs, labels, topk_ids, topk_logprobs, tail_logprob, ce_weight)

    def _distill(self, inputs, labels, topk_ids, topk_logprobs, tail_logprob, ce_weight) -> DistillSums:
        """KD on the teacher's buckets + CE on the labels, by the dense, fused or chunked head."""
        kd = self.kd_weight > 0
        if self.loss_impl == "dense":
            logits = self.model(**inputs).logits[..., :self.vocab]
            kd_sum, ce_sum, _ = token_losses(logits, labels, topk_ids, topk_logprobs, tail_logprob,
                                             self.kd_weight, self.ce_weight, **self.kd_options)
            return DistillSums(kd_sum, ce_sum)
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
            return DistillSums(kd_sum, ce_sum if self.ce_weight > 0 else ce_sum * 0.0)  # logged CE is 0 unweighted
        label_lp, s_topk, s_tail = student_logprobs(h, head, labels[mask], topk_ids[mask] if kd else None,
                                                    self.vocab, self.chunk_size, self.softcap)
        ce_sum = -label_lp.sum() if self.ce_weight > 0 else label_lp.sum() * 0.0
        kd_sum = kd_per_token(s_topk, s_tail, topk_logprobs[mask], tail_logprob[mask],
                              **self.kd_options).sum() if kd else label_lp.sum() * 0.0
        return DistillSums(kd_sum, ce_sum)
    def _minillm(self, inputs, labels, topk_ids, topk_logprobs, tail_logprob, teacher_token_logprob,
                 sample_logprob) -> MiniLLMSums:
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
        return MiniLLMSums(surrogate.sum(), rkl)


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
