"""Reading a published teacher dataset's rows: the parquet parts under `data/`, or an older `save_to_disk`
directory. Below `data` (prompts, run directories) and `validate` (which checks these rows), so that both can
read rows without importing each other; `data` re-exports these names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import UserError

DATA_DIR = "data"  # the parquet parts of a published teacher dataset, data/part-00000.parquet ...
PART_GLOB = "part-*.parquet"


def teacher_parquet_files(path: str) -> list[Path]:
    """The parquet parts of a published teacher dataset, in row order (empty for any other directory)."""
    return sorted((Path(path) / DATA_DIR).glob(PART_GLOB))


def _is_save_to_disk_dir(p: Path) -> bool:
    return (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def load_teacher_dataset(path: str, cache_dir: Optional[str] = None):
    """A teacher dataset directory as a `datasets.Dataset` (memory-mapped Arrow), rows in the stored order.

    Reads `DIR/data/part-*.parquet` (what generate, score, merge and ensemble publish; the same as
    `datasets.load_dataset("parquet", data_files="DIR/data/*.parquet", split="train")`). The first load converts
    the parquet into an Arrow cache file that later loads reuse: under `cache_dir` if given, else in the datasets
    cache (`$HF_DATASETS_CACHE`, by default `~/.cache/huggingface/datasets`), 2-3.5x the parquet size. A
    directory written by `Dataset.save_to_disk` (older llm_distill outputs, other tools) is opened in place with
    `load_from_disk`. Anything else is a one-line UserError.
    """
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{path}: dataset directory not found (write one with `llm-distill generate`)")
    files = teacher_parquet_files(path)
    try:
        if files:
            import pyarrow.parquet as pq
            from datasets import Dataset

            if sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 0:  # datasets cannot read 0-row parquet
                return Dataset(pq.read_schema(files[0]).empty_table())
            return Dataset.from_parquet([str(f) for f in files], cache_dir=cache_dir, split="train")
        if _is_save_to_disk_dir(p):
            from datasets import load_from_disk

            return load_from_disk(str(p))
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"{path}: cannot read this dataset ({type(e).__name__}: {first})") from None
    raise UserError(f"{path}: not a teacher dataset (no {DATA_DIR}/{PART_GLOB}) nor a `save_to_disk` directory; "
                    "write one with `llm-distill generate`, or pass a JSONL file")


def teacher_tables(path: str, columns: Optional[list] = None):
    """(Arrow schema, iterator of pyarrow tables in row order) of a teacher dataset, read without the datasets
    cache: the parquet row groups one by one, or the memory-mapped table of a `save_to_disk` directory."""
    files = teacher_parquet_files(path)
    if files:
        import pyarrow.parquet as pq

        schema = pq.read_schema(files[0])

        def parts():
            for f in files:
                pf = pq.ParquetFile(f)
                for i in range(pf.num_row_groups):
                    yield pf.read_row_group(i, columns=columns)

        return schema, parts()
    ds = load_teacher_dataset(path)
    table = ds.flatten_indices().data.table if ds._indices is not None else ds.data.table
    schema = ds.features.arrow_schema
    return schema, iter([table.select(columns) if columns else table])
