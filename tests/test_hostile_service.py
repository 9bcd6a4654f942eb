"""Hostile input against the chat service: each test sends it and checks the safe outcome (a clear 4xx in the
project's error format, or an answer that is still valid), and that the service keeps answering.

Cross-site requests (Content-Type, Host, CORS), paths hidden from clients, logprobs as the jury's numbers,
refused and unknown fields, non-finite numbers in and out, forged log lines, echoed input, /docs off.
A tiny random Hydra (letters as tokens) keeps these fast; FastAPI's TestClient runs the app in-process.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from fastapi.testclient import TestClient

from olmo_tap import cli
from olmo_tap.inference.poe import PoE
from olmo_tap.serve.app import create_app
from olmo_tap.serve.cli import exposure_warnings
from olmo_tap.serve.config import ServeConfig, public_model_id
from olmo_tap.serve.middleware import client_request_id, log_safe
from olmo_tap.serve.responses import ZERO_PROB_LOGPROB, sse, token_bytes
from tests.tiny import LetterTokenizer, tiny_hydra

VOCAB = 12
MODEL_ID = "tiny-letters"
PROMPT = [{"role": "user", "content": "abc"}]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def tiny():
    return tiny_hydra(vocab=VOCAB, n_heads=4)


def make_client(model, model_id: str = MODEL_ID, **config) -> TestClient:
    app = create_app(model, LetterTokenizer(VOCAB), model_id, ServeConfig(**config))
    return TestClient(app, base_url="http://localhost", raise_server_exceptions=False)


def chat(client, **body):
    return client.post(CHAT, json={"messages": PROMPT, "max_tokens": 2, **body})


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as every JSON parser but Python's does."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def sse_payloads(text: str) -> list:
    return [
        line.removeprefix("data: ") if line == "data: [DONE]" else strict_json(line.removeprefix("data: "))
        for line in text.splitlines()
        if line.startswith("data: ")
    ]


def assert_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = strict_json(response.text)["error"]
    assert error["message"] and error["type"].endswith("error")
    if param is not None:
        assert error["param"] == param and param in error["message"]
    return error


# ----- 1. cross-site requests -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/json"],
)
def test_a_body_not_declared_as_json_gets_415(tiny, content_type):
    body = json.dumps({"messages": PROMPT, "max_tokens": 2}).encode()
    headers = {} if content_type is None else {"content-type": content_type}
    with make_client(tiny) as client:
        for path in (CHAT, "/v1/verify", "/v1/audit"):
            error = assert_error(client.post(path, content=body, headers=headers), 415)
            assert "application/json" in error["message"]
        assert client.get("/health").json()["queue"]["completed"] == 0  # nothing reached the model
        declared = client.post(CHAT, content=body, headers={"content-type": "Application/JSON; charset=utf-8"})
        assert declared.status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io"])
def test_a_foreign_host_header_gets_400(tiny, host):
    with make_client(tiny) as client:
        for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", CHAT)):
            response = client.request(method, path, json={"messages": PROMPT}, headers={"host": host})
            error = assert_error(response, 400)
            assert error["code"] == "invalid_host" and "--allowed-hosts" in error["message"]
        assert client.get("/health").json()["queue"]["completed"] == 0


def test_loopback_names_the_bind_address_and_allowed_hosts_are_answered(tiny):
    with make_client(tiny, host="10.1.2.3", allowed_hosts=("chat.example", "*.lab.example")) as client:
        for host in ("localhost", "localhost:8000", "127.0.0.1:9", "[::1]:8000", "10.1.2.3:8000", "CHAT.example:443"):
            assert client.get("/health", headers={"host": host}).status_code == 200, host
        assert client.get("/health", headers={"host": "gpu.lab.example"}).status_code == 200
        for host in ("10.1.2.4", "lab.example.evil", "chat.example.evil", "[::2]"):
            assert client.get("/health", headers={"host": host}).status_code == 400, host


def test_listening_on_every_interface_answers_addresses_but_only_allowed_names(tiny):
    with make_client(tiny, host="0.0.0.0", allowed_hosts=("box.local",)) as client:
        for host in ("192.168.1.5:8000", "[fe80::1]:8000", "0.0.0.0:8000", "box.local", "localhost"):
            assert client.get("/health", headers={"host": host}).status_code == 200, host
        assert client.get("/health", headers={"host": "rebind.evil.example"}).status_code == 400
    with make_client(tiny, allowed_hosts=("*",)) as client:  # the operator turned the check off
        assert client.get("/health", headers={"host": "anything.example"}).status_code == 200
    warnings = " ".join(exposure_warnings(ServeConfig(host="0.0.0.0", allowed_hosts=("*",), cors_origins=("*",))))
    assert "every interface" in warnings and "DNS rebinding" in warnings and "every web page" in warnings
    assert exposure_warnings(ServeConfig()) == []


def test_no_cors_headers_unless_origins_are_named(tiny):
    preflight = {
        "origin": "https://evil.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type",
    }
    with make_client(tiny) as client:
        response = client.options(CHAT, headers=preflight)
        assert not any(name.startswith("access-control-") for name in response.headers)
        simple = client.get("/v1/models", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in simple.headers
    with make_client(tiny, cors_origins=("https://app.example",)) as client:
        allowed = client.options(CHAT, headers={**preflight, "origin": "https://app.example"})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        refused = client.options(CHAT, headers=preflight)
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        answer = client.post(
            CHAT, json={"messages": PROMPT, "max_tokens": 2}, headers={"origin": "https://app.example"}
        )
        assert answer.headers["access-control-allow-origin"] == "https://app.example"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("allowed_hosts", ("*evil",)),
        ("allowed_hosts", ("a.*.example",)),
        ("allowed_hosts", ("",)),
        ("cors_origins", ("https://app.example/",)),
        ("cors_origins", ("app.example",)),
    ],
)
def test_bad_host_patterns_and_origins_are_refused_at_start(setting, value):
    with pytest.raises(ValueError, match=r"allowed host|CORS origin"):
        ServeConfig(**{setting: value})


def test_the_flags_and_their_environment_variables(monkeypatch):
    monkeypatch.setenv("OLMO_TAP_SERVE_ALLOWED_HOSTS", "chat.example, *.lab.example,")
    monkeypatch.setenv("OLMO_TAP_SERVE_DOCS", "yes")
    args = cli.build_parser().parse_args(["serve", "--cors-origins", "https://a.example,http://localhost:3000"])
    assert args.allowed_hosts == ("chat.example", "*.lab.example")
    assert args.cors_origins == ("https://a.example", "http://localhost:3000") and args.docs is True
    monkeypatch.delenv("OLMO_TAP_SERVE_DOCS")
    assert cli.build_parser().parse_args(["serve"]).docs is False
    assert cli.build_parser().parse_args(["serve", "--docs"]).docs is True
    monkeypatch.setenv("OLMO_TAP_SERVE_DOCS", "perhaps")
    assert "OLMO_TAP_SERVE_DOCS" in " ".join(cli.build_parser().parse_args(["serve"]).env_errors)


def test_a_model_given_as_a_path_is_shown_by_its_base_name(tiny, caplog, tmp_path):
    secret = tmp_path / "home" / "alice" / "private-runs" / "jury"
    secret.mkdir(parents=True)
    caplog.set_level(logging.INFO, logger="olmo_tap.serve")
    with make_client(tiny, model_id=str(secret) + "/") as client:
        seen = [
            client.get("/v1/models").text,
            client.get("/v1/models/jury").text,
            client.get("/health").text,
            chat(client).text,
            client.post(CHAT, json={"messages": PROMPT, "model": "other"}).text,
            client.get("/v1/models/other").text,
        ]
        assert client.get("/v1/models").json()["data"][0]["id"] == "jury"
        answer = chat(client, model="jury").json()
        assert answer["model"] == "jury" and answer["trust"]["transcript"]["model"] == "jury"
    for text in [*seen, *(r.getMessage() for r in caplog.records)]:
        assert "alice" not in text and "private-runs" not in text
    assert public_model_id("smollm2-135m-instruct") == "smollm2-135m-instruct"  # a preset keeps its name
    assert public_model_id("allenai/OLMo-2-0425-1B") == "allenai/OLMo-2-0425-1B"  # so does a hub id
    assert public_model_id("~/models/q4.gguf") == "q4.gguf"
    assert public_model_id("/srv/a/b/c") == "c" and public_model_id("C:\\Users\\bob\\m") == "m"


# ----- 2. OpenAI's fields: logprobs, and the refused ones ------------------------------------------------------


def single_head_logits(model, prompt_ids: list[int], token_ids: list[int], head: int) -> torch.Tensor:
    """The head's logits for each answer token, from one uncached pass over prompt + answer."""
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(ids, head_indices=[head])[0, 0].float()
    return logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(token_ids), :VOCAB]


