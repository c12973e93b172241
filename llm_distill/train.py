"""Student training: one explicit Accelerate loop over a teacher dataset.

    llm-distill train recipes/tiny/train_kd.yaml dataset=runs/teacher_data output_dir=runs/student
    accelerate launch --multi_gpu --num_processes 2 -m llm_distill train recipes/tiny/train_kd.yaml ...

Loss per optimiser step = (kd_weight * sum of token KL + ce_weight * sum of token CE) / completion tokens of the
whole step (every micro-batch on every process), so gradient accumulation and the number of processes do not
change the loss or its gradient (`global_token_mean`).

On-policy distillation (GKD): with `onpolicy_fraction` λ > 0 a step, chosen with probability λ from (seed, step),
trains instead on the student's own samples for the step's prompts, scored by `teacher` in this process; its
loss is the KD term (or, with onpolicy_objective=minillm, MiniLLM's policy gradient of the sequence-level
reverse KL; experimental), normalised the same way. With onpolicy_teacher_backend=vllm the teacher is a vLLM
engine colocated on the training GPU (one training process only). See onpolicy.py.

    llm-distill train recipes/tiny/train_kd.yaml onpolicy_fraction=0.5 teacher=data/tiny_task/teacher

Reading order: `main` -> `setup` (accelerator, data, student, optimiser, loss: a `Run`) -> `fit` (the loop) ->
`step_batches` (offline or on-policy micro-batches) -> `train_step` (forward, backward, clip, optimiser step) ->
`log_window` / `evaluate_loss` / `save_checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TrainConfig, config_to_dict
from .data import RUN_FILE, default_permissions, encode_prompt, load_teacher_dataset, read_provenance, write_run_record
from .errors import UserError
from .models import context_length, count_parameters, eos_ids, load_tokenizer, tokenizer_hash
from .onpolicy import build_teacher, onpolicy_batches, onpolicy_step, onpolicy_vllm_kwargs  # noqa: F401 (re-exported)
from .packing import use_packed_sdpa
from .student import (StudentLoss, TeacherRows, check_chunked_head, check_packing, collate,  # noqa: F401 (re-exported)
                      fused_head_problem)
from .validate import check_model_dir, check_output_path, check_teacher_dataset, one_line, read_json


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
        return fit(setup(cfg, started))
    except UserError:
        out = Path(cfg.output_dir)
        if started.get("created") and not (out / STATE_FILE).is_file() \
                and not any((p / STATE_FILE).is_file() for p in (out / "checkpoints").glob("step-*")):
            shutil.rmtree(out, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------------------
# Setup: everything checked and built before the first step, in the order a bad input is refused.


@dataclass
class TrainData:
    """The teacher dataset(s) and the student tokenizer, checked against each other."""

    ds: object                # the training rows (datasets.Dataset)
    eval_ds: object | None    # eval_dataset's rows
    prov: dict                # the dataset's provenance
    tokenizer: object
    tok_path: str             # where the tokenizer came from (named in errors)
    with_topk: bool           # the dataset stores the teacher's top-k
    retokenize: bool          # CE on the text re-encoded with the student's tokenizer and template
    resplit: int              # of the first 64 completions, how many re-encode to other ids (reported)


@dataclass
class Run:
    """What the loop reads: built once by `setup`, then passed to every step function."""

    cfg: TrainConfig
    accelerator: object
    tokenizer: object
    rows: TeacherRows             # this run's training examples
    eval_rows: TeacherRows | None
    lengths: list[int]            # per row, for batching
    step_loss: torch.nn.Module    # the prepared StudentLoss (DDP-wrapped under a multi-process launch)
    optimizer: object
    scheduler: object
    teacher: object | None        # the on-policy teacher backend
    stop_ids: list[int] | None    # the student's stop tokens when it samples (on-policy)
    vocab: int                    # len(tokenizer): padded embedding rows beyond it get no probability
    max_len: int
    out: Path
    start: int                    # the last finished step (a resumed run continues after it)
    epochs: dict = field(default_factory=dict)  # {epoch: its global batches}, the current epoch only

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def metrics_file(self) -> Path:
        return self.out / "metrics.jsonl"


def setup(cfg: TrainConfig, started: dict) -> Run:
    """Check the launch, read and check the data, build the student, its optimiser and loss; resume if asked."""
    from transformers import get_scheduler

    out = Path(cfg.output_dir)
    resume_from = resume_point(cfg)
    trackers = _trackers(cfg.report_to)
    accelerator = start_accelerator(cfg, out, trackers)
    data = load_data(cfg)
    model = build_model(cfg, data.tokenizer)
    max_len = cfg.max_seq_len or context_length(model) or 4096
    kd = data.with_topk and cfg.kd_weight > 0
    rows = TeacherRows(data.ds, data.tokenizer, data.retokenize, kd, max_len)
    lengths = row_lengths(rows.ds, data.retokenize)
    world = accelerator.num_processes
    if cfg.global_batch(world) > len(rows):
        # Filling a step's batch would repeat every row many times over (100000 rows from 64 exhausts memory).
        raise UserError(f"train: a step takes micro_batch_size={cfg.micro_batch_size} x grad_accum_steps="
                        f"{cfg.grad_accum_steps} x {world} process(es) = {cfg.global_batch(world)} rows, more than "
                        f"the {len(rows)} rows of {cfg.dataset}; lower micro_batch_size (at most "
                        f"{max(len(rows) // (cfg.grad_accum_steps * world), 1)} here) or add data")
    eval_rows = None
    if cfg.eval_dataset:
        if kd and read_provenance(cfg.eval_dataset).get("tokenizer_hash") != data.prov.get("tokenizer_hash"):
            raise UserError(f"{cfg.eval_dataset}: eval_dataset comes from another tokenizer than dataset")
        eval_rows = TeacherRows(data.eval_ds, data.tokenizer, data.retokenize, kd, max_len)
    optimizer = build_optimizer(cfg, model, accelerator)
    scheduler = get_scheduler("constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler,
                              optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    vocab = len(data.tokenizer)  # padded embedding rows beyond the tokenizer get no probability
    teacher = stop_ids = None
    if cfg.onpolicy_fraction > 0:
        teacher = build_teacher(cfg, str(accelerator.device), data.tokenizer, data.tok_path)
        stop_ids = eos_ids(model, data.tokenizer)
    step_loss, loss_impl = build_loss(cfg, model, vocab, rows, accelerator.distributed_type.value)
    # The scheduler is stepped once per optimiser step by hand (a prepared one steps once per process), and is
    # registered so that save_state / load_state carry it.
    step_loss, optimizer = accelerator.prepare(step_loss, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    start = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from / "state"))  # weights, optimiser, scheduler, every process's RNG
        start = int(read_json(resume_from / STATE_FILE, "checkpoint state").get("step", 0))
    run = Run(cfg, accelerator, data.tokenizer, rows, eval_rows, lengths, step_loss, optimizer, scheduler, teacher,
              stop_ids, vocab, max_len, out, start)
    if accelerator.is_main_process:
        start_output(run, started, resume_from)
        print(summary(run, model, loss_impl, data.resplit, resume_from))
    accelerator.wait_for_everyone()
    if trackers:
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                   for k, v in config_to_dict(cfg).items()}
        accelerator.init_trackers("tensorboard", config=hparams)
    return run


def start_accelerator(cfg: TrainConfig, out: Path, trackers: list[str] | None):
    """The Accelerator, then the checks that need the launch (process count, distributed type) or are cheap
    (the model directories), before any data or model is read."""
    from accelerate import Accelerator

    # Without CUDA, cpu=True makes `accelerate launch --multi_gpu --num_processes N` run real DDP over gloo.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                              log_with=trackers, project_dir=str(out))
    if accelerator.distributed_type.value == "DEEPSPEED" and cfg.grad_accum_steps > 1:
        raise UserError("train: under DeepSpeed keep grad_accum_steps=1 (DeepSpeed steps the optimiser inside "
                        "backward); raise micro_batch_size or the number of GPUs instead")
    if cfg.onpolicy_fraction > 0 and accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        # Sampling runs the unwrapped student outside the training forward; sharded weights are not whole there.
        raise UserError(f"train: on-policy steps (onpolicy_fraction > 0) run on one process or under DDP, not "
                        f"{accelerator.distributed_type.value}; use the DDP launch config")
    cfg.check_processes(accelerator.num_processes)
    if cfg.onpolicy_fraction > 0 and cfg.onpolicy_teacher_backend == "vllm":
        from .vllm_backend import require_vllm

        require_vllm("onpolicy_teacher_backend")  # no vllm or no CUDA: one line now, before any data or model
    for path, what in ((cfg.student, "student"), (cfg.teacher, "teacher")):
        if path:
            check_model_dir(path, what)  # cheap: config.json, whole weight files; before any data is read
    return accelerator


def read_teacher_data(path: str):
    """A teacher dataset directory with at least one row and the text columns."""
    if not Path(path).is_dir():
        raise UserError(f"{path}: dataset directory not found (write one with `llm-distill generate`)")
    try:
        ds = load_teacher_dataset(path)  # data/part-*.parquet, or an older save_to_disk directory
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a datasets directory ({type(e).__name__})") from None
    if len(ds) == 0:
        raise UserError(f"{path}: the dataset has no rows")
    if "completion" not in ds.column_names or "messages" not in ds.column_names:
        raise UserError(f"{path}: needs 'messages' and 'completion' columns")
    return ds


def load_data(cfg: TrainConfig) -> TrainData:
    """Read dataset (and eval_dataset) and the student tokenizer; check every row before the student is built."""
    ds = read_teacher_data(cfg.dataset)
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
    eval_ds = None
    if cfg.eval_dataset:
        eval_ds = read_teacher_data(cfg.eval_dataset)
        if cfg.kd_weight > 0 and "topk_token_ids" not in eval_ds.column_names:
            raise UserError(f"{cfg.eval_dataset}: eval_dataset has no teacher logprobs (topk_token_ids)")
        check_teacher_dataset(cfg.eval_dataset, eval_ds, need=need, vocab_size=len(tokenizer))
    resplit = check_alignment(ds, tokenizer, tok_path) if cfg.kd_weight > 0 else 0
    return TrainData(ds, eval_ds, prov, tokenizer, tok_path, with_topk, retokenize, resplit)


def build_model(cfg: TrainConfig, tokenizer):
    """The student as trained: packed attention, gradient checkpointing and a LoRA adapter when asked for."""
    model = build_student(cfg, tokenizer)
    if cfg.packing:
        use_packed_sdpa(model)  # sdpa without a (tokens x tokens) block mask; checked in build_loss
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora:
        model = add_lora(cfg, model)
    emb = model.get_input_embeddings().weight.shape[0]
    if emb < len(tokenizer):
        raise UserError(f"train: the student's embedding has {emb} rows but the tokenizer has {len(tokenizer)} tokens")
    return model


def add_lora(cfg: TrainConfig, model):
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
    return model


def build_optimizer(cfg: TrainConfig, model, accelerator) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (LoRA: the adapter only); no weight decay on biases and norms."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    # Fused AdamW updates every parameter in one kernel (CPU and CUDA): at small sizes the per-tensor loop of the
    # default implementation is a visible part of a step. FSDP and DeepSpeed keep their default.
    fused = (accelerator.distributed_type.value in ("NO", "MULTI_CPU", "MULTI_GPU")
             and accelerator.device.type in ("cpu", "cuda"))
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate, fused=fused or None)


def build_loss(cfg: TrainConfig, model, vocab: int, rows: TeacherRows, distributed_type: str):
    """The StudentLoss with the head implementation this model and launch allow: (loss, implementation)."""
    loss_impl = "dense" if not cfg.loss_chunk_size else cfg.loss_impl
    if loss_impl in ("auto", "fused"):
        problem = fused_head_problem(model, distributed_type)
        if problem and loss_impl == "fused":
            raise UserError(f"train: loss_impl=fused cannot run: {problem}; use loss_impl=chunked")
        loss_impl = "chunked" if problem else "fused"
    if loss_impl != "dense":
        check_chunked_head(model, vocab, torch.tensor([rows[0]["prompt"]]))
    if cfg.packing:
        check_packing(model, [rows[0]["prompt"], rows[len(rows) - 1]["prompt"]])
    loss = StudentLoss(model, vocab, cfg.loss_chunk_size, cfg.kd_weight, cfg.ce_weight, cfg.kd_topk,
                       loss_impl=loss_impl, **cfg.kd_options(),
                       minillm={"single_step": cfg.minillm_single_step, "length_norm": cfg.minillm_length_norm})
    return loss, loss_impl


def start_output(run: Run, started: dict, resume_from: Path | None) -> None:
    """Main process: a fresh (or overwritten) output directory with its run record, or the resumed one cleaned of
    what a killed run left after its last checkpoint."""
    cfg, out = run.cfg, run.out
    if cfg.overwrite and out.exists():
        shutil.rmtree(out)
    started["created"] = resume_from is None  # a failure from here on removes this fresh directory
    out.mkdir(parents=True, exist_ok=True)
    write_run_record(out, "train", config_to_dict(cfg))
    for stale in (out / "checkpoints").glob(".step-*.tmp"):  # a checkpoint a killed run did not finish
        shutil.rmtree(stale, ignore_errors=True)
    if run.metrics_file.exists():  # drop what a killed run logged after the checkpoint we continue from
        kept = [l for l in run.metrics_file.read_text().splitlines() if l and json.loads(l)["step"] <= run.start]
        run.metrics_file.write_text("".join(l + "\n" for l in kept))


def summary(run: Run, model, loss_impl: str, resplit: int, resume_from: Path | None) -> str:
    cfg, accelerator = run.cfg, run.accelerator
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"train: student {count_parameters(model):,} params ({trained:,} trained), "
            f"{len(run.rows)} rows, "
            f"{'KD + ' if cfg.kd_weight > 0 else ''}CE weights kd={cfg.kd_weight} ce={cfg.ce_weight}, "
            f"{run.world} process(es) ({accelerator.distributed_type.value}, "
            f"{accelerator.mixed_precision} mixed precision), {loss_impl} loss"
            + (", packed micro-batches" if cfg.packing else "")
            + (f"; {resplit} of the first 64 completions re-encode to other ids (sampled splits)" if resplit else "")
            + (f"; on-policy ({cfg.onpolicy_objective}) with probability {cfg.onpolicy_fraction} per step, teacher "
               f"{cfg.teacher} ({cfg.onpolicy_teacher_backend})" if run.teacher is not None else "")
            + (f", resuming at step {run.start} from {resume_from}" if run.start else ""))


# ---------------------------------------------------------------------------------------------------------------
# The loop.


def fit(run: Run) -> str:
    """The training loop: each step's micro-batches (offline or on-policy), one optimiser step on them, the
    metrics window logged every log_every steps, eval_dataset's loss every eval_every, a checkpoint every
    save_every; then the final student."""
    from tqdm.auto import tqdm

    cfg, accelerator = run.cfg, run.accelerator
    run.step_loss.train()
    bar = tqdm(total=cfg.max_steps, initial=run.start, desc="train", disable=not accelerator.is_main_process)
    window = Window.empty(accelerator.device)
    for step in range(run.start + 1, cfg.max_steps + 1):
        micro, objective, onpolicy = step_batches(run, step)
        # CE on the student's own samples would teach it what it already says: on-policy steps use KD only.
        ce_weight = 0.0 if onpolicy else cfg.ce_weight
        step_tokens = count_step_tokens(micro, accelerator)
        window.add_batches(micro)
        sums, norm = train_step(run, micro, objective, ce_weight, step_tokens)
        window.add_step(sums, norm, cfg.max_grad_norm, onpolicy, step_tokens)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            rec = log_window(run, window, step)
            if accelerator.is_main_process:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", kd=f"{rec['kd']:.4f}", ce=f"{rec['ce']:.4f}",
                                tok_s=f"{rec['tokens_per_s']:.0f}")
            window = Window.empty(accelerator.device)
        elif run.eval_rows is not None and cfg.eval_every and step % cfg.eval_every == 0:
            write_metrics(run, {"step": step, **evaluate_loss(run)}, step)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            save_checkpoint(run, step)
    bar.close()
    accelerator.wait_for_everyone()
    save_model(run, run.out)
    if accelerator.is_main_process:
        # Written last: its presence means the final student is complete (a rerun then refuses to resume).
        (run.out / STATE_FILE).write_text(json.dumps({"step": cfg.max_steps, "finished": True}))
        print(f"train: saved student -> {run.out}")
    for tracker in accelerator.trackers:
        tracker.finish()
    # All processes leave together, and the process group is not torn down: the main process hosts the rendezvous
    # store, and a process that destroys its group after the main one has exited waits on that store forever
    # (seen under load: rank 1 hung at the end of a finished 2-process run). Exiting frees it all the same.
    accelerator.wait_for_everyone()
    return str(run.out)


def step_rows(run: Run, step: int, i: int) -> list[int]:
    """Row indices of micro-batch i of this process for optimiser step `step` (1-based): a pure function of
    (step, i)."""
    cfg = run.cfg
    global_batch = cfg.global_batch(run.world)
    epoch_len = -(-len(run.lengths) // global_batch)
    epoch, j = divmod(step - 1, epoch_len)
    if epoch not in run.epochs:
        run.epochs.clear()
        run.epochs[epoch] = epoch_batches(run.lengths, global_batch, epoch, cfg.seed, cfg.group_by_length)
    lo = (i * run.world + run.accelerator.process_index) * cfg.micro_batch_size
    return run.epochs[epoch][j][lo:lo + cfg.micro_batch_size]


def offline_batches(run: Run, step: int) -> list[dict]:
    """This process's grad_accum_steps micro-batches of step `step` from the teacher dataset."""
    return [collate(run.rows.take(step_rows(run, step, i)), run.tokenizer.pad_token_id, run.cfg.packing)
            for i in range(run.cfg.grad_accum_steps)]


