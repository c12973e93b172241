"""`llm-distill ensemble` through the real CLI: generate with one teacher, score the same completions with a
second, combine, train on the result; inputs that do not hold the same completions are refused."""

import json
import math

import pytest
import torch
from conftest import STUDENT_CONFIG, run_cli


def test_ensemble_of_two_teachers_trains(teacher_data, tiny_teacher, tmp_path):
    from llm_distill.data import load_teacher_dataset
    from llm_distill.ensemble import combine_topk
    from llm_distill.tiny import save_tiny_model

    other = save_tiny_model(tmp_path / "teacher_b", hidden_size=32, num_layers=2, seed=7)
    scored = tmp_path / "scored_b"
    run_cli("score", f"model={other}", f"responses={teacher_data}", f"output_dir={scored}", "logprobs=5")
    out = tmp_path / "ensemble"
    proc = run_cli("ensemble", f"inputs=[{teacher_data},{scored}]", f"output_dir={out}", "logprobs=6")
    assert "2 teachers" in proc.stdout
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["stage"] == "ensemble" and prov["k"] == 6
    assert [t["teacher"] for t in prov["teachers"]] == [str(tiny_teacher), str(other)]
    assert [t["k"] for t in prov["teachers"]] == [8, 5]

    a, b, e = (load_teacher_dataset(str(p)) for p in (teacher_data, scored, out))
    assert e["id"] == a["id"] and e["completion_token_ids"] == a["completion_token_ids"]
    row_b = {r["id"]: r for r in b}
    for i in (0, 5):
        ra, rb, re_ = a[i], row_b[a[i]["id"]], e[i]
        ids, lp, tail = combine_topk([torch.tensor(ra["topk_token_ids"]), torch.tensor(rb["topk_token_ids"])],
                                     [torch.tensor(ra["topk_logprobs"]), torch.tensor(rb["topk_logprobs"])],
                                     [torch.tensor(ra["tail_logprob"]), torch.tensor(rb["tail_logprob"])], 6)
        assert re_["topk_token_ids"] == ids.tolist()
        assert torch.allclose(torch.tensor(re_["topk_logprobs"]), lp.float(), atol=2e-3)  # stored as float16
        for lps, t in zip(re_["topk_logprobs"], re_["tail_logprob"]):
            assert sum(math.exp(x) for x in lps) + math.exp(t) == pytest.approx(1.0, abs=2e-3)
        mixed = [math.log((math.exp(x) + math.exp(y)) / 2) for x, y in zip(ra["token_logprob"], rb["token_logprob"])]
        assert re_["token_logprob"] == pytest.approx(mixed, abs=1e-5)

    run_cli("train", f"dataset={out}", f"output_dir={tmp_path / 'student'}", *STUDENT_CONFIG, "max_steps=2",
            "micro_batch_size=4")
    assert (tmp_path / "student" / "model.safetensors").is_file()


def test_ensemble_refuses_inputs_with_other_rows(teacher_data, tiny_teacher, tmp_path):
    scored = tmp_path / "part"
    run_cli("score", f"model={tiny_teacher}", f"responses={teacher_data}", f"output_dir={scored}", "limit=5")
    proc = run_cli("ensemble", f"inputs=[{teacher_data},{scored}]", f"output_dir={tmp_path / 'e'}", check=False)
    assert proc.returncode == 2 and "holds other rows" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "e").exists()
    proc = run_cli("ensemble", f"inputs=[{teacher_data}]", f"output_dir={tmp_path / 'e'}", check=False)
    assert proc.returncode == 2 and "two or more" in proc.stderr