def test_logprobs_of_a_single_head_greedy_answer_are_its_softmax(tiny):
    request = dict(mode="single", draft_head=1, temperature=0, max_tokens=8, logprobs=True, top_logprobs=5)
    with make_client(tiny) as client:
        body = strict_json(chat(client, **request).text)
        streamed = client.post(CHAT, json={"messages": PROMPT, **request, "stream": True})
    tokens = body["trust"]["transcript"]["token_ids"]
    prompt = body["trust"]["transcript"]["prompt_ids"]
    expected = torch.log_softmax(single_head_logits(tiny, prompt, tokens, head=1), dim=-1)
    content = body["choices"][0]["logprobs"]["content"]
    assert body["choices"][0]["logprobs"]["refusal"] is None and len(content) == len(tokens) == 8
    for entry, token, row in zip(content, tokens, expected, strict=True):
        letter = LetterTokenizer(VOCAB).decode([token])
        assert entry["token"] == letter and entry["bytes"] == list(letter.encode())
        assert entry["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        best = torch.topk(row, 5)
        assert [LetterTokenizer(VOCAB).decode([i]) for i in best.indices.tolist()] == [
            t["token"] for t in entry["top_logprobs"]
        ]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert entry["top_logprobs"][0]["token"] == letter  # greedy: the emitted token is the most likely
    # streamed: each token's chunk carries its own entry, the same numbers
    chunks = [c for c in sse_payloads(streamed.text) if isinstance(c, dict) and c["choices"]]
    per_token = [c["choices"][0]["logprobs"]["content"] for c in chunks if c["choices"][0]["logprobs"]]
    assert all(len(entries) == 1 for entries in per_token)
    assert [entries[0] for entries in per_token] == content
    assert all("logprob" not in c.get("trust", {}) for c in chunks)  # the numbers live in OpenAI's place only


def test_poe_logprobs_are_the_jurys_distribution_after_the_veto(tiny):
    with make_client(tiny) as client:
        soft = strict_json(chat(client, temperature=1.0, seed=4, max_tokens=12, logprobs=True, top_logprobs=5).text)
        vetoed = strict_json(
            chat(
                client, temperature=1.0, seed=4, max_tokens=12, veto_threshold=0.05, logprobs=True, top_logprobs=20
            ).text
        )
        without = chat(client, temperature=1.0, seed=4, max_tokens=12).json()
    # asking for logprobs changes no token
    assert soft["trust"]["transcript"]["token_ids"] == without["trust"]["transcript"]["token_ids"]
    for entry in soft["choices"][0]["logprobs"]["content"]:
        top = entry["top_logprobs"]
        assert len(top) == 5 and sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-6
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        if entry["token"] in [t["token"] for t in top]:
            assert next(t for t in top if t["token"] == entry["token"])["logprob"] == entry["logprob"]
        else:
            assert entry["logprob"] <= top[-1]["logprob"]
    # with a veto: every token of the vocabulary listed (20 > 12), the vetoed ones at OpenAI's -9999.0
    seen_vetoed = False
    for entry in vetoed["choices"][0]["logprobs"]["content"]:
        top = entry["top_logprobs"]
        assert len(top) == VOCAB and entry["logprob"] > ZERO_PROB_LOGPROB
        assert sum(math.exp(t["logprob"]) for t in top) == pytest.approx(1.0, abs=1e-5)
        seen_vetoed |= any(t["logprob"] == ZERO_PROB_LOGPROB for t in top)
    assert seen_vetoed


def test_poe_option_top_logprobs_is_checked(tiny):
    for bad in (-1, 21, 2.5):
        with pytest.raises(ValueError, match="top_logprobs"):
            PoE(tiny, LetterTokenizer(VOCAB), top_logprobs=bad)
    events = list(PoE(tiny, LetterTokenizer(VOCAB), max_new_tokens=3, seed=1).stream(messages=PROMPT))
    assert all(e.logprob is None and e.top_logprobs is None for e in events)  # not asked for: nothing computed


def test_token_bytes_of_a_partial_character():
    class ByteLevel:  # GPT-2-style pieces: "âĤ" is the bytes E2 82, the start of "€"
        def decode(self, ids):
            return "\ufffd"

        def convert_ids_to_tokens(self, token_id):
            return "âĤ" if token_id == 0 else "<0xAC>"

    assert token_bytes(ByteLevel(), 0) == ("\ufffd", [0xE2, 0x82])
    assert token_bytes(ByteLevel(), 1) == ("\ufffd", [0xAC])  # SentencePiece's byte fallback
    assert token_bytes(LetterTokenizer(VOCAB), 3) == ("d", [ord("d")])


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"logit_bias": {"3": 5}}, "logit_bias"),
        ({"n": 3}, "n"),
        ({"stop": "x"}, "stop"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"surprise": 1}, "surprise"),  # unknown: refused, not dropped
        ({"stream_options": {"include_usage": True, "extra": 1}}, "stream_options.extra"),
        ({"messages": [{"role": "user", "content": "abc", "tool_calls": [{"id": "1"}]}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": "abc", "colour": "red"}]}, "messages[0].colour"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "abc", "x": 1}]}]},
            "messages[0].content[0].x",
        ),
    ],
)
def test_fields_the_jury_does_not_honour_are_refused_by_name(tiny, extra, param):
    with make_client(tiny) as client:
        error = assert_error(chat(client, **extra), 400)
        assert error["param"].startswith(param) and param.split(".")[0].split("[")[0] in error["message"]
        assert chat(client).status_code == 200


