"""The chat service: every endpoint, streaming, the trust object, bad input, the queue under load, disconnects.

A tiny random Hydra (letters as tokens) keeps these fast; in-process tests use FastAPI's TestClient, and the
openai-client, load and disconnect tests a real uvicorn server on a free localhost port. Waits on the server
poll its /health with a generous limit so that nothing can hang; no assertion is about speed.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from olmo_tap.inference.poe import PoE
from olmo_tap.inference.transcript import check_transcript
from olmo_tap.serve.app import create_app
from olmo_tap.serve.config import ServeConfig
from olmo_tap.serve.engine import DeadlinePassed, Engine, QueueFull
from olmo_tap.serve.live import LiveServer
from tests.tiny import LetterTokenizer, tiny_hydra

VOCAB = 12
MODEL_ID = "tiny-letters"
CONTEXT = 128  # tiny_hydra's context
PROMPT = [{"role": "user", "content": "abc"}]


class SlowTokenizer(LetterTokenizer):
    """Each decode (one per emitted token) first waits for ``gate`` and then sleeps ``delay`` seconds, so a
    test can hold the worker on a request or make one outlast a time limit. Module-level gates keep the
    tokenizer deep-copyable."""

    gate = threading.Event()
    delay = 0.0

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        SlowTokenizer.gate.wait(60)
        time.sleep(SlowTokenizer.delay)
        return super().decode(ids, skip_special_tokens)


@pytest.fixture(scope="module")
def tiny():
    return tiny_hydra(vocab=VOCAB, n_heads=4)


@pytest.fixture
def slow_tokenizer():
    SlowTokenizer.gate.set()
    SlowTokenizer.delay = 0.0
    yield SlowTokenizer(VOCAB)
    SlowTokenizer.gate.set()
    SlowTokenizer.delay = 0.0


def make_client(model, tokenizer=None, **config) -> TestClient:
    app = create_app(model, tokenizer or LetterTokenizer(VOCAB), MODEL_ID, ServeConfig(**config))
    # The server answers only Host names of its own (DNS-rebinding protection), not TestClient's "testserver".
    return TestClient(app, base_url="http://localhost", raise_server_exceptions=False)


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"messages": PROMPT, **body})


def sse_events(lines) -> list:
    """The JSON payloads of an SSE body ("[DONE]" kept as a string)."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def wait_until(condition, what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting: {what}")
        time.sleep(0.02)


# ----- endpoints ------------------------------------------------------------------------------------------------


def test_health_models_and_page(tiny):
    with make_client(tiny) as client:
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok" and health.json()["queue"]["worker_alive"]
        assert health.headers["x-request-id"].startswith("req-")
        models = client.get("/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL_ID]
        card = models["data"][0]["olmo_tap"]
        assert (card["n_heads"], card["n_text_heads"], card["context"]) == (4, 4, CONTEXT)
        assert client.get(f"/v1/models/{MODEL_ID}").json()["id"] == MODEL_ID
        assert client.get("/v1/models/gpt-4").json()["error"]["code"] == "model_not_found"
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        for asset in ("/static/app.js", "/static/style.css"):
            assert client.get(asset).status_code == 200
        # a well-formed client request id is kept
        assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"


def test_completion_is_the_jury_answer_with_its_trust(tiny):
    settings = dict(temperature=1.0, seed=7, max_tokens=30, gamma=3, beta=1.0)
    with make_client(tiny) as client:
        response = chat(client, **settings)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = PoE(tiny, LetterTokenizer(VOCAB), gamma=3, max_new_tokens=30, seed=7).generate_with_cache(
        messages=PROMPT, temperature=1.0
    )
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and body["model"] == MODEL_ID
    assert choice["message"] == {"role": "assistant", "content": expected.text, "refusal": None}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 30, "total_tokens": 33}
    trust = body["trust"]
    assert trust["certified"] and not trust["abstained"] and trust["finish_reason"] == "length"
    assert [t["token_id"] for t in trust["tokens"]] == expected.token_ids
    assert "".join(t["text"] for t in trust["tokens"]) == expected.text
    assert [t["stability_radius"] for t in trust["tokens"]] == expected.stability_radii
    assert trust["acceptance"]["n_accepted"] == expected.n_accepted
    assert trust["acceptance"]["n_drafted"] == expected.n_drafted
    assert trust["min_stability_radius"] == min(expected.stability_radii)
    # resampled positions: listed once per rejected draft, and flagged on their token
    assert trust["n_resampled"] == len(expected.resampled_idxs) > 0
    flagged = [t["index"] for t in trust["tokens"] if t["resampled"]]
    assert flagged == [r["index"] for r in trust["resampled"]] == [i - 1 for i in expected.resampled_idxs]
    for r in trust["resampled"]:
        token = trust["tokens"][r["index"]]
        assert token["draft_token_id"] == r["draft_token_id"] != token["token_id"]
        assert r["validity_radius"] >= 1 and 0 <= r["suppression_score"] <= 1
    assert trust["seed"] == 7 and trust["settings"]["gamma"] == 3 and trust["settings"]["temperature"] == 1.0
    transcript = check_transcript(trust["transcript"])
    assert transcript["model"] == MODEL_ID and transcript["token_ids"] == expected.token_ids


