"""Prompts in, datasets out: prompt loading/validation, reading teacher datasets, run directories.

A teacher dataset (what generate, score, merge and ensemble publish) is a directory:

    data/part-00000.parquet ...  the rows, in prompt order, zstd parquet (chunks.parquet_options), >= 1 file
    provenance.json              what produced them (teacher, tokenizer, k, sampling, counts, ...)
    run.json                     the stage and settings of the run that wrote it

`load_teacher_dataset` opens one as a `datasets.Dataset` (and still opens a `save_to_disk` directory).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import validate
from .errors import UserError
from .storage import DATA_DIR, PART_GLOB, load_teacher_dataset, teacher_parquet_files, teacher_tables  # noqa: F401

SCHEMA_VERSION = 1
ROLES = validate.ROLES
RUN_FILE = "run.json"
PROVENANCE_FILE = "provenance.json"


@dataclass
class Prompt:
    id: str
    messages: list
    reference: Optional[str]
    where: str  # "file:line" for error messages
    task: Optional[str] = None
    references: Optional[list] = None  # every right answer, when there are several

    def valid_answers(self) -> Optional[list]:
        """What exact match accepts: `references` and `reference` together (None without either)."""
        if self.references is None:
            return None if self.reference is None else [self.reference]
        return self.references + ([self.reference] if self.reference is not None else [])


def prompt_from_record(rec, where: str, index: int) -> Prompt:
    """A checked `Prompt` from one JSONL record (`validate.prompt_record`); `where` names it in errors."""
    return validate.prompt_record(rec, where, index, Prompt)


def load_prompts(path: str, limit: Optional[int] = None, allow_empty: bool = False) -> list[Prompt]:
    """Read and validate chat prompts from JSONL, a teacher dataset directory or a `save_to_disk` directory."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: prompts file not found")
    prompts: list[Prompt] = []
    if p.is_dir():
        ds = load_teacher_dataset(str(p))
        validate.check_teacher_dataset(str(p), ds, need="messages")
        for i, rec in enumerate(ds):
            if limit is not None and len(prompts) >= limit:
                break
            prompts.append(prompt_from_record(rec, f"{path}: row {i}", i))
    else:
        for lineno, line in validate.jsonl_lines(path):
            if limit is not None and len(prompts) >= limit:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                                "each line must be one JSON object") from None
            prompts.append(prompt_from_record(rec, f"{path}:{lineno}", len(prompts)))
    if not prompts and not allow_empty:
        raise UserError(f"{path}: no prompts found")
    seen: dict[str, str] = {}
    for pr in prompts:
        if pr.id in seen:
            raise UserError(f"{pr.where}: duplicate id {pr.id!r} (first at {seen[pr.id]}); ids must be unique")
        seen[pr.id] = pr.where
    return prompts


def encode_prompt(tokenizer, messages: list, model_name: str = "model") -> list[int]:
    """Token ids of `messages` under the tokenizer's own chat template, with the assistant turn opened.

    The template text already holds any BOS it wants, so it is tokenised without adding special tokens again.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{model_name}: the tokenizer has no chat template; use a chat/instruct model or set "
                        "tokenizer.chat_template and save it")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# Run directories: refuse to mix runs, never leave a half-written output where a finished one is expected.


def _run_record(stage: str, config: dict) -> dict:
    cfg = {k: v for k, v in config.items() if k != "overwrite"}
    return {"stage": stage, "config": cfg}


def check_output_dir(path: str, stage: str, config: dict, overwrite: bool, inputs=()) -> None:
    """Refuse an output directory that holds something else, naming what differs; refuse what `overwrite` could
    destroy (validate.check_output_path: this run's `inputs`, the working directory, anything not a previous
    output of `stage`)."""
    validate.check_output_path(path, stage, inputs, overwrite)
    p = Path(path)
    if not p.exists() or overwrite:
        return
    if p.is_file():
        raise UserError(f"{path}: output_dir is a file; choose a directory path")
    if not any(p.iterdir()):
        return
    run_file = p / RUN_FILE
    if not run_file.is_file():
        raise UserError(f"{path}: output_dir is not empty and was not written by this stage; "
                        "choose another output_dir or pass overwrite=true")
    old = validate.read_json(run_file, "run record")
    new = _run_record(stage, config)
    if old.get("stage") != stage:
        raise UserError(f"{path}: holds a '{old.get('stage')}' run, not '{stage}'; choose another output_dir")
    old_cfg = old.get("config") if isinstance(old.get("config"), dict) else {}
    diff = sorted(k for k in set(old_cfg) | set(new["config"]) if old_cfg.get(k) != new["config"].get(k))
    if diff:
        k = diff[0]
        raise UserError(f"{path}: holds a different run ({k}: {old_cfg.get(k)!r} there, {new['config'].get(k)!r} now); "
                        "choose another output_dir or pass overwrite=true")


def default_permissions(directory: Path) -> None:
    """Give the files in `directory` the mode new files get here (0644 under the usual umask): the weight files
    save_pretrained writes come out 0600 (written through a private temp file), unlike the config beside them."""
    mask = os.umask(0)
    os.umask(mask)
    for f in Path(directory).rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~mask)


def write_run_record(directory: Path, stage: str, config: dict) -> None:
    (directory / RUN_FILE).write_text(json.dumps(_run_record(stage, config), indent=2, default=str))


def staging_dir(path: str) -> Path:
    """A fresh hidden sibling of `path` to write into; `publish` moves it into place atomically."""
    p = Path(path).resolve()
    p.parent.mkdir(parents=True, exist_ok=True)
    for stale in p.parent.glob(f".{p.name}.tmp-*"):  # left by a killed run whose process is gone
        if not pid_alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = p.parent / f".{p.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def pid_alive(pid: str) -> bool:
    """Whether process `pid` (a string from a file name) still runs: staging and lock files name their writer."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def publish(tmp: Path, path: str) -> None:
    """Replace `path` with the finished `tmp` directory (rename is atomic on one filesystem)."""
    p = Path(path).resolve()
    old = p.parent / f".{p.name}.old-{os.getpid()}"
    if p.exists():
        os.replace(p, old)
    os.replace(tmp, p)
    if old.exists():
        shutil.rmtree(old)


def read_provenance(dataset_dir: str) -> dict:
    return validate.check_provenance(dataset_dir)
