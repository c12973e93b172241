"""The on-policy module in this process on the tiny model: the step's samples, the teacher's scores of them and
the micro-batches built from both, without the trainer, the optimiser or a CLI run."""

import pytest
import torch

from llm_distill.config import TrainConfig, load_config
from llm_distill.decoding import TransformersBackend
from llm_distill.models import eos_ids, load_model
from llm_distill.onpolicy import build_teacher, onpolicy_batches, onpolicy_step
from llm_distill.student import StudentLoss

PROMPTS = [[3, 5, 7, 9], [4, 6], [8, 10, 12], [5, 5, 5, 5, 5]]


def _cfg(tiny_teacher, *extra):
    return load_config(TrainConfig, None, ["dataset=d", "output_dir=o", f"teacher={tiny_teacher}", "student=s",
                                           "onpolicy_fraction=0.5", "onpolicy_max_new_tokens=5",
                                           "onpolicy_logprobs=4", "micro_batch_size=2", "grad_accum_steps=2",
                                           *extra])


@pytest.fixture(scope="module")
def parts(tiny_teacher):
    student = load_model(str(tiny_teacher), torch.device("cpu"), torch.float32).train()
    teacher = TransformersBackend(str(tiny_teacher), device="cpu", k=4, batch_size=4)
    return student, teacher, eos_ids(student, teacher.tokenizer), len(teacher.tokenizer)


def _batches(parts, cfg, step=1, prompts=PROMPTS):
    student, teacher, stop_ids, vocab = parts
    rows = list(enumerate(prompts))
    return onpolicy_batches(student, teacher, rows, step, cfg, pad_id=teacher.tokenizer.pad_token_id,
                            stop_ids=stop_ids, vocab=vocab, max_len=9)


def test_onpolicy_step_is_a_function_of_seed_and_step():
    assert not any(onpolicy_step(0, s, 0.0) for s in range(1, 50))
    assert all(onpolicy_step(0, s, 1.0) for s in range(1, 50))
    chosen = [onpolicy_step(7, s, 0.3) for s in range(1, 200)]
    assert chosen == [onpolicy_step(7, s, 0.3) for s in range(1, 200)]
    assert 0.15 < sum(chosen) / len(chosen) < 0.45


def test_gkd_batches_are_the_teachers_scores_of_the_students_samples(parts, tiny_teacher):
    """grad_accum_steps micro-batches of micro_batch_size rows; their labels are the student's samples (cut to
    max_len) and their top-k the teacher's `score` of exactly those tokens; the student is left in train mode."""
    student, teacher, _, _ = parts
    cfg = _cfg(tiny_teacher, "onpolicy_temperature=1.0")
    micro, objective = _batches(parts, cfg)
    assert objective == "distill" and len(micro) == 2 and student.training
    assert all(b["input_ids"].shape[0] == 2 and "teacher_token_logprob" not in b for b in micro)
    for i, b in enumerate(micro):
        for row in range(2):
            prompt = PROMPTS[2 * i + row]
            mask = b["labels"][row] != -100
            completion = b["labels"][row][mask].tolist()
            assert 1 <= len(completion) <= min(5, 9 - len(prompt))
            assert b["input_ids"][row][:len(prompt)].tolist() == prompt
            scored = teacher.score([prompt], [completion])[0]
            assert torch.equal(b["topk_ids"][row][mask], scored.topk_ids)
            assert torch.allclose(b["topk_logprobs"][row][mask], scored.topk_logprobs)
            assert torch.allclose(b["tail_logprob"][row][mask], scored.tail_logprob)
    again, _ = _batches(parts, cfg)  # the draws come from (seed, step, row): the same again
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(micro, again))
    other, _ = _batches(parts, cfg, step=2)
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) or not torch.equal(a["labels"], b["labels"])
               for a, b in zip(micro, other))


def test_gkd_packing_and_minillm_rows(parts, tiny_teacher):
    """packing=true packs GKD's micro-batches (one row each); MiniLLM's are never packed and carry the teacher's
    and the sampler's logprob of every sampled token, which the MiniLLM objective of the loss reads."""
    packed, objective = _batches(parts, _cfg(tiny_teacher, "packing=true"))
    assert objective == "distill" and all(b["input_ids"].shape[0] == 1 and "position_ids" in b for b in packed)
    cfg = _cfg(tiny_teacher, "onpolicy_objective=minillm", "packing=true")
    micro, objective = _batches(parts, cfg)
    assert objective == "minillm" and all(b["input_ids"].shape[0] == 2 for b in micro)
    student, _, _, vocab = parts
    loss = StudentLoss(student, vocab, 0, 1.0, 0.0, minillm={"single_step": True, "length_norm": True})
    for b in micro:
        mask = b["labels"] != -100
        assert bool((b["teacher_token_logprob"][mask] < 0).all()) and bool((b["sample_logprob"][mask] <= 0).all())
        with torch.no_grad():
            sums = loss(**b, objective="minillm")
        assert torch.isfinite(sums.surrogate) and sums.rkl == sums.rkl


def test_the_teacher_must_share_the_students_vocabulary(tiny_teacher, parts):
    from llm_distill.errors import UserError
    from llm_distill.tiny import build_char_tokenizer

    cfg = _cfg(tiny_teacher)
    teacher = build_teacher(cfg, "cpu", parts[1].tokenizer, "student")
    assert teacher.name == "transformers" and teacher.k == 4 and teacher.batch_size == 4
    with pytest.raises(UserError, match="the teacher's tokenizer differs from the student's"):
        build_teacher(cfg, "cpu", build_char_tokenizer("abc"), "student")