def test_harmless_openai_fields_are_accepted(tiny):
    echoed = {"role": "assistant", "content": "ab", "refusal": None, "annotations": [], "tool_calls": None}
    messages = [*PROMPT, echoed, {"role": "user", "content": "cd"}]
    with make_client(tiny) as client:
        for extra in (
            {"response_format": {"type": "text"}},
            {"tool_choice": "none", "tools": [], "logit_bias": {}, "stop": None, "n": 1, "user": "u1"},
            {"messages": messages},
            {"logprobs": False},
        ):
            response = chat(client, **extra)
            assert response.status_code == 200, (extra, response.text)
            assert response.json()["choices"][0]["logprobs"] is None


# ----- 3. non-finite numbers: refused coming in, never invalid JSON going out ----------------------------------


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ('"temperature": NaN', "temperature"),
        ('"temperature": Infinity', "temperature"),
        ('"beta": -Infinity', "beta"),
        ('"veto_threshold": 1e999', "veto_threshold"),
        ('"presence_penalty": NaN', "presence_penalty"),
        ('"logit_bias": {"3": NaN}', "logit_bias.3"),
    ],
)
def test_non_finite_numbers_in_a_request_are_refused_by_name(tiny, raw, param):
    body = '{"messages": [{"role": "user", "content": "abc"}], "max_tokens": 2, ' + raw + "}"
    with make_client(tiny) as client:
        error = assert_error(client.post(CHAT, content=body, headers={"content-type": "application/json"}), 400)
        assert error["param"] == param and "finite" in error["message"]


