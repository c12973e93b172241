"""evaluate: metrics on hand-built cases with known answers, and the report files."""

import json

import pytest
from conftest import run_cli, write_lines

from llm_distill.evaluate import is_right, normalize_answer, rouge_l, total_variation


def test_answer_normalisation_and_rouge():
    assert normalize_answer("  12 \n") == "12" and normalize_answer("a  b") == "a b"
    assert normalize_answer("The answer is 1,234.", "number") == "1234" and normalize_answer("none", "number") == ""
    assert normalize_answer(" Paris ", "lower") == "paris"
    assert rouge_l(["the cat sat"], ["the cat sat"]) == [1.0]
    assert rouge_l(["a b c d"], ["a b x y"])[0] == pytest.approx(0.5)
    assert rouge_l(["abc"], ["xyz"]) == [0.0]
    assert rouge_l([["xyz", "the cat sat"]], ["the cat sat"]) == [1.0]  # the best of several references


def test_answer_sets_and_total_variation():
    assert is_right(" 42 ", ["41", "42"], "whitespace") == 1.0 and is_right("43", ["41", "42"], "whitespace") == 0.0
    assert is_right("The answer is 42.", ["42"], "number") == 1.0
    assert total_variation(["a", "a", "b", "b"], ["a", "a", "b", "b"]) == 0.0
    assert total_variation(["a", "a"], ["b", "b"]) == 1.0
    assert total_variation(["a", "a", "a", "b"], ["a", "b", "b", "c"]) == pytest.approx(0.5)  # |.75-.25|/2+|.25-.5|/2+.25/2


def greedy_answers(teacher: str, questions: list[str], max_new_tokens: int):
    """(model, tokenizer, prompt ids, greedy answers) of a model directory on single-turn questions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_distill.data import encode_prompt
    from llm_distill.decoding import decode_batch

    model, tok = AutoModelForCausalLM.from_pretrained(teacher), AutoTokenizer.from_pretrained(teacher)
    ids = [encode_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    outs = decode_batch(model, ids, pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id], vocab_size=len(tok),
                        max_new_tokens=max_new_tokens, k=1)
    return model, tok, ids, [tok.decode(c.token_ids, skip_special_tokens=True).strip() for c in outs]


@pytest.fixture(scope="module")
def known_prompts(tiny_teacher, tmp_path_factory):
    """Half the references are the teacher's own greedy answers, half are wrong: teacher exact match = 50%."""
    qs = [f"What is {i}+{i}?" for i in range(8)]
    _, _, _, answers = greedy_answers(tiny_teacher, qs, max_new_tokens=8)
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
    assert any("exact match and ROUGE-L vs reference not computed" in n for n in report["notes"])
    # backend=auto picks transformers here (no CUDA); asking for vLLM without a GPU is a one-line error.
    assert report["backend"] == "transformers" and report["models"]["teacher"]["backend"] == "transformers"
    proc = run_cli("evaluate", f"prompts={f}", f"teacher={tiny_teacher}", f"output_dir={tmp_path / 'v'}",
                   "backend=vllm", check=False)
    assert proc.returncode == 2 and "backend=vllm needs" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "v").exists()


def test_bootstrap_interval():
    from llm_distill.evaluate import bootstrap_ci

    assert bootstrap_ci([1.0] * 50, 200) == [1.0, 1.0]
    lo, hi = bootstrap_ci([0.0, 1.0] * 100, 1000)
    assert lo < 0.5 < hi and hi - lo < 0.2
    assert bootstrap_ci([1.0, 0.0], 0) is None


