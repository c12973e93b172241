"""Join the shards of a sharded `generate` (or `score`) run into one teacher dataset, after checking them.

    llm-distill generate recipes/tiny/generate.yaml shard=0/2 output_dir=runs/part0    # e.g. on GPU 0
    llm-distill generate recipes/tiny/generate.yaml shard=1/2 output_dir=runs/part1    # e.g. on GPU 1
    llm-distill merge inputs=[runs/part0,runs/part1] output_dir=runs/teacher_data

Refused, each with one line naming the shard and the field: shards whose provenance differs in anything that
changes what a row means (teacher, tokenizer, chat template, k, sampling, schema, prompt set, stage), a
directory that is not a finished shard, two inputs of the same shard, an id present twice, and (unless
allow_missing=true) absent shards of the N.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from . import __version__
from .chunks import parse_shard, write_parts
from .config import MergeConfig, config_to_dict
from .data import PROVENANCE_FILE, check_output_dir, publish, staging_dir, teacher_tables, write_run_record
from .errors import UserError
from .validate import check_provenance, check_teacher_dataset

# Provenance fields every shard must share: they define what a row means. Dates, row counts, backend version
# and the shard itself may differ.
MUST_MATCH = ("stage", "schema_version", "teacher", "teacher_revision", "tokenizer_hash", "chat_template_hash",
              "vocab_size", "k", "logprobs_mode", "sampling", "storage", "prompts_sha256", "responses_sha256")


def main(cfg: MergeConfig) -> str:
    check_output_dir(cfg.output_dir, "merge", config_to_dict(cfg), cfg.overwrite, cfg.inputs)
    provs, seen_shards = [], {}
    for path in cfg.inputs:
        f = Path(path) / PROVENANCE_FILE
        if not f.is_file():
            raise UserError(f"{path}: not a finished generate/score output (no {PROVENANCE_FILE}); finish that shard "
                            "by rerunning its command")
        prov = check_provenance(path)
        check_teacher_dataset(path, need="kd")  # every part file readable, every value sane, ids unique
        shard = parse_shard(prov.get("shard"))
        if shard is None:
            raise UserError(f"{path}: was not written with shard=i/N; merge joins the shards of one sharded run")
        if shard in seen_shards:
            raise UserError(f"{path}: is shard {shard[0]}/{shard[1]} again (also {seen_shards[shard]})")
        seen_shards[shard] = path
        provs.append(prov)

    ref, ref_path = provs[0], cfg.inputs[0]
    for path, prov in zip(cfg.inputs[1:], provs[1:]):
        for key in ("num_shards",) + MUST_MATCH:
            a = parse_shard(ref["shard"])[1] if key == "num_shards" else ref.get(key)
            b = parse_shard(prov["shard"])[1] if key == "num_shards" else prov.get(key)
            if a != b:
                raise UserError(f"{path}: shard {prov['shard']} differs from {ref_path} (shard {ref['shard']}) in "
                                f"{key}: {json.dumps(b, default=str)} vs {json.dumps(a, default=str)}; "
                                "merge only shards of one run")
    n = parse_shard(ref["shard"])[1]
    missing = sorted(set(range(n)) - {i for i, _ in seen_shards})
    if missing and not cfg.allow_missing:
        raise UserError(f"merge: shards {', '.join(f'{i}/{n}' for i in missing)} are missing; add them to inputs, "
                        "or pass allow_missing=true to merge what there is")
    if missing:
        print(f"merge: warning: shards {', '.join(f'{i}/{n}' for i in missing)} are missing; their prompts are not in "
              "the output (recorded in provenance.json)")

    first_seen: dict[str, str] = {}
    for path in cfg.inputs:
        for table in teacher_tables(path, columns=["id"])[1]:
            for rid in table.column("id").to_pylist():
                if rid in first_seen:
                    raise UserError(f"{path}: id {rid!r} is also in {first_seen[rid]}; each row must come from one "
                                    "shard")
                first_seen[rid] = path
    schema = teacher_tables(cfg.inputs[0])[0]

    def tables():  # every shard's rows in input order, each in its own order, as the shards' parquet holds them
        for path in cfg.inputs:
            for table in teacher_tables(path)[1]:
                try:
                    yield table.cast(schema) if not table.schema.equals(schema) else table
                except (ValueError, TypeError, NotImplementedError) as e:
                    raise UserError(f"{path}: its columns differ from {cfg.inputs[0]}'s ({str(e).splitlines()[0]}); "
                                    "merge only shards of one run") from None

    tmp = staging_dir(cfg.output_dir)
    write_parts(tables(), tmp, schema)
    num_rows = len(first_seen)
    tokens = sum(p.get("completion_tokens", 0) for p in provs)
    skipped = [i for p in provs for i in p.get("skipped_long_prompts", {}).get("ids", [])]
    provenance = {
        **{k: ref.get(k) for k in MUST_MATCH},
        **{k: ref.get(k) for k in ("backend", "backend_version", "dtype") if k in ref},
        "llm_distill_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "merged_from": [{"path": str(p), "shard": pr["shard"], "num_rows": pr.get("num_rows"),
                         "created": pr.get("created"), "backend": pr.get("backend"),
                         "backend_version": pr.get("backend_version")} for p, pr in zip(cfg.inputs, provs)],
        "missing_shards": [f"{i}/{n}" for i in missing],
        "shard": None,
        "num_prompts": sum(p.get("num_prompts", 0) for p in provs),
        "num_rows": num_rows,
        "completion_tokens": tokens,
        "skipped_long_prompts": {"count": sum(p.get("skipped_long_prompts", {}).get("count", 0) for p in provs),
                                 "ids": skipped[:100]},
    }
    (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
    write_run_record(tmp, "merge", config_to_dict(cfg))
    publish(tmp, cfg.output_dir)
    print(f"merge: {len(cfg.inputs)} of {n} shards, {num_rows} rows, {tokens} completion tokens -> {cfg.output_dir}")
    return cfg.output_dir
