"""generate: the schema, agreement with transformers' own generate and forward pass, and bad input."""

import json
import math

import pytest
import torch
from conftest import run_cli, write_lines

from llm_distill.data import encode_prompt
from llm_distill.generate import decode_batch


def test_dataset_schema_and_invariants(teacher_data, tiny_teacher, prompts_file):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    ds = load_from_disk(str(teacher_data))
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
            assert mass == pytest.approx(1.0, abs=1e-4)
            tok_id = row["completion_token_ids"][t]
            if tok_id in row["topk_token_ids"][t]:
                j = row["topk_token_ids"][t].index(tok_id)
                assert row["token_logprob"][t] == pytest.approx(lps[j], abs=1e-6)
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
    from datasets import load_from_disk

    common = [f"model={tiny_teacher}", f"prompts={prompts_file}", "temperature=1.0", "max_new_tokens=6",
              "logprobs=2", "limit=4", "seed=5"]
    run_cli("generate", *common, f"output_dir={tmp_path / 'a'}")
    run_cli("generate", *common, f"output_dir={tmp_path / 'b'}")
    a, b = load_from_disk(str(tmp_path / "a")), load_from_disk(str(tmp_path / "b"))
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
    _bad([f"model={tmp_path / 'nope'}", f"prompts={prompts_file}"], tmp_path, "model/tokenizer path not found")


def test_output_dir_with_a_different_run(tiny_teacher, prompts_file, tmp_path):
    out = tmp_path / "out"
    common = [f"model={tiny_teacher}", f"prompts={prompts_file}", f"output_dir={out}", "limit=2", "max_new_tokens=4"]
    run_cli("generate", *common)
    before = sorted(p.name for p in out.iterdir())
    proc = run_cli("generate", *common, "temperature=0.5", check=False)
    assert proc.returncode == 2 and "holds a different run (temperature" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == before
    run_cli("generate", *common, "temperature=0.5", "overwrite=true")
