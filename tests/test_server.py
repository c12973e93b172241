"""backend=server against real vLLM servers on 127.0.0.1 (two replicas of the bundled teacher on vLLM's CPU engine).

The servers run in .venv-vllm (`make vllm-cpu`; its Python is LLM_DISTILL_VLLM_PYTHON); the client runs here, in an
environment without vLLM's engine. Every test of this file runs in one pytest-xdist worker (one xdist group) so
the two servers start once; the test that kills a replica runs last.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

from llm_distill.data import load_teacher_dataset

pytestmark = pytest.mark.xdist_group("vllm_servers")

TEACHER = ROOT / "data" / "tiny_task" / "teacher"
TRAIN = ROOT / "data" / "tiny_task" / "train.jsonl"
VLLM_PYTHON = os.environ.get("LLM_DISTILL_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
SERVER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log: Path) -> tuple[subprocess.Popen, str]:
    """`vllm serve` for the bundled teacher, float32, on a free port; seeded sampling on the CPU engine needs
    chunked prefill off (see vllm_backend's docstring)."""
    port = free_port()
    cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(TEACHER), "--dtype", "float32",
           "--max-model-len", "128", "--enforce-eager", "--max-logprobs", "20", "--no-enable-chunked-prefill",
           "--max-num-batched-tokens", "2048", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=SERVER_ENV,
                            start_new_session=True)
    return proc, f"http://127.0.0.1:{port}/v1"


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vLLM server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"vLLM server at {url} not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    if not Path(VLLM_PYTHON).exists():
        reason = f"no vLLM environment at {VLLM_PYTHON} (`make vllm-cpu` builds .venv-vllm; `make test` runs these)"
        if os.environ.get("LLM_DISTILL_REQUIRE_VLLM") == "1":
            raise AssertionError(reason)
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("servers")
    started = [start_server(d / f"server{i}.log") for i in range(2)]
    try:
        for i, (proc, url) in enumerate(started):
            wait_ready(proc, url, d / f"server{i}.log")
        yield started
    finally:
        for proc, _ in started:
            stop(proc)


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "llm_distill", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=ENV)
    if check:
        assert proc.returncode == 0, f"llm-distill {' '.join(map(str, args))} -> {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc


def rows(path) -> dict:
    return {r["id"]: r for r in load_teacher_dataset(str(path)).to_list()}


def urls(servers) -> str:
    return "server_urls=[" + ",".join(url for _, url in servers) + "]"


GEN = ["recipes/tiny/generate.yaml", f"prompts={TRAIN}", "limit=48", "max_new_tokens=12", "logprobs=5",
       "chunk_size=16"]


def test_client_environment_has_no_vllm_engine():
    """The point of the client: it needs an HTTP library, not vLLM (this environment has at most vLLM's classes)."""
    from llm_distill.vllm_backend import vllm_platform

    assert vllm_platform() is None


def test_server_generate_matches_transformers_and_records_the_servers(servers, tmp_path):
    cli("generate", *GEN, "backend=server", urls(servers), f"output_dir={tmp_path / 'srv'}")
    cli("generate", *GEN, "backend=transformers", f"output_dir={tmp_path / 'hf'}")
    a, b = rows(tmp_path / "srv"), rows(tmp_path / "hf")
    assert a.keys() == b.keys() and len(a) == 48
    for i in a:
        assert a[i]["completion_token_ids"] == b[i]["completion_token_ids"], i
        np.testing.assert_allclose(a[i]["token_logprob"], b[i]["token_logprob"], atol=1e-5)
        np.testing.assert_allclose(np.array(a[i]["topk_logprobs"], np.float64),
                                   np.array(b[i]["topk_logprobs"], np.float64), atol=1.6e-2)
        np.testing.assert_allclose(np.exp(a[i]["tail_logprob"]), np.exp(b[i]["tail_logprob"]), atol=1e-4)
    prov = json.loads((tmp_path / "srv" / "provenance.json").read_text())
    assert prov["backend"] == "server" and prov["backend_version"] == "0.32.0"
    details = prov["backend_details"]
    assert details["served_model"] == str(TEACHER)
    assert sorted(s["url"] for s in details["servers"]) == sorted(url for _, url in servers)
    assert all(s["max_model_len"] == 128 and s["vllm_version"] == "0.32.0" for s in details["servers"])

    # score through the servers reproduces the generated logprobs (prompt_logprobs of prompt + response)
    cli("score", f"model={TEACHER}", f"responses={tmp_path / 'srv'}", f"output_dir={tmp_path / 'sc'}",
        "backend=server", urls(servers), "logprobs=5")
    sc = rows(tmp_path / "sc")
    for i in a:
        assert sc[i]["completion_token_ids"] == a[i]["completion_token_ids"]
        np.testing.assert_allclose(sc[i]["token_logprob"], a[i]["token_logprob"], atol=1e-5)
        assert sc[i]["topk_token_ids"] == a[i]["topk_token_ids"] or np.allclose(
            np.array(sc[i]["topk_logprobs"], np.float64), np.array(a[i]["topk_logprobs"], np.float64), atol=1.6e-2)


