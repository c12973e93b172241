"""Every input a stage reads is checked here, before any expensive work, one function per kind of input:

    prompt_record        one chat prompt (JSONL line or dataset row): messages, roles, non-empty content, types
    jsonl_lines          a JSONL file's lines: not UTF-8 is one line naming the line (a leading BOM is accepted)
    read_json            run.json / provenance.json / adapter_config.json: a corrupt file is one line, not a traceback
    model_source         a model path: a local directory ("not found" at once when it looks local) or a hub id
    check_model_dir      a local model directory: config.json parses, safetensors files are whole
    check_teacher_dataset  a teacher dataset, vectorised over its Arrow columns (ids vs vocabulary, k, lengths,
                         logprob values, top-k mass, duplicate ids, schema version)
    check_output_path    an output directory: never the working directory, a parent of it or of an input, nor
                         inside an input folder; `overwrite` only replaces a previous output of the same stage;
                         a real write is tried before work starts

Each raises `UserError` with one line naming the input (file, row, column, field) and the fix; the CLI prints it
as `llm-distill <stage>: error: ...` and exits with code 2.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UserError

ROLES = ("system", "user", "assistant")
SCHEMA_VERSION = 1
RUN_FILE = "run.json"

# Teacher values: float16 storage rounds a logprob of a near-certain token to a few 1e-4 above 0 at worst, and the
# top-k mass (a sum of k rounded probabilities) to within k * 2^-11 relative of its true value.
LOGPROB_TOL = 1e-3
MASS_TOL = 2e-3
TOTAL_TOL = 1e-2  # top-k mass + tail mass must be 1 (the tail is exact, the top-k rounded)


def one_line(e: BaseException, limit: int = 240) -> str:
    """`Type: message` of an exception a library raised, on one line (libraries' messages span several)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def prompt_record(rec, where: str, index: int, prompt_cls):
    """One prompt (`{"messages": [...], "id"?, "reference"?, "references"?, "task"?}`) -> `prompt_cls(...)`, or a UserError at
    `where` (file:line or dataset row)."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object with 'messages', got {type(rec).__name__}")
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: 'messages' is missing or empty; "
                        'each prompt needs "messages": [{"role": "user", "content": "..."}]')
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise UserError(f"{where}: unknown role {m.get('role')!r} in messages[{i}]; use one of {', '.join(ROLES)}")
        if not m["content"].strip():
            raise UserError(f"{where}: messages[{i}] has empty content; give the {m['role']} turn some text or "
                            "leave the message out")
    if msgs[-1]["role"] == "assistant":
        raise UserError(f"{where}: the last message is from the assistant; a prompt must end with a user "
                        "(or system) turn — put an expected answer in 'reference'")
    ref = rec.get("reference")
    if ref is not None and not isinstance(ref, str):
        raise UserError(f"{where}: 'reference' must be a string")
    refs = rec.get("references")
    if refs is not None and (not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs)):
        raise UserError(f"{where}: 'references' must be a non-empty list of strings (every right answer), "
                        f"got {json.dumps(refs)[:60]}")
    task = rec.get("task")
    if task is not None and not isinstance(task, str):
        raise UserError(f"{where}: 'task' must be a string (a task type name), got {type(task).__name__}")
    pid = rec.get("id", f"p{index}")
    if isinstance(pid, bool) or not isinstance(pid, (str, int)) or pid == "":
        raise UserError(f"{where}: 'id' must be a non-empty string or an integer, got {pid!r}")
    return prompt_cls(id=str(pid), messages=[{"role": m["role"], "content": m["content"]} for m in msgs],
                      reference=ref, where=where, task=task, references=refs)


def jsonl_lines(path: str):
    """(line number, text) of a JSONL file; a file that is not UTF-8 text is one line naming the first bad line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                # utf-8-sig on the first line: a byte-order mark (Windows editors write one) is not JSON.
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "save the file as UTF-8") from None