def step_batches(run: Run, step: int) -> tuple[list[dict], str, bool]:
    """(micro-batches, objective, on-policy?) of step `step`: the dataset's rows, or on an on-policy step (the same
    choice on every process) the student's own samples for their prompts, scored by the teacher."""
    cfg = run.cfg
    if not onpolicy_step(cfg.seed, step, cfg.onpolicy_fraction):
        return offline_batches(run, step), "distill", False
    rows = []
    for i in range(cfg.grad_accum_steps):
        idx = step_rows(run, step, i)
        rows += [(r, e["prompt"]) for r, e in zip(idx, run.rows.take(idx))]
    student = run.accelerator.unwrap_model(run.step_loss).model
    micro, objective = onpolicy_batches(student, run.teacher, rows, step, cfg, pad_id=run.tokenizer.pad_token_id,
                                        stop_ids=run.stop_ids, vocab=run.vocab, max_len=run.max_len)
    return micro, objective, True


def count_step_tokens(micro: list[dict], accelerator) -> int:
    """Completion tokens of the whole optimiser step: every micro-batch of every process (`global_token_mean`).
    Counted on the host, before the batches are copied to the device."""
    step_tokens = sum(int((b["labels"] != -100).sum()) for b in micro)
    if accelerator.num_processes > 1:  # all micro-batches of all processes
        step_tokens = int(accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), reduction="sum"))
    return step_tokens


