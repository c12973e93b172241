"""Student training: one explicit Accelerate loop over a teacher dataset.

    llm-distill train recipes/tiny/train_kd.yaml dataset=runs/teacher_data output_dir=runs/student
    accelerate launch --multi_gpu --num_processes 2 -m llm_distill train recipes/tiny/train_kd.yaml ...

Loss per optimiser step = (kd_weight * sum of token KL + ce_weight * sum of token CE) / completion tokens of the
whole step (every micro-batch on every process), so gradient accumulation and the number of processes do not
change the loss or its gradient.
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
from .data import check_output_dir, encode_prompt, read_provenance, write_run_record
from .errors import UserError
from .losses import kd_per_token, restrict_topk, student_logprobs, token_losses
from .models import context_length, count_parameters, load_tokenizer, tokenizer_hash


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


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad prompt + completion; label position t-1 with completion token t; align the teacher's top-k.

    Builds each tensor once for the whole batch (one torch.tensor call per field), which keeps the KD batch's
    extra top-k data cheap to assemble.
    """
    T = max(len(e["prompt"]) + len(e["completion"]) for e in examples)
    B = len(examples)
    ids, mask, labels = [], [], []
    with_topk = "topk_ids" in examples[0]
    pos_b, pos_t, top_ids, top_lp, tails = [], [], [], [], []
    for b, e in enumerate(examples):
        p, c = len(e["prompt"]), len(e["completion"])
        pad = T - p - c
        ids.append(e["prompt"] + e["completion"] + [pad_id] * pad)
        mask.append([1] * (p + c) + [0] * pad)
        # Logits at position j predict token j + 1: completion token t sits at p + t, so it is predicted at p + t - 1.
        labels.append([-100] * (p - 1) + e["completion"] + [-100] * (pad + 1))
        if with_topk and c:
            pos_b += [b] * c
            pos_t += range(p - 1, p + c - 1)
            top_ids += e["topk_ids"]
            top_lp += e["topk_logprobs"]
            tails += e["tail"]
    batch = {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask, dtype=torch.long),
             "labels": torch.tensor(labels, dtype=torch.long)}
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
    return batch


class StudentLoss(torch.nn.Module):
    """The student and its token losses in one forward, so that DDP (or any wrapper) sees a single call.

    With chunk_size > 0 only completion positions reach the vocabulary projection, chunk by chunk
    (`losses.student_logprobs`); with 0 the model's own full logits are used (the dense reference).
    forward(batch) -> (kd_sum, ce_sum): sums over the batch's completion tokens; the caller normalises.
    """

    def __init__(self, model, vocab: int, chunk_size: int, kd_weight: float, ce_weight: float,
                 kd_topk: int | None = None, **kd_options):
        super().__init__()
        self.model, self.vocab, self.chunk_size = model, vocab, chunk_size
        self.kd_weight, self.ce_weight, self.kd_topk, self.kd_options = kd_weight, ce_weight, kd_topk, kd_options
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def forward(self, input_ids, attention_mask, labels, topk_ids=None, topk_logprobs=None, tail_logprob=None):
        kd = self.kd_weight > 0
        if kd and self.kd_topk:
            topk_ids, topk_logprobs, tail_logprob = restrict_topk(topk_ids, topk_logprobs, tail_logprob, self.kd_topk)
        if not self.chunk_size:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[..., :self.vocab]
            kd_sum, ce_sum, _ = token_losses(logits, labels, topk_ids, topk_logprobs, tail_logprob,
                                             self.kd_weight, self.ce_weight, **self.kd_options)
            return kd_sum, ce_sum
        mask = labels != -100  # (B, T)
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        h = hidden[mask]  # (N, d): prompt positions never reach the vocabulary projection
        weight = self.model.get_output_embeddings().weight  # (V', d)
        label_lp, s_topk, s_tail = student_logprobs(h, weight, labels[mask], topk_ids[mask] if kd else None,
                                                    self.vocab, self.chunk_size, self.softcap)
        ce_sum = -label_lp.sum() if self.ce_weight > 0 else label_lp.sum() * 0.0
        kd_sum = kd_per_token(s_topk, s_tail, topk_logprobs[mask], tail_logprob[mask],
                              **self.kd_options).sum() if kd else label_lp.sum() * 0.0
        return kd_sum, ce_sum


