"""Bad input, table-driven: every case must end with exit code 2, exactly one stderr line naming the input, no
traceback, nothing left behind and the inputs untouched (every file of the working directory hashed before and
after). Most cases call `llm_distill.cli.main` in this process (fast); a few run the real CLI in a subprocess to
prove the process-level behaviour.

Each case runs in its own working directory holding copies of the shared inputs (relative paths, as a user types
them): teacher/ (tiny model), prompts.jsonl, td/ (a teacher dataset written by generate, k=8, 24 rows), runs/.
"""

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
from conftest import STUDENT_CONFIG, run_cli

from llm_distill import cli

TRAIN = ["train", "dataset=td", "output_dir=out", *STUDENT_CONFIG, "max_steps=2", "micro_batch_size=4"]
GEN = ["generate", "model=teacher", "prompts=prompts.jsonl", "output_dir=out", "max_new_tokens=2"]
EVAL = ["evaluate", "prompts=prompts.jsonl", "teacher=teacher", "output_dir=out", "max_new_tokens=2",
        "latency_prompts=0", "bootstrap=0", "plot=false"]


# ---------------------------------------------------------------------------------------------------------------
# Builders of broken inputs (each takes the case's working directory)


def _rows(work: Path, name: str = "td"):
    import pyarrow.parquet as pq

    files = sorted((work / name / "data").glob("part-*.parquet"))
    table = pq.read_table(files[0])
    return table, table.to_pylist()


def _write_rows(work: Path, rows: list, name: str = "td", keep_schema: bool = True) -> None:
    """Replace the dataset's rows; with keep_schema the original (fixed-k) types, else inferred ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = sorted((work / name / "data").glob("part-*.parquet"))[0]
    schema = pq.read_schema(f)
    table = pa.Table.from_pylist(rows, schema=schema) if keep_schema else pa.Table.from_pylist(rows)
    pq.write_table(table, f)


def edit_rows(fn, keep_schema=True, name="td"):
    def setup(work):
        _, rows = _rows(work, name)
        fn(rows)
        _write_rows(work, rows, name, keep_schema)
    return setup


def edit_provenance(**changes):
    def setup(work):
        f = work / "td" / "provenance.json"
        prov = json.loads(f.read_text())
        prov.update(changes)
        f.write_text(json.dumps(prov))
    return setup


def write(name: str, data):
    def setup(work):
        p = work / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def prompts(*records):
    return write("prompts.jsonl", "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def chain(*setups):
    def setup(work):
        for s in setups:
            s(work)
    return setup


def set_pos(row: int, column: str, pos: int, j, value):
    def fn(rows):
        if j is None:
            rows[row][column][pos] = value
        else:
            rows[row][column][pos][j] = value
    return fn


def unsorted_topk(rows):
    lp = rows[2]["topk_logprobs"][0]
    lp[0], lp[-1] = lp[-1], lp[0]


def short_k(rows):  # row 5 stores 7 ids per position where the rest has 8
    rows[5]["topk_token_ids"] = [ids[:7] for ids in rows[5]["topk_token_ids"]]
    rows[5]["topk_logprobs"] = [lp[:7] for lp in rows[5]["topk_logprobs"]]


def big_with_bad_token_late(work):
    """96 rows (the 24 four times, fresh ids); row 80 holds an out-of-vocabulary completion token."""
    _, rows = _rows(work)
    out = []
    for rep in range(4):
        for r in rows:
            out.append({**r, "id": f"{r['id']}-{rep}", "completion_token_ids": list(r["completion_token_ids"])})
    out[80]["completion_token_ids"][1] = 5000
    _write_rows(work, out)


def drop_column(column):
    def setup(work):
        import pyarrow.parquet as pq

        f = work / "td" / "data" / "part-00000.parquet"
        pq.write_table(pq.read_table(f).drop_columns([column]), f)
    return setup


def empty_dataset(work):
    import pyarrow.parquet as pq

    f = work / "td" / "data" / "part-00000.parquet"
    pq.write_table(pq.read_table(f).slice(0, 0), f)


def duplicate_part(work):
    shutil.copy(work / "td" / "data" / "part-00000.parquet", work / "td" / "data" / "part-00001.parquet")


def truncate(path: str, keep: int = 200):
    def setup(work):
        p = work / path
        p.write_bytes(p.read_bytes()[:keep])
    return setup


def nan_teacher(work):
    """A teacher copy whose final norm is NaN: every logit is NaN."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(work / "teacher", work / "nan_teacher")
    f = work / "nan_teacher" / "model.safetensors"
    state = load_file(str(f))
    state["model.norm.weight"].fill_(float("nan"))
    save_file(state, str(f), metadata={"format": "pt"})