def global_token_mean(loss_sum: torch.Tensor, step_tokens: int, world: int) -> torch.Tensor:
    """A micro-batch's summed loss as its share of the mean over every completion token of the optimiser step.

    Dividing by the step's completion tokens on all micro-batches and all processes (`count_step_tokens`), not by
    the micro-batch's own, makes the step's gradient that of one mean over the global batch: splitting it into
    more micro-batches or more processes changes neither the loss nor its gradient (a per-micro-batch mean would
    weight a token of a short micro-batch more). x world undoes DDP's averaging of the gradients over processes.
    """
    return loss_sum * world / max(step_tokens, 1)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train_step(run: Run, micro: list[dict], objective: str, ce_weight: float, step_tokens: int):
    """Forward and backward over the step's micro-batches, clip, one optimiser and scheduler step.

    Returns the step's two summed loss values ((2,) float32 on the device: kd and ce, or MiniLLM's surrogate and
    reverse KL) and the pre-clipping gradient norm (None under DeepSpeed, which clips inside its own step)."""
    cfg, accelerator, step_loss = run.cfg, run.accelerator, run.step_loss
    kd_step = ce_step = torch.zeros((), device=accelerator.device)
    for i, b in enumerate(micro):
        b = to_device(b, accelerator.device)
        # Gradients are all-reduced (averaged over processes) only on the last micro-batch.
        sync = contextlib.nullcontext() if i == len(micro) - 1 else accelerator.no_sync(step_loss)
        with sync:
            sums = step_loss(**b, ce_weight=ce_weight, objective=objective)
            loss = global_token_mean(sums.weighted(cfg.kd_weight, ce_weight), step_tokens, run.world)
            accelerator.backward(loss)
        kd_step = kd_step + sums[0].detach().float()
        ce_step = ce_step + sums[1].detach().float()
    # The pre-clipping norm is logged either way (inf = measure only): how often clipping acts, and by how
    # much, tells whether the loss weights move the effective step size.
    norm = accelerator.clip_grad_norm_(step_loss.parameters(),
                                       cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return torch.stack([kd_step, ce_step]), norm


# ---------------------------------------------------------------------------------------------------------------
# Metrics: a window of steps, logged together.


@dataclass
class Window:
    """What the steps since the last log step add up to. Loss sums stay on the device until a log step: a float()
    per step would make the host wait for the GPU every step, so that it could not queue the next step's work
    while the current one runs."""

    sums: torch.Tensor       # (4,) kd, ce (offline steps), then the on-policy pair (kd or surrogate, rkl)
    norms: torch.Tensor      # (3,) sum of gradient norms, steps clipped, steps measured
    norm_max: torch.Tensor   # ()
    t0: float                # perf_counter at the window's start
    tokens: int = 0          # completion tokens of offline steps (already global: count_step_tokens)
    seen: int = 0            # this process's real (not padding) positions
    positions: int = 0       # this process's positions, padding included
    op_steps: int = 0        # on-policy steps
    op_tokens: int = 0       # completion tokens of on-policy steps

    @staticmethod
    def empty(device) -> "Window":
        dtype = Window.dtype(device)
        return Window(torch.zeros(4, dtype=dtype, device=device), torch.zeros(3, dtype=dtype, device=device),
                      torch.zeros((), dtype=dtype, device=device), time.perf_counter())

    @staticmethod
    def dtype(device) -> torch.dtype:
        return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64

    def add_batches(self, micro: list[dict]) -> None:
        # A packed batch has no attention_mask: every position is a token.
        self.seen += sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                         for b in micro)
        self.positions += sum(b["input_ids"].numel() for b in micro)

    def add_step(self, sums: torch.Tensor, norm, max_grad_norm: float, onpolicy: bool, step_tokens: int) -> None:
        dtype = self.sums.dtype
        if norm is not None:
            norm = norm.detach().to(device=self.sums.device, dtype=dtype)
            clipped = (norm > max_grad_norm).to(dtype) if max_grad_norm > 0 else norm * 0.0
            self.norms += torch.stack([norm, clipped, norm * 0.0 + 1.0])
            self.norm_max = torch.maximum(self.norm_max, norm)
        part = slice(2, 4) if onpolicy else slice(0, 2)  # on-policy values are logged apart: another quantity
        self.sums[part] += sums.to(dtype)
        if onpolicy:
            self.op_steps += 1
            self.op_tokens += step_tokens
        else:
            self.tokens += step_tokens