def test_stream_sends_each_token_with_its_trust(tiny):
    request = {"messages": PROMPT, "temperature": 1.0, "seed": 7, "max_tokens": 30, "stream": True}
    with make_client(tiny) as client:
        whole = chat(client, temperature=1.0, seed=7, max_tokens=30).json()
        with client.stream(
            "POST", "/v1/chat/completions", json={**request, "stream_options": {"include_usage": True}}
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    tokens = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is None and "trust" in c]
    assert [c["trust"]["index"] for c in tokens] == list(range(30))
    for c in tokens:
        assert c["choices"][0]["delta"]["content"] == c["trust"]["text"]
        assert {"entropy", "stability_radius", "stability_margin", "resampled", "validity_radius"} <= set(c["trust"])
    final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert final["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    # the last chunk's trust is the whole answer's (transcript included), equal to the non-streamed one
    assert final["trust"]["tokens"] == whole["trust"]["tokens"]
    assert final["trust"]["transcript"]["token_ids"] == whole["trust"]["transcript"]["token_ids"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 30


def test_settings_reach_the_decoder(tiny):
    with make_client(tiny) as client:
        single = chat(client, mode="single", draft_head=2, temperature=0, max_tokens=5).json()["trust"]
        veto = chat(client, veto_threshold=0.999, temperature=1.0, seed=1, max_tokens=5).json()
        default = chat(client).json()
    assert single["mode"] == "single" and single["draft_head"] == 2 and not single["certified"]
    # a veto no token can pass: the jury abstains at once, and says so in OpenAI's terms too
    assert veto["trust"]["abstained"] and veto["choices"][0]["finish_reason"] == "content_filter"
    assert veto["choices"][0]["message"]["content"] == ""
    # no max_tokens: the server's default, capped by the context (3 prompt tokens of 128)
    assert default["usage"]["completion_tokens"] == min(ServeConfig().default_max_tokens, CONTEXT - 3)
    assert default["trust"]["settings"]["temperature"] == ServeConfig().default_temperature


def test_audit_endpoint_replays_a_served_transcript(tiny):
    with make_client(tiny) as client:
        answer = chat(client, temperature=1.0, seed=11, max_tokens=20).json()
        transcript = answer["trust"]["transcript"]
        assert answer["trust"]["n_resampled"] > 0  # the replay has rejections to re-take, not only accepts
        report = client.post("/v1/audit", json={"transcript": transcript}).json()
        assert report["honest"] is True and report["ending_consistent"] and report["inconsistent_positions"] == []
        assert report["audited_against"] == MODEL_ID
        # another answer's tokens under this transcript's seed: the jury would not have written them
        other = chat(client, temperature=1.0, seed=12, max_tokens=20).json()["trust"]["transcript"]
        forged = {**transcript, "token_ids": other["token_ids"], "output": other["output"]}
        assert client.post("/v1/audit", json={"transcript": forged}).json()["honest"] is False
        wrong_split = {**transcript, "settings": {**transcript["settings"], "n_heads": 9}}
        for bad in ({"format": "nope"}, wrong_split):
            response = client.post("/v1/audit", json={"transcript": bad})
            assert response.status_code == 400 and response.json()["error"]["param"] == "transcript"
        # the forger's edits, one at a time: each is caught and named
        assert report["digest"] == answer["trust"]["digest"] == transcript["digest"]
        edited_text = copy.deepcopy(transcript)
        edited_text["output"]["output_parts"][3] = " PWNED"
        report = client.post("/v1/audit", json={"transcript": edited_text}).json()
        assert report["honest"] is False
        assert [m["field"] for m in report["field_mismatches"]] == ["output.output_parts[3]"]
        edited_token = copy.deepcopy(transcript)
        edited_token["token_ids"][5] = (edited_token["token_ids"][5] + 1) % VOCAB
        report = client.post("/v1/audit", json={"transcript": edited_token}).json()
        assert report["honest"] is False and 5 in report["inconsistent_positions"]
        assert any(m["field"] == "digest" for m in report["field_mismatches"])
        for name, value in (("max_new_tokens", "5"), ("seed", None), ("temperature", -1)):
            broken = {**transcript, "settings": {**transcript["settings"], name: value}}
            response = client.post("/v1/audit", json={"transcript": broken})
            assert response.status_code == 400 and name in response.json()["error"]["message"]
        single = chat(client, mode="single", temperature=1.0, seed=11, max_tokens=20).json()["trust"]["transcript"]
        report = client.post("/v1/audit", json={"transcript": single}).json()
        assert report["honest"] is True and report["jury"] is False and "not the jury" in report["label"]


def test_verify_endpoint_scores_claimed_tokens(tiny):
    with make_client(tiny) as client:
        trust = chat(client, mode="single", draft_head=1, temperature=1.0, seed=3, max_tokens=20).json()["trust"]
        claimed = {
            "prompt_token_ids": trust["transcript"]["prompt_ids"],
            "output_token_ids": trust["transcript"]["token_ids"],
        }
        request = {"temperature": 1.0, "seed": 3, "sampling_method": "olmo_tap", "head": 1}
        honest = client.post("/v1/verify", json={**request, "outputs": [claimed]}).json()
        assert honest["summary"]["total_tokens"] == 20 and honest["summary"]["exact_match_rate"] == 1.0
        assert honest["verdict"]["honest"] is True and len(honest["results"][0]) == 20
        shifted = {**claimed, "output_token_ids": [(t + 1) % VOCAB for t in claimed["output_token_ids"]]}
        forged = client.post("/v1/verify", json={**request, "outputs": [shifted]}).json()
        assert forged["verdict"]["honest"] is False and forged["summary"]["exact_match_rate"] < 0.5
        out_of_vocab = {**claimed, "output_token_ids": [VOCAB + 5]}
        response = client.post("/v1/verify", json={**request, "outputs": [out_of_vocab]})
        assert response.status_code == 400 and "vocabulary" in response.json()["error"]["message"]
        response = client.post("/v1/verify", json={**request, "head": 7, "outputs": [claimed]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "head"
        response = client.post("/v1/verify", json={"outputs": [claimed]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"


def test_verify_endpoint_names_an_edited_token_under_the_exact_rule(tiny):
    with make_client(tiny) as client:
        transcript = chat(client, mode="single", draft_head=1, temperature=1.0, seed=3, max_tokens=20).json()["trust"][
            "transcript"
        ]
        tokens = transcript["token_ids"]
        edited = (tokens[-1] + 1) % VOCAB
        claimed = {"prompt_token_ids": transcript["prompt_ids"], "output_token_ids": [*tokens[:-1], edited]}
        request = {"temperature": 1.0, "seed": 3, "sampling_method": "olmo_tap", "head": 1, "outputs": [claimed]}
        # olmo-tap's sampler: the exact rule by default, and the edited last token is named
        verdict = client.post("/v1/verify", json=request).json()["verdict"]
        assert verdict["rule"] == "exact" and verdict["honest"] is False and verdict["n_agreeing"] == 19
        assert [(m["sequence"], m["index"], m["claimed"]) for m in verdict["not_reproduced"]] == [(0, 19, edited)]
        assert "sequence 0 token 19: claimed" in verdict["reason"]
        # the statistical rule pools the evidence: 19 of 20 tokens pass its test
        statistical = client.post("/v1/verify", json={**request, "rule": "statistical"}).json()["verdict"]
        assert statistical["rule"] == "statistical" and statistical["honest"] is True
        assert statistical["not_reproduced"] is None
        response = client.post("/v1/verify", json={**request, "threshold": 0.9})
        assert response.status_code == 400 and "statistical rule" in response.json()["error"]["message"]


def test_multiple_choice_reports_the_uncertainty_heads_p_correct():
    model = tiny_hydra(vocab=VOCAB, n_heads=5, seed=1)
    model.uncertainty_head = 4  # the last head scores answers; the other four decode
    with make_client(model) as client:
        assert client.get("/v1/models").json()["data"][0]["olmo_tap"]["n_text_heads"] == 4
        trust = chat(client, mcq=True, temperature=0, max_tokens=4).json()["trust"]
        plain = chat(client, temperature=0, max_tokens=4).json()["trust"]
    assert trust["mcq"] and 0 < trust["p_correct"] < 1 and len(trust["verifier_heads"]) == 3
    assert not plain["mcq"] and plain["p_correct"] is None


# ----- bad input ------------------------------------------------------------------------------------------------

MESSAGES = {"messages": PROMPT}


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b'{"messages": [', 400, None),  # malformed JSON
        (b"[1, 2]", 400, None),  # not an object
        (b"", 400, None),  # no body
        ({}, 400, "messages"),  # missing field
        ({"messages": []}, 400, "messages"),
        ({"messages": "hello"}, 400, "messages"),  # wrong type
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, 400, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "  "}]}, 400, "messages"),
        ({**MESSAGES, "temperature": "hot"}, 400, "temperature"),
        ({**MESSAGES, "temperature": -1}, 400, "temperature"),
        ({**MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
        ({**MESSAGES, "max_tokens": CONTEXT}, 400, "max_tokens"),  # beyond the context left after the prompt
        ({**MESSAGES, "max_completion_tokens": 10_000}, 400, "max_completion_tokens"),
        ({**MESSAGES, "seed": -3}, 400, "seed"),
        ({**MESSAGES, "stream": "yes please"}, 400, "stream"),
        ({**MESSAGES, "top_p": 0.5}, 400, "top_p"),
        ({**MESSAGES, "n": 2}, 400, "n"),
        ({**MESSAGES, "stop": ["\n"]}, 400, "stop"),
        ({**MESSAGES, "gamma": 0}, 400, "gamma"),
        ({**MESSAGES, "veto_threshold": 1.5}, 400, "veto_threshold"),
        ({**MESSAGES, "draft_head": 4}, 400, "draft_head"),
        ({**MESSAGES, "mode": "vote"}, 400, "mode"),
        ({**MESSAGES, "model": "gpt-4"}, 404, "model"),
        ({"messages": [{"role": "user", "content": "abc" * 200}]}, 400, "messages"),  # longer than the context
    ],
)
def test_bad_requests_get_an_openai_error_naming_the_field(tiny, body, status, param):
    with make_client(tiny) as client:
        if isinstance(body, bytes):
            response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        else:
            response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["param"] == param and error["message"] and error["type"].endswith("error")
        if param is not None:
            assert param in error["message"]
        assert client.get("/health").json()["status"] == "ok"
        assert chat(client, max_tokens=2).status_code == 200  # still answering


def test_huge_bodies_get_413(tiny):
    with make_client(tiny, max_body_bytes=10_000) as client:
        huge = {"messages": [{"role": "user", "content": "a" * 20_000}]}
        declared = client.post("/v1/chat/completions", json=huge)
        assert declared.status_code == 413 and "10000 bytes" in declared.json()["error"]["message"]

        def chunked():  # no Content-Length: the limit is enforced while the body streams in
            data = json.dumps(huge).encode()
            for i in range(0, len(data), 4096):
                yield data[i : i + 4096]

        streamed = client.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and streamed.json()["error"]["type"] == "invalid_request_error"
        assert chat(client, max_tokens=2).status_code == 200


def test_time_limit_cuts_an_answer_short_and_says_so(tiny, slow_tokenizer):
    SlowTokenizer.delay = 0.05  # 100 tokens need >= 5 s; the limit is 1 s
    with make_client(tiny, slow_tokenizer, request_timeout_s=1.0) as client:
        body = chat(client, max_tokens=100).json()
        health = client.get("/health").json()["queue"]
        wait_until(lambda: client.get("/health").json()["queue"]["running"] == 0, "the worker to be free")
    trust = body["trust"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert trust["finish_reason"] == "time_limit" and not trust["certified"]
    assert 0 < body["usage"]["completion_tokens"] < 100
    assert health["timed_out"] == 1


# ----- the engine -----------------------------------------------------------------------------------------------


def test_engine_queue_is_bounded_and_cancelling_frees_a_slot():
    async def scenario():
        engine = Engine(queue_size=3)
        engine.start()
        hold, ran = threading.Event(), []

        def blocking(job):
            hold.wait(30)
            ran.append(job.request_id)
            return job.request_id

        def boom(job):
            raise RuntimeError("a job that fails")

        try:
            first = engine.submit("first", blocking, 60)
            assert await first.events.get() == ("started", None)
            waiting = [engine.submit(f"w{i}", blocking, 60) for i in range(2)]
            failing = engine.submit("boom", boom, 60)
            with pytest.raises(QueueFull) as full:
                engine.submit("refused", blocking, 60)
            assert full.value.retry_after_s >= 1
            engine.cancel(waiting[0])  # a client that left: its slot is free at once
            assert engine.snapshot()["waiting"] == 2
            late = engine.submit("late", blocking, 0.01)  # its deadline passes while it waits
            with pytest.raises(QueueFull):
                engine.submit("refused-again", blocking, 60)
            await asyncio.sleep(0.05)
            hold.set()
            assert (await first.events.get())[0] == "done"
            assert [e async for e in drain(waiting[1])][-1] == ("done", "w1")
            assert (await next_non_start(failing))[0] == "error"
            kind, error = await late.events.get()
            assert kind == "error" and isinstance(error, DeadlinePassed)
            snap = engine.snapshot()
            assert ran == ["first", "w1"]  # the cancelled job never ran
            assert (snap["completed"], snap["failed"], snap["cancelled"], snap["timed_out"]) == (2, 1, 1, 1)
            assert snap["rejected"] == 2 and snap["worker_alive"] and snap["waiting"] == 0
        finally:
            hold.set()
            engine.stop()

    async def drain(job):
        while True:
            event = await job.events.get()
            yield event
            if event[0] in ("done", "error"):
                return

    async def next_non_start(job):
        while (event := await job.events.get())[0] == "started":
            pass
        return event

    asyncio.run(scenario())


# ----- a real server: the openai client, disconnects, load ------------------------------------------------------


def test_openai_client_gets_a_completion_and_a_stream(tiny):
    with LiveServer(create_app(tiny, LetterTokenizer(VOCAB), MODEL_ID)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL_ID]
        completion = client.chat.completions.create(
            model=MODEL_ID, messages=PROMPT, temperature=1.0, seed=5, max_tokens=12, extra_body={"gamma": 2}
        )
        text = completion.choices[0].message.content
        assert len(text) == 12 and completion.usage.completion_tokens == 12
        assert completion.trust["settings"]["gamma"] == 2 and completion.trust["seed"] == 5
        stream = client.chat.completions.create(
            model=MODEL_ID, messages=PROMPT, temperature=1.0, seed=5, max_tokens=12, stream=True
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert chunks[-1].choices[0].finish_reason == "length"
        token_chunks = [c for c in chunks if c.choices and c.choices[0].finish_reason is None][1:]  # [0]: the role
        assert [c.trust["index"] for c in token_chunks] == list(range(12))
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model=MODEL_ID, messages=PROMPT, max_tokens=10_000)
        assert bad.value.body["param"] == "max_tokens"


def test_a_client_that_disconnects_frees_its_slot(tiny, slow_tokenizer):
    SlowTokenizer.delay = 0.02  # 100 tokens take >= 2 s: the disconnect comes long before the end
    with LiveServer(create_app(tiny, slow_tokenizer, MODEL_ID, ServeConfig(queue_size=1))) as server:

        def queue() -> dict:
            return httpx.get(server.url + "/health").json()["queue"]

        request = {"messages": PROMPT, "max_tokens": 100, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=request, timeout=30) as response:
            lines = response.iter_lines()
            while not next(lines).startswith('data: {"id"'):
                pass
            assert queue()["running"] == 1
        wait_until(lambda: queue()["running"] == 0, "the streamed request to stop after its client left")
        assert queue()["cancelled"] == 1 and queue()["completed"] == 0
        # a non-streamed request whose client gives up waiting is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json={**request, "stream": False}, timeout=0.5)
        wait_until(lambda: queue()["cancelled"] == 2 and queue()["running"] == 0, "the second cancellation")
        SlowTokenizer.delay = 0.0
        after = httpx.post(server.url + "/v1/chat/completions", json={"messages": PROMPT, "max_tokens": 3})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3
        assert queue()["completed"] == 1


@pytest.mark.parametrize("max_batch", [1, 4])
def test_fifty_concurrent_clients_get_an_answer_or_a_clean_refusal(tiny, slow_tokenizer, max_batch):
    n_clients, queue_size, max_tokens = 50, 3, 6
    SlowTokenizer.gate.clear()  # the worker holds the first request until every client has been answered or queued
    config = ServeConfig(queue_size=queue_size, max_batch=max_batch, request_timeout_s=120)
    app = create_app(tiny, slow_tokenizer, MODEL_ID, config)
    with LiveServer(app) as server:

        async def one_client(i: int, client: httpx.AsyncClient):
            body = {"messages": PROMPT, "max_tokens": max_tokens, "seed": i, "temperature": 1.0, "stream": i % 2 == 0}
            response = await client.post("/v1/chat/completions", json=body)
            return i, response

        async def health(client: httpx.AsyncClient) -> dict:
            response = await client.get("/health")
            assert response.status_code == 200 and response.json()["status"] == "ok"
            return response.json()["queue"]

        async def scenario():
            limits = httpx.Limits(max_connections=n_clients + 5)
            async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
                tasks = [asyncio.create_task(one_client(i, client)) for i in range(n_clients)]
                deadline = time.monotonic() + 60
                while True:  # every request has arrived: one running, the queue full, the rest refused
                    q = await health(client)
                    if q["running"] + q["waiting"] + q["rejected"] == n_clients:
                        break
                    assert time.monotonic() < deadline, f"requests never all arrived: {q}"
                    await asyncio.sleep(0.05)
                SlowTokenizer.gate.set()
                results = await asyncio.gather(*tasks)
                while (q := await health(client))["running"]:  # the worker lets go just after its last answer
                    assert time.monotonic() < deadline + 60, f"the worker never became free: {q}"
                    await asyncio.sleep(0.05)
                return results, q

        results, after = asyncio.run(scenario())
        answered = [(i, r) for i, r in results if r.status_code == 200]
        refused = [r for _, r in results if r.status_code != 200]
        # in flight at most: a full batch and the queue behind it
        assert len(answered) == max_batch + queue_size and len(refused) == n_clients - max_batch - queue_size
        for r in refused:
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
        for i, r in answered:
            if i % 2 == 0:
                events = sse_events(r.text.splitlines())
                assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
                assert events[-2]["trust"]["n_tokens"] == max_tokens
            else:
                assert r.json()["usage"]["completion_tokens"] == max_tokens
        assert (after["running"], after["waiting"], after["completed"]) == (0, 0, max_batch + queue_size)
        final = httpx.post(server.url + "/v1/chat/completions", json={"messages": PROMPT, "max_tokens": 2})
        assert final.status_code == 200


def test_the_server_loads_its_model_on_a_thread_that_ends():
    """``olmo-tap serve`` loads and prepacks off the main thread, on a thread that is gone before decoding
    starts (so the worker's OpenMP pool is the only one); its result comes back, its errors are raised here."""
    from olmo_tap.serve.cli import on_passing_thread

    seen: list[threading.Thread] = []

    def load() -> int:
        seen.append(threading.current_thread())
        return 7

    assert on_passing_thread(load) == 7
    assert seen[0] is not threading.main_thread() and not seen[0].is_alive()

    def fail() -> None:
        raise ValueError("no such model: 'nope'")

    with pytest.raises(ValueError, match="no such model"):
        on_passing_thread(fail)