# ---------------------------------------------------------------------------------------------------------------
# Small JSON files the stages write next to their outputs


def read_json(path, what: str = "") -> dict:
    """A JSON object from `path`; a file that is not one is a UserError naming it (and what wrote it)."""
    p = Path(path)
    try:
        value = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: corrupt {what or p.name} ({type(e).__name__}: {str(e).splitlines()[0][:80]}); "
                        "restore it, or rerun the stage that wrote it") from None
    if not isinstance(value, dict):
        raise UserError(f"{p}: corrupt {what or p.name} (a JSON object was expected); restore it, or rerun the stage "
                        "that wrote it")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Model paths

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def model_source(path: str, what: str = "model") -> str:
    """'local' (an existing directory) or 'hub' (a Hub id: `org/name`, never a path that could be local).

    A path that looks local (starts with `.`, `/` or `~`, has no or several slashes, or its first component
    exists here, like `runs/nope`) and does not exist is "not found" at once, without asking the Hub.
    """
    if not isinstance(path, str) or not path:
        raise UserError(f"{what}: needs a path (a local model directory or a Hub id)")
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{path}: {what} is a file; pass the model directory (with config.json)")
        return "local"
    first = path.split("/", 1)[0]
    if _HUB_ID.match(path) and ".." not in path and not Path(first).exists():
        return "hub"
    raise UserError(f"{path}: {what} not found (no such local directory)")


def check_safetensors(f: Path) -> None:
    """A safetensors file whose header parses and whose tensors all lie inside the file (a cheap read of the
    header, not of the weights): a truncated or foreign file is one line."""
    size = f.stat().st_size
    bad = f"{f}: truncated or corrupt safetensors file"
    fix = "; copy or save the model again"
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UserError(bad + f" ({size} bytes)" + fix)
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100 << 20:
            raise UserError(bad + " (header length beyond the file)" + fix)
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(bad + " (header is not JSON)" + fix) from None
    ends = [int(v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)]
    if ends and 8 + n + max(ends) > size:
        raise UserError(bad + f" ({size} bytes, its tensors need {8 + n + max(ends)})" + fix)


def check_model_dir(path: str, what: str = "model") -> None:
    """A local model directory that `from_pretrained` can open: config.json (valid JSON with a model_type) and
    whole safetensors files. Hub ids are left to the loader."""
    if model_source(path, what) != "local":
        return
    p = Path(path).expanduser()
    if (p / "adapter_config.json").is_file():
        cfg = read_json(p / "adapter_config.json", "LoRA adapter config")
        base = cfg.get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise UserError(f"{p / 'adapter_config.json'}: no base_model_name_or_path; the adapter does not say "
                            "which model it adapts")
        check_model_dir(base, f"base model of the adapter {path}")
    else:
        if not (p / "config.json").is_file():
            raise UserError(f"{path}: {what} directory has no config.json; pass a directory written by "
                            "save_pretrained (or by `llm-distill train`)")
        cfg = read_json(p / "config.json", "model config")
        if "model_type" not in cfg:
            raise UserError(f"{p / 'config.json'}: no 'model_type'; this is not a transformers model config")
    for f in sorted(p.glob("*.safetensors")):
        check_safetensors(f)


# ---------------------------------------------------------------------------------------------------------------
# Teacher datasets

KD_COLUMNS = ("prompt_token_ids", "completion_token_ids", "topk_token_ids", "topk_logprobs", "tail_logprob")
TOKEN_COLUMNS = ("prompt_token_ids", "completion_token_ids")
TEXT_COLUMNS = ("messages", "completion")


def check_provenance(path: str) -> dict:
    """provenance.json of a teacher dataset ({} when there is none); refuses one this version cannot read."""
    f = Path(path) / "provenance.json"
    if not f.is_file():
        return {}
    prov = read_json(f, "provenance.json")
    version = prov.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
        raise UserError(f"{f}: schema_version {version!r}, but this llm_distill reads schema_version "
                        f"{SCHEMA_VERSION}; regenerate the dataset with this version (or upgrade llm_distill)")
    return prov