def log_window(run: Run, window: Window, step: int) -> dict:
    """The window's record (per-token losses, throughput, gradient norms, on-policy values; eval_dataset's loss
    when due), written to metrics.jsonl and the trackers; refuses a loss that stopped being finite."""
    cfg, accelerator = run.cfg, run.accelerator
    seen, positions = accelerator.reduce(torch.tensor([window.seen, window.positions], device=accelerator.device),
                                         reduction="sum").tolist()
    w_kd, w_ce, op_kd, op_rkl = accelerator.reduce(window.sums, reduction="sum").tolist()
    elapsed = time.perf_counter() - window.t0
    rec = {"step": step, "lr": run.scheduler.get_last_lr()[0],
           "kd": w_kd / max(window.tokens, 1), "ce": w_ce / max(window.tokens, 1),
           "completion_tokens": window.tokens, "tokens_per_s": seen / max(elapsed, 1e-9),
           "padding_fraction": 1 - seen / max(positions, 1)}
    rec["loss"] = cfg.kd_weight * rec["kd"] + cfg.ce_weight * rec["ce"]
    norm_sum, clipped, norm_steps = window.norms.tolist()  # already global: grads are all-reduced
    if norm_steps:
        rec.update(grad_norm=norm_sum / norm_steps, grad_norm_max=float(window.norm_max),
                   clip_fraction=clipped / norm_steps)
    if cfg.onpolicy_fraction > 0:
        op_tokens = max(window.op_tokens, 1)
        rec.update(onpolicy_steps=window.op_steps, onpolicy_tokens=window.op_tokens)
        if cfg.onpolicy_objective == "minillm":  # surrogate, and the sampled reverse KL per token
            rec.update(onpolicy_surrogate=op_kd / op_tokens, onpolicy_rkl=op_rkl / op_tokens)
        else:
            rec["onpolicy_kd"] = op_kd / op_tokens
    if run.eval_rows is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
        rec.update(evaluate_loss(run))
    write_metrics(run, rec, step)
    if not all(math.isfinite(v) for k, v in rec.items() if k in ("loss", "onpolicy_kd", "onpolicy_surrogate")):
        raise UserError(f"train: loss became {rec['loss']} at step {step}; lower learning_rate")
    return rec


