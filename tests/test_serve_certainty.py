"""Certainty in the service: routing by request and by message, KLE's samples decoded beside the answer and
audited with it, the stream's last chunk, and the original system's ``/api/analyse`` schema field by field."""

from __future__ import annotations

import copy

import pytest

from olmo_tap.certainty.sampled import sample_seeds
from olmo_tap.inference.transcript import content_digest
from tests.test_serve import MODEL_ID, PROMPT, VOCAB, chat, make_client, sse_events
from tests.tiny import tiny_hydra

MCQ_PROMPT = [{"role": "user", "content": "Which one?\nA) abc\nB) bcd\nC) cde"}]


@pytest.fixture(scope="module")
def jury():
    """Four text heads and an uncertainty head."""
    model = tiny_hydra(vocab=VOCAB, n_heads=5, seed=1)
    model.uncertainty_head = 4
    return model


@pytest.fixture(scope="module")
def client(jury):
    with make_client(jury, default_max_tokens=8) as client:  # /api/analyse sets no max_tokens
        yield client


def test_kle_for_free_text_on_request(client):
    response = chat(client, certainty="auto", temperature=0.7, seed=5, max_tokens=6)
    assert response.status_code == 200, response.text
    certainty = response.json()["trust"]["certainty"]
    assert certainty["method"] == "kle" and certainty["requested"] == "auto" and not certainty["detected_mcq"]
    assert 0 <= certainty["value"] <= 1 and certainty["n_samples"] == 5 and certainty["reason"] is None
    assert [s["seed"] for s in certainty["samples"]] == sample_seeds(5)
    assert len(certainty["matrix"]) == 5 and certainty["similarity"] == "token-overlap"
    assert isinstance(certainty["claims"], list)
    # the transcript carries it, and the service's audit replays the samples
    transcript = response.json()["trust"]["transcript"]
    assert transcript["certainty"]["value"] == certainty["value"]
    audit = client.post("/v1/audit", json={"transcript": transcript}).json()
    assert audit["honest"] and audit["certainty"]["honest"], audit["reason"]
    # a forger who raises the certainty and restamps the digest is caught
    forged = copy.deepcopy(transcript)
    forged["certainty"]["value"] = 1.0 if certainty["value"] < 0.9 else 0.2
    forged.pop("output")
    forged["digest"] = content_digest(forged)
    audit = client.post("/v1/audit", json={"transcript": forged}).json()
    assert not audit["honest"] and "certainty" in audit["reason"]


def test_kle_samples_without_a_seed_still_derive_from_the_answers(client):
    trust = chat(client, certainty="kle", max_tokens=4).json()["trust"]
    assert [s["seed"] for s in trust["certainty"]["samples"]] == sample_seeds(trust["seed"])


def test_a_plain_completion_stays_fast_and_says_why_it_has_no_certainty(client):
    certainty = chat(client, max_tokens=4).json()["trust"]["certainty"]
    assert certainty["method"] is None and certainty["value"] is None
    assert "not asked for" in certainty["reason"] and "kle" in certainty["reason"]


def test_multiple_choice_is_recognised_and_scored_by_the_uncertainty_head(client):
    trust = client.post(
        "/v1/chat/completions", json={"messages": MCQ_PROMPT, "max_tokens": 4, "temperature": 0}
    ).json()["trust"]
    assert trust["certainty"]["detected_mcq"] and trust["certainty"]["method"] == "uncertainty_head"
    assert trust["certainty"]["value"] == trust["p_correct"] and 0 < trust["p_correct"] < 1 and trust["mcq"]
    # forced either way
    forced = chat(client, certainty="mcq", max_tokens=4).json()["trust"]["certainty"]
    assert forced["method"] == "uncertainty_head" and not forced["detected_mcq"]
    kle = client.post(
        "/v1/chat/completions", json={"messages": MCQ_PROMPT, "max_tokens": 3, "certainty": "kle"}
    ).json()["trust"]["certainty"]
    assert kle["method"] == "kle" and kle["detected_mcq"]
    off = chat(client, certainty="off", max_tokens=3).json()["trust"]["certainty"]
    assert off["method"] is None and "turned off" in off["reason"]


