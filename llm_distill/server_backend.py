"""Teacher behind one or more running vLLM servers (`backend: server`), for generate and score.

    vllm serve Qwen/Qwen2.5-7B-Instruct --max-logprobs 20 --port 8000        # on each teacher node
    llm-distill generate recipes/qwen2.5-7b-to-0.5b/generate.yaml backend=server \
        server_urls=[http://node1:8000/v1,http://node2:8000/v1] prompts=my_prompts.jsonl

`model` stays a local path (or hub id) of the teacher's tokenizer: the chat template is applied here, once, and
prompts go to `/v1/completions` as token ids, so the server never re-tokenises. Each sample is its own request
(`n=1`) seeded from (seed, prompt id, sample) as in the other backends, with `logprobs=k` and
`return_tokens_as_token_ids` (every candidate keyed `token_id:N`, never by decoded text); scoring sends prompt +
response with `prompt_logprobs=k` and one throw-away token. Values are vLLM's raw logprobs (its default
`--logprobs-mode raw_logprobs`), so rows are the ones `backend: vllm` stores.

Requests are spread over the replicas through one queue: each replica runs `concurrency` requests at a time
(vLLM batches them), so a faster replica takes more. A request that fails to connect, times out or gets a 5xx
is retried on the same replica with backoff (`retries` times); after that the replica is dropped for the rest of
the run and its unfinished requests go to the others. A chunk is written only when all its requests are back,
so the chunked writer stays the single source of truth: nothing is lost or duplicated, and a rerun resumes as
with the other backends. A 4xx is our request's fault and stops the run with the server's message.

Only the HTTP client `httpx` is needed here, not vLLM.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
import types

import numpy as np

from .errors import UserError
from .teacher import Completion, sample_seed
from .vllm_backend import check_request, finish_reason, logprob_rows, make_completion, stop_ids_of

# vLLM's JSON writes -inf logprobs as -9999.0 (OpenAI's convention); read them back as -inf.
JSON_NEG_INF = -9999.0


class _ReplicaDown(Exception):
    """A replica that kept failing (connection, timeout, 5xx) after its retries."""


class _Refused(Exception):
    """A 4xx: the server refused the request itself (retrying elsewhere would not help)."""


def _token_id(key: str, where: str) -> int:
    """`token_id:N` (vLLM's return_tokens_as_token_ids form) -> N."""
    if not key.startswith("token_id:"):
        raise UserError(f"{where}: the server returned token {key!r}, not 'token_id:N'; it must be a vLLM server "
                        "(it honours return_tokens_as_token_ids)")
    return int(key[len("token_id:"):])


def _lp(value) -> float:
    v = float(value)
    return -math.inf if v <= JSON_NEG_INF else v


class Replica:
    """One server: its base URL (`http://host:port/v1`), an HTTP client, what it serves, and whether it is alive."""

    def __init__(self, url: str, *, timeout: float, retries: int, concurrency: int):
        import httpx

        self.url = url.rstrip("/")
        self.root = self.url[:-3] if self.url.endswith("/v1") else self.url  # /version, /tokenize live at the root
        self.retries = retries
        self.client = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                                   limits=httpx.Limits(max_connections=concurrency + 2))
        self.alive, self.error = True, None
        self.model = self.version = self.max_model_len = None

    def request(self, method: str, url: str, body: dict | None = None, *, retries: int | None = None) -> dict:
        """JSON of a request, retried with backoff on connection errors, timeouts and 5xx; `_Refused` on 4xx,
        `_ReplicaDown` when the retries are spent."""
        import httpx

        retries = self.retries if retries is None else retries
        last = None
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
            try:
                r = self.client.request(method, url, json=body)
            except httpx.HTTPError as e:  # refused, reset, timed out, ...
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            if r.status_code >= 500:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            if r.status_code >= 400:
                try:
                    msg = r.json().get("error", {}).get("message") or r.text
                except ValueError:
                    msg = r.text
                raise _Refused(f"HTTP {r.status_code}: {' '.join(str(msg).split())[:300]}")
            try:
                return r.json()
            except ValueError:
                last = f"HTTP {r.status_code} with a body that is not JSON"
        raise _ReplicaDown(last)

    def close(self) -> None:
        self.client.close()


