"""Chunked, resumable, shardable dataset writing, shared by `generate` and `score`.

A run works in a hidden sibling of its output directory, `.<name>.partial/`:

    run.json              the settings the run started with (a resume must match them, field by field)
    lock                  pid of the process writing here (a second live writer is refused)
    chunk-000000.parquet  rows of work unit 0 (zstd parquet), each written to a temp name and os.replace'd into place

A chunk file exists completely or not at all, so a run killed at any moment (SIGKILL included) resumes at
the first missing chunk; the unit being computed when it died is redone from scratch. Chunk contents are a
pure function of the settings, so a redone chunk is the same rows. When every chunk is present the chunks are
streamed, in order, into the published teacher dataset (`data/part-*.parquet` with the chunks' compression,
+ provenance.json + run.json; `data.load_teacher_dataset` reads it), which appears with one rename; the partial
directory is removed last. A rerun after that is a no-op.

Sharding (`shard: i/N`) assigns each prompt to shard `hash(id) mod N`, so N independent processes cover every
prompt exactly once whatever the file order or the machines; `llm-distill merge` checks and joins them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

from .data import DATA_DIR, PROVENANCE_FILE, RUN_FILE, pid_alive, publish, staging_dir, write_run_record
from .errors import UserError

CHUNK_GLOB = "chunk-*.parquet"
# Chunk files: zstd over byte-stream-split columns (each value's bytes regrouped by position, so the always-zero
# high bytes of int32 ids and the exponent bytes of logprobs compress), without dictionaries (top-k ids are too
# many distinct values for one to pay): 83 B/token at k=20 even for incompressible random ids over a
# 151,936-token vocabulary, against 136 with pyarrow's defaults (benchmarks/storage.py).
PARQUET_OPTIONS = {"compression": "zstd", "use_dictionary": False}


def parquet_options(schema) -> dict:
    """PARQUET_OPTIONS plus byte stream split on every numeric leaf column (strings cannot use it)."""
    import pyarrow as pa

    numeric = []
    for field in schema:
        path, t = field.name, field.type
        while pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
            path, t = path + ".list.element", t.value_type
        if pa.types.is_integer(t) or pa.types.is_floating(t):
            numeric.append(path)
    return {**PARQUET_OPTIONS, "use_byte_stream_split": numeric}


# A published part file holds whole chunks (one row group each) up to about this many uncompressed Arrow bytes
# (~200 MB of parquet at the tiny teacher's ratio).
PART_BYTES = 512 << 20


def write_parts(tables, directory: Path, schema, part_bytes: int = PART_BYTES) -> int:
    """Write `tables` (pyarrow, in order) as `directory/data/part-00000.parquet`, ... with parquet_options; a
    new part starts once the current one holds `part_bytes` of Arrow data. Always at least one part (empty
    when there are no rows, so the schema is kept). Returns the number of parts."""
    import pyarrow.parquet as pq

    out = Path(directory) / DATA_DIR
    out.mkdir(parents=True, exist_ok=True)
    options = parquet_options(schema)
    writer, parts, size = None, 0, 0
    try:
        for table in tables:
            if not table.schema.equals(schema):
                table = table.cast(schema)
            if writer is not None and size >= part_bytes:
                writer.close()
                writer = None
            if writer is None:
                writer = pq.ParquetWriter(str(out / f"part-{parts:05d}.parquet"), schema, **options)
                parts, size = parts + 1, 0
            writer.write_table(table)
            size += table.nbytes
        if writer is None:
            writer = pq.ParquetWriter(str(out / "part-00000.parquet"), schema, **options)
            parts = 1
    finally:
        if writer is not None:
            writer.close()
    return parts


# Fields a resumed run may change: placement, speed and memory, not the rows (batch_size can change the last bits
# of the logits on some kernels; see generate.py for what is guaranteed). vLLM memory settings may change so that a
# run that ran out of memory can resume with less.
RESUMABLE_CHANGES = ("overwrite", "batch_size", "device", "output_dir", "prompts", "responses",
                     "gpu_memory_utilization", "max_num_batched_tokens", "enforce_eager",
                     # which servers answer (and how hard they are pushed) does not change a row
                     "server_urls", "server_concurrency", "server_timeout", "server_retries")


def partial_dir(output_dir: str) -> Path:
    p = Path(output_dir).resolve()
    return p.parent / f".{p.name}.partial"


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """`"i/N"` -> (i, N), or None for no sharding; the error names the expected form."""
    if spec is None or spec == "":
        return None
    try:
        i, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise UserError(f"shard '{spec}' is not of the form i/N (e.g. shard=0/4)") from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"shard '{spec}': need 0 <= i < N (e.g. shard=0/4 ... shard=3/4)")
    return i, n


def shard_of(prompt_id: str, num_shards: int) -> int:
    """Shard of a prompt: a hash of its id, so the split depends on nothing but the id and N."""
    return int.from_bytes(hashlib.sha256(prompt_id.encode("utf-8")).digest()[:8], "big") % num_shards


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process at the named point when LLM_DISTILL_CRASH_AT says so.

    The resume tests kill the real CLI at exact points (mid-chunk, between a chunk's temp write and its rename,
    while finalising) instead of racing a timer; unset, this does nothing.
    """
    if os.environ.get("LLM_DISTILL_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _fmt(v) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def settings_diff(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def finished(output_dir: str) -> bool:
    p = Path(output_dir)
    return (p / RUN_FILE).is_file() and (p / PROVENANCE_FILE).is_file()


class ChunkedRun:
    """The partial directory of one run: settings check, lock, atomic chunk files, and the final publish."""

    def __init__(self, output_dir: str, stage: str, settings: dict, features, overwrite: bool):
        self.output_dir, self.stage, self.features = output_dir, stage, features
        self.schema = features.arrow_schema
        self.dir = partial_dir(output_dir)
        if overwrite and self.dir.exists():
            self._take_lock_or_fail()
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._take_lock_or_fail()
        record = {"stage": stage, "settings": settings}
        run_file = self.dir / RUN_FILE
        if run_file.is_file():
            from .validate import read_json

            old = read_json(run_file, "run record of the unfinished run")
            if old.get("stage") != stage:
                raise UserError(f"{output_dir}: an unfinished '{old.get('stage')}' run is there, not '{stage}'; "
                                "choose another output_dir or pass overwrite=true")
            diff = settings_diff(old.get("settings") if isinstance(old.get("settings"), dict) else {}, settings)
            if diff:
                changes = ", ".join(f"{k} {_fmt((old.get('settings') or {}).get(k))} -> {_fmt(settings.get(k))}" for k in diff)
                raise UserError(f"{output_dir}: cannot resume, the unfinished run there used other settings "
                                f"(changed: {changes}); rerun with the old settings or pass overwrite=true to start "
                                "over")
            self.resumed = True
        else:
            self._atomic_write(run_file, json.dumps(record, indent=2, default=str).encode())
            self.resumed = False
        for tmp in self.dir.glob("*.tmp"):  # a write cut short by a kill; its chunk is redone
            tmp.unlink()

    @contextlib.contextmanager
    def refusing(self):
        """Around the work loop: a run refused (bad teacher values, ...) before it wrote any chunk leaves nothing
        behind, so the fix the message suggests can simply be rerun; one refused later keeps its finished chunks
        and says how to go on."""
        try:
            yield
        except UserError as e:
            if not self.resumed and not self.done():
                shutil.rmtree(self.dir, ignore_errors=True)
                raise
            raise UserError(f"{e} (the {len(self.done())} finished chunks are kept in {self.dir}: rerun with the "
                            "same settings to resume, or with overwrite=true to start over with new ones)") from None

    def _take_lock_or_fail(self) -> None:
        lock = self.dir / "lock"
        if lock.is_file():
            pid = lock.read_text().strip()
            if pid != str(os.getpid()) and pid_alive(pid):
                raise UserError(f"{self.output_dir}: another process (pid {pid}) is writing this run; wait for it or "
                                "use another output_dir")
        if self.dir.is_dir():
            lock.write_text(str(os.getpid()))

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def chunk_path(self, index: int) -> Path:
        return self.dir / f"chunk-{index:06d}.parquet"

    def done(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.dir.glob(CHUNK_GLOB)}

    def write_chunk(self, index: int, table) -> None:
        """Write one unit's rows as a zstd parquet file under a temp name, then rename it into place."""
        import pyarrow.parquet as pq

        final = self.chunk_path(index)
        tmp = final.with_name(final.name + ".tmp")
        pq.write_table(table, tmp, **parquet_options(table.schema))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        crash_point(f"chunk_tmp:{index}")
        os.replace(tmp, final)
        crash_point(f"chunk:{index}")

    def finalize(self, num_chunks: int, expected_ids: list[str], provenance: dict, run_config: dict) -> dict:
        """Stream the chunks in order into the parquet parts of the published dataset, check every id once,
        publish; return the provenance with row and token counts."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        ids, tokens = [], 0

        def chunks():
            nonlocal tokens
            for index in range(num_chunks):
                table = pq.read_table(self.chunk_path(index), schema=self.schema)
                ids.extend(table.column("id").to_pylist())
                tokens += int(pc.sum(pc.list_value_length(table.column("completion_token_ids"))).as_py() or 0)
                yield table

        tmp = staging_dir(self.output_dir)
        write_parts(chunks(), tmp, self.schema)
        if ids != expected_ids:  # cannot happen unless the partial directory was edited by hand
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{self.dir}: the chunks hold {len(ids)} rows, {len(set(ids))} distinct ids, "
                            f"expected {len(expected_ids)}; pass overwrite=true to regenerate")
        crash_point("finalize")
        provenance = {**provenance, "num_rows": len(ids), "completion_tokens": tokens}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
        write_run_record(tmp, self.stage, run_config)
        publish(tmp, self.output_dir)
        crash_point("published")
        shutil.rmtree(self.dir, ignore_errors=True)
        return provenance
