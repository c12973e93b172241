"""generate: the schema, agreement with transformers' own generate and forward pass, and bad input."""

import json
import math
import re

import pytest
import torch
from conftest import run_cli, write_lines

from llm_distill.data import encode_prompt, load_teacher_dataset
from llm_distill.decoding import decode_batch


def test_dataset_schema_and_invariants(teacher_data, tiny_teacher, prompts_file):
    from transformers import AutoTokenizer

    ds = load_teacher_dataset(str(teacher_data))
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    prompts = [json.loads(l) for l in prompts_file.read_text().splitlines()]
    assert len(ds) == 2 * len(prompts)
    assert ds["id"][:2] == [f"{prompts[0]['id']}#0", f"{prompts[0]['id']}#1"]
    for row in ds:
        C = len(row["completion_token_ids"])
        assert C >= 1
        assert len(row["topk_token_ids"]) == len(row["topk_logprobs"]) == len(row["tail_logprob"]) == C
        assert row["prompt_token_ids"] == encode_prompt(tok, row["messages"])
        for t in range(C):
            lps = row["topk_logprobs"][t]
            assert len(lps) == 8 and lps == sorted(lps, reverse=True)
            mass = sum(math.exp(x) for x in lps) + math.exp(row["tail_logprob"][t])
            assert mass == pytest.approx(1.0, abs=2e-3)  # top-k stored as float16: rel. error <= 2^-11 |lp|
            tok_id = row["completion_token_ids"][t]
            if tok_id in row["topk_token_ids"][t]:
                j = row["topk_token_ids"][t].index(tok_id)
                assert row["token_logprob"][t] == pytest.approx(lps[j], rel=2 ** -11, abs=1e-6)  # float32 vs float16
            else:
                assert row["token_logprob"][t] <= lps[-1] + 1e-6
        if row["finish_reason"] == "stop":
            assert row["completion_token_ids"][-1] == tok.eos_token_id
        else:
            assert C == 12 and tok.eos_token_id not in row["completion_token_ids"]
        assert row["completion"] == tok.decode(row["completion_token_ids"], skip_special_tokens=True)
    prov = json.loads((teacher_data / "provenance.json").read_text())
    for key in ("schema_version", "teacher", "tokenizer_hash", "chat_template_hash", "backend", "backend_version",
                "sampling", "k", "logprobs_mode", "created"):
        assert key in prov
    assert prov["k"] == 8 and prov["logprobs_mode"] == "raw" and prov["sampling"]["n"] == 2


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_greedy_matches_transformers_generate_and_forward(tiny_teacher):
    """Left-padded KV-cache decoding gives the same tokens as HF generate and the same logprobs as a full pass."""
    model, tok = _load(tiny_teacher)
    msgs = [[{"role": "user", "content": c}] for c in ("What is 1+2?", "Reverse the letters: abcdefgh", "hi")]
    ids = [encode_prompt(tok, m) for m in msgs]
    outs = decode_batch(model, ids, pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id], vocab_size=len(tok),
                        max_new_tokens=10, k=5)
    for p, c in zip(ids, outs):
        ref = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert c.token_ids == ref[:len(c.token_ids)]
        full = torch.tensor([p + c.token_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(full).logits[0, len(p) - 1:-1].float(), -1)  # (C, V)
        top, top_ids = lp.topk(5, -1)
        assert torch.equal(top_ids, c.topk_ids)
        assert torch.allclose(top, c.topk_logprobs, atol=1e-4)


def test_sampling_is_seeded(tiny_teacher, prompts_file, tmp_path):
    common = [f"model={tiny_teacher}", f"prompts={prompts_file}", "temperature=1.0", "max_new_tokens=6",
              "logprobs=2", "limit=4", "seed=5"]
    run_cli("generate", *common, f"output_dir={tmp_path / 'a'}")
    run_cli("generate", *common, f"output_dir={tmp_path / 'b'}")
    a, b = load_teacher_dataset(str(tmp_path / "a")), load_teacher_dataset(str(tmp_path / "b"))
    assert a["completion_token_ids"] == b["completion_token_ids"]


def _bad(args, tmp_path, needle):
    out = tmp_path / "out"
    proc = run_cli("generate", *args, f"output_dir={out}", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in lines[0], lines[0]
    assert not out.exists(), "nothing half-written"
    return lines[0]


def test_malformed_jsonl_names_file_and_line(tiny_teacher, tmp_path):
    f = write_lines(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, "{not json"])
    _bad([f"model={tiny_teacher}", f"prompts={f}"], tmp_path, f"{f}:2: not valid JSON")


@pytest.mark.parametrize("record,needle", [
    ({"prompt": "hi"}, "'messages' is missing or empty"),
    ({"messages": []}, "'messages' is missing or empty"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "last message"),
])
def test_bad_messages(tiny_teacher, tmp_path, record, needle):
    f = write_lines(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "ok"}]}, record])
    msg = _bad([f"model={tiny_teacher}", f"prompts={f}"], tmp_path, needle)
    assert f"{f}:2" in msg


