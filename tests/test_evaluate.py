"""evaluate: metrics on hand-built cases with known answers, and the report files."""

import json

import pytest
from conftest import run_cli, write_lines

from llm_distill.evaluate import normalize_answer, rouge_l


def test_answer_normalisation_and_rouge():
    assert normalize_answer("  12 \n") == "12" and normalize_answer("a  b") == "a b"
    assert rouge_l(["the cat sat"], ["the cat sat"]) == [1.0]
    assert rouge_l(["a b c d"], ["a b x y"])[0] == pytest.approx(0.5)
    assert rouge_l(["abc"], ["xyz"]) == [0.0]


@pytest.fixture(scope="module")
def known_prompts(tiny_teacher, tmp_path_factory):
    """Half the references are the teacher's own greedy answers, half are wrong: teacher exact match = 50%."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_distill.data import encode_prompt
    from llm_distill.generate import decode_batch

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_teacher), AutoTokenizer.from_pretrained(tiny_teacher)
    qs = [f"What is {i}+{i}?" for i in range(8)]
    ids = [encode_prompt(tok, [{"role": "user", "content": q}]) for q in qs]
    outs = decode_batch(model, ids, pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id], vocab_size=len(tok),
                        max_new_tokens=8, k=1)
    answers = [tok.decode(c.token_ids, skip_special_tokens=True).strip() for c in outs]
    recs = [{"id": f"k{i}", "task": "add", "messages": [{"role": "user", "content": q}],
             "reference": answers[i] if i % 2 == 0 else answers[i] + "#wrong"} for i, q in enumerate(qs)]
    return write_lines(tmp_path_factory.mktemp("known") / "heldout.jsonl", recs)


def test_teacher_against_itself(tiny_teacher, known_prompts, tmp_path):
    out = tmp_path / "eval"
    run_cli("evaluate", f"prompts={known_prompts}", f"teacher={tiny_teacher}", f"students.copy={tiny_teacher}",
            f"output_dir={out}", "max_new_tokens=8", "logprobs=5")
    report = json.loads((out / "report.json").read_text())
    t, s = report["models"]["teacher"], report["models"]["copy"]
    assert t["exact_match"] == 0.5 and s["exact_match"] == 0.5
    assert s["agreement"] == 1.0
    assert s["kl"] == pytest.approx(0.0, abs=1e-6) and s["nll"] > 0
    assert t["params"] == s["params"] > 0 and s["tokens_per_s"] > 0
    md = (out / "report.md").read_text()
    assert "| copy |" in md and "50.0%" in md
    rows = [json.loads(l) for l in (out / "examples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[0]["teacher"] == rows[0]["copy"] and rows[1]["reference"].endswith("#wrong")


def test_without_references_degrades(tiny_teacher, tmp_path):
    f = write_lines(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    out = tmp_path / "eval"
    run_cli("evaluate", f"prompts={f}", f"teacher={tiny_teacher}", f"output_dir={out}", "max_new_tokens=4")
    report = json.loads((out / "report.json").read_text())
    assert "exact_match" not in report["models"]["teacher"]
    assert any("exact match not computed" in n for n in report["notes"])
