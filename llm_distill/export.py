"""Merge a LoRA student adapter into its base model and save a plain model directory:

    llm-distill export adapter=runs/student-lora output_dir=runs/student-merged

The result loads with `AutoModelForCausalLM.from_pretrained` (no PEFT needed) and keeps the tokenizer and chat
template saved with the adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ExportConfig, config_to_dict
from .data import check_output_dir, default_permissions, publish, staging_dir, write_run_record
from .errors import UserError
from .validate import check_model_dir, one_line, read_json
from .models import load_tokenizer


def main(cfg: ExportConfig) -> str:
    from peft import AutoPeftModelForCausalLM

    if not (Path(cfg.adapter) / "adapter_config.json").is_file():
        raise UserError(f"{cfg.adapter}: no adapter_config.json; pass a LoRA adapter directory written by train")
    check_model_dir(cfg.adapter, "adapter")  # its config, its base model, whole weight files
    base = read_json(Path(cfg.adapter) / "adapter_config.json")["base_model_name_or_path"]
    check_output_dir(cfg.output_dir, "export", config_to_dict(cfg), cfg.overwrite, [cfg.adapter, base])
    try:
        model = AutoPeftModelForCausalLM.from_pretrained(cfg.adapter, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - one line naming the adapter, whatever the loader raised
        raise UserError(f"{cfg.adapter}: cannot load the adapter or its base model ({one_line(e)})") from None
    merged = model.merge_and_unload()
    tokenizer = load_tokenizer(cfg.adapter if (Path(cfg.adapter) / "tokenizer_config.json").is_file()
                               else merged.config._name_or_path)
    tmp = staging_dir(cfg.output_dir)
    merged.generation_config.eos_token_id = tokenizer.eos_token_id
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    default_permissions(tmp)
    write_run_record(tmp, "export", config_to_dict(cfg))
    publish(tmp, cfg.output_dir)
    print(f"export: merged {cfg.adapter} -> {cfg.output_dir}")
    return cfg.output_dir