def _fail(path, table, row0: int, row: int, column: str, what: str, position: Optional[int] = None,
          fix: str = "regenerate the dataset with `llm-distill generate` (or `score`)") -> None:
    rid = None
    if "id" in table.column_names:
        rid = table.column("id")[row].as_py()
    where = f"row {row0 + row}" + (f" (id {rid!r})" if rid is not None else "")
    pos = f", completion position {position}" if position is not None else ""
    raise UserError(f"{path}: {where}, column {column}{pos}: {what}; {fix}")


def _first(mask: np.ndarray) -> Optional[int]:
    return int(np.argmax(mask)) if mask.any() else None


def _lengths(col) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)


def _values(col):
    """The flattened child array of a list column (respecting slices)."""
    import pyarrow.compute as pc

    return pc.list_flatten(col)


def _check_batch(path, batch, row0: int, need: str, vocab: Optional[int], state: dict) -> None:
    """Checks on one Arrow batch of rows (row0 = index of its first row in the dataset): nulls, the messages, the
    token ids, then (need="kd") the teacher's per-position top-k, tail and token logprobs."""
    table = batch  # a RecordBatch: its columns are plain Arrays
    wanted = {"kd": KD_COLUMNS + TEXT_COLUMNS, "tokens": TOKEN_COLUMNS + TEXT_COLUMNS, "text": TEXT_COLUMNS,
              "messages": ("messages",)}[need]
    for name in wanted + tuple(c for c in ("id", "token_logprob") if c in table.column_names):
        if name in table.column_names and table.column(name).null_count:
            nulls = table.column(name).is_null().to_numpy(zero_copy_only=False)
            _fail(path, table, row0, _first(nulls), name, "missing value (null)")
    if "messages" in wanted:
        _check_messages(path, table, row0)
    if need in ("kd", "tokens"):
        _check_token_ids(path, table, row0, need, vocab)
    if need == "kd":
        _check_teacher_logprobs(path, table, row0, vocab, state)


def _check_messages(path, table, row0: int) -> None:
    """Every row has messages, each with a known role and non-empty content."""
    import pyarrow as pa
    import pyarrow.compute as pc

    msgs = table.column("messages")
    flat = _values(msgs)
    if not (pa.types.is_struct(flat.type) and {"role", "content"} <= {f.name for f in flat.type}):
        raise UserError(f"{path}: column messages must be a list of {{role, content}}, not {msgs.type}; "
                        "regenerate the dataset with `llm-distill generate`")
    lens = _lengths(msgs)
    bad = _first(lens == 0)
    if bad is not None:
        _fail(path, table, row0, bad, "messages", "no messages", fix="each row needs its prompt conversation")
    offsets = np.concatenate([[0], np.cumsum(lens)])
    roles, content = flat.field("role"), flat.field("content")
    bad_role = ~pc.fill_null(pc.is_in(roles, value_set=pa.array(ROLES)), False).to_numpy(zero_copy_only=False)
    empty = pc.fill_null(pc.less(pc.utf8_length(pc.utf8_trim_whitespace(content)), 1), True)
    for mask, what in ((bad_role, f"a role that is not one of {', '.join(ROLES)}"),
                       (empty.to_numpy(zero_copy_only=False), "a message with empty content")):
        i = _first(mask)
        if i is not None:
            _fail(path, table, row0, int(np.searchsorted(offsets, i, side="right") - 1), "messages", what,
                  fix="fix or drop that row")


