"""Loading models and tokenizers the way users do (`from_pretrained`), devices, dtypes, and tokenizer hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .errors import UserError
from .validate import check_model_dir, model_source
from .validate import one_line as _one_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """`auto`, `cpu`, `cuda`, `cuda:N` or `mps`; a device this machine does not have is a one-line UserError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"device '{device}' is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={device}, but no CUDA device is visible here; use device=auto or device=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device={device}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={device}, but MPS is not available here; use device=auto or device=cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device '{device}' is not supported; use auto, cpu, cuda, cuda:N or mps")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    source = model_source(path, "model/tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any loader failure is this path's fault: one line naming it
        where = "local directory" if source == "local" else "Hub id (not a local path)"
        raise UserError(f"{path}: cannot load a tokenizer from this {where} ({_one_line(e)})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # batching needs a pad id; padded positions are always masked
    return tok


def load_model(path: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    source = model_source(path, "model")
    check_model_dir(path)  # config.json and whole safetensors files, before the loader reads gigabytes
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        where = "local directory" if source == "local" else "Hub id (not a local path)"
        raise UserError(f"{path}: cannot load a model from this {where} ({_one_line(e)})") from None
    return model.to(device).eval()


def eos_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS plus the generation config's list."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def tokenizer_hash(tokenizer) -> str:
    """Hash of the token -> id map (added tokens included): equal hashes mean interchangeable token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def chat_template_hash(tokenizer) -> str:
    return hashlib.sha256((getattr(tokenizer, "chat_template", None) or "").encode()).hexdigest()[:16]


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
