"""Hostile input must not kill or stall the server (issue 16): each test sends it and checks the safe outcome.

Bounded memory (verification scored block by block, with the same metrics), a cap on the tokens of a
verify or audit request, deadlines that hold for waiting requests and for every kind of job, a worker that
survives whatever a job raises, and a full queue that refuses a flood before tokenising it. A tiny random
Hydra with a letter tokenizer keeps every test at a few seconds; timeouts are short on purpose.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from olmo_tap.inference.poe import PoE
from olmo_tap.serve import app as app_module
from olmo_tap.serve.app import create_app
from olmo_tap.serve.config import ServeConfig
from olmo_tap.serve.engine import DeadlinePassed, Engine
from olmo_tap.serve.live import LiveServer
from olmo_tap.serve.schemas import AuditRequest
from olmo_tap.serve.verification import run_audit
from olmo_tap.verify import SamplingMethod, TokenSequence, replay, verify_outputs
from olmo_tap.verify import outputs as outputs_module
from olmo_tap.verify import poe_audit as poe_audit_module
from olmo_tap.verify.replay import teacher_forced_logits
from olmo_tap.verify.scoring import olmo_tap_gumbels, score_tokens, vllm_exponentials
from tests.tiny import LetterTokenizer, tiny_hydra

VOCAB = 12
MODEL_ID = "tiny-letters"
CONTEXT = 128  # tiny_hydra's context
PROMPT = [{"role": "user", "content": "abc"}]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_hydra(vocab=VOCAB, n_heads=4)


def make_client(model, tokenizer=None, **config) -> TestClient:
    app = create_app(model, tokenizer or LetterTokenizer(VOCAB), MODEL_ID, ServeConfig(**config))
    return TestClient(app, base_url="http://localhost", raise_server_exceptions=False)  # a Host name of its own


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"messages": PROMPT, **body})


def verify_body(n_out: int = 20) -> dict:
    rng = random.Random(n_out)
    ids = [rng.randrange(VOCAB) for _ in range(n_out)]
    sequence = {"prompt_token_ids": [1, 2, 3], "output_token_ids": ids}
    return {"outputs": [sequence], "temperature": 0, "sampling_method": "olmo_tap", "head": 0}


def queue(client) -> dict:
    return client.get("/health").json()["queue"]


def wait_until(condition, what: str, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.02)


# ----- 1. bounded memory: verification block by block, same metrics ------------------------------------------


def sequences_to_verify(model, tokenizer) -> list[TokenSequence]:
    """An honest sequence (the model's own greedy answer) and a random one, 40 output tokens each."""
    own = PoE(model, tokenizer, max_new_tokens=40, seed=1, mode="single", draft_head=0)
    honest = own.generate_with_cache("abc", temperature=0.0)
    rng = random.Random(0)
    noise = [rng.randrange(len(tokenizer)) for _ in range(40)]
    return [TokenSequence(honest.prompt_ids, honest.token_ids), TokenSequence([4, 1, 7, 2, 9], noise)]


def all_at_once(model, tokenizer, sequence, method, temperature, top_k, seed):
    """The metrics as verify_outputs computed them before it went block by block: every position's logits
    and noise at once."""
    prompt, output = sequence.prompt_token_ids, sequence.output_token_ids
    logits = teacher_forced_logits(model, prompt, output, [0])[0]
    if method is SamplingMethod.OLMO_TAP:
        logits = logits[:, : len(tokenizer)]
        noise = olmo_tap_gumbels(len(prompt), len(output), logits.size(-1), seed)
    else:
        noise = vllm_exponentials(len(output), logits.size(-1), seed, "cpu")
    claimed = torch.tensor(output)
    options = dict(temperature=temperature, top_k=top_k, top_p=1.0, method=method)
    return score_tokens(logits, claimed, noise=noise if temperature > 0 else None, **options)


def recording(function, sizes: list[int]):
    """``function(model, hidden, start, stop)``, recording how many positions each call covers."""

    def wrapper(model, hidden, start, stop):
        sizes.append(stop - start)
        return function(model, hidden, start, stop)

    return wrapper


@pytest.mark.parametrize(
    "method, temperature, top_k",
    [
        (SamplingMethod.OLMO_TAP, 1.0, 0),
        (SamplingMethod.OLMO_TAP, 0.0, 0),
        (SamplingMethod.VLLM_GUMBEL_MAX, 1.0, 0),
        (SamplingMethod.VLLM_GUMBEL_MAX, 0.7, 5),
    ],
)
def test_verification_block_by_block_gives_identical_metrics(tiny, monkeypatch, method, temperature, top_k):
    tokenizer = LetterTokenizer(10)  # fewer tokens than the model's 12 rows: olmo-tap's sampler cuts the logits
    seqs = sequences_to_verify(tiny, tokenizer)
    options = dict(temperature=temperature, top_k=top_k, top_p=1.0, seed=5, sampling_method=method, head=0)

    def run():
        return verify_outputs(seqs, tiny, tokenizer=tokenizer, verbose=False, **options)

    whole = run()  # 40 positions: one block of LOGIT_BLOCK = 64
    assert whole == [all_at_once(tiny, tokenizer, s, method, temperature, top_k, 5) for s in seqs]
    blocks: list[int] = []  # positions scored at a time
    windows: list[int] = []  # positions projected to logits at a time
    monkeypatch.setattr(outputs_module, "project_block", recording(outputs_module.project_block, blocks))
    project = tiny.project
    monkeypatch.setattr(tiny, "project", lambda hidden, **kw: windows.append(hidden.size(2)) or project(hidden, **kw))
    monkeypatch.setattr(replay, "LOGIT_BLOCK", 3)
    blocked = run()
    assert blocked == whole  # every metric of every token, exactly
    assert max(blocks) == 3 and sum(blocks) == 80
    assert max(windows) == replay.MIN_PROJECT_ROWS  # never the whole sequence's logits at once
    if temperature > 0:
        assert any(m.exact_match for m in whole[0]) and not all(m.exact_match for m in whole[1])


def test_verification_calls_check_stop_between_blocks_and_stops_when_it_raises(tiny, monkeypatch):
    tokenizer = LetterTokenizer(VOCAB)
    seqs = sequences_to_verify(tiny, tokenizer)
    monkeypatch.setattr(replay, "LOGIT_BLOCK", 8)
    calls = []
    options = dict(temperature=1.0, top_k=0, top_p=1.0, seed=5, head=0, tokenizer=tokenizer, verbose=False)
    verify_outputs(seqs, tiny, check_stop=lambda: calls.append(1), **options)
    assert len(calls) == 2 + 2 * math.ceil(40 / 8)  # before each sequence and before each block

    class Stop(Exception):
        pass

    def stop_after_three():
        calls.append(1)
        if len(calls) > 3:
            raise Stop

    calls.clear()
    with pytest.raises(Stop):
        verify_outputs(seqs, tiny, check_stop=stop_after_three, **options)
    assert len(calls) == 4


# ----- 2. a cap on the tokens of one verify or audit request ---------------------------------------------------


def test_verify_and_audit_requests_over_the_token_cap_get_400_before_queuing(tiny):
    with make_client(tiny, max_verify_tokens=50) as client:
        body = verify_body(27)  # 3 + 27 = 30 tokens
        assert client.post("/v1/verify", json=body).status_code == 200
        two = {**body, "outputs": body["outputs"] * 2}  # 60 tokens over two sequences
        refused = client.post("/v1/verify", json=two)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["param"] == "outputs" and error["code"] == "too_many_tokens"
        assert "60 tokens" in error["message"] and "at most 50" in error["message"]

        fits = chat(client, max_tokens=40).json()["trust"]["transcript"]  # 3 + 40 tokens
        assert client.post("/v1/audit", json={"transcript": fits}).json()["honest"] is True
        long = chat(client, max_tokens=60).json()["trust"]["transcript"]  # 3 + 60 tokens
        refused = client.post("/v1/audit", json={"transcript": long})
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["param"] == "transcript" and "63 tokens" in error["message"] and "50" in error["message"]
        assert queue(client)["completed"] == 4  # the refused requests never reached the worker

    with make_client(tiny) as client:  # default: the model's context
        body = verify_body(70)
        two = {**body, "outputs": body["outputs"] * 2}
        refused = client.post("/v1/verify", json=two).json()["error"]
        assert "146 tokens" in refused["message"] and f"at most {CONTEXT}" in refused["message"]


def test_max_verify_tokens_is_a_flag_and_an_environment_variable(monkeypatch):
    from olmo_tap import cli

    assert cli.build_parser().parse_args(["serve"]).max_verify_tokens == ServeConfig().max_verify_tokens == 0
    assert cli.build_parser().parse_args(["serve", "--max-verify-tokens", "900"]).max_verify_tokens == 900
    monkeypatch.setenv("OLMO_TAP_SERVE_MAX_VERIFY_TOKENS", "777")
    assert cli.build_parser().parse_args(["serve"]).max_verify_tokens == 777
    with pytest.raises(ValueError, match="max_verify_tokens"):
        ServeConfig(max_verify_tokens=-1)


# ----- 3. deadlines hold for waiting requests and for every kind of job ----------------------------------------


def test_a_request_waiting_behind_a_long_job_gets_its_503_at_its_own_deadline(tiny, monkeypatch):
    monkeypatch.setattr(app_module, "RUNNING_GRACE_S", 0.5)
    started, release = threading.Event(), threading.Event()

    def stubborn(job, *args):  # one long step that never looks at its deadline (a huge forward pass)
        started.set()
        release.wait(30)
        return {"stubborn": True}

    monkeypatch.setattr(app_module, "run_verify", stubborn)
    app = create_app(tiny, LetterTokenizer(VOCAB), MODEL_ID, ServeConfig(request_timeout_s=1.0))
    with LiveServer(app) as server:

        async def scenario():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                slow = asyncio.create_task(client.post("/v1/verify", json=verify_body()))
                while not started.is_set():
                    await asyncio.sleep(0.01)
                sent = time.monotonic()
                waiting = await client.post("/v1/chat/completions", json={"messages": PROMPT, "max_tokens": 2})
                waited = time.monotonic() - sent
                slow_response = await slow
                answered_while_running = not release.is_set()
                return waiting, waited, slow_response, answered_while_running

        waiting, waited, slow_response, answered_while_running = asyncio.run(scenario())
        assert waiting.status_code == 503 and waiting.json()["error"]["code"] == "timeout"
        assert "waited longer than its time limit" in waiting.json()["error"]["message"]
        assert waited < 2.5  # its own 1 s deadline (plus polling), not the 30 s the job ahead could take
        # The running job that ignores its deadline is answered after the grace, while it still runs.
        assert slow_response.status_code == 503 and answered_while_running
        assert "ran past its time limit" in slow_response.json()["error"]["message"]
        release.set()

        def health() -> dict:
            return httpx.get(server.url + "/health").json()["queue"]

        wait_until(lambda: health()["running"] == 0, "the stubborn job to end")
        assert (health()["timed_out"], health()["completed"]) == (2, 0)  # the waiting chat never ran
        after = httpx.post(server.url + "/v1/chat/completions", json={"messages": PROMPT, "max_tokens": 2})
        assert after.status_code == 200 and health()["completed"] == 1


def slow_blocks(monkeypatch, module, name: str, delay: float) -> None:
    """Make ``module``'s block projection ``name`` take ``delay`` seconds a call (a block)."""
    real = getattr(module, name)

    def slow(*args):
        time.sleep(delay)
        return real(*args)

    monkeypatch.setattr(module, name, slow)


def test_a_running_verification_stops_at_its_deadline_and_the_worker_goes_on(tiny, monkeypatch):
    monkeypatch.setattr(replay, "LOGIT_BLOCK", 1)
    slow_blocks(monkeypatch, outputs_module, "project_block", 0.05)  # 100 positions: 5 s unless it stops
    with make_client(tiny, request_timeout_s=1.0) as client:
        sent = time.monotonic()
        response = client.post("/v1/verify", json=verify_body(100))
        elapsed = time.monotonic() - sent
        assert response.status_code == 503 and response.json()["error"]["code"] == "timeout"
        assert "time limit" in response.json()["error"]["message"] and elapsed < 2.5
        wait_until(lambda: queue(client)["running"] == 0, "the verification to stop", limit_s=2)
        assert queue(client)["timed_out"] == 1
        assert chat(client, max_tokens=3).status_code == 200


def test_a_running_audit_stops_at_its_deadline_and_when_its_client_leaves(tiny, monkeypatch):
    with make_client(tiny, request_timeout_s=1.0) as client:
        transcript = chat(client, max_tokens=40, temperature=1.0, seed=3).json()["trust"]["transcript"]
        monkeypatch.setattr(poe_audit_module, "LOGIT_BLOCK", 1)
        slow_blocks(monkeypatch, poe_audit_module, "project_block", 0.1)  # 41 positions: 4 s unless it stops
        sent = time.monotonic()
        response = client.post("/v1/audit", json={"transcript": transcript})
        assert response.status_code == 503 and time.monotonic() - sent < 2.5
        wait_until(lambda: queue(client)["running"] == 0, "the audit to stop", limit_s=2)
        assert queue(client)["timed_out"] == 1

    tokenizer = LetterTokenizer(VOCAB)

    async def client_leaves():  # the handler cancels a job whose client disconnected: the audit stops too
        engine = Engine(queue_size=2)
        engine.start()
        try:
            body = AuditRequest(transcript=transcript)
            job = engine.submit("audit", lambda job: run_audit(job, tiny, tokenizer, MODEL_ID, transcript, body), 60)
            assert await job.events.get() == ("started", None)
            await asyncio.sleep(0.3)
            engine.cancel(job)
            kind, error = await asyncio.wait_for(job.events.get(), 2)
            assert kind == "error" and isinstance(error, DeadlinePassed) and "client went away" in str(error)
            snapshot = engine.snapshot()
            assert (snapshot["cancelled"], snapshot["completed"]) == (1, 0)
        finally:
            engine.stop()

    asyncio.run(client_leaves())


# ----- 4. whatever a job raises, its request gets a 500 and the worker goes on -----------------------------------


@pytest.mark.parametrize("exc", [SystemExit, KeyboardInterrupt, MemoryError, RuntimeError])
def test_a_job_that_raises_anything_gets_a_500_and_the_next_job_runs(tiny, monkeypatch, exc):
    def explode(job, *args):
        raise exc("/srv/secret/internal/path")

    monkeypatch.setattr(app_module, "run_verify", explode)
    with make_client(tiny) as client:
        response = client.post("/v1/verify", json=verify_body())
        assert response.status_code == 500
        error = response.json()["error"]
        assert (
            error["type"] == "server_error" and error["message"] == f"the model failed on this request ({exc.__name__})"
        )
        assert "secret" not in response.text
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["queue"]["failed"] == 1 and health["queue"]["worker_alive"]
        assert chat(client, max_tokens=2).status_code == 200


# ----- 5. a full queue refuses before the expensive part; prompts are bounded in characters ----------------------


class GatedTokenizer(LetterTokenizer):
    """Counts every encode (the service's check copy included: the counter is the class's) and holds each
    decode (one per emitted token) until ``gate`` opens, so a test can keep the worker and the queue busy."""

    gate = threading.Event()
    encoded = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        GatedTokenizer.encoded += 1
        return super().encode(text, add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        GatedTokenizer.gate.wait(60)
        return super().decode(ids, skip_special_tokens)


def test_a_flood_against_a_full_queue_is_refused_before_tokenising_and_health_stays_fast(tiny):
    GatedTokenizer.gate.clear()
    # one answer at a time: the queue's bound is what is tested (a batch only adds room before it)
    config = ServeConfig(queue_size=2, max_batch=1, max_body_bytes=2_000_000, request_timeout_s=60)
    app = create_app(tiny, GatedTokenizer(VOCAB), MODEL_ID, config)
    huge = {"messages": [{"role": "user", "content": "a" * 1_000_000}], "max_tokens": 2}  # ~1 MB each
    try:
        with LiveServer(app) as server:

            async def scenario():
                limits = httpx.Limits(max_connections=40)
                async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
                    small = {"messages": PROMPT, "max_tokens": 2}
                    held = [asyncio.create_task(client.post("/v1/chat/completions", json=small)) for _ in range(3)]
                    while True:  # one request running (held by the gate), the queue full
                        q = (await client.get("/health")).json()["queue"]
                        if (q["running"], q["waiting"]) == (1, 2):
                            break
                        await asyncio.sleep(0.02)
                    encoded = GatedTokenizer.encoded
                    started = time.monotonic()
                    flood = [asyncio.create_task(client.post("/v1/chat/completions", json=huge)) for _ in range(20)]
                    health_s = []
                    while not all(task.done() for task in flood):
                        sent = time.monotonic()
                        assert (await client.get("/health")).status_code == 200
                        health_s.append(time.monotonic() - sent)
                        await asyncio.sleep(0.01)
                    refused = [task.result() for task in flood]
                    flood_s = time.monotonic() - started
                    tokenised_during_flood = GatedTokenizer.encoded - encoded
                    GatedTokenizer.gate.set()
                    answered = await asyncio.gather(*held)
                    return refused, flood_s, health_s, tokenised_during_flood, answered

            refused, flood_s, health_s, tokenised, answered = asyncio.run(scenario())
            assert [r.status_code for r in refused] == [429] * 20
            assert all(r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"] for r in refused)
            assert tokenised == 0  # refused before the chat template and the tokenizer
            assert flood_s < 10 and max(health_s) < 2, (flood_s, max(health_s))
            assert [r.status_code for r in answered] == [200] * 3

            # With room in the queue, a prompt beyond 32 characters per context token is refused untokenised.
            encoded = GatedTokenizer.encoded
            response = httpx.post(server.url + "/v1/chat/completions", json=huge, timeout=30)
            assert response.status_code == 400 and GatedTokenizer.encoded == encoded
            error = response.json()["error"]
            assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
            assert "1000000 characters" in error["message"] and f"at most {32 * CONTEXT}" in error["message"]
            health = httpx.get(server.url + "/health").json()["queue"]
            assert health["rejected"] == 20 and health["completed"] == 3
    finally:
        GatedTokenizer.gate.set()


# ----- 6. the memory measurement ---------------------------------------------------------------------------------


def test_peak_rss_sees_a_large_allocation():
    """In a fresh process: in this one, memory freed by earlier tests may be reused without raising the RSS."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from olmo_tap.serve.memcheck import PeakRSS\n"
        "with PeakRSS() as peak:\n"
        "    block = torch.ones(64 * 2**20 // 4)\n"  # 64 MiB, written so its pages are resident
        "    del block\n"
        "print(peak.method, peak.growth)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    method, growth = result.stdout.split()
    assert int(growth) >= 48 * 2**20, (method, growth)


def test_memcheck_measures_a_context_length_verify_and_audit(tiny, tmp_path, monkeypatch, capsys):
    from olmo_tap import cli
    from olmo_tap.serve import memcheck

    monkeypatch.setattr(cli, "load_model_and_tokenizer", lambda args: (tiny, LetterTokenizer(VOCAB)))
    out = tmp_path / "memcheck" / "tiny.json"
    assert memcheck.main(["--model", "tiny", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["model"], report["context"], report["tokens"]) == ("tiny", CONTEXT, CONTEXT)
    rows = report["rows"]
    assert [r["check"] for r in rows] == [
        "verify (olmo_tap sampler)",
        "verify (vllm_gumbel_max)",
        "audit (PoE transcript)",
    ]
    assert [r["tokens"] for r in rows] == [CONTEXT, CONTEXT, CONTEXT - 1]  # the audit also scores one more position
    assert rows[2]["all_positions_logits_bytes"] == 4 * (CONTEXT - 1) * VOCAB * 4  # 4 text heads
    assert all(r["peak_rss_growth_bytes"] >= 0 and r["seconds"] >= 0 for r in rows)
    assert "| verify (olmo_tap sampler) | 128 |" in capsys.readouterr().out