def one_line_error(proc) -> str:
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_refusals_before_any_work(servers, tmp_path):
    out = tmp_path / "out"
    dead = f"http://127.0.0.1:{free_port()}/v1"
    msg = one_line_error(cli("generate", *GEN, "backend=server", f"server_urls=[{dead}]", f"output_dir={out}",
                             check=False))
    assert "no replica answers" in msg and dead in msg
    msg = one_line_error(cli("generate", *GEN, "backend=server", urls(servers), "logprobs=30", f"output_dir={out}",
                             check=False))
    assert "--max-logprobs 30" in msg
    # a local tokenizer that is not the served model's
    from llm_distill.tiny import build_char_tokenizer

    other = tmp_path / "other_tok"
    build_char_tokenizer("zyxwvutsrqponmlkjihgfedcba0123456789 +?,:").save_pretrained(other)
    msg = one_line_error(cli("generate", *GEN, "backend=server", urls(servers), f"model={other}",
                             f"output_dir={out}", check=False))
    assert "tokenises text differently" in msg
    msg = one_line_error(cli("generate", *GEN, "backend=server", f"output_dir={out}", check=False))
    assert "needs server_urls" in msg
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_evaluate_with_a_served_teacher(servers, tmp_path):
    """evaluate's teacher behind the servers: the same answers as the local teacher, and students' KL measured
    against the served teacher's top-k (a copy of the teacher as the student: KL ~ 0)."""
    heldout = ROOT / "data" / "tiny_task" / "heldout.jsonl"
    common = [f"teacher={TEACHER}", f"prompts={heldout}", "limit=40", "max_new_tokens=12", "logprobs=5",
              "latency_prompts=2", "bootstrap=20", "plot=true", f"students={{copy: {TEACHER}}}"]
    cli("evaluate", *common, urls(servers).replace("server_urls", "teacher_server_urls"),
        f"output_dir={tmp_path / 'srv'}")
    cli("evaluate", *common, f"output_dir={tmp_path / 'local'}")
    srv = json.loads((tmp_path / "srv" / "report.json").read_text())["models"]
    local = json.loads((tmp_path / "local" / "report.json").read_text())["models"]
    assert srv["teacher"]["backend"] == "server" and srv["teacher"]["params"] is None
    assert srv["teacher"]["exact_match"] == local["teacher"]["exact_match"] > 0.5
    assert srv["copy"]["kl"] == pytest.approx(local["copy"]["kl"], abs=1e-3) and srv["copy"]["kl"] < 1e-3
    assert (tmp_path / "srv" / "report.png").is_file()


def test_a_replica_killed_mid_run_loses_nothing(servers, tmp_path):
    """Sampled generation over two replicas; one is SIGKILLed once the first chunk is written; the run ends on
    the other with every (prompt, sample) exactly once and the tokens of a run on the surviving replica alone
    (requests are seeded per sample, so which replica served one does not matter)."""
    sampled = [*GEN, "limit=160", "backend=server", "temperature=1.0", "num_samples=2", "seed=3", "server_retries=1"]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "llm_distill", "generate", *sampled, urls(servers),
                             f"output_dir={out}"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    partial = tmp_path / ".out.partial"
    deadline = time.time() + 300
    while not list(partial.glob("chunk-*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim, _ = servers[1]
    os.killpg(victim.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    got = rows(out)
    assert len(got) == 320 and "dropped" in stderr and servers[1][1] in stderr
    cli("generate", *sampled, f"server_urls=[{servers[0][1]}]", f"output_dir={tmp_path / 'one'}")
    ref = rows(tmp_path / "one")
    assert {i: r["completion_token_ids"] for i, r in got.items()} == {i: r["completion_token_ids"] for i, r in ref.items()}
