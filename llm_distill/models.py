"""Loading models and tokenizers the way users do (`from_pretrained`), devices, dtypes, and tokenizer hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.count("/") != 1 or Path(path).exists()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if _looks_local(path) and not Path(path).expanduser().exists():
        raise UserError(f"{path}: model/tokenizer path not found")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # batching needs a pad id; padded positions are always masked
    return tok


def load_model(path: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if _looks_local(path) and not Path(path).expanduser().exists():
        raise UserError(f"{path}: model path not found")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load model ({str(e).splitlines()[0]})") from None
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