def _check_token_ids(path, table, row0: int, need: str, vocab: Optional[int]) -> None:
    """Prompt and completion ids inside the vocabulary; for KD, no empty completion."""
    for name in TOKEN_COLUMNS:
        col = table.column(name)
        vals = _values(col).to_numpy(zero_copy_only=False)
        lens = _lengths(col)
        offsets = np.concatenate([[0], np.cumsum(lens)])
        bad = (vals < 0) | (vals >= vocab) if vocab else vals < 0
        i = _first(bad)
        if i is not None:
            row = int(np.searchsorted(offsets, i, side="right") - 1)
            _fail(path, table, row0, row, name, f"token id {int(vals[i])} is outside the vocabulary [0, {vocab or '?'})",
                  int(i - offsets[row]) if name == "completion_token_ids" else None,
                  fix="the dataset was written with another tokenizer, or edited; regenerate it")
    bad = _first(_lengths(table.column("completion_token_ids")) == 0)
    if bad is not None and need == "kd":
        _fail(path, table, row0, bad, "completion_token_ids", "empty completion (no tokens to learn from)",
              fix="drop that row or regenerate it")


def _check_teacher_logprobs(path, table, row0: int, vocab: Optional[int], state: dict) -> None:
    """One entry per completion token in every per-token column; the same k everywhere (state["k"], across
    batches); top-k ids valid and distinct; logprobs finite, <= 0, sorted; top-k + tail mass 1."""
    length = _lengths(table.column("completion_token_ids"))
    offsets = np.concatenate([[0], np.cumsum(length)])
    per_token = ["topk_token_ids", "topk_logprobs", "tail_logprob"] + \
        (["token_logprob"] if "token_logprob" in table.column_names else [])
    for name in per_token:
        other = _lengths(table.column(name))
        i = _first(other != length)
        if i is not None:
            _fail(path, table, row0, i, name, f"{int(other[i])} positions, but completion_token_ids has {int(length[i])}",
                  fix="every per-token list must have one entry per completion token; regenerate the row")
    pos_ids, pos_lp = _values(table.column("topk_token_ids")), _values(table.column("topk_logprobs"))
    P = len(pos_ids)
    k_ids, k_lp = _lengths(pos_ids), _lengths(pos_lp)

    def row_of(position: int) -> tuple[int, int]:
        row = int(np.searchsorted(offsets, position, side="right") - 1)
        return row, int(position - offsets[row])

    for name, ks in (("topk_token_ids", k_ids), ("topk_logprobs", k_lp)):
        if P == 0:
            continue
        k0 = state.setdefault("k", int(ks[0]))
        i = _first(ks != k0)
        if i is not None:
            row, t = row_of(i)
            _fail(path, table, row0, row, name, f"{int(ks[i])} entries where the rest of the dataset has k={k0}", t,
                  fix="every position must store the same k; regenerate the row")
    if P == 0:
        return
    k = state["k"]
    if k < 1:
        raise UserError(f"{path}: topk_token_ids stores k=0 ids per position; regenerate with logprobs >= 1")
    ids = _values(pos_ids).to_numpy(zero_copy_only=False).reshape(P, k)  # (P, k)
    lp = _values(pos_lp).to_numpy(zero_copy_only=False).astype(np.float32).reshape(P, k)  # (P, k)
    tail = _values(table.column("tail_logprob")).to_numpy(zero_copy_only=False).astype(np.float32)  # (P,)

    def fail_at(flat_mask: np.ndarray, column: str, what, fix: str = "regenerate the row") -> None:
        i = _first(flat_mask)
        if i is not None:
            row, t = row_of(i)
            _fail(path, table, row0, row, column, what(i) if callable(what) else what, t, fix)

    fail_at(((ids < 0) | (ids >= vocab) if vocab else ids < 0).any(1), "topk_token_ids",
            lambda i: f"token id {int(ids[i][(ids[i] < 0) | (ids[i] >= (vocab or 2**62))][0])} is outside the "
                      f"vocabulary [0, {vocab or '?'})",
            "the dataset was written with another tokenizer, or edited; regenerate it")
    if k > 1:
        s = np.sort(ids, axis=1)
        fail_at((s[:, 1:] == s[:, :-1]).any(1), "topk_token_ids",
                lambda i: f"id {int(s[i][1:][s[i][1:] == s[i][:-1]][0])} appears twice in the top-k")
    fail_at(np.isnan(lp).any(1) | np.isposinf(lp).any(1), "topk_logprobs", "NaN or +inf logprob")
    fail_at((lp > LOGPROB_TOL).any(1), "topk_logprobs",
            lambda i: f"positive logprob {float(lp[i].max()):.4g} (a log-probability is <= 0)")
    if k > 1:
        fail_at((lp[:, 1:] > lp[:, :-1] + LOGPROB_TOL).any(1), "topk_logprobs",
                "the top-k is not sorted by logprob, highest first")
    with np.errstate(over="ignore"):
        mass = np.exp(lp.astype(np.float64)).sum(1)  # (P,)
    fail_at(mass > 1 + MASS_TOL, "topk_logprobs", lambda i: f"the top-k probabilities sum to {mass[i]:.4f} > 1")
    fail_at(np.isnan(tail) | np.isposinf(tail), "tail_logprob", lambda i: f"{tail[i]} tail logprob")
    fail_at(tail > LOGPROB_TOL, "tail_logprob", lambda i: f"positive tail logprob {tail[i]:.4g}")
    total = mass + np.exp(tail.astype(np.float64))
    fail_at(np.abs(total - 1) > TOTAL_TOL, "tail_logprob",
            lambda i: f"top-k mass {mass[i]:.4f} + tail mass {np.exp(float(tail[i])):.4f} = {total[i]:.4f}, not 1")
    if "token_logprob" in table.column_names:
        tok = _values(table.column("token_logprob")).to_numpy(zero_copy_only=False).astype(np.float32)
        fail_at(~np.isfinite(tok), "token_logprob", lambda i: f"{tok[i]} logprob of the emitted token")
        fail_at(tok > LOGPROB_TOL, "token_logprob", lambda i: f"positive logprob {tok[i]:.4g}")