def test_non_finite_numbers_in_verify_and_audit_requests_are_refused(tiny):
    headers = {"content-type": "application/json"}
    with make_client(tiny) as client:
        transcript = chat(client, temperature=1.0, seed=2, max_tokens=4).json()["trust"]["transcript"]
        outputs = '{"outputs": [{"prompt_token_ids": [1], "output_token_ids": [2]}], '
        verify = outputs + '"temperature": NaN}'
        assert_error(client.post("/v1/verify", content=verify, headers=headers), 400, "temperature")
        verify = outputs + '"temperature": 1, "margin_tolerance": Infinity}'
        assert_error(client.post("/v1/verify", content=verify, headers=headers), 400, "margin_tolerance")
        raw = json.dumps({"transcript": transcript}).replace('"temperature": 1.0', '"temperature": NaN', 1)
        error = assert_error(client.post("/v1/audit", content=raw, headers=headers), 400, "transcript")
        assert "settings.temperature" in error["message"]
        assert client.post("/v1/audit", json={"transcript": transcript}).json()["honest"] is True


PART = "messages[0].content[0].text"


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'"messages": [{"role": "user", "content": "a\\ud800b"}]', "messages[0].content"),
        (b'"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]', PART),
        (b'"messages": [{"role": "user", "content": "abc", "name": "\\uDBFF"}]', "messages[0].name"),
        (b'"messages": [{"role": "user", "content": "abc"}], "model": "\\ud800"', "model"),
        (b'"messages": [{"role": "user", "content": "abc"}], "\\ud800": 1', "\\ud800"),  # a key: pydantic fails on it
        (b'"messages": [{"role": "user", "content": "\xed\xa0\x80"}]', "messages[0].content"),  # its raw bytes
    ],
)
def test_text_that_is_not_unicode_is_refused_by_name(tiny, raw, param):
    """Half of a UTF-16 surrogate pair, which JSON's escapes (and Python's parser) let through, reaches no
    tokenizer, hash or UTF-8 answer: a 400 naming where it is, on every route, and the service keeps answering."""
    headers = {"content-type": "application/json"}
    with make_client(tiny) as client:
        for path in (CHAT, "/api/analyse"):
            body = b'{"max_tokens": 2, ' + raw + b"}" if path == CHAT else b"{" + raw + b"}"
            if path != CHAT and b"model" in raw:
                continue  # /api/analyse has no model field
            error = assert_error(client.post(path, content=body, headers=headers), 400)
            assert error["param"] == param and "lone surrogate" in error["message"]
        pair = b'{"max_tokens": 2, "messages": [{"role": "user", "content": "ab \\ud83d\\ude00 \\\\ud800"}]}'
        assert client.post(CHAT, content=pair, headers=headers).status_code == 200  # a pair, and an escaped backslash
        transcript = chat(client, max_tokens=2).json()["trust"]["transcript"]
        raw_audit = json.dumps({"transcript": {**transcript, "model": "\ud800"}}).encode()
        error = assert_error(client.post("/v1/audit", content=raw_audit, headers=headers), 400)
        assert error["param"] == "transcript.model"
        assert chat(client).status_code == 200