def shard_copies(work):
    """Two copies of td posing as shards 0/2 and 1/2 of one run (for merge)."""
    for i in range(2):
        shutil.copytree(work / "td", work / f"s{i}")
        f = work / f"s{i}" / "provenance.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "shard": f"{i}/2"}))


def previous_output(stage: str, name: str = "out"):
    return write(f"{name}/{'run.json'}", json.dumps({"stage": stage, "config": {}}))


def adapter(base: str):
    return write("adapter/adapter_config.json", json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"}))


def symlink_loop(work):
    os.symlink("loop_b", work / "loop_a")
    os.symlink("loop_a", work / "loop_b")


def max_seq_len_hit(work):
    """max_seq_len equal to the longest prompt: row 0 fits, the longest prompt's row does not (found at step 1)."""
    _, rows = _rows(work)
    lens = [len(r["prompt_token_ids"]) for r in rows]
    assert lens[0] < max(lens)
    (work / "maxlen").write_text(str(max(lens)))


# ---------------------------------------------------------------------------------------------------------------
# The table: (id, setup, argv, text the one error line must contain)

CASES = [
    # -- prompts
    ("prompts-not-utf8", write("prompts.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n'
                                                b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'),
     GEN, "prompts.jsonl:2: not UTF-8"),
    ("prompts-bad-json", prompts('{"messages": ['), GEN, "prompts.jsonl:1: not valid JSON"),
    ("prompts-not-object", prompts([1, 2]), GEN, "prompts.jsonl:1: expected a JSON object"),
    ("prompts-no-messages", prompts({"prompt": "hi"}), GEN, "prompts.jsonl:1: 'messages' is missing"),
    ("prompts-empty-messages", prompts({"messages": []}), GEN, "'messages' is missing or empty"),
    ("prompts-unknown-role", prompts({"messages": [{"role": "bot", "content": "x"}]}), GEN, "unknown role 'bot'"),
    ("prompts-empty-content", prompts({"messages": [{"role": "user", "content": ""}]}), GEN, "empty content"),
    ("prompts-blank-content", prompts({"messages": [{"role": "system", "content": "  "},
                                                    {"role": "user", "content": "hi"}]}), GEN, "messages[0] has empty content"),
    ("prompts-content-number", prompts({"messages": [{"role": "user", "content": 3}]}), GEN, "string 'role' and 'content'"),
    ("prompts-ends-assistant", prompts({"messages": [{"role": "user", "content": "a"},
                                                     {"role": "assistant", "content": "b"}]}), GEN, "from the assistant"),
    ("prompts-reference-list", prompts({"messages": [{"role": "user", "content": "a"}], "reference": [1]}), GEN,
     "'reference' must be a string"),
    ("prompts-references-not-list", prompts({"messages": [{"role": "user", "content": "a"}], "references": "12"}),
     EVAL, "'references' must be a non-empty list of strings"),
    ("prompts-references-empty", prompts({"messages": [{"role": "user", "content": "a"}], "references": []}),
     EVAL, "'references' must be a non-empty list of strings"),
    ("prompts-duplicate-id", prompts({"id": "a", "messages": [{"role": "user", "content": "x"}]},
                                     {"id": "a", "messages": [{"role": "user", "content": "y"}]}), GEN, "duplicate id 'a'"),
    ("prompts-id-list", prompts({"id": [1], "messages": [{"role": "user", "content": "x"}]}), GEN, "'id' must be"),
    ("prompts-empty-file", write("prompts.jsonl", "\n\n"), GEN, "prompts.jsonl: no prompts found"),
    ("prompts-missing", None, GEN[:2] + ["prompts=nope.jsonl"] + GEN[3:], "nope.jsonl: prompts file not found"),
    ("prompts-plain-dir", write("pdir/readme.txt", "x"), GEN[:2] + ["prompts=pdir"] + GEN[3:], "pdir: not a teacher dataset"),
    ("evaluate-task-list", prompts({"messages": [{"role": "user", "content": "x"}], "task": ["add"]}), EVAL,
     "'task' must be a string"),
    ("score-not-utf8", write("resp.jsonl", b'{"messages": [{"role": "user", "content": "\xff"}], "completion": "a"}\n'),
     ["score", "model=teacher", "responses=resp.jsonl", "output_dir=out"], "resp.jsonl:1: not UTF-8"),
    ("score-no-completion", write("resp.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n'),
     ["score", "model=teacher", "responses=resp.jsonl", "output_dir=out"], "resp.jsonl:1: no response to score"),

    # -- recipes and command-line overrides
    ("recipe-duplicate-key", write("r.yaml", "model: teacher\nmodel: other\n"), ["generate", "r.yaml"],
     "r.yaml: not valid YAML (key 'model' appears twice"),
    ("recipe-duplicate-nested-key", write("r.yaml", "student_config:\n  model_type: llama\n  model_type: qwen2\n"),
     ["train", "r.yaml"], "appears twice"),
    ("recipe-bad-yaml", write("r.yaml", "model: [teacher\n"), ["generate", "r.yaml"], "r.yaml: not valid YAML"),
    ("recipe-not-mapping", write("r.yaml", "- a\n- b\n"), ["generate", "r.yaml"], "r.yaml: a recipe must be a mapping"),
    ("recipe-not-utf8", write("r.yaml", b"model: caf\xe9\n"), ["generate", "r.yaml"], "r.yaml: not UTF-8"),
    ("recipe-missing", None, ["generate", "nope.yaml"], "nope.yaml: recipe file not found"),
    ("recipe-unknown-key", write("r.yaml", "modle: teacher\n"), ["generate", "r.yaml"], "r.yaml: unknown key 'modle'"),
    ("override-unknown-key", write("r.yaml", "model: teacher\n"), ["generate", "r.yaml", "modle=x"],
     "command line: unknown key 'modle'"),
    ("override-wrong-type", None, GEN + ["max_new_tokens=abc"], "command line: 'max_new_tokens' must be int"),
    ("override-bad-yaml", None, GEN + ["logprobs=[1,"], "command line: the value of 'logprobs' is not valid YAML"),
    ("override-not-key-value", None, GEN + ["logprobs"], "'logprobs' is not key=value"),
    ("override-into-scalar", None, GEN + ["max_new_tokens.x=1"], "inside 'max_new_tokens', which is not a map"),
    ("temperature-inf", None, GEN + ["temperature=inf"], "'temperature' must be a finite number"),
    ("temperature-nan", None, GEN + ["temperature=.nan"], "'temperature' must be a finite number"),
    ("greedy-num-samples", None, GEN + ["temperature=0", "num_samples=2"], "identical completions"),
    ("device-banana", None, GEN + ["device=banana"], "device 'banana'"),
    ("backend-unknown", None, GEN + ["backend=tgi"], "backend 'tgi'"),
    ("stage-unknown", None, ["distil"], "invalid choice: 'distil'"),
    ("kd-divergences-all-zero", None, TRAIN + ["kd_divergences={forward_kl: 0, jsd: 0}"], "every divergence weight 0"),
    ("kd-divergence-unknown", None, TRAIN + ["kd_divergences={kl: 1}"], "unknown divergence 'kl'"),
    ("kd-topk-above-stored", None, TRAIN + ["kd_topk=9"], "kd_topk=9 is more than the 8 ids"),
    ("lora-target-nothing", None, TRAIN + ["lora={r: 2, target_modules: [nope_proj]}"], "lora.target_modules"),
    ("lora-target-type", None, TRAIN + ["lora={r: 2, target_modules: 3}"], "lora.target_modules must be"),
    ("heads-not-dividing", None, TRAIN + ["student_config.num_attention_heads=5", "student_config.num_key_value_heads=5"],
     "not a multiple of the number of attention heads"),
    ("micro-batch-above-rows", None, TRAIN[:-1] + ["micro_batch_size=100000"], "more than the 24 rows"),
    ("report-to-unknown", None, TRAIN + ["report_to=banana"], "report_to 'banana' is not a tracker"),
    ("evaluate-student-number", None, EVAL + ["students={s: 3}"], "students.s must be a model path"),
    ("evaluate-seeds-strings", None, EVAL + ["temperature=1", "seeds=[a]"], "seeds must be a non-empty list"),

    # -- model folders
    ("model-missing-one-slash", None, ["generate", "model=runs/nope", *GEN[2:]], "runs/nope: teacher not found (no such local directory)"),
    ("model-missing-dot", None, ["generate", "model=./nope", *GEN[2:]], "./nope: teacher not found"),
    ("model-missing-plain", None, ["generate", "model=nope", *GEN[2:]], "nope: teacher not found"),
    ("model-is-file", write("weights.bin", "x"), ["generate", "model=weights.bin", *GEN[2:]], "is a file"),
    ("model-no-config", lambda w: (w / "teacher" / "config.json").unlink(), GEN, "has no config.json"),
    ("model-corrupt-config", write("teacher/config.json", "{"), GEN, "corrupt model config"),
    ("model-truncated-safetensors", truncate("teacher/model.safetensors", 5000), GEN, "truncated or corrupt safetensors"),
    ("model-garbage-safetensors", write("teacher/model.safetensors", b"\xff" * 64), GEN, "truncated or corrupt safetensors"),
    ("model-corrupt-tokenizer", write("teacher/tokenizer.json", "{not json"), GEN, "cannot load a tokenizer"),
    ("evaluate-broken-student", chain(lambda w: shutil.copytree(w / "teacher", w / "st"),
                                      truncate("st/model.safetensors", 3000)),
     EVAL + ["students={s: st}"], "st/model.safetensors: truncated"),
    ("train-student-missing", None, ["train", "dataset=td", "output_dir=out", "student=runs/nope"],
     "runs/nope: student not found"),
    ("export-not-adapter", None, ["export", "adapter=teacher", "output_dir=out"], "no adapter_config.json"),
    ("export-adapter-base-missing", adapter("runs/gone"), ["export", "adapter=adapter", "output_dir=out"],
     "runs/gone: base model of the adapter adapter not found"),
    ("export-adapter-corrupt-config", write("adapter/adapter_config.json", "[1,"), ["export", "adapter=adapter",
                                                                                    "output_dir=out"],
     "corrupt LoRA adapter config"),

    # -- teacher datasets
    ("td-topk-id-out-of-range", edit_rows(set_pos(3, "topk_token_ids", 2, 0, 10000)), TRAIN,
     "row 3 (id"),
    ("td-topk-id-negative", edit_rows(set_pos(4, "topk_token_ids", 1, 3, -5)), TRAIN, "token id -5 is outside"),
    ("td-rows-of-different-k", edit_rows(short_k, keep_schema=False), TRAIN, "7 entries where the rest of the dataset has k=8"),
    ("td-topk-length-differs", edit_rows(lambda rows: rows[2].update(topk_token_ids=rows[2]["topk_token_ids"][:-1])),
     TRAIN, "row 2 (id"),
    ("td-missing-tail", drop_column("tail_logprob"), TRAIN, "has no column tail_logprob"),
    ("td-oov-completion-after-row-64", big_with_bad_token_late, TRAIN, "row 80 (id"),
    ("td-positive-logprob", edit_rows(set_pos(4, "topk_logprobs", 1, 0, 0.5)), TRAIN, "positive logprob"),
    ("td-topk-mass-above-1", edit_rows(lambda rows: rows[4]["topk_logprobs"].__setitem__(1, [math.log(0.3)] * 8)),
     TRAIN, "top-k probabilities sum to"),
    ("td-duplicate-topk-id", edit_rows(lambda rows: rows[6]["topk_token_ids"][0].__setitem__(
        1, rows[6]["topk_token_ids"][0][0])), TRAIN, "appears twice in the top-k"),
    ("td-nan-topk", edit_rows(set_pos(1, "topk_logprobs", 0, 3, float("nan"))), TRAIN, "NaN or +inf logprob"),
    ("td-inf-tail", edit_rows(set_pos(1, "tail_logprob", 0, None, float("inf"))), TRAIN, "inf tail logprob"),
    ("td-tail-inconsistent", edit_rows(set_pos(1, "tail_logprob", 0, None, float("-inf"))), TRAIN, "not 1"),
    ("td-nan-token-logprob", edit_rows(set_pos(0, "token_logprob", 0, None, float("nan"))), TRAIN,
     "column token_logprob"),
    ("td-unsorted-topk", edit_rows(unsorted_topk), TRAIN, "not sorted by logprob"),
    ("td-schema-version-99", edit_provenance(schema_version=99), TRAIN, "schema_version 99"),
    ("td-duplicate-part-file", duplicate_part, TRAIN, "appears more than once"),
    ("td-corrupt-provenance", write("td/provenance.json", '{"teacher": '), TRAIN, "corrupt provenance.json"),
    ("td-no-rows", empty_dataset, TRAIN, "has no rows"),
    ("td-missing", None, ["train", "dataset=runs/none", *TRAIN[2:]], "runs/none: dataset directory not found"),
    ("td-truncated-parquet", truncate("td/data/part-00000.parquet", 500), TRAIN, "td: cannot read this dataset"),
    ("td-bad-role", edit_rows(lambda rows: rows[7]["messages"][0].update(role="robot")), TRAIN[:1] +
     ["dataset=td", "output_dir=out", "kd_weight=0", *TRAIN[3:]], "row 7 (id"),
    ("td-as-prompts-empty-content", edit_rows(lambda rows: rows[3]["messages"][0].update(content="")),
     GEN[:2] + ["prompts=td"] + GEN[3:], "a message with empty content"),
    ("ensemble-nan-input", chain(lambda w: shutil.copytree(w / "td", w / "td2"),
                                 edit_rows(set_pos(2, "topk_logprobs", 0, 0, float("nan")), name="td2")),
     ["ensemble", "inputs=[td,td2]", "output_dir=out"], "td2: row 2"),
    ("merge-truncated-part", chain(shard_copies, truncate("s1/data/part-00000.parquet", 400)),
     ["merge", "inputs=[s0,s1]", "output_dir=out"], "s1: cannot read this dataset"),
    ("merge-corrupt-provenance", chain(shard_copies, write("s1/provenance.json", "nope")),
     ["merge", "inputs=[s0,s1]", "output_dir=out"], "corrupt provenance.json"),
    ("score-dataset-bad-ids", edit_rows(set_pos(2, "completion_token_ids", 0, None, 99999)),
     ["score", "model=teacher", "responses=td", "output_dir=out"], "outside the vocabulary"),

    # -- output paths
    ("generate-overwrite-input-folder", lambda w: shutil.copytree(w / "teacher", w / "data" / "teacher"),
     ["generate", "model=data/teacher", "prompts=prompts.jsonl", "output_dir=data", "overwrite=true"],
     "data: output_dir holds this run's input data/teacher"),
    ("generate-overwrite-cwd", None, GEN[:3] + ["output_dir=.", "overwrite=true"], "is the working directory"),
    ("generate-overwrite-parent", None, GEN[:3] + ["output_dir=..", "overwrite=true"],
     "a parent of the working directory"),
    ("train-overwrite-own-dataset", None, ["train", "dataset=td", "output_dir=td", "overwrite=true", *TRAIN[3:]],
     "td: output_dir is this run's input td"),
    ("overwrite-foreign-folder", write("out/notes.txt", "mine"), GEN + ["overwrite=true"],
     "holds no run record (run.json)"),
    ("overwrite-other-stage", previous_output("train"), GEN + ["overwrite=true"], "holds a 'train' output"),
    ("output-corrupt-run-record", write("out/run.json", "{"), GEN, "corrupt run record"),
    ("output-corrupt-run-record-train", write("out/run.json", "]"), TRAIN, "corrupt run record"),
    ("output-symlink-loop", symlink_loop, GEN[:3] + ["output_dir=loop_a"], "symlink loop"),
    ("output-under-a-file", write("afile", "x"), GEN[:3] + ["output_dir=afile/sub"], "afile is a file"),
    ("output-is-a-file", write("afile", "x"), GEN[:3] + ["output_dir=afile"], "is a file"),
    ("evaluate-output-is-a-file", write("afile", "x"), EVAL[:3] + ["output_dir=afile", *EVAL[4:]], "is a file"),
    ("score-output-is-responses", None, ["score", "model=teacher", "responses=td", "output_dir=td",
                                         "overwrite=true"], "is this run's input td"),
    ("merge-output-is-input", shard_copies, ["merge", "inputs=[s0,s1]", "output_dir=s0", "overwrite=true"],
     "is this run's input s0"),
    ("output-inside-input-folder", None, GEN[:3] + ["output_dir=teacher/out"], "inside this run's input teacher"),
    ("output-on-unwritable-filesystem", None, GEN[:3] + ["output_dir=/proc/llm-distill-out"], "/proc is not writable"),
    ("quickstart-output-cwd", None, ["quickstart", "data_dir=.", "recipes_dir=.", "output_dir=."],
     "is the working directory"),

    # -- leftovers: refused runs leave nothing behind
    ("generate-nan-teacher", nan_teacher, ["generate", "model=nan_teacher", *GEN[2:]], "the teacher returned a nan"),
    ("train-fails-at-step-1", max_seq_len_hit, None, "more than max_seq_len"),
]


# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tiny_teacher, prompts_file, teacher_data, tmp_path_factory):
    """The pristine inputs every case copies."""
    root = tmp_path_factory.mktemp("bad_input_inputs")
    shutil.copytree(tiny_teacher, root / "teacher")
    shutil.copy(prompts_file, root / "prompts.jsonl")
    shutil.copytree(teacher_data, root / "td")
    (root / "runs").mkdir()
    return root


def snapshot(root: Path) -> dict:
    """Every path under root (directories too, hidden ones included) -> sha256 of its bytes (or 'dir'/'link')."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            p = Path(dirpath) / d
            out[str(p.relative_to(root))] = "link" if p.is_symlink() else "dir"
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = ("link" if p.is_symlink() and not p.exists()
                                             else hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture
def work(inputs, tmp_path, monkeypatch):
    """A working directory with fresh copies of the inputs, as the current directory."""
    w = tmp_path / "work"
    shutil.copytree(inputs, w, symlinks=True)
    monkeypatch.chdir(w)
    import tqdm.auto

    class Quiet(tqdm.auto.tqdm):  # no progress bars in this process (the CLI runs get TQDM_DISABLE=1)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    monkeypatch.setattr(tqdm.auto, "tqdm", Quiet)
    return w


def check_refused(rc, stderr: str, expect: str, stage: str, before: dict, work: Path):
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert "Traceback" not in stderr, stderr
    assert rc == 2, (rc, stderr)
    assert len(lines) == 1, stderr
    prefix = "llm-distill: error:" if stage == "distil" else f"llm-distill {stage}: error:"
    assert lines[0].startswith(prefix), lines[0]
    assert expect in lines[0], lines[0]
    after = snapshot(work)
    assert after == before, {"added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
                             "changed": sorted(k for k in before if k in after and before[k] != after[k])}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused(case, work, capsys):
    name, setup, argv, expect = case
    if name == "train-fails-at-step-1":
        setup(work)
        argv = TRAIN[:-1] + ["micro_batch_size=24", f"max_seq_len={(work / 'maxlen').read_text()}"]
        (work / "maxlen").unlink()
    elif setup is not None:
        setup(work)
    before = snapshot(work)
    capsys.readouterr()
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code
    check_refused(rc, capsys.readouterr().err, expect, argv[0], before, work)


def test_device_cuda_without_cuda(work, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    before = snapshot(work)
    rc = cli.main(GEN + ["device=cuda"])
    check_refused(rc, capsys.readouterr().err, "no CUDA device is visible", "generate", before, work)


def test_read_only_output_parent_is_refused_before_work(work, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    (work / "ro").mkdir()
    (work / "ro").chmod(0o500)
    try:
        before = snapshot(work)
        rc = cli.main(EVAL[:3] + ["output_dir=ro/eval", *EVAL[4:]])
        check_refused(rc, capsys.readouterr().err, "is not writable", "evaluate", before, work)
    finally:
        (work / "ro").chmod(0o700)


def test_there_are_at_least_60_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------------------------------
# The real process: exit code 2, one stderr line, no traceback.

PROCESS_CASES = [
    ("prompts-not-utf8", write("prompts.jsonl", b'{"messages": [{"role": "user", "content": "\xe9"}]}\n'), GEN,
     "not UTF-8"),
    ("hub-like-missing-path", None, ["generate", "model=runs/nope", *GEN[2:]], "runs/nope: teacher not found"),
    ("train-overwrite-own-dataset", None, ["train", "dataset=td", "output_dir=td", "overwrite=true", *TRAIN[3:]],
     "is this run's input td"),
    ("generate-nan-teacher", nan_teacher, ["generate", "model=nan_teacher", *GEN[2:]], "the teacher returned a nan"),
]


@pytest.mark.parametrize("case", PROCESS_CASES, ids=[c[0] for c in PROCESS_CASES])
def test_bad_input_in_a_real_process(case, work):
    name, setup, argv, expect = case
    if setup is not None:
        setup(work)
    before = snapshot(work)
    proc = run_cli(*argv, cwd=work, check=False)
    check_refused(proc.returncode, proc.stderr, expect, argv[0], before, work)


def test_nan_teacher_rerun_gets_the_same_message(work):
    """A generate refused for NaN logits leaves no `.partial`, so the rerun the message suggests is not refused
    for other settings: it meets the same teacher and says the same thing."""
    nan_teacher(work)
    first = cli_err(["generate", "model=nan_teacher", *GEN[2:]])
    second = cli_err(["generate", "model=nan_teacher", *GEN[2:], "dtype=float32"])
    assert "the teacher returned a nan" in first and "the teacher returned a nan" in second
    assert not list(work.glob(".out*"))


def cli_err(argv) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        assert cli.main(argv) == 2
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Accepted inputs the checks must not refuse, and the fixes that are not refusals.


def test_map_override_replaces_and_dotted_override_merges(work):
    from llm_distill.config import EvaluateConfig, load_config

    (work / "e.yaml").write_text("prompts: p\noutput_dir: o\nstudents:\n  a: x\n  b: y\n")
    assert load_config(EvaluateConfig, "e.yaml", ["students={c: z}"]).students == {"c": "z"}
    assert load_config(EvaluateConfig, "e.yaml", ["students.c=z"]).students == {"a": "x", "b": "y", "c": "z"}


def test_overwrite_replaces_a_previous_output_of_the_same_stage(work):
    run_args = GEN + ["limit=2"]
    assert cli.main(run_args) == 0
    assert cli.main(run_args + ["max_new_tokens=3", "overwrite=true"]) == 0
    assert json.loads((work / "out" / "run.json").read_text())["config"]["max_new_tokens"] == 3


def test_prompts_with_a_byte_order_mark_are_read(work):
    from llm_distill.data import load_prompts

    (work / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"id": "a", "messages": [{"role": "user", "content": "hi"}]}\n')
    assert [p.id for p in load_prompts("bom.jsonl")] == ["a"]


def test_validation_accepts_every_generated_dataset(teacher_data):
    from llm_distill.validate import check_teacher_dataset

    info = check_teacher_dataset(str(teacher_data), need="kd")
    assert info == {"k": 8, "num_rows": 24}


def test_lora_adapter_records_an_absolute_base_and_weights_are_0644(work):
    assert cli.main(["train", "dataset=td", "output_dir=lora", "student=teacher", "lora={r: 2}", "max_steps=1",
                     "micro_batch_size=4", "kd_weight=1"]) == 0
    base = json.loads((work / "lora" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((work / "teacher").resolve())
    mask = os.umask(0)
    os.umask(mask)
    for f in (work / "lora").iterdir():
        if f.is_file():
            assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f