def check_teacher_dataset(path: str, ds=None, need: str = "kd", vocab_size: Optional[int] = None,
                          batch_positions: int = 1 << 19) -> dict:
    """Check a teacher dataset fully, vectorised over its Arrow columns; returns {"k", "num_rows"}.

    need: `kd` (top-k, tail and token ids, for token-level KD), `tokens` (prompt/completion ids), `text`
    (messages + completion), `messages` (prompts only). `ds`: an opened `datasets.Dataset` (else the parquet
    parts are read). vocab_size: token ids must lie in [0, vocab_size) (default: provenance's vocab_size).
    Rows are checked in batches of about `batch_positions` completion positions (a few hundred MB of numpy
    temporaries at k = 20), so memory stays flat however large the dataset.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from .storage import teacher_tables

    prov = check_provenance(path)
    vocab = vocab_size or (prov.get("vocab_size") if isinstance(prov.get("vocab_size"), int) else None)
    wanted = {"kd": KD_COLUMNS + TEXT_COLUMNS, "tokens": TOKEN_COLUMNS + TEXT_COLUMNS, "text": TEXT_COLUMNS,
              "messages": ("messages",)}[need]
    try:
        if ds is not None:
            table = ds.flatten_indices().data.table if ds._indices is not None else ds.data.table
            schema, tables = table.schema, iter([table])
        else:
            schema, tables = teacher_tables(path)
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            fix = ("set kd_weight=0 to train on the text only, or write the dataset with `llm-distill generate`"
                   if need == "kd" and "completion" in schema.names else "write it with `llm-distill generate`")
            raise UserError(f"{path}: has no column {missing[0]} (needed here); {fix}")
        state: dict = {}
        ids = []
        row0 = 0
        columns = [c for c in schema.names if c in wanted or c in ("id", "token_logprob")]
        for table in tables:
            table = table.select(columns)
            if "id" in columns:
                ids.append(table.column("id"))
            per_row = 1
            if "completion_token_ids" in columns and table.num_rows:
                per_row = max(1, len(pc.list_flatten(table.column("completion_token_ids"))) // table.num_rows)
            for batch in table.to_batches(max_chunksize=max(1, batch_positions // per_row)):
                _check_batch(path, batch, row0, need, vocab, state)
                row0 += batch.num_rows
        if ids:
            col = pa.chunked_array([pc.cast(c, pa.string()) for chunk in ids for c in chunk.chunks], type=pa.string())
            if pc.count_distinct(col).as_py() != len(col):
                counts = pc.value_counts(col)
                dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
                raise UserError(f"{path}: id {dup!r} appears more than once (a duplicated part file under data/?); "
                                "every row id must be unique - remove the extra file or regenerate the dataset")
    except UserError:
        raise
    except (OSError, pa.ArrowException, ValueError, TypeError) as e:
        raise UserError(f"{path}: cannot read this dataset ({one_line(e, 160)}); a part file is truncated, not "
                        "parquet or of another schema - restore or regenerate it") from None
    return {"k": state.get("k"), "num_rows": row0}


# ---------------------------------------------------------------------------------------------------------------
# Output paths


def _resolve(path: str, what: str) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop
        raise UserError(f"{path}: {what} cannot be resolved ({type(e).__name__}: {e}); a symlink loop? choose "
                        "another path") from None


def check_output_path(path: str, stage: str, inputs=(), overwrite: bool = False) -> Path:
    """Refuse output directories a run could destroy or could not write, before any work; returns it resolved.

    Never the working directory or one of its parents, the home directory or `/`; never a directory that is or
    holds one of this run's `inputs`; with `overwrite`, only an empty directory or a previous output of `stage`
    (its run.json says so); the nearest existing directory must be writable.
    """
    if not isinstance(path, str) or not path:
        raise UserError(f"{stage}: 'output_dir' is required")
    out = _resolve(path, "output_dir")
    if Path(path).is_symlink() and not Path(path).exists():
        raise UserError(f"{path}: output_dir is a broken symlink; remove it or choose another path")
    cwd = Path.cwd().resolve()
    if out == Path(out.anchor) or out == Path.home().resolve() or cwd == out or cwd.is_relative_to(out):
        raise UserError(f"{path}: output_dir is {'the working directory' if cwd == out else 'a parent of the working directory' if cwd.is_relative_to(out) else 'the home or root directory'}; "
                        "choose a new directory for this run's output, e.g. output_dir=runs/" + stage)
    for item in inputs:
        if not isinstance(item, str) or not item:
            continue
        src = _resolve(item, "input")
        if src == out or src.is_relative_to(out):
            raise UserError(f"{path}: output_dir {'is' if src == out else 'holds'} this run's input {item}; "
                            "writing there would destroy it - choose another output_dir")
        if src.is_dir() and out.is_relative_to(src):
            raise UserError(f"{path}: output_dir is inside this run's input {item}; keep outputs out of input "
                            "folders (e.g. output_dir=runs/" + stage + ")")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{path}: {'output_dir' if existing == out else existing} is a file, not a directory; "
                        "choose a directory path")
    try:  # a real write (permission bits say nothing for root, nor for /proc, read-only mounts, ...)
        import tempfile

        os.rmdir(tempfile.mkdtemp(prefix=".llm-distill-write-test-", dir=existing))
    except OSError as e:
        raise UserError(f"{path}: {existing} is not writable ({e.strerror}); choose an output_dir you can write "
                        "to") from None
    if out.exists() and overwrite and any(out.iterdir()):
        run_file = out / RUN_FILE
        record = read_json(run_file, "run record") if run_file.is_file() else None
        if record is None or record.get("stage") != stage:
            holds = f"a '{record.get('stage')}' output" if record else "no run record (run.json)"
            raise UserError(f"{path}: overwrite=true only replaces a previous {stage} output, and this directory "
                            f"holds {holds}; choose another output_dir (or delete it yourself)")
    return out