def test_a_body_naming_a_key_twice_is_refused_as_ambiguous(tiny, tmp_path, capsys):
    """A transcript whose first "token_ids" is a forgery and whose last is the real one: Python (and so the audit
    before this check) reads the last and calls it honest, a first-wins parser shows the forgery. Refused on every
    route and by ``olmo-tap audit``; the service keeps answering."""
    headers = {"content-type": "application/json"}
    with make_client(tiny) as client:
        transcript = chat(client, max_tokens=3).json()["trust"]["transcript"]
        forged = [(i + 1) % 64 for i in transcript["token_ids"]]
        raw = '{"transcript": {"token_ids": ' + json.dumps(forged) + ", " + json.dumps(transcript)[1:] + "}"
        assert json.loads(raw)["transcript"] == transcript  # last wins: what the audit read before
        error = assert_error(client.post("/v1/audit", content=raw, headers=headers), 400)
        assert "ambiguous" in error["message"] and "'token_ids' appears twice" in error["message"]
        body = b'{"messages": [{"role": "user", "content": "a"}], "messages": [{"role": "user", "content": "b"}]}'
        error = assert_error(client.post(CHAT, content=body, headers=headers), 400)
        assert "'messages' appears twice" in error["message"]
        body = b'{"messages": [{"role": "user", "content": "a"}], "\\ud800": 1, "\\ud800": 2}'
        assert "\\ud800" in assert_error(client.post(CHAT, content=body, headers=headers), 400)["message"]
        assert client.post("/v1/audit", json={"transcript": transcript}).json()["honest"] is True
    saved = tmp_path / "t.json"
    saved.write_text(raw[len('{"transcript": ') : -1])
    assert cli.main(["audit", str(saved), "--model", "unused"]) == 2
    assert "is ambiguous: the key 'token_ids' appears twice" in capsys.readouterr().err


