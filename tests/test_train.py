"""train through the real CLI: a loadable student, tokenizer checks, and micro-batch invariance."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch
from conftest import STUDENT_CONFIG, run_cli


def test_kd_student_saves_loads_and_chats(teacher_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    out = tmp_path / "student"
    proc = run_cli("train", f"dataset={teacher_data}", f"output_dir={out}", *STUDENT_CONFIG, "max_steps=12",
                   "micro_batch_size=4", "learning_rate=1e-2", "log_every=3", "save_every=6")
    assert "saved student" in proc.stdout
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3, 6, 9, 12]
    assert all(m["kd"] > 0 and m["ce"] > 0 and m["tokens_per_s"] > 0 for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    # Pre-clipping gradient norm (mean and max over the logged steps) and the share of steps clipped at 1.0.
    assert all(0 < m["grad_norm"] <= m["grad_norm_max"] and 0 <= m["clip_fraction"] <= 1 for m in metrics)
    assert all(m["grad_norm"] > 1 for m in metrics if m["clip_fraction"] == 1)
    assert all(m["grad_norm_max"] <= 1 for m in metrics if m["clip_fraction"] == 0)
    assert (out / "checkpoints" / "step-000006" / "model.safetensors").is_file()

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and model.generation_config.eos_token_id == tok.eos_token_id
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    reply = pipe([{"role": "user", "content": "What is 1+2?"}], max_new_tokens=4, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_loss_is_invariant_to_micro_batch_split(teacher_data, tmp_path):
    """4 sequences per step as 1x4, 2x2 and 4x1 micro-batches give the same weights (token-level normalisation)."""
    runs = {}
    for mb, accum in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"mb{mb}"
        run_cli("train", f"dataset={teacher_data}", f"output_dir={out}", *STUDENT_CONFIG, "max_steps=3",
                f"micro_batch_size={mb}", f"grad_accum_steps={accum}", "learning_rate=1e-2",
                "lr_scheduler=constant", "max_grad_norm=0", "log_every=1")
        logs = [json.loads(l) for l in (out / "metrics.jsonl").open()]
        runs[(mb, accum)] = (_weights(out), [m["loss"] for m in logs], [m["grad_norm"] for m in logs])
        assert all(m["clip_fraction"] == 0 for m in logs), "max_grad_norm=0 measures the norm and never clips"
    ref_w, ref_loss, ref_norm = runs[(4, 1)]
    for key, (w, loss, norm) in runs.items():
        assert loss == __import__("pytest").approx(ref_loss, rel=1e-5), key
        assert norm == __import__("pytest").approx(ref_norm, rel=1e-4), key  # the whole step's gradient
        for name in ref_w:
            # float32 sums in another order, then AdamW's division by sqrt(v): ~1e-6 apart after 3 steps
            assert torch.allclose(w[name], ref_w[name], atol=1e-5), (key, name)


def test_kd_refuses_a_different_tokenizer_but_ce_retokenises(teacher_data, tmp_path):
    from llm_distill.tiny import build_char_tokenizer

    other = tmp_path / "other_tok"
    build_char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789 ?+:,").save_pretrained(other)
    out = tmp_path / "s"
    args = [f"dataset={teacher_data}", f"output_dir={out}", f"tokenizer={other}", *STUDENT_CONFIG, "max_steps=2",
            "micro_batch_size=4"]
    proc = run_cli("train", *args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "differs from the student's" in proc.stderr and "kd_weight=0" in proc.stderr
    run_cli("train", *args, "kd_weight=0")
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(other))


def test_batched_row_reads_equal_per_row_reads(teacher_data, tiny_teacher):
    """TeacherRows.take (one dataset read per micro-batch; the top-k straight from Arrow to numpy) gives exactly
    the examples of the per-row path, with and without the teacher's top-k, for CE-only retokenisation, for rows
    cut at max_len, and after a dataset select (an Arrow view with an offset); collate gives the same batch."""
    import numpy as np
    from transformers import AutoTokenizer

    from llm_distill.storage import load_teacher_dataset
    from llm_distill.student import TeacherRows, collate

    def plain(ex):
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in ex.items()}

    ds = load_teacher_dataset(str(teacher_data))
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    idx = [5, 0, 3, 3, 1]
    for data in (ds, ds.select(range(2, len(ds)))):
        for retokenize, with_topk in ((False, True), (False, False), (True, False)):
            rows = TeacherRows(data, tok, retokenize, with_topk, max_len=48)  # short: some completions are cut
            per_row = [rows.example(data[i], i) for i in idx]
            taken = rows.take(idx)
            assert [plain(e) for e in taken] == per_row
            assert [plain(e) for e in rows.__getitems__(idx)] == per_row  # how torch's DataLoader asks
            for packing in (False, True):
                a, b = collate(taken, tok.pad_token_id, packing), collate(per_row, tok.pad_token_id, packing)
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            assert any(len(e["completion"]) < len(data[i]["completion_token_ids"]) for e, i in zip(per_row, idx))


def test_bad_train_inputs(teacher_data, tmp_path):
    proc = run_cli("train", f"dataset={tmp_path / 'missing'}", f"output_dir={tmp_path / 'o'}", *STUDENT_CONFIG,
                   check=False)
    assert proc.returncode == 2 and "dataset directory not found" in proc.stderr
    proc = run_cli("train", f"dataset={teacher_data}", f"output_dir={tmp_path / 'o'}", check=False)
    assert proc.returncode == 2 and "exactly one of 'student'" in proc.stderr
    assert not (tmp_path / "o").exists()



def launch_two_processes(*train_args) -> subprocess.CompletedProcess:
    """`accelerate launch` of `llm-distill train` with the shipped DDP config, 2 processes, no bf16 (gloo on CPU),
    on a free port so that tests running side by side do not meet on Accelerate's default one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/multi_gpu_ddp.yaml",
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port), "-m", "llm_distill",
           "train", *train_args]
    # Its own process group with a deadline: a rank left waiting in a collective (its peer gone) fails the test
    # instead of hanging the suite.
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "TQDM_DISABLE": "1"}, cwd=Path(__file__).resolve().parents[1],
                                start_new_session=True)
    try:
        out, err = launcher.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        out, err = launcher.communicate()
        raise AssertionError(f"2-process run did not finish in 900 s:\n{err[-3000:]}") from None
    proc = subprocess.CompletedProcess(cmd, launcher.returncode, out, err)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_process_ddp_matches_single_process(teacher_data, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) with 2 sequences per process equals one
    process with 4: same loss trajectory and final weights (the loss is normalised by global step tokens)."""

    common = [f"dataset={teacher_data}", *STUDENT_CONFIG, "max_steps=3", "learning_rate=1e-2",
              "lr_scheduler=constant", "log_every=1", f"eval_dataset={teacher_data}", "eval_every=2"]
    run_cli("train", *common, f"output_dir={tmp_path / 'one'}", "micro_batch_size=4")
    # The shipped DDP launch config, with 2 processes and no bf16 (on CPU it runs over gloo).
    proc = launch_two_processes(*common, f"output_dir={tmp_path / 'two'}", "micro_batch_size=2")
    assert "2 process(es) (MULTI_CPU" in proc.stdout
    one = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").open()]
    two = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").open()]
    assert len(two) == 3, "only the main process writes metrics"
    for a, b in zip(one, two):
        assert a["completion_tokens"] == b["completion_tokens"]
        assert b["loss"] == __import__("pytest").approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == __import__("pytest").approx(a["grad_norm"], rel=1e-4)  # the all-reduced gradient's
    # Held-out loss: each process scores its share of the rows and the sums are gathered.
    assert [m["step"] for m in two if "eval_loss" in m] == [2, 3]
    for a, b in zip(one[1:], two[1:]):
        assert b["eval_loss"] == __import__("pytest").approx(a["eval_loss"], rel=1e-5)
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in w1:
        assert torch.allclose(w1[name], w2[name], atol=1e-5), name


def test_chunked_loss_trains_like_dense_logits(teacher_data, tmp_path):
    """The fused loss (default), the chunked vocabulary projection and the model's full logits give the same
    training run."""
    common = [f"dataset={teacher_data}", *STUDENT_CONFIG, "max_steps=3", "micro_batch_size=4", "learning_rate=1e-2",
              "lr_scheduler=constant", "log_every=1", "kd_divergences={jsd: 1.0, tvd: 0.5}", "kd_temperature=2.0"]
    run_cli("train", *common, f"output_dir={tmp_path / 'dense'}", "loss_chunk_size=0")
    run_cli("train", *common, f"output_dir={tmp_path / 'chunked'}", "loss_chunk_size=7", "loss_impl=chunked")
    assert "fused loss" in run_cli("train", *common, f"output_dir={tmp_path / 'fused'}", "loss_chunk_size=7").stdout
    a = _weights(tmp_path / "dense")
    for run in ("chunked", "fused"):
        b = _weights(tmp_path / run)
        for name in a:
            # float32 logits summed in another order, then AdamW (lr 1e-2) divides by sqrt(v): one lm_head entry of
            # 1,376 was measured 1.08e-5 apart after 3 steps, so 2e-5 (a real bug moves weights by ~lr = 1e-2)
            assert torch.allclose(a[name], b[name], atol=2e-5), (run, name)


def test_padded_student_vocabulary_and_smaller_k(teacher_data, tmp_path):
    """A student whose embedding is padded beyond the tokenizer (as Qwen's are) trains; kd_topk < stored k works."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "padded"
    run_cli("train", f"dataset={teacher_data}", f"output_dir={out}", *STUDENT_CONFIG, "student_config.vocab_size=100",
            "max_steps=2", "micro_batch_size=4", "kd_topk=3", "kd_divergences={reverse_kl: 1.0}")
    assert AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight.shape[0] == 100


def test_nan_teacher_logprobs_are_rejected(teacher_data, tmp_path):
    from llm_distill.data import load_teacher_dataset

    ds = load_teacher_dataset(str(teacher_data))
    bad = ds.map(lambda r, i: {"topk_logprobs": [[float("nan")] * len(r["topk_logprobs"][0])] + r["topk_logprobs"][1:]}
                 if i == 0 else {}, with_indices=True)
    path = tmp_path / "bad"
    bad.save_to_disk(str(path))
    (path / "provenance.json").write_text((teacher_data / "provenance.json").read_text())
    proc = run_cli("train", f"dataset={path}", f"output_dir={tmp_path / 'o'}", *STUDENT_CONFIG, "max_steps=20",
                   "micro_batch_size=24", check=False)
    assert proc.returncode == 2, proc.stderr[-500:]
    assert "row 0 (id 'q00000#0'), column topk_logprobs, completion position 0: NaN or +inf logprob" in proc.stderr


def test_lora_student_adapter_loads_and_exports(teacher_data, tiny_teacher, tmp_path):
    """A LoRA student saves an adapter that loads with PeftModel.from_pretrained; export merges it into a plain
    model directory with the same outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    proc = run_cli("train", f"dataset={teacher_data}", f"output_dir={out}", f"student={tiny_teacher}",
                   "lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}", "max_steps=3", "micro_batch_size=4",
                   "learning_rate=5e-2")
    assert "trained)" in proc.stdout and (out / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    merged_dir = tmp_path / "merged"
    run_cli("export", f"adapter={out}", f"output_dir={merged_dir}")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    x = torch.tensor([[2, 10, 11, 12, 13]])
    with torch.no_grad():
        a, b = peft_model(input_ids=x).logits, merged(input_ids=x).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_teacher)(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, plain, atol=1e-4), "the adapter was trained"
    assert (merged_dir / "tokenizer_config.json").is_file() and not (merged_dir / "adapter_config.json").exists()


def _popen_train(args):
    return subprocess.Popen([sys.executable, "-m", "llm_distill", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TQDM_DISABLE": "1"})


def test_killed_run_resumes_to_the_same_weights(teacher_data, tmp_path):
    """SIGKILL at several points (after a checkpoint, between checkpoints, while one is being written), then a
    rerun of the same command: the final weights and the logged losses equal an uninterrupted run's. Dropout is
    on, so the restored RNG state matters."""
    import time

    common = [f"dataset={teacher_data}", *STUDENT_CONFIG, "student_config.attention_dropout=0.2", "max_steps=40",
              "micro_batch_size=4", "learning_rate=1e-2", "log_every=1", "save_every=5", "keep_checkpoints=2"]
    run_cli("train", *common, f"output_dir={tmp_path / 'straight'}")
    out = tmp_path / "killed"
    args = [*common, f"output_dir={out}"]
    ckpt = out / "checkpoints"
    triggers = [lambda: (ckpt / "step-000010").is_dir(),
                lambda: (ckpt / "step-000020").is_dir() and time.sleep(0.15) is None,
                lambda: any(ckpt.glob(".step-000030.tmp*")) or (ckpt / "step-000030").is_dir()]
    for trigger in triggers:
        proc = _popen_train(args)
        while proc.poll() is None and not trigger():
            time.sleep(0.005)
        proc.kill()
        proc.wait()
        assert proc.returncode == -9, f"the run finished before it could be killed: {proc.stderr.read()[-500:]}"
    # The last kill lands while step 30's checkpoint is written or a little after (a fast step can save 35 first).
    kept = sorted(p.name for p in ckpt.glob("step-*"))
    assert kept in ([f"step-{s:06d}", f"step-{s + 5:06d}"] for s in (20, 25, 30)), f"keeps the newest 2: {kept}"
    proc = run_cli("train", *args)
    assert "resuming at step" in proc.stdout
    a, b = _weights(tmp_path / "straight"), _weights(out)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    straight = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").open()]
    resumed = [json.loads(l) for l in (out / "metrics.jsonl").open()]
    assert [m["step"] for m in resumed] == list(range(1, 41)), "every step logged exactly once"
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]

    # A finished run is not trained again, and a changed setting is named rather than silently mixed in.
    proc = run_cli("train", *args, check=False)
    assert proc.returncode == 2 and "has finished" in proc.stderr
    (out / "trainer_state.json").unlink()
    proc = run_cli("train", *args, "learning_rate=5e-3", "log_every=2", check=False)
    assert proc.returncode == 2 and "learning_rate: 0.01 there, 0.005 now" in proc.stderr
    assert "log_every" not in proc.stderr, "logging settings may change on resume"



def test_killed_onpolicy_run_resumes_to_the_same_weights(teacher_data, tiny_teacher, tmp_path):
    """On-policy steps (which steps, and every sampled token) are functions of (seed, step, row): a GKD run killed
    after a checkpoint and rerun ends with the weights and losses of an uninterrupted run."""
    import time

    common = [f"dataset={teacher_data}", *STUDENT_CONFIG, "max_steps=12", "micro_batch_size=4", "learning_rate=1e-2",
              "log_every=1", "save_every=4", "onpolicy_fraction=0.5", f"teacher={tiny_teacher}",
              "onpolicy_max_new_tokens=6"]
    run_cli("train", *common, f"output_dir={tmp_path / 'straight'}")
    out = tmp_path / "killed"
    proc = _popen_train([*common, f"output_dir={out}"])
    while proc.poll() is None and not (out / "checkpoints" / "step-000008").is_dir():
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9, f"the run finished before it could be killed: {proc.stderr.read()[-500:]}"
    assert "resuming at step 8" in run_cli("train", *common, f"output_dir={out}").stdout
    a, b = _weights(tmp_path / "straight"), _weights(out)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    straight = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").open()]
    resumed = [json.loads(l) for l in (out / "metrics.jsonl").open()]
    assert 0 < sum(m["onpolicy_steps"] for m in straight) < 12, "this seed mixes on-policy and offline steps"
    assert resumed == [{**m, "tokens_per_s": r["tokens_per_s"]} for m, r in zip(straight, resumed)]

def test_tensorboard_bf16_gradient_checkpointing_and_length_grouping(teacher_data, tmp_path):
    """Trackers write TensorBoard scalars; gradient checkpointing gives the same run; bf16 autocast trains to a
    close loss; grouping rows by length cuts the padding."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = [f"dataset={teacher_data}", *STUDENT_CONFIG, "max_steps=4", "micro_batch_size=6", "learning_rate=1e-2",
              "log_every=1"]
    run_cli("train", *common, f"output_dir={tmp_path / 'plain'}", "group_by_length=false")
    run_cli("train", *common, f"output_dir={tmp_path / 'ckpt'}", "group_by_length=false", "gradient_checkpointing=true")
    run_cli("train", *common, f"output_dir={tmp_path / 'grouped'}", "mixed_precision=bf16", "group_by_length=true")
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "ckpt")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name

    logs = {run: [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").open()] for run in ("plain", "grouped")}
    pad = {run: sum(m["padding_fraction"] for m in ms) / len(ms) for run, ms in logs.items()}
    assert pad["grouped"] < pad["plain"], pad
    # bf16 autocast (CPU here): another data order, so only the scale of the loss is compared.
    assert abs(logs["grouped"][0]["loss"] - logs["plain"][0]["loss"]) < 0.1 * logs["plain"][0]["loss"]

    events = [p for p in (tmp_path / "plain" / "tensorboard").rglob("events.out.tfevents.*")]
    scalars = {}
    for e in events:
        acc = EventAccumulator(str(e)).Reload()
        scalars.update({tag: [ev.value for ev in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]})
    assert len(scalars["loss"]) == 4 and scalars["loss"][0] == __import__("pytest").approx(logs["plain"][0]["loss"])


def test_kd_refuses_rows_the_student_tokenizer_reads_differently(teacher_data, tmp_path):
    """Same vocabulary but another chat template at capture (shifted prompt ids), or ids that do not decode to
    the stored text: one-line errors naming the row, before any training."""
    from llm_distill.data import load_teacher_dataset

    ds = load_teacher_dataset(str(teacher_data))
    cases = {"template": lambda r: {"prompt_token_ids": r["prompt_token_ids"][1:]},
             "text": lambda r: {"completion": r["completion"] + "!"}}
    for name, change in cases.items():
        path = tmp_path / name
        ds.map(lambda r, i: change(r) if i == 1 else {}, with_indices=True).save_to_disk(str(path))
        (path / "provenance.json").write_text((teacher_data / "provenance.json").read_text())
        proc = run_cli("train", f"dataset={path}", f"output_dir={tmp_path / ('o' + name)}", *STUDENT_CONFIG,
                       "max_steps=1", check=False)
        assert proc.returncode == 2 and f"dataset row {ds[1]['id']!r}" in proc.stderr, proc.stderr[-800:]
        assert ("chat-template encoding" if name == "template" else "decode to") in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_onpolicy_fraction_zero_is_the_offline_run(teacher_data, tiny_teacher, tmp_path):
    """λ = 0 with every on-policy field set trains exactly the weights of a run without them."""
    common = [f"dataset={teacher_data}", *STUDENT_CONFIG, "max_steps=3", "micro_batch_size=4", "learning_rate=1e-2",
              "student_config.attention_dropout=0.2"]
    run_cli("train", *common, f"output_dir={tmp_path / 'offline'}")
    run_cli("train", *common, f"output_dir={tmp_path / 'zero'}", "onpolicy_fraction=0", f"teacher={tiny_teacher}",
            "onpolicy_objective=minillm", "onpolicy_max_new_tokens=5")
    a, b = _weights(tmp_path / "offline"), _weights(tmp_path / "zero")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_onpolicy_gkd_under_ddp_matches_single_process(teacher_data, tiny_teacher, tmp_path):
    """GKD on the student's own samples (λ = 0.5, JSD): one process with 2 x 2 micro-batches (the step's samples
    drawn once, then split) equals two DDP processes with 2 each (each samples its own rows; both make the same
    λ choice per step); on-policy steps are logged apart from offline ones."""

    from llm_distill.onpolicy import onpolicy_step

    common = [f"dataset={teacher_data}", *STUDENT_CONFIG, "max_steps=4", "learning_rate=1e-2", "lr_scheduler=constant",
              "log_every=2", "onpolicy_fraction=0.5", f"teacher={tiny_teacher}", "onpolicy_max_new_tokens=6",
              "onpolicy_logprobs=5", "kd_divergences={jsd: 1.0}", "seed=3"]
    chosen = [s for s in range(1, 5) if onpolicy_step(3, s, 0.5)]
    assert 0 < len(chosen) < 4, "this seed mixes on-policy and offline steps"
    proc = run_cli("train", *common, f"output_dir={tmp_path / 'one'}", "micro_batch_size=2", "grad_accum_steps=2")
    assert "on-policy (gkd)" in proc.stdout
    proc = launch_two_processes(*common, f"output_dir={tmp_path / 'two'}", "micro_batch_size=2")
    one = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").open()]
    two = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").open()]
    assert sum(m["onpolicy_steps"] for m in one) == len(chosen)
    for a, b in zip(one, two):
        assert a["onpolicy_tokens"] == b["onpolicy_tokens"] and a["onpolicy_tokens"] > 0
        assert b["onpolicy_kd"] == __import__("pytest").approx(a["onpolicy_kd"], rel=1e-5)
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in w1:
        assert torch.allclose(w1[name], w2[name], atol=1e-5), name


def test_minillm_trains_chunked_like_dense(teacher_data, tiny_teacher, tmp_path):
    """The MiniLLM-style objective (teacher-mixed sampling, single-step part, length normalisation) trains through
    the CLI, and the chunked vocabulary projection gives the dense-logits run."""
    common = [f"dataset={teacher_data}", *STUDENT_CONFIG, "max_steps=3", "micro_batch_size=4", "learning_rate=1e-2",
              "lr_scheduler=constant", "log_every=1", "onpolicy_fraction=1", f"teacher={tiny_teacher}",
              "onpolicy_objective=minillm", "minillm_teacher_mix=0.2", "onpolicy_max_new_tokens=6"]
    run_cli("train", *common, f"output_dir={tmp_path / 'dense'}", "loss_chunk_size=0")
    run_cli("train", *common, f"output_dir={tmp_path / 'chunked'}", "loss_chunk_size=7")
    metrics = [json.loads(l) for l in (tmp_path / "chunked" / "metrics.jsonl").open()]
    assert [m["onpolicy_steps"] for m in metrics] == [1, 1, 1] and all(m["completion_tokens"] == 0 for m in metrics)
    assert all(m["onpolicy_rkl"] == m["onpolicy_rkl"] and m["onpolicy_tokens"] > 0 for m in metrics)
    a, b = _weights(tmp_path / "dense"), _weights(tmp_path / "chunked")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    proc = run_cli("train", f"dataset={teacher_data}", *STUDENT_CONFIG, f"output_dir={tmp_path / 'x'}",
                   "onpolicy_fraction=0.5", check=False)
    assert proc.returncode == 2 and "needs 'teacher'" in proc.stderr