def check_chunked_head(model, vocab: int, input_ids: torch.Tensor) -> None:
    """The chunked path rebuilds logits as hidden @ W^T; refuse models whose head does more (scales, biases)."""
    with torch.no_grad():
        ref = model(input_ids=input_ids[:1, :8]).logits[0, :, :vocab].float()
        h = model.get_decoder()(input_ids=input_ids[:1, :8]).last_hidden_state[0]
        z = (h @ model.get_output_embeddings().weight[:vocab].T).float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            z = cap * torch.tanh(z / cap)
    if not torch.allclose(z, ref, atol=1e-3, rtol=1e-3):
        raise UserError(f"train: this model's output head is not a plain linear projection "
                        f"({type(model).__name__}); set loss_chunk_size=0 to use its full logits")


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
    except (ValueError, TypeError) as e:
        raise UserError(f"train: student_config is not a valid '{model_type}' config ({e})") from None
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config)


def save_student(model, tokenizer, directory: Path) -> None:
    """Save a model + tokenizer that load with AutoModelForCausalLM / AutoTokenizer and stop at EOS."""
    tmp = directory.parent / f".{directory.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    directory.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        f.replace(directory / f.name)
    tmp.rmdir()


def _infinite(loader):
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            yield batch
        epoch += 1


def main(cfg: TrainConfig) -> str:
    from accelerate import Accelerator
    from datasets import load_from_disk
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    # Without CUDA, cpu=True makes `accelerate launch --multi_gpu --num_processes N` run real DDP over gloo.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        check_output_dir(cfg.output_dir, "train", config_to_dict(cfg), cfg.overwrite)

    if not Path(cfg.dataset).is_dir():
        raise UserError(f"{cfg.dataset}: dataset directory not found (write one with `llm-distill generate`)")
    try:
        ds = load_from_disk(cfg.dataset)
    except Exception as e:
        raise UserError(f"{cfg.dataset}: not a datasets directory ({type(e).__name__})") from None
    if len(ds) == 0:
        raise UserError(f"{cfg.dataset}: the dataset has no rows")
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
    if "completion" not in ds.column_names or "messages" not in ds.column_names:
        raise UserError(f"{cfg.dataset}: needs 'messages' and 'completion' columns")

    model = build_student(cfg, tokenizer)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora.get("r", 8), lora_alpha=cfg.lora.get("alpha", 16),
                          lora_dropout=cfg.lora.get("dropout", 0.0), task_type="CAUSAL_LM",
                          target_modules=cfg.lora.get("target_modules", "all-linear"))
        model = get_peft_model(model, lora)
    emb = model.get_input_embeddings().weight.shape[0]
    if emb < len(tokenizer):
        raise UserError(f"train: the student's embedding has {emb} rows but the tokenizer has {len(tokenizer)} tokens")
    max_len = cfg.max_seq_len or context_length(model) or 4096
    rows = TeacherRows(ds, tokenizer, retokenize, with_topk and cfg.kd_weight > 0, max_len)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(rows, batch_size=cfg.micro_batch_size, shuffle=True, generator=generator,
                                         collate_fn=lambda ex: collate(ex, tokenizer.pad_token_id))
    trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapter only
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)
    scheduler = get_scheduler("constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler,
                              optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    vocab = len(tokenizer)  # padded embedding rows beyond the tokenizer get no probability
    if cfg.loss_chunk_size:
        check_chunked_head(model, vocab, torch.tensor([rows[0]["prompt"]]))
    step_loss = StudentLoss(model, vocab, cfg.loss_chunk_size, cfg.kd_weight, cfg.ce_weight, cfg.kd_topk,
                            divergences=cfg.kd_divergences, temperature=cfg.kd_temperature, beta=cfg.jsd_beta,
                            alpha=cfg.skew_alpha, renormalized_topk=cfg.renormalized_topk)
    step_loss, optimizer, loader = accelerator.prepare(step_loss, optimizer, loader)

    if accelerator.is_main_process:
        if cfg.overwrite and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        write_run_record(out, "train", config_to_dict(cfg))
        print(f"train: student {count_parameters(model):,} params ({sum(p.numel() for p in trainable):,} trained), "
              f"{len(rows)} rows, "
              f"{'KD + ' if cfg.kd_weight > 0 else ''}CE weights kd={cfg.kd_weight} ce={cfg.ce_weight}, "
              f"{accelerator.num_processes} process(es)")
    metrics_file = out / "metrics.jsonl"
    step_loss.train()
    data = _infinite(loader)
    bar = tqdm(total=cfg.max_steps, desc="train", disable=not accelerator.is_main_process)
    window = {"kd": 0.0, "ce": 0.0, "tokens": 0, "seen": 0, "t0": time.perf_counter()}
    for step in range(1, cfg.max_steps + 1):
        micro = [next(data) for _ in range(cfg.grad_accum_steps)]
        local = torch.tensor(sum(int((b["labels"] != -100).sum()) for b in micro), device=accelerator.device)
        step_tokens = int(accelerator.reduce(local, reduction="sum"))  # all micro-batches, all processes
        kd_step = ce_step = torch.zeros((), device=accelerator.device)
        for i, b in enumerate(micro):
            # Gradients are all-reduced (averaged over processes) only on the last micro-batch.
            sync = contextlib.nullcontext() if i == len(micro) - 1 else accelerator.no_sync(step_loss)
            with sync:
                kd_sum, ce_sum = step_loss(**b)
                # x num_processes undoes DDP's gradient averaging: the gradient is that of the global token mean.
                loss = (cfg.kd_weight * kd_sum + cfg.ce_weight * ce_sum) * accelerator.num_processes / max(step_tokens, 1)
                accelerator.backward(loss)
            kd_step = kd_step + kd_sum.detach()
            ce_step = ce_step + ce_sum.detach()
            window["seen"] += int(b["attention_mask"].sum())
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(step_loss.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        sums = accelerator.reduce(torch.stack([kd_step, ce_step]), reduction="sum")
        window["kd"] += float(sums[0])
        window["ce"] += float(sums[1])
        window["tokens"] += step_tokens
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            seen = int(accelerator.reduce(torch.tensor(window["seen"], device=accelerator.device), reduction="sum"))
            elapsed = time.perf_counter() - window["t0"]
            rec = {"step": step, "lr": scheduler.get_last_lr()[0],
                   "kd": window["kd"] / max(window["tokens"], 1), "ce": window["ce"] / max(window["tokens"], 1),
                   "completion_tokens": window["tokens"], "tokens_per_s": seen / max(elapsed, 1e-9)}
            rec["loss"] = cfg.kd_weight * rec["kd"] + cfg.ce_weight * rec["ce"]
            if accelerator.is_main_process:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", kd=f"{rec['kd']:.4f}", ce=f"{rec['ce']:.4f}",
                                tok_s=f"{rec['tokens_per_s']:.0f}")
                with metrics_file.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            if not math.isfinite(rec["loss"]):
                raise UserError(f"train: loss became {rec['loss']} at step {step}; lower learning_rate")
            window = {"kd": 0.0, "ce": 0.0, "tokens": 0, "seen": 0, "t0": time.perf_counter()}
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_student(accelerator.unwrap_model(step_loss).model, tokenizer, out / "checkpoints" / f"step-{step:06d}")
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_student(accelerator.unwrap_model(step_loss).model, tokenizer, out)
        print(f"train: saved student -> {out}")
    accelerator.end_training()
    return str(out)