def test_prompt_longer_than_context(tiny_teacher, tmp_path):
    f = write_lines(tmp_path / "p.jsonl", [{"id": "long", "messages": [{"role": "user", "content": "a" * 300}]}])
    _bad([f"model={tiny_teacher}", f"prompts={f}"], tmp_path, "exceeds the model context of 256")


def test_missing_model_path(prompts_file, tmp_path):
    _bad([f"model={tmp_path / 'nope'}", f"prompts={prompts_file}"], tmp_path, "nope: teacher not found")


def test_output_dir_with_a_different_run(tiny_teacher, prompts_file, tmp_path):
    out = tmp_path / "out"
    common = [f"model={tiny_teacher}", f"prompts={prompts_file}", f"output_dir={out}", "limit=2", "max_new_tokens=4"]
    run_cli("generate", *common)
    before = sorted(p.name for p in out.iterdir())
    proc = run_cli("generate", *common, "temperature=0.5", check=False)
    assert proc.returncode == 2 and "holds a different run (temperature" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == before
    run_cli("generate", *common, "temperature=0.5", "overwrite=true")


# ---------------------------------------------------------------------------------------------------------------
# Chunked output, resume after SIGKILL, shards + merge, score, bad teacher values.

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT


def _run(*args, crash_at=None, check=True):
    """The real CLI; with crash_at it SIGKILLs itself at that point (chunks.crash_point) and must die by it."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if crash_at:
        env["LLM_DISTILL_CRASH_AT"] = crash_at
    proc = subprocess.run([sys.executable, "-m", "llm_distill", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=env)
    if crash_at:
        assert proc.returncode == -signal.SIGKILL, (crash_at, proc.returncode, proc.stderr[-2000:])
    elif check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(path):
    return load_teacher_dataset(str(path)).to_list()


def _partial(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_resume_after_sigkill_at_every_stage_equals_a_straight_run(tiny_teacher, prompts_file, tmp_path, sampling):
    n = 2 if sampling else 1  # greedy samples would be identical (refused)
    common = [f"model={tiny_teacher}", f"prompts={prompts_file}", f"num_samples={n}", "max_new_tokens=8", "logprobs=4",
              "batch_size=3", "chunk_size=2", "seed=7",
              *(["temperature=1.0", "top_p=0.9"] if sampling else ["temperature=0"])]
    straight = tmp_path / "straight"
    _run("generate", *common, f"output_dir={straight}")
    out = tmp_path / "out"
    # Killed: after chunk 0 is in place; mid-chunk (2nd batch of the resumed run, chunk 1 half done); between
    # chunk 3's temp write and its rename; with every chunk written but nothing published; right after
    # publishing (partial directory still there). Each rerun is the same command.
    for crash in ("chunk:0", "batch:2", "chunk_tmp:3", "finalize", "published"):
        _run("generate", *common, f"output_dir={out}", crash_at=crash)
        assert not out.exists() or crash == "published"
    assert _partial(out).exists()
    proc = _run("generate", *common, f"output_dir={out}")
    assert "already complete" in proc.stdout
    assert not _partial(out).exists()
    a, b = _rows(straight), _rows(out)
    ids = [r["id"] for r in b]
    assert len(ids) == len(set(ids)) == 12 * n
    assert a == b  # bit-identical rows, same order


def test_resume_after_external_sigkill(tiny_teacher, prompts_file, tmp_path):
    """A kill from outside at an arbitrary moment (here: once the second chunk file appears)."""
    common = [f"model={tiny_teacher}", f"prompts={prompts_file}", "num_samples=2", "max_new_tokens=12",
              "logprobs=4", "batch_size=1", "chunk_size=1", "temperature=1.0", "seed=3"]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "llm_distill", "generate", *common, f"output_dir={out}"], cwd=ROOT,
                            env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (_partial(out) / "chunk-000001.parquet").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "killed before the end"
    proc = _run("generate", *common, f"output_dir={out}")
    assert "resuming" in proc.stdout
    straight = tmp_path / "straight"
    _run("generate", *common, f"output_dir={straight}")
    assert _rows(out) == _rows(straight)


def test_resume_refuses_changed_settings(tiny_teacher, prompts_file, tmp_path):
    out = tmp_path / "out"
    common = [f"model={tiny_teacher}", f"prompts={prompts_file}", f"output_dir={out}", "max_new_tokens=4",
              "chunk_size=2", "logprobs=4"]
    _run("generate", *common, crash_at="chunk:0")
    proc = _run("generate", *common[:-1], "logprobs=3", "temperature=0.5", "batch_size=2", check=False)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "cannot resume" in lines[0] and "changed: logprobs 4 -> 3, temperature 1.0 -> 0.5)" in lines[0]
    _run("generate", *common, "batch_size=2")  # batch_size may change on resume


def test_sampling_does_not_depend_on_batching_or_sharding(tiny_teacher, prompts_file, tmp_path):
    common = [f"model={tiny_teacher}", f"prompts={prompts_file}", "num_samples=2", "max_new_tokens=10",
              "logprobs=4", "temperature=1.0", "seed=11"]
    _run("generate", *common, "batch_size=1", f"output_dir={tmp_path / 'b1'}")
    _run("generate", *common, "batch_size=7", f"output_dir={tmp_path / 'b7'}")
    for i in range(2):
        _run("generate", *common, "batch_size=4", f"shard={i}/2", f"output_dir={tmp_path / f's{i}'}")
    ref = {r["id"]: r["completion_token_ids"] for r in _rows(tmp_path / "b1")}
    assert {r["id"]: r["completion_token_ids"] for r in _rows(tmp_path / "b7")} == ref
    shards = [_rows(tmp_path / f"s{i}") for i in range(2)]
    assert shards[0] and shards[1], "both shards get prompts"
    assert {r["id"]: r["completion_token_ids"] for s in shards for r in s} == ref
    assert len(shards[0]) + len(shards[1]) == len(ref)

    merged = tmp_path / "merged"
    proc = _run("merge", f"inputs=[{tmp_path / 's1'},{tmp_path / 's0'}]", f"output_dir={merged}")
    assert "2 of 2 shards" in proc.stdout
    rows = _rows(merged)
    assert sorted(r["id"] for r in rows) == sorted(ref)
    prov = json.loads((merged / "provenance.json").read_text())
    assert prov["num_rows"] == len(ref) and prov["missing_shards"] == [] and prov["k"] == 4

    # Missing shard: an error, or a warning recorded in provenance with allow_missing=true.
    proc = _run("merge", f"inputs=[{tmp_path / 's0'}]", f"output_dir={tmp_path / 'm1'}", check=False)
    assert proc.returncode == 2 and "shards 1/2 are missing" in proc.stderr
    proc = _run("merge", f"inputs=[{tmp_path / 's0'}]", f"output_dir={tmp_path / 'm1'}", "allow_missing=true")
    assert "warning" in proc.stdout
    assert json.loads((tmp_path / "m1" / "provenance.json").read_text())["missing_shards"] == ["1/2"]
    # The same shard twice, and a directory that is not a shard.
    import shutil
    shutil.copytree(tmp_path / "s0", tmp_path / "s0copy")
    proc = _run("merge", f"inputs=[{tmp_path / 's0'},{tmp_path / 's0copy'}]", f"output_dir={tmp_path / 'm2'}",
                check=False)
    assert proc.returncode == 2 and "is shard 0/2 again" in proc.stderr
    proc = _run("merge", f"inputs=[{tmp_path / 'b1'}]", f"output_dir={tmp_path / 'm3'}", check=False)
    assert proc.returncode == 2 and "was not written with shard=i/N" in proc.stderr


def test_merge_refuses_shards_of_different_teachers(tiny_teacher, prompts_file, tmp_path):
    from llm_distill.tiny import save_tiny_model

    other = save_tiny_model(tmp_path / "other_teacher", hidden_size=32, num_layers=2, seed=2)
    common = [f"prompts={prompts_file}", "max_new_tokens=4", "logprobs=4", "limit=6"]
    _run("generate", *common, f"model={tiny_teacher}", "shard=0/2", f"output_dir={tmp_path / 'a'}")
    _run("generate", *common, f"model={other}", "shard=1/2", f"output_dir={tmp_path / 'b'}")
    proc = _run("merge", f"inputs=[{tmp_path / 'a'},{tmp_path / 'b'}]", f"output_dir={tmp_path / 'm'}", check=False)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"{tmp_path / 'b'}: shard 1/2 differs from" in lines[0] and "in teacher:" in lines[0]
    assert not (tmp_path / "m").exists()


def test_score_reproduces_generate_logprobs(teacher_data, tiny_teacher, tmp_path):
    """Teacher forcing the completions generate sampled gives the logprobs generate stored."""
    out = tmp_path / "scored"
    _run("score", f"model={tiny_teacher}", f"responses={teacher_data}", f"output_dir={out}", "logprobs=8",
         "batch_size=5", "chunk_size=7")
    gen, sc = _rows(teacher_data), _rows(out)
    assert [r["id"] for r in sc] == [r["id"] for r in gen]
    for g, s in zip(gen, sc):
        assert s["finish_reason"] == "given"
        for key in ("prompt_token_ids", "completion_token_ids", "completion", "messages", "prompt_id"):
            assert s[key] == g[key]
        assert torch.equal(torch.tensor(s["topk_token_ids"]), torch.tensor(g["topk_token_ids"]))
        for key in ("topk_logprobs", "token_logprob", "tail_logprob"):
            # float16 top-k: one rounding step apart at most where the float32 values straddle a boundary
            assert torch.allclose(torch.tensor(s[key]), torch.tensor(g[key]), rtol=2e-3, atol=1e-4), key
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["stage"] == "score" and prov["k"] == 8 and prov["num_rows"] == len(gen)


def test_score_jsonl_with_assistant_turn(tiny_teacher, tmp_path):
    from transformers import AutoTokenizer

    f = write_lines(tmp_path / "r.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "What is 1+2?"}, {"role": "assistant", "content": "3"}]},
        {"messages": [{"role": "user", "content": "hi"}], "completion": "hello", "finish_reason": "length"},
    ])
    out = tmp_path / "scored"
    _run("score", f"model={tiny_teacher}", f"responses={f}", f"output_dir={out}", "logprobs=5")
    rows = _rows(out)
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    assert [r["id"] for r in rows] == ["a", "r1"]
    assert rows[0]["completion_token_ids"] == tok("3", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert rows[1]["completion_token_ids"] == tok("hello", add_special_tokens=False)["input_ids"]  # cut: no EOS
    assert rows[0]["messages"] == [{"role": "user", "content": "What is 1+2?"}]
    assert all(len(r["topk_token_ids"]) == len(r["completion_token_ids"]) for r in rows)
    bad = write_lines(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "no answer"}]}])
    proc = _run("score", f"model={tiny_teacher}", f"responses={bad}", f"output_dir={tmp_path / 'x'}", check=False)
    assert proc.returncode == 2 and f"{bad}:1: no response to score" in proc.stderr


def test_long_prompts_skipped_and_counted(tiny_teacher, tmp_path):
    f = write_lines(tmp_path / "p.jsonl", [{"id": "ok1", "messages": [{"role": "user", "content": "hi"}]},
                                           {"id": "long", "messages": [{"role": "user", "content": "a" * 300}]},
                                           {"id": "ok2", "messages": [{"role": "user", "content": "yo"}]}])
    out = tmp_path / "out"
    proc = _run("generate", f"model={tiny_teacher}", f"prompts={f}", f"output_dir={out}", "max_new_tokens=4",
                "on_long_prompt=skip")
    assert "skipped 1 prompts longer than the context (long)" in proc.stdout
    assert [r["prompt_id"] for r in _rows(out)] == ["ok1", "ok2"]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["skipped_long_prompts"] == {"count": 1, "ids": ["long"]} and prov["num_prompts"] == 2
    msg = _bad([f"model={tiny_teacher}", f"prompts={f}"], tmp_path / "e", "exceeds the model context")
    assert "on_long_prompt=skip" in msg


def test_nan_teacher_is_a_one_line_error(tiny_teacher, prompts_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan_teacher")
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(tmp_path / "nan_teacher")
    msg = _bad([f"model={tmp_path / 'nan_teacher'}", f"prompts={prompts_file}", "limit=2", "max_new_tokens=4"],
               tmp_path,
               "the teacher returned a nan top-k logprob at completion position 0")
    assert re.search(r"prompt 'q\d+' sample 0", msg), msg


def test_check_logprobs_accepts_neg_inf_topk_refuses_neg_inf_token():
    from llm_distill.errors import UserError
    from llm_distill.teacher import Completion, check_logprobs

    ninf = float("-inf")
    ok = Completion([3], torch.tensor([[3, 4]]), torch.tensor([[-0.1, ninf]]), torch.tensor([-0.1]),
                    torch.tensor([ninf]), "stop")
    check_logprobs(ok, "row")  # a zero-probability candidate and an empty tail are valid
    bad = Completion([4], ok.topk_ids, ok.topk_logprobs, torch.tensor([ninf]), ok.tail_logprob, "stop")
    with pytest.raises(UserError, match="row: the teacher returned a -inf token logprob at completion position 0"):
        check_logprobs(bad, "row")
    nan = Completion([3], ok.topk_ids, torch.tensor([[float("nan"), -1.0]]), ok.token_logprob, ok.tail_logprob, "stop")
    with pytest.raises(UserError, match="nan top-k logprob"):
        check_logprobs(nan, "row")


def test_published_layout_and_readers(teacher_data, tmp_path):
    """generate publishes data/part-*.parquet + provenance.json + run.json; load_teacher_dataset, plain
    `load_dataset("parquet")` and an older `save_to_disk` directory give the same rows; anything else is one line."""
    import pyarrow.parquet as pq
    from datasets import load_dataset

    from llm_distill.chunks import write_parts
    from llm_distill.data import teacher_parquet_files, teacher_tables
    from llm_distill.errors import UserError

    assert sorted(p.name for p in teacher_data.iterdir()) == ["data", "provenance.json", "run.json"]
    files = teacher_parquet_files(str(teacher_data))
    assert [f.name for f in files] == ["part-00000.parquet"]
    meta = pq.ParquetFile(files[0]).metadata.row_group(0).column(0)
    assert meta.compression == "ZSTD"
    ds = load_teacher_dataset(str(teacher_data))
    rows = ds.to_list()
    assert ds.features["topk_token_ids"].feature.length == 8  # fixed-size top-k lists survive the round trip
    plain = load_dataset("parquet", data_files=str(teacher_data / "data" / "*.parquet"), split="train")
    assert plain.to_list() == rows

    # Several parts: rows stay in order across them.
    schema, tables = teacher_tables(str(teacher_data))
    split = tmp_path / "split"
    table = next(tables)
    assert write_parts([table.slice(i, 5) for i in range(0, len(table), 5)], split, schema, part_bytes=1) > 1
    assert load_teacher_dataset(str(split)).to_list() == rows

    ds.save_to_disk(str(tmp_path / "old"))  # an older llm_distill output / another tool's datasets directory
    assert load_teacher_dataset(str(tmp_path / "old")).to_list() == rows
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(UserError, match="not a teacher dataset") as e:
        load_teacher_dataset(str(tmp_path / "junk"))
    assert "\n" not in str(e.value)


def test_vllm_memory_settings_may_change_on_resume(tiny_teacher):
    """Lowering gpu_memory_utilization / max_num_batched_tokens or enforcing eager mode after an OOM resumes the
    run; max_model_len (which prompts fit) does not."""
    from llm_distill.config import GenerateConfig, load_config
    from llm_distill.generate import run_settings
    from llm_distill.models import load_tokenizer

    tok = load_tokenizer(str(tiny_teacher))
    base = ["model=m", "prompts=p", "output_dir=o", "backend=vllm"]
    a = run_settings(load_config(GenerateConfig, None, base), tok, "sha")
    b = run_settings(load_config(GenerateConfig, None, base + ["gpu_memory_utilization=0.5",
                                                              "max_num_batched_tokens=512", "enforce_eager=true"]),
                     tok, "sha")
    assert a == b
    assert a != run_settings(load_config(GenerateConfig, None, base + ["max_model_len=64"]), tok, "sha")


def test_merge_reads_parquet_and_save_to_disk_shards(teacher_data, tmp_path):
    """merge joins a published (parquet) shard and an older save_to_disk shard into parquet parts, in input order."""
    from llm_distill import merge
    from llm_distill.chunks import shard_of, write_parts
    from llm_distill.config import MergeConfig, load_config

    ds = load_teacher_dataset(str(teacher_data))
    prov = json.loads((teacher_data / "provenance.json").read_text())
    for i in range(2):
        part = ds.filter(lambda r: shard_of(r["id"], 2) == i).flatten_indices()
        d = tmp_path / f"s{i}"
        if i == 0:
            write_parts([part.data.table], d, part.features.arrow_schema)
        else:
            part.save_to_disk(str(d))
        (d / "provenance.json").write_text(json.dumps({**prov, "shard": f"{i}/2", "num_rows": len(part)}))
    out = tmp_path / "merged"
    merge.main(load_config(MergeConfig, None, [f"inputs=[{tmp_path / 's1'},{tmp_path / 's0'}]", f"output_dir={out}"]))
    rows = load_teacher_dataset(str(out)).to_list()
    by_id = {r["id"]: r for r in ds.to_list()}
    assert [r["id"] for r in rows] == [r for i in (1, 0) for r in by_id if shard_of(r, 2) == i]
    assert all(r == by_id[r["id"]] for r in rows)
    assert sorted(p.name for p in out.iterdir()) == ["data", "provenance.json", "run.json"]