def test_multiple_choice_on_a_model_without_an_uncertainty_head(tiny):
    with make_client(tiny) as client:
        auto = client.post(
            "/v1/chat/completions", json={"messages": MCQ_PROMPT, "max_tokens": 3, "certainty": "auto"}
        ).json()["trust"]["certainty"]
        forced = chat(client, certainty="mcq", max_tokens=3).json()["trust"]["certainty"]
    assert auto["method"] == "kle" and auto["detected_mcq"]  # KLE over the letters instead
    assert forced["method"] is None and "no uncertainty head" in forced["reason"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_hydra(vocab=VOCAB, n_heads=4)


@pytest.mark.parametrize(
    ("body", "field"),
    [({"mcq": True, "certainty": "kle"}, "mcq"), ({"certainty": "sometimes"}, "certainty")],
)
def test_contradictory_or_unknown_certainty_is_refused(client, body, field):
    response = chat(client, max_tokens=3, **body)
    assert response.status_code == 400 and field in response.json()["error"]["message"]


def test_the_streams_last_chunk_carries_the_certainty(client):
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"messages": PROMPT, "stream": True, "certainty": "auto", "max_tokens": 5, "seed": 2},
    ) as response:
        events = sse_events(response.iter_lines())
    last = [e for e in events if isinstance(e, dict) and e["choices"] and e["choices"][0]["finish_reason"]][-1]
    certainty = last["trust"]["certainty"]
    assert certainty["method"] == "kle" and [s["seed"] for s in certainty["samples"]] == sample_seeds(2)
    assert last["trust"]["transcript"]["certainty"]["matrix"] == certainty["matrix"]


# ----- /api/analyse: the original's schema ---------------------------------------------------------------------


def test_api_analyse_answers_in_the_originals_schema(client):
    response = client.post("/api/analyse", json={"messages": PROMPT})
    assert response.status_code == 200, response.text
    body = response.json()
    # AnalysisResponse (the original's app/frontend/src/types/api.ts), field by field
    assert set(body) >= {
        "claims", "overall_confidence", "uncertainty", "security", "robustness", "raw_response", "model", "is_mcq"
    }  # fmt: skip
    assert body["model"] == MODEL_ID and body["is_mcq"] is False and isinstance(body["raw_response"], str)
    for claim in body["claims"]:
        assert set(claim) == {"text", "confidence", "confidence_level", "guidance"}
        assert claim["confidence_level"] in ("high", "moderate", "low") and 0 <= claim["confidence"] <= 1
    overall = body["overall_confidence"]
    assert overall is None or 0 <= overall <= 1
    assert set(body["uncertainty"]) == {"overall"} and 0 <= body["uncertainty"]["overall"] <= 1
    security = body["security"]
    assert set(security) == {
        "certified", "tokens", "resampled", "token_entropies", "stability_radii", "stability_margins"
    }  # fmt: skip
    assert isinstance(security["certified"], bool)
    n = len(security["tokens"])
    assert all(isinstance(t, str) for t in security["tokens"])
    assert (
        len(security["token_entropies"]) == len(security["stability_radii"]) == len(security["stability_margins"]) == n
    )
    for r in security["resampled"]:
        assert set(r) == {"index", "old_token", "new_token", "severity", "validity_radius", "suppression_score"}
        assert 0 <= r["index"] < n and r["new_token"] == security["tokens"][r["index"]]
        assert r["severity"] is None  # not invented: the reason is given
    assert body["robustness"]["type"] == "unavailable" and body["robustness"]["reason"]
    unavailable = body["olmo_tap"]["unavailable"]
    assert "security.resampled[].severity" in unavailable and "robustness" in unavailable
    assert body["olmo_tap"]["trust"]["certainty"]["method"] == "kle"


def test_api_analyse_multiple_choice(client):
    body = client.post("/api/analyse", json={"messages": MCQ_PROMPT}).json()
    assert body["is_mcq"] is True and 0 < body["uncertainty"]["overall"] < 1
    assert body["claims"] == [] and body["overall_confidence"] is None and "claims" in body["olmo_tap"]["unavailable"]


@pytest.mark.parametrize(
    ("request_body", "query", "message"),
    [
        ({"messages": PROMPT}, "?hf=true", "no Hugging Face"),
        ({"messages": []}, "", "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "", "role"),
        ({"prompt": "x"}, "", "messages"),
    ],
)
def test_api_analyse_refuses_bad_input(client, request_body, query, message):
    response = client.post(f"/api/analyse{query}", json=request_body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_api_health(client):
    assert client.get("/api/health").json() == {"status": "ok"}


def test_a_full_queue_costs_the_certainty_not_the_answer(jury):
    """KLE asks for 5 more answers; a server with no room for them still answers, and says why it has no value."""
    with make_client(jury, max_batch=2, queue_size=0) as client:
        response = chat(client, certainty="kle", max_tokens=4, seed=1)
        assert response.status_code == 200
        certainty = response.json()["trust"]["certainty"]
        assert certainty["method"] == "kle" and certainty["value"] is None
        assert "could not be queued" in certainty["reason"]
        assert "certainty" not in response.json()["trust"]["transcript"]
        # and the samples it did queue were cancelled: the server is free for the next request
        assert chat(client, max_tokens=3).status_code == 200