def write_metrics(run: Run, rec: dict, step: int) -> None:
    """One line of metrics.jsonl (main process) and the trackers (every process)."""
    if run.accelerator.is_main_process:
        with run.metrics_file.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    run.accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=step)


@torch.no_grad()
def evaluate_loss(run: Run) -> dict:
    """KD and CE per completion token on eval_dataset, summed over every process's share of its rows."""
    cfg, accelerator, step_loss, eval_rows = run.cfg, run.accelerator, run.step_loss, run.eval_rows
    step_loss.eval()
    share = list(range(accelerator.process_index, len(eval_rows), run.world))
    n_batches = -(-len(eval_rows) // (run.world * cfg.micro_batch_size))  # the same on every process
    sums = torch.zeros(3, device=accelerator.device)
    for n in range(n_batches):
        idx = share[n * cfg.micro_batch_size:(n + 1) * cfg.micro_batch_size]
        # A process without rows left still runs a forward (DDP forwards are collective) and adds nothing.
        b = to_device(collate(eval_rows.take(idx or share[:1]), run.tokenizer.pad_token_id, cfg.packing),
                      accelerator.device)
        kd_sum, ce_sum = step_loss(**b)
        if idx:
            sums += torch.stack([kd_sum.float(), ce_sum.float(), (b["labels"] != -100).sum().float()])
    sums = accelerator.reduce(sums, reduction="sum")
    step_loss.train()
    tokens = max(float(sums[2]), 1.0)
    kd_tok, ce_tok = float(sums[0]) / tokens, float(sums[1]) / tokens
    return {"eval_kd": kd_tok, "eval_ce": ce_tok, "eval_loss": cfg.kd_weight * kd_tok + cfg.ce_weight * ce_tok}


# ---------------------------------------------------------------------------------------------------------------
# Saving.


def save_model(run: Run, directory: Path) -> None:
    """The full student (gathered under FSDP / ZeRO-3; a collective) saved by the main process."""
    state = run.accelerator.get_state_dict(run.step_loss)
    if run.accelerator.is_main_process:
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        save_student(run.accelerator.unwrap_model(run.step_loss).model, run.tokenizer, directory, state_dict=state)


def save_checkpoint(run: Run, step: int) -> None:
    """checkpoints/step-N: the student + `state/`; written under a hidden name and renamed when complete."""
    accelerator = run.accelerator
    root = run.out / "checkpoints"
    tmp, final = root / f".step-{step:06d}.tmp", root / f"step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))  # every process adds its RNG state
    save_model(run, tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "processes": run.world}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
        for old in done[:-run.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