def test_a_temperature_that_float32_cannot_hold_is_refused_not_decoded(tiny):
    """1e-300 is a valid JSON number in [0, 2] but 0 in float32: it decoded every token as id 0 with NaN signals.
    Refused by name on the chat and verify routes, and a transcript claiming it is malformed."""
    with make_client(tiny) as client:
        error = assert_error(chat(client, temperature=1e-300), 400, "temperature")
        assert "0 (greedy) or between 0.0001 and 100" in error["message"]
        assert chat(client, temperature=1e-4).status_code == 200
        outputs = [{"prompt_token_ids": [1, 2], "output_token_ids": [3]}]
        assert_error(client.post("/v1/verify", json={"outputs": outputs, "temperature": 1e-300}), 400, "temperature")
        transcript = chat(client, temperature=1.0, seed=2).json()["trust"]["transcript"]
        forged = {**transcript, "settings": {**transcript["settings"], "temperature": 1e-300}}
        error = assert_error(client.post("/v1/audit", json={"transcript": forged}), 400)
        assert "setting 'temperature' must be 0 or a number in [0.0001, 100], got 1e-300" in error["message"]


def test_serve_refuses_an_address_it_cannot_listen_on_before_loading_the_model(capsys, monkeypatch):
    """A port in use used to fail after the model's load, as an internal error (exit 3) after a 'ready' line."""
    import socket

    def no_model(args):
        raise AssertionError("the model was loaded before the address was checked")

    monkeypatch.setattr(cli, "load_model_and_tokenizer", no_model)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in capsys.readouterr().err
    assert cli.main(["serve", "--host", "192.0.2.1"]) == 2  # TEST-NET-1: no interface of this machine has it
    assert "cannot listen on 192.0.2.1:8000: no interface of this machine has that address" in capsys.readouterr().err
    assert cli.main(["serve", "--max-batch", "0"]) == 2
    assert "server setting max_batch must be an integer in [1, 256], got 0" in capsys.readouterr().err