def test_lora_adapter_sampling_contamination_and_plot(tiny_teacher, known_prompts, tmp_path):
    """A freshly initialised LoRA adapter (B = 0) is the base model: KL 0, full agreement. Sampling over two
    seeds, a contamination check and the PNG plot all come out of one run."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(adapter)
    train = write_lines(tmp_path / "train.jsonl", [json.loads(l) for l in known_prompts.read_text().splitlines()[:3]])
    out = tmp_path / "eval"
    run_cli("evaluate", f"prompts={known_prompts}", f"teacher={tiny_teacher}", f"students.lora={adapter}",
            f"output_dir={out}", "max_new_tokens=8", "temperature=1.0", "seeds=[0,1]", f"train_prompts={train}",
            "bootstrap=200", "latency_prompts=2")
    report = json.loads((out / "report.json").read_text())
    lora, teacher = report["models"]["lora"], report["models"]["teacher"]
    assert lora["params"] == teacher["params"] and lora["adapter_trainable_params"] > 0
    assert lora["kl"] == pytest.approx(0.0, abs=1e-6)
    assert lora["exact_match"] == pytest.approx(teacher["exact_match"]), "same model, same seeds, same samples"
    assert len(lora["exact_match_ci"]) == 2 and lora["latency_s"] > 0
    assert report["contaminated_ids"] == ["k0", "k1", "k2"] and any("contamination" in n for n in report["notes"])
    assert "seeds [0, 1]" in report["protocol"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_heldout_set_reports_sizes_only(tiny_teacher, tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    out = tmp_path / "eval"
    run_cli("evaluate", f"prompts={f}", f"teacher={tiny_teacher}", f"output_dir={out}")
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["teacher"]["params"] > 0 and "exact_match" not in report["models"]["teacher"]
    assert any("empty" in n for n in report["notes"])


def test_train_prompts_may_be_a_teacher_dataset(teacher_data, prompts_file):
    """train_prompts given as a generate output (parquet teacher dataset): its prompts count as training prompts."""
    from llm_distill.data import load_prompts
    from llm_distill.evaluate import contamination

    held = load_prompts(str(prompts_file))
    assert contamination(held, str(teacher_data)) == [p.id for p in held]


def test_references_and_answer_distributions(tiny_teacher, tmp_path):
    """Every right answer in `references`: a row counts when the answer is any of them. With answer_samples the
    teacher's samples (seed 1) are the references of the even rows, so its sampled exact match and coverage are
    known, and a copy of the teacher draws the same samples: TV 0 to the teacher's answers."""
    from llm_distill.evaluate import sample_answers

    qs = [f"What is {i}+{i + 3}?" for i in range(6)]
    model, tok, ids, greedy = greedy_answers(tiny_teacher, qs, max_new_tokens=6)
    drawn = sample_answers(model, tok, ids, 4, max_new_tokens=6, batch_size=32, seed=1)
    recs = []
    for i, q in enumerate(qs):
        refs = sorted(set(drawn[i]) | {greedy[i]}) if i % 2 == 0 else ["#wrong", "#also wrong"]
        recs.append({"id": f"r{i}", "messages": [{"role": "user", "content": q}], "references": refs})
    f = write_lines(tmp_path / "heldout.jsonl", recs)
    out = tmp_path / "eval"
    run_cli("evaluate", f"prompts={f}", f"teacher={tiny_teacher}", f"students.copy={tiny_teacher}",
            f"output_dir={out}", "max_new_tokens=6", "logprobs=5", "answer_samples=4", "latency_prompts=0",
            "batch_size=32")
    report = json.loads((out / "report.json").read_text())
    t, c = report["models"]["teacher"], report["models"]["copy"]
    assert t["exact_match"] == c["exact_match"] == 0.5
    assert t["sampled_exact_match"] == c["sampled_exact_match"] == 0.5
    cover = [len(set(drawn[i])) / min(len(recs[i]["references"]), 4) for i in (0, 2, 4)]
    assert t["answer_coverage"] == pytest.approx(sum(cover) / 6)
    assert c["answer_tv"] == 0.0 and 0.0 <= t["answer_tv"] <= 1.0
    md = (out / "report.md").read_text()
    assert "exact, sampled T=1" in md and "TV to teacher's answers" in md
    rows = [json.loads(l) for l in (out / "examples.jsonl").read_text().splitlines()]
    assert rows[1]["references"] == ["#wrong", "#also wrong"]
