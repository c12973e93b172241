"""Padding-free packing and the fused loss inside the trainer: packed rows never attend to each other, and packed
micro-batches give the padded batch's losses and gradients for every loss implementation."""

import copy
import json
import math

import pytest
import torch
from conftest import STUDENT_CONFIG, run_cli


def _rows(vocab, seed=0, lengths=((5, 4), (3, 7), (9, 1), (2, 6)), k=5):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n_prompt, n_comp in lengths:
        lp = torch.log_softmax(torch.randn(n_comp, k, generator=g), -1)  # (C, k)
        rows.append({"prompt": torch.randint(0, vocab, (n_prompt,), generator=g).tolist(),
                     "completion": torch.randint(0, vocab, (n_comp,), generator=g).tolist(),
                     "topk_ids": [torch.randperm(vocab, generator=g)[:k].tolist() for _ in range(n_comp)],
                     "topk_logprobs": (lp - 0.3).tolist(), "tail": [math.log(1 - math.exp(-0.3))] * n_comp})
    return rows


def _model(tiny_teacher):
    from llm_distill.models import load_model

    return load_model(str(tiny_teacher), torch.device("cpu"), torch.float32)


def test_collate_packs_rows_into_one_sequence():
    from llm_distill.student import collate

    rows = _rows(30)
    padded, packed = collate(rows, pad_id=0), collate(rows, pad_id=0, packing=True)
    n = sum(len(r["prompt"]) + len(r["completion"]) for r in rows)
    assert packed["input_ids"].shape == (1, n) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [i for r in rows for i in range(len(r["prompt"]) + len(r["completion"]))]
    m_pad, m_pack = padded["labels"] != -100, packed["labels"] != -100
    assert torch.equal(padded["labels"][m_pad], packed["labels"][m_pack])  # the same targets in the same order
    for key in ("topk_ids", "topk_logprobs", "tail_logprob"):
        assert torch.equal(padded[key][m_pad], packed[key][m_pack]), key
    assert torch.equal(padded["input_ids"][padded["attention_mask"].bool()], packed["input_ids"][0])


@pytest.mark.parametrize("impl", ["fused", "chunked", "dense"])
@pytest.mark.parametrize("attention", ["packed_sdpa", "sdpa"])
def test_packed_batch_gives_the_padded_losses_and_gradients(tiny_teacher, impl, attention):
    """Each row's logits depend on that row only, so packed and padded batches have the same losses and
    gradients (float32 tolerance), for every loss implementation; with train's packed sdpa (no block mask) and
    with transformers' sdpa (its block-diagonal mask from the restarting position ids)."""
    from llm_distill.packing import PACKED_SDPA, use_packed_sdpa
    from llm_distill.student import StudentLoss, collate

    model = _model(tiny_teacher)
    vocab = model.config.vocab_size
    rows = _rows(vocab)
    results = []
    for packing in (False, True):
        student = copy.deepcopy(model)
        if packing and attention == "packed_sdpa":
            assert use_packed_sdpa(student) and student.config._attn_implementation == PACKED_SDPA
        loss = StudentLoss(student, vocab, 4, 1.0, 0.5, loss_impl=impl,
                           divergences={"jsd": 1.0, "forward_kl": 0.5}, temperature=1.5)
        kd, ce = loss(**collate(rows, pad_id=0, packing=packing))
        (kd + 0.5 * ce).backward()
        results.append((kd.detach(), ce.detach(), {n: p.grad for n, p in loss.model.named_parameters()}))
    (kd0, ce0, g0), (kd1, ce1, g1) = results
    assert torch.allclose(kd0, kd1, rtol=1e-5) and torch.allclose(ce0, ce1, rtol=1e-5)
    for name, grad in g0.items():
        assert torch.allclose(grad, g1[name], rtol=1e-4, atol=1e-5 * float(grad.abs().max())), name