def test_a_prompt_that_is_not_utf8_is_a_clear_error():
    from olmo_tap.inference.prompts import normalise_messages, not_unicode

    assert not_unicode("café 😀") is None
    assert not_unicode(b"caf\xe9".decode("utf-8", "surrogateescape")) == "byte 0xE9 at character 3 is not UTF-8"
    assert not_unicode("a\ud800") == "a lone surrogate (U+D800) at character 1"
    with pytest.raises(ValueError, match="the prompt cannot be tokenized: byte 0xFF"):
        normalise_messages(b"\xff".decode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=r"messages\[1\]'s content cannot be tokenized: a lone surrogate"):
        normalise_messages(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "\udc00"}])


def test_non_finite_signals_go_out_as_valid_json_on_both_paths(tiny, monkeypatch):
    import olmo_tap.inference.poe as poe

    monkeypatch.setattr(poe, "entropy_nats", lambda p: torch.full(p.shape[:-1], math.inf))
    with make_client(tiny) as client:
        whole = chat(client, max_tokens=3)
        streamed = client.post(CHAT, json={"messages": PROMPT, "max_tokens": 3, "stream": True})
    assert whole.status_code == 200 and streamed.status_code == 200
    trust = strict_json(whole.text)["trust"]
    assert trust["mean_entropy"] == "inf" and {t["entropy"] for t in trust["tokens"]} == {"inf"}
    events = sse_payloads(streamed.text)
    assert events[-1] == "[DONE]"
    assert [c["trust"]["entropy"] for c in events[1:4]] == ["inf"] * 3 and events[4]["trust"]["mean_entropy"] == "inf"
    assert sse({"x": math.nan, "y": [-math.inf]}) == 'data: {"x":"nan","y":["-inf"]}\n\n'


# ----- 4. logs: no forged lines, request ids only when wholly well-formed ---------------------------------------


def test_a_path_with_newlines_and_escapes_logs_one_clean_line(tiny, caplog):
    caplog.set_level(logging.INFO, logger="olmo_tap.serve")
    with make_client(tiny) as client:
        caplog.clear()
        response = client.get(
            "/v1/x%0A2026-01-01 INFO forged%0D%1B[31mred%E2%80%AEevil", headers={"X-Request-ID": "t-1"}
        )
    assert response.status_code == 404
    lines = [r.getMessage() for r in caplog.records if "t-1" in r.getMessage()]
    assert len(lines) == 1
    line = lines[0]
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u202e" not in line
    assert "\\x0a2026-01-01 INFO forged\\x0d\\x1b[31mred\\u202eevil" in line
    assert log_safe("a" * 500).endswith("…") and len(log_safe("a" * 500)) == 201


@pytest.mark.parametrize("given", ["abc\n", "abc def", "a" * 65, "", "id;rm", "ok\x1b[31m"])
def test_a_request_id_is_taken_only_when_all_of_it_is_well_formed(given):
    assert client_request_id(given).startswith("req-") and client_request_id(given) != given


def test_a_well_formed_request_id_is_echoed_and_a_bad_one_replaced(tiny):
    with make_client(tiny) as client:
        assert client.get("/health", headers={"X-Request-ID": "abc-1.2:3"}).headers["x-request-id"] == "abc-1.2:3"
        assert client.get("/health", headers={"X-Request-ID": "abc def"}).headers["x-request-id"].startswith("req-")


# ----- 5. errors quote little of the input -----------------------------------------------------------------------


def test_error_messages_quote_only_a_short_part_of_the_input(tiny):
    huge = "x" * 50_000
    with make_client(tiny) as client:
        responses = {
            "model": chat(client, model=huge),
            "path": client.get(f"/v1/models/{huge}"),
            "unknown field": chat(client, **{huge: 1}),
            "literal": chat(client, mode=huge),
            "content part": chat(client, messages=[{"role": "user", "content": [{"type": huge, "text": "a"}]}]),
            "content type": client.post(CHAT, content=b"{}", headers={"content-type": "text/" + huge[:5000]}),
            "host": client.get("/health", headers={"host": huge[:4000] + ".example"}),
        }
        for what, response in responses.items():
            assert 400 <= response.status_code < 500, what
            error = strict_json(response.text)["error"]
            assert len(error["message"]) < 400 and huge[:100] not in error["message"], what
            assert error["param"] is None or len(error["param"]) <= 80, what
        assert "…" in responses["model"].json()["error"]["message"]