class ServerBackend:
    """Teacher on vLLM servers, with the other backends' interface (`generate`, `score` -> `Completion`s)."""

    name = "server"

    def __init__(self, model: str, *, urls: list[str] | None = None, served_model: str | None = None, k: int = 20,
                 num_samples: int = 1, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256,
                 seed: int = 0, concurrency: int = 32, timeout: float = 600.0, retries: int = 3, tokenizer=None):
        from .models import load_tokenizer

        check_request(k=k, max_logprobs=k, n=num_samples, temperature=temperature, top_p=top_p,
                      max_tokens=max_new_tokens, backend="server")
        if not urls:
            raise UserError("backend=server needs server_urls, e.g. server_urls=[http://127.0.0.1:8000/v1]")
        self.tokenizer = tokenizer or load_tokenizer(model)
        self.vocab_size = len(self.tokenizer)
        self.k, self.n, self.temperature, self.top_p = k, num_samples, temperature, top_p
        self.max_new_tokens, self.seed, self.concurrency = max_new_tokens, seed, concurrency
        self.stop_ids = stop_ids_of(model, self.tokenizer)
        self.revision = None
        self.replicas = [Replica(u, timeout=timeout, retries=retries, concurrency=concurrency) for u in urls]
        self._lock = threading.Lock()
        try:
            self._connect(served_model)
        except BaseException:
            self.close()
            raise

    # -- start-up checks ------------------------------------------------------------------------------------------

    def _connect(self, served_model: str | None) -> None:
        """Ask every replica what it serves; drop the ones that do not answer; refuse a mismatch in one line."""
        for rep in self.replicas:
            try:
                cards = rep.request("GET", f"{rep.url}/models", retries=1)["data"]
                models = [m["id"] for m in cards]
                rep.max_model_len = next((m.get("max_model_len") for m in cards
                                          if m["id"] == (served_model or models[0])), None)
                rep.version = rep.request("GET", f"{rep.root}/version", retries=0).get("version")
            except (_ReplicaDown, _Refused, KeyError, IndexError, TypeError) as e:
                rep.alive, rep.error = False, str(e) or type(e).__name__
                continue
            if served_model is None and len(models) != 1:
                raise UserError(f"{rep.url} serves {len(models)} models ({', '.join(models)}); set server_model to "
                                "the teacher's name")
            if served_model is not None and served_model not in models:
                raise UserError(f"{rep.url} does not serve server_model={served_model!r} (it serves "
                                f"{', '.join(models)})")
            rep.model = served_model or models[0]
        live = [r for r in self.replicas if r.alive]
        if not live:
            raise UserError("backend=server: no replica answers: " +
                            "; ".join(f"{r.url} ({r.error})" for r in self.replicas) +
                            "; start them (vllm serve ...) or fix server_urls")
        for rep in self.replicas:
            if not rep.alive:
                print(f"backend=server: warning: {rep.url} does not answer ({rep.error}); going on with "
                      f"{len(live)} of {len(self.replicas)} replicas", file=sys.stderr)
        if len({r.model for r in live}) > 1:
            raise UserError("backend=server: the replicas serve different models: " +
                            ", ".join(f"{r.url}: {r.model}" for r in live) + "; every replica must serve the teacher")
        self.served_model = live[0].model
        for rep in live:
            self._check_replica(rep)
        self.version = ",".join(sorted({str(r.version) for r in live}))
        self.details = {"served_model": self.served_model,
                        "servers": [{"url": r.url, "model": r.model, "vllm_version": r.version,
                                     "max_model_len": r.max_model_len} for r in live]}

    def _check_replica(self, rep: Replica) -> None:
        """The served tokenizer must be ours (ids mean the same), and the server must return k logprobs."""
        probe = self.tokenizer.decode(list(range(min(self.vocab_size, 256))), skip_special_tokens=True)
        mine = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        try:
            theirs = rep.request("POST", f"{rep.root}/tokenize",
                                 {"model": rep.model, "prompt": probe, "add_special_tokens": False}, retries=1)
        except _Refused:
            theirs = None  # /tokenize turned off: the vocabulary is still checked on the logprobs probe below
        except _ReplicaDown as e:
            raise UserError(f"{rep.url}: stopped answering during the start-up checks ({e})") from None
        if theirs is not None and theirs.get("tokens") != mine:
            raise UserError(f"{rep.url}: the served model ({rep.model}) tokenises text differently from the local "
                            f"tokenizer in model= (a probe of {len(mine)} tokens gave {len(theirs.get('tokens') or [])}"
                            "); point model= at the served model's tokenizer")
        body = self._generate_body([self.tokenizer.eos_token_id or 0], 0, max_tokens=1)
        try:
            out = rep.request("POST", f"{rep.url}/completions", body, retries=1)
        except _Refused as e:
            hint = (f"; start the server with --max-logprobs {self.k} or lower logprobs" if "logprobs" in str(e)
                    else "")
            raise UserError(f"{rep.url}: refused a {self.k}-logprob request ({e}){hint}") from None
        except _ReplicaDown as e:
            raise UserError(f"{rep.url}: stopped answering during the start-up checks ({e})") from None
        ids = [_token_id(t, rep.url) for d in out["choices"][0]["logprobs"]["top_logprobs"] for t in d]
        if ids and max(ids) >= self.vocab_size:
            raise UserError(f"{rep.url}: the served model returned token id {max(ids)}, outside the local "
                            f"tokenizer's {self.vocab_size} ids; point model= at the served model's tokenizer")

    # -- requests --------------------------------------------------------------------------------------------------

    def context_length(self) -> int | None:
        lens = [r.max_model_len for r in self.replicas if r.alive and r.max_model_len]
        return min(lens) if lens else None

    def _generate_body(self, prompt_ids: list[int], seed: int, max_tokens: int | None = None) -> dict:
        body = {"model": self.served_model, "prompt": list(prompt_ids), "n": 1,
                "max_tokens": max_tokens or self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "logprobs": self.k, "return_tokens_as_token_ids": True, "stop_token_ids": self.stop_ids}
        if self.temperature > 0:
            # Greedy requests go unseeded: a seeded request gets its own generator, which a CPU server started
            # with chunked prefill cannot rewind (see vllm_backend), and greedy decoding draws nothing.
            body["seed"] = seed
        return body

    def _run(self, bodies: list[dict], progress, tokens_of) -> list[dict]:
        """Every request's JSON response, in order, over the live replicas (see the module docstring)."""
        results: list = [None] * len(bodies)
        pending = list(range(len(bodies)))
        while pending:
            live = [r for r in self.replicas if r.alive]
            if not live:
                raise UserError("backend=server: no replica answers any more: " +
                                "; ".join(f"{r.url} ({r.error})" for r in self.replicas) +
                                "; the finished chunks are kept: restart the servers and rerun the same command")
            todo: queue.SimpleQueue = queue.SimpleQueue()
            for i in pending:
                todo.put(i)
            refused: list = []

            def work(rep: Replica) -> None:
                while rep.alive and not refused:
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        out = rep.request("POST", f"{rep.url}/completions", bodies[i])
                    except _ReplicaDown as e:
                        with self._lock:
                            if rep.alive:
                                rep.alive, rep.error = False, str(e)
                                print(f"backend=server: warning: dropped {rep.url} ({e}); its requests go to the other "
                                      "replicas", file=sys.stderr)
                        return
                    except _Refused as e:
                        refused.append((i, rep, e))
                        return
                    results[i] = out
                    if progress:
                        with self._lock:
                            progress(1, tokens_of(i, out))

            # Started round-robin over the replicas: with fewer requests than threads, each replica gets a share.
            threads = [threading.Thread(target=work, args=(rep,), daemon=True)
                       for _ in range(self.concurrency) for rep in live]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if refused:
                i, rep, e = refused[0]
                raise UserError(f"{rep.url} refused request {i} of this chunk ({e})")
            pending = [i for i in pending if results[i] is None]
        return results

    def generate(self, prompt_ids: list[list[int]], prompt_keys: list[str] | None = None,
                 progress=None) -> list[list[Completion]]:
        """`n` completions per prompt, one request per (prompt, sample) seeded by sample_seed(seed, key, sample)."""
        keys = prompt_keys or [str(i) for i in range(len(prompt_ids))]
        jobs = [(i, s) for i in range(len(prompt_ids)) for s in range(self.n)]
        bodies = [self._generate_body(prompt_ids[i], sample_seed(self.seed, keys[i], s)) for i, s in jobs]
        outs = self._run(bodies, progress, lambda i, o: len((o["choices"][0].get("logprobs") or {}).get("tokens") or []))
        results: list[list] = [[None] * self.n for _ in prompt_ids]
        for (i, s), out in zip(jobs, outs):
            results[i][s] = self._completion(out, f"prompt {keys[i]!r} sample {s}")
        return results

    def _completion(self, out: dict, where: str) -> Completion:
        """A /v1/completions choice -> Completion. Each position's `top_logprobs` holds the top-k and, when the
        emitted token is outside them, that token too (k + 1 entries), in no order we rely on: the top-k are the
        k largest values (a tie at the k-th value may swap ids of equal logprob)."""
        choice = out["choices"][0]
        lp = choice.get("logprobs") or {}
        tokens = [_token_id(t, where) for t in lp.get("tokens") or []]
        tops = lp.get("top_logprobs") or []
        if len(tops) != len(tokens) or not tokens:
            raise UserError(f"{where}: the server returned {len(tops)} logprob positions for {len(tokens)} tokens")
        k = self.k
        top_ids = np.zeros((len(tokens), k), dtype=np.int64)
        top_lp = np.zeros((len(tokens), k), dtype=np.float64)
        for t, d in enumerate(tops):
            entries = sorted(((_lp(v), _token_id(key, where)) for key, v in d.items()), key=lambda e: -e[0])
            if len(entries) < k:
                raise UserError(f"{where}: the server returned {len(entries)} candidates at completion position {t}, "
                                f"fewer than k={k}")
            top_lp[t] = [e[0] for e in entries[:k]]
            top_ids[t] = [e[1] for e in entries[:k]]
        tok_lp = np.array([_lp(v) for v in lp["token_logprobs"]], dtype=np.float64)
        if tokens and int(max(tokens)) >= self.vocab_size or int(top_ids.max()) >= self.vocab_size:
            raise UserError(f"{where}: the server returned a token id at or above the local tokenizer's "
                            f"{self.vocab_size}; point model= at the served model's tokenizer")
        return make_completion(top_ids, top_lp, tok_lp, tokens, finish_reason(choice.get("finish_reason"), where),
                               where)

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], prompt_keys: list[str] | None = None,
              progress=None) -> list[Completion]:
        """Top-k logprobs of given completions: prompt logprobs of prompt + response, one throw-away token."""
        keys = prompt_keys or [str(i) for i in range(len(prompt_ids))]
        bodies = [{"model": self.served_model, "prompt": list(p) + list(c), "max_tokens": 1, "temperature": 0.0,
                   "prompt_logprobs": self.k, "return_tokens_as_token_ids": True}
                  for p, c in zip(prompt_ids, completion_ids)]
        outs = self._run(bodies, progress, lambda i, o: len(completion_ids[i]))
        results = []
        for key, out, p, c in zip(keys, outs, prompt_ids, completion_ids):
            where = f"row {key!r}"
            plp = out["choices"][0].get("prompt_logprobs")
            if plp is None or len(plp) != len(p) + len(c):
                raise UserError(f"{where}: the server returned prompt logprobs for "
                                f"{None if plp is None else len(plp)} of {len(p) + len(c)} positions")
            # vLLM's dict form ({id: Logprob}, the actual token first), as vllm_backend reads it.
            container = [None if d is None else
                         {int(i): types.SimpleNamespace(logprob=_lp(v["logprob"]), rank=v.get("rank"))
                          for i, v in d.items()} for d in plp]
            top_ids, top_lp, tok_lp = logprob_rows(container, len(p), [int(t) for t in c], self.k, where)
            results.append(make_completion(top_ids, top_lp, tok_lp, [int(t) for t in c], "given", where))
        return results

    def close(self) -> None:
        for rep in getattr(self, "replicas", []):
            rep.close()