def test_attention_crossing_packed_rows_is_caught(tiny_teacher, monkeypatch):
    """With transformers' packed-row detection switched off, attention runs across the packed rows: the packed
    losses then differ and train's start-up check refuses packing (so the tests above can fail)."""
    import transformers.masking_utils as mu

    from llm_distill.errors import UserError
    from llm_distill.student import StudentLoss, check_packing, collate

    model = _model(tiny_teacher)
    vocab = model.config.vocab_size
    rows = _rows(vocab)
    loss = StudentLoss(model, vocab, 4, 1.0, 1.0, loss_impl="fused")
    with torch.no_grad():
        ref = loss(**collate(rows, pad_id=0))
        check_packing(model, [r["prompt"] for r in rows])  # passes with block-diagonal attention
        monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
        crossed = loss(**collate(rows, pad_id=0, packing=True))
    assert not torch.allclose(ref[0], crossed[0], rtol=1e-3)
    with pytest.raises(UserError, match="attention crosses packed rows"):
        check_packing(model, [r["prompt"] for r in rows])


def _metrics(path):
    return [json.loads(l) for l in (path / "metrics.jsonl").open()]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_packed_training_runs_like_padded(teacher_data, tiny_teacher, tmp_path):
    """Through the CLI: packed micro-batches (offline, and on-policy GKD steps) train the padded run's losses and
    weights, with no padding; the eval loss is the same."""
    common = [f"dataset={teacher_data}", *STUDENT_CONFIG, "max_steps=4", "micro_batch_size=5", "learning_rate=1e-2",
              "lr_scheduler=constant", "log_every=1", "onpolicy_fraction=0.5", f"teacher={tiny_teacher}",
              "onpolicy_max_new_tokens=6", "kd_divergences={jsd: 1.0}", "seed=3", f"eval_dataset={teacher_data}"]
    run_cli("train", *common, f"output_dir={tmp_path / 'padded'}")
    proc = run_cli("train", *common, f"output_dir={tmp_path / 'packed'}", "packing=true")
    assert "packed micro-batches" in proc.stdout and "fused loss" in proc.stdout
    a, b = _metrics(tmp_path / "padded"), _metrics(tmp_path / "packed")
    assert 0 < sum(m["onpolicy_steps"] for m in a) < 4, "this seed mixes on-policy and offline steps"
    assert all(m["padding_fraction"] == 0 for m in b) and any(m["padding_fraction"] > 0 for m in a)
    for x, y in zip(a, b):
        assert x["completion_tokens"] == y["completion_tokens"] and x["onpolicy_tokens"] == y["onpolicy_tokens"]
        for key in ("loss", "kd", "ce", "onpolicy_kd", "eval_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)
    wa, wb = _weights(tmp_path / "padded"), _weights(tmp_path / "packed")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=2e-5), name


def test_fused_refusals_and_auto_fallback(teacher_data, tiny_teacher, tmp_path):
    """LoRA on the output head: loss_impl=fused refuses in one line, auto falls back to the chunked loss; FSDP and
    DeepSpeed are refused by the same check."""
    from llm_distill.student import fused_head_problem

    args = [f"dataset={teacher_data}", f"student={tiny_teacher}", "lora={r: 4, alpha: 8, target_modules: [lm_head]}",
            "max_steps=2", "micro_batch_size=4"]
    proc = run_cli("train", *args, f"output_dir={tmp_path / 'f'}", "loss_impl=fused", check=False)
    assert proc.returncode == 2 and "loss_impl=fused cannot run" in proc.stderr and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after PEFT's own warnings
    assert last.startswith("llm-distill train: error: train: loss_impl=fused cannot run: the output head is a peft.")
    proc = run_cli("train", *args, f"output_dir={tmp_path / 'a'}")
    assert "chunked loss" in proc.stdout
    model = _model(tiny_teacher)
    assert fused_head_problem(model, "NO") is None
    assert "shards the head" in fused_head_problem(model, "FSDP")
    assert "shards the head" in fused_head_problem(model, "DEEPSPEED")