# ----- 6. /docs -------------------------------------------------------------------------------------------------


def test_docs_are_off_by_default_and_the_schema_is_served(tiny):
    with make_client(tiny) as client:
        assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
        schema = client.get("/openapi.json")
        assert schema.status_code == 200 and CHAT in schema.json()["paths"]
    with make_client(tiny, docs=True) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "swagger-ui" in page.text
        assert client.get("/redoc").status_code == 200


# ----- after everything: the worker is alive ---------------------------------------------------------------------


def test_after_a_whole_hostile_run_the_worker_still_answers(tiny):
    """Every kind of hostile request against one server, then a normal chat: 200, and /health is fine."""
    with make_client(tiny, max_verify_tokens=64) as client:
        good = chat(client, temperature=1.0, seed=3, max_tokens=8).json()
        transcript = good["trust"]["transcript"]
        hostile = [
            client.post(CHAT, content=json.dumps({"messages": PROMPT}), headers={"content-type": "text/plain"}),
            client.get("/health", headers={"host": "evil.example"}),
            client.post(
                CHAT,
                content='{"messages": [{"role": "user", "content": "a"}], "temperature": NaN}',
                headers={"content-type": "application/json"},
            ),
            chat(client, tools=[{"type": "function"}]),
            chat(client, surprise=1),
            chat(client, messages=[{"role": "user", "content": "a" * 1_000_000}]),
            client.post(CHAT, content="{broken", headers={"content-type": "application/json"}),
            client.get("/v1/models/%0Aforged%20line"),
            client.post(
                "/v1/verify",
                json={
                    "outputs": [{"prompt_token_ids": [1] * 60, "output_token_ids": [2] * 60}],
                    "temperature": 1.0,
                    "seed": 1,
                },
            ),
            client.post(
                "/v1/audit", json={"transcript": {**transcript, "settings": {**transcript["settings"], "seed": None}}}
            ),
            client.post("/v1/audit", json={"transcript": {**transcript, "output": {"resampled_idxs": [[1]]}}}),
        ]
        assert all(400 <= r.status_code < 500 for r in hostile), [(r.status_code, r.text[:80]) for r in hostile]
        again = chat(client, temperature=1.0, seed=3, max_tokens=8)
        assert again.status_code == 200 and again.json()["trust"]["transcript"]["token_ids"] == transcript["token_ids"]
        assert client.get("/health").json()["status"] == "ok"
        assert client.post("/v1/audit", json={"transcript": transcript}).json()["honest"] is True


def test_a_conversation_the_chat_template_refuses_is_a_400(tiny):
    """Many chat templates refuse conversations by raising (a system turn, roles that do not alternate): that is
    the client's conversation, not a server fault (it was a 500), and the CLI says the same (exit 2)."""
    from jinja2 import TemplateError

    from olmo_tap.inference.prompts import ChatTemplateError, encode_chat

    class NoSystemTurn(LetterTokenizer):
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            if messages[0]["role"] == "system":
                raise TemplateError("System role not supported")
            return super().apply_chat_template(messages, tokenize, add_generation_prompt)

    tokenizer = NoSystemTurn(VOCAB)
    system = [{"role": "system", "content": "be brief"}, *PROMPT]
    with pytest.raises(ChatTemplateError, match="chat template refused this conversation: System role not supported"):
        encode_chat(tokenizer, messages=system)
    app = create_app(tiny, tokenizer, MODEL_ID, ServeConfig())
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
        refused = client.post(CHAT, json={"messages": system, "max_tokens": 2})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "messages" and "System role not supported" in error["message"]
        assert client.post(CHAT, json={"messages": PROMPT, "max_tokens": 2}).status_code == 200
