"""The robustness probe: the flip rule against hand-made answers, the attacked answers (the bank's first k suffixes,
the answer's own settings and seed, batched exactly as decoded one by one), the record, its transcript and audit
(every forgery named), the CLI (``generate --robustness``, ``audit``) and the service (chat, stream, /api/analyse,
/v1/audit, hostile requests and banks). Tiny random Hydras with letters as tokens and tiny banks keep it fast."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

import olmo_tap.cli
from olmo_tap.certainty.similarity import TokenOverlap
from olmo_tap.inference.poe import PoE
from olmo_tap.inference.settings import DecodeSettings
from olmo_tap.inference.transcript import check_transcript, content_digest, transcript_dict
from olmo_tap.robustness.bank import AttackBank, BankEntry, BankError, model_fingerprint
from olmo_tap.robustness.probe import (
    BANK_FOR_PRESET,
    EMPTY_BANK,
    FLIP_THRESHOLD,
    K_SUFFIXES,
    NO_BANK,
    NOT_REQUESTED,
    RobustnessRun,
    attacked_messages,
    decode_attacks,
    default_bank_path,
    judge_attacks,
    resolve_bank,
    summary_line,
    worst_case,
)
from olmo_tap.verify import audit_poe
from olmo_tap.weights.presets import CLONES_MODEL, DEFAULT_MODEL
from tests.tiny import LetterTokenizer, tiny_hydra

VOCAB = 12
MESSAGES = [{"role": "user", "content": "abc"}]
SUFFIXES = ["kkk", "jlj", "ghia", "bbb"]  # four: the probe takes the first three


def make_bank(fingerprint: str, suffixes: list[str] = SUFFIXES) -> AttackBank:
    entries = [
        BankEntry(index=i, suffix=s, token_ids=[1, 2], target="jury", questions=[], flipped=1, n_questions=2, loss=-1.0,
                  steps=3, seconds=0.1, seed=i)
        for i, s in enumerate(suffixes)
    ]  # fmt: skip
    return AttackBank("tiny-letters", fingerprint, {"steps": 3}, entries)


@pytest.fixture(scope="module")
def jury(one_thread):
    return tiny_hydra(vocab=VOCAB, n_heads=4, scale=1.0), LetterTokenizer(VOCAB)


@pytest.fixture(scope="module")
def bank(jury):
    return make_bank(model_fingerprint(jury[0]))


@pytest.fixture(scope="module")
def probed(jury, bank):
    """A free-text answer, its record and its transcript."""
    model, tokenizer = jury
    settings = DecodeSettings(max_new_tokens=4, seed=11, temperature=1.0)
    output = PoE.from_settings(model, tokenizer, settings).generate_with_cache(messages=MESSAGES)
    record = RobustnessRun(model, tokenizer, bank, TokenOverlap()).result(output, MESSAGES)
    return output, record, transcript_dict(output, robustness=record)


# ----- the flip rule, by hand --------------------------------------------------------------------------------------


def test_multiple_choice_flips_when_the_letter_changes():
    judged = judge_attacks("B) 42", ["B", "C) 7", "I think the answer is B.", "forty-two"], True, None, "")
    assert [j["flipped"] for j in judged] == [False, True, False, True]
    assert [j["choice"] for j in judged] == ["B", "C", "B", None]
    # a clean answer without a letter: the normalised text decides
    judged = judge_attacks("Forty  two", ["forty two ", "seven"], True, None, "")
    assert [j["flipped"] for j in judged] == [False, True] and judged[0]["similarity"] is None


def test_free_text_flips_at_or_below_the_threshold():
    question = "What is the capital of Peru?"
    clean = "Lima is the capital."
    attacked = ["Lima", "Cusco", "  Lima is the capital.  ", "Lima and Cusco"]
    judged = judge_attacks(clean, attacked, False, TokenOverlap(), question)
    # "capital" and "peru" are the question's words: only "lima" and "cusco" count
    assert [j["similarity"] for j in judged] == [2.0, 0.0, 2.0, 1.5]
    assert [j["flipped"] for j in judged] == [False, True, False, False]
    # exactly at the threshold flips: half of each side's words supported both ways
    on_edge = judge_attacks("lima cusco", ["lima arequipa"], False, TokenOverlap(), "")[0]
    assert on_edge["similarity"] == FLIP_THRESHOLD and on_edge["flipped"]
    with pytest.raises(ValueError, match="similarity"):
        judge_attacks("a", ["b"], False, None, "")


def test_the_worst_case_is_the_first_flip_or_the_least_similar():
    attacks = [
        {"suffix": "x", "answer": "A", "flipped": False, "similarity": None},
        {"suffix": "y", "answer": "C", "flipped": True, "similarity": None},
        {"suffix": "z", "answer": "D", "flipped": True, "similarity": None},
    ]
    worst = worst_case({"type": "mcq", "attacks": attacks}, "A")
    assert worst == {"suffix": "y", "clean_response": "A", "adv_response": "C", "flipped": True, "score": None}
    assert worst_case({"type": "mcq", "attacks": attacks[:1]}, "A") is None
    free = [dict(a, similarity=s, flipped=s <= 1) for a, s in zip(attacks, [1.5, 0.4, 0.4], strict=True)]
    assert worst_case({"type": "free_text", "attacks": free}, "A")["suffix"] == "y"  # the first of equals


def test_only_the_last_user_message_is_attacked():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    attacked = attacked_messages(messages, "!! zz")
    assert attacked[3]["content"] == "second !! zz" and attacked[:3] == messages[:3]
    assert messages[3]["content"] == "second"  # the conversation itself is untouched
    with pytest.raises(ValueError, match="no user message"):
        attacked_messages([{"role": "system", "content": "x"}], "s")


def test_which_bank_a_model_uses(tmp_path):
    assert BANK_FOR_PRESET[CLONES_MODEL] == BANK_FOR_PRESET[DEFAULT_MODEL] == DEFAULT_MODEL
    # a model that is no preset gets none, and its name never becomes a path
    for model in ("../../etc/passwd", "/abs/smollm2-135m-instruct", "org/model", "", None):
        assert default_bank_path(model) is None
    assert resolve_bank(None, "tiny-letters") is None
    path = make_bank("sha256:0").save(tmp_path / "bank.json")
    assert resolve_bank(path, "tiny-letters").suffixes == SUFFIXES
    (tmp_path / "bad.json").write_text('{"format": "olmo-tap-attack-bank", "version": 1, "model": {}}')
    with pytest.raises(BankError, match="fingerprint"):
        resolve_bank(tmp_path / "bad.json", None)
    with pytest.raises(BankError, match="no attack bank"):
        resolve_bank(tmp_path / "missing.json", None)


# ----- the attacked answers and the record -----------------------------------------------------------------------


def test_the_record(probed, bank, jury):
    output, record, _ = probed
    assert record["type"] == "free_text" and record["attempts"] == K_SUFFIXES == len(record["attacks"])
    assert [a["suffix"] for a in record["attacks"]] == SUFFIXES[:K_SUFFIXES]  # the bank's first k, in order
    assert record["flips"] == record["flipped"] == sum(a["flipped"] for a in record["attacks"])
    assert record["value"] == pytest.approx(1 - record["flips"] / K_SUFFIXES)
    assert all(a["flipped"] == (a["similarity"] <= FLIP_THRESHOLD) for a in record["attacks"])
    assert record["similarity"] == "token-overlap" and record["seed"] == 11 == record["attack_settings"]["seed"]
    assert record["bank"] == {"model": "tiny-letters", "fingerprint": bank.fingerprint, "matches_model": True}
    assert record["messages"] == MESSAGES and record["clean_choice"] is None
    low = min(record["attacks"], key=lambda a: a["similarity"])
    assert record["worst_case"]["suffix"] == low["suffix"] and record["worst_case"]["clean_response"] == output.text
    # the answer's own settings: only the prompt differs
    settings = record["attack_settings"]
    assert {k: settings[k] for k in ("temperature", "mode", "max_new_tokens", "draft_head")} == {
        k: output.settings[k] for k in ("temperature", "mode", "max_new_tokens", "draft_head")
    }
    line = summary_line(record)
    assert line.startswith(f"robustness: {100 * record['value']:.0f}% ({record['flips']} of 3 adversarial suffixes")
    # a bank made for other weights is used all the same, and says so
    other = RobustnessRun(*jury, make_bank("sha256:other"), TokenOverlap()).result(output, MESSAGES)
    assert other["bank"]["matches_model"] is False and other["attacks"] == record["attacks"]


def test_attacked_answers_batched_are_those_decoded_one_by_one(probed, jury):
    model, tokenizer = jury
    output, record, _ = probed
    settings = DecodeSettings.from_dict(output.settings)
    batched = decode_attacks(model, tokenizer, settings, MESSAGES, SUFFIXES[:K_SUFFIXES])
    assert [a.token_ids for a in batched] == [a["token_ids"] for a in record["attacks"]]
    decoder = PoE.from_settings(model, tokenizer, settings)
    for suffix, attack in zip(SUFFIXES, batched, strict=False):
        alone = decoder.stream(messages=attacked_messages(MESSAGES, suffix), seed=11, batched=True)
        list(alone)
        assert alone.output.token_ids == attack.token_ids and alone.output.resampled_idxs == attack.resampled_idxs


def test_no_value_without_a_bank_an_empty_one_or_an_answer(probed, jury):
    model, tokenizer = jury
    output = probed[0]
    assert RobustnessRun(model, tokenizer, None, TokenOverlap()).result(output, MESSAGES)["reason"] == NO_BANK
    empty = RobustnessRun(model, tokenizer, make_bank("sha256:0", []), TokenOverlap())
    assert empty.result(output, MESSAGES) == {"type": "unavailable", "reason": EMPTY_BANK}
    abstained = dataclasses.replace(output, abstained=True)
    record = RobustnessRun(model, tokenizer, make_bank("sha256:0"), TokenOverlap()).result(abstained, MESSAGES)
    assert record["type"] == "unavailable" and "abstained" in record["reason"]
    assert summary_line(record).startswith("robustness: n/a (the jury abstained")


def test_multiple_choice_is_judged_by_letter(jury, bank):
    model, tokenizer = jury
    messages = [{"role": "user", "content": "Which one?\nA) abc\nB) bcd"}]
    output = PoE(model, tokenizer, max_new_tokens=3, seed=4, temperature=1.0).generate_with_cache(messages=messages)
    record = RobustnessRun(model, tokenizer, bank, TokenOverlap()).result(output, messages)
    # the letter tokenizer writes lower-case letters, which name no option: the texts are compared
    assert record["type"] == "mcq" and record["clean_choice"] is None
    assert all(a["similarity"] is None and a["flipped"] == (a["answer"] != output.text) for a in record["attacks"])
    report = audit_poe(transcript_dict(output, robustness=record), model, tokenizer=tokenizer, attack_bank=bank)
    assert report.honest and report.robustness.honest, report.reason


# ----- transcript and audit ----------------------------------------------------------------------------------------


def audit(jury, transcript, bank=None):
    model, tokenizer = jury
    return audit_poe(transcript, model, tokenizer=tokenizer, attack_bank=bank)


def test_an_honest_robustness_transcript_passes(probed, jury, bank):
    _, record, transcript = probed
    assert "worst_case" not in transcript["robustness"] and transcript["robustness"]["value"] == record["value"]
    report = audit(jury, transcript, bank)
    assert report.honest, report.reason
    r = report.robustness
    assert r.honest and r.suffixes_checked and r.similarity_checked and len(r.attacks) == K_SUFFIXES
    assert report.to_dict()["robustness"]["honest"]
    # without a bank the suffixes are replayed but said not to be checked against one
    unchecked = audit(jury, transcript).robustness
    assert (
        unchecked.honest and not unchecked.suffixes_checked and "not checked against an attack bank" in unchecked.reason
    )


def forge(probed, edit):
    transcript = copy.deepcopy(probed[2])
    edit(transcript["robustness"])
    transcript["digest"] = content_digest(transcript)
    return transcript


def _other_text(attack):
    attack["answer"] = attack["answer"] + "x"


def _other_token(attack):
    attack["token_ids"][0] = (attack["token_ids"][0] + 1) % VOCAB


def _drop_last_attack(record):
    record["attacks"] = record["attacks"][:-1]
    flips = sum(a["flipped"] for a in record["attacks"])
    record.update(attempts=len(record["attacks"]), flips=flips, flipped=flips, value=1 - flips / 2)


def _flip(record, i):
    record["attacks"][i]["flipped"] = not record["attacks"][i]["flipped"]


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda r: r["attacks"][0].update(suffix="lll"), "attack 0's suffix is not entry 0"),
        (lambda r: _other_text(r["attacks"][1]), "attack 1: its recorded text"),
        (lambda r: _other_token(r["attacks"][2]), "attack 2"),
        (lambda r: r.update(flips=(r["flips"] + 1) % 4, flipped=(r["flips"] + 1) % 4), "flipped the answer, not"),
        (lambda r: r.update(flipped=(r["flipped"] + 1) % 4), "flipped the answer, not"),
        (lambda r: r.update(value=0.5 if r["value"] != 0.5 else 0.0), "the robustness is"),
        (lambda r: _flip(r, 1), "attack 1: the flip rule"),
        (lambda r: r["attacks"][0].update(similarity=r["attacks"][0]["similarity"] + 0.3), "attack 0: its similarity"),
        (lambda r: r.update(type="mcq"), "calls the question mcq"),
        (lambda r: r.update(threshold=0.1), "flip threshold"),
        (lambda r: r.update(seed=r["seed"] + 1), "seed"),
        (lambda r: r["attack_settings"].update(temperature=0.3), "differ from the answer's in temperature"),
        (lambda r: r["messages"][0].update(content="abd"), "conversation is not the answer's"),
        (lambda r: r["bank"].update(fingerprint="sha256:elsewhere"), "another attack bank"),
        (lambda r: _drop_last_attack(r), "first 3 suffixes, not 2"),
    ],
)
def test_a_forged_robustness_is_caught(probed, jury, bank, edit, reason):
    report = audit(jury, forge(probed, edit), bank)
    assert not report.honest and not report.robustness.honest
    assert reason in report.reason, report.reason


def test_a_robustness_edited_without_restamping_breaks_the_digest(probed, jury, bank):
    transcript = copy.deepcopy(probed[2])
    transcript["robustness"]["value"] = 1.0 - transcript["robustness"]["value"] + 0.5
    report = audit(jury, transcript, bank)
    assert not report.honest and any(m.field == "digest" for m in report.field_mismatches)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(attacks=[]), "1 to 16"),
        (lambda r: r.update(attempts=5), "attempts"),
        (lambda r: r["attacks"][0].update(token_ids=["a"]), "token ids"),
        (lambda r: r["attacks"][0].update(flipped="yes"), "flipped"),
        (lambda r: r.update(type="nlp"), "type"),
        (lambda r: r.update(value="robust"), "value"),
        (lambda r: r.update(messages=[{"role": "user"}]), "messages"),
        (lambda r: r["attack_settings"].pop("seed"), "attack_settings"),
    ],
)
def test_a_malformed_robustness_is_bad_input(probed, edit, message):
    with pytest.raises(ValueError, match=message):
        check_transcript(forge(probed, edit))


# ----- the CLI ---------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_cli(monkeypatch, jury):
    monkeypatch.setattr(olmo_tap.cli, "load_model_and_tokenizer", lambda args: jury)
    monkeypatch.setattr("olmo_tap.verify.poe_audit.load_audit_model", lambda *args, **kwargs: jury)
    return jury


def test_generate_robustness_end_to_end(tiny_cli, bank, tmp_path, capsys):
    bank_path = bank.save(tmp_path / "bank.json")
    saved = tmp_path / "answer.json"
    args = ["generate", "abc", "--model", "tiny", "--max-new-tokens", "4", "--seed", "6", "--temperature", "1"]
    args += ["--robustness", "--attack-bank", str(bank_path), "--certainty", "off"]
    assert olmo_tap.cli.main([*args, "--json", "--save", str(saved)]) == 0
    out, err = capsys.readouterr()
    record = json.loads(out)["robustness"]
    assert record["attempts"] == 3 and record["seed"] == 6
    assert "robustness: decoding 3 answers" in err and f"robustness: {100 * record['value']:.0f}% (" in err
    assert "of 3 adversarial suffixes flipped the answer" in err
    transcript = json.loads(saved.read_text())
    assert transcript["robustness"]["attacks"] == record["attacks"]  # the same attacks, in the digested claim
    audit_args = ["audit", str(saved), "--model", "tiny", "--attack-bank", str(bank_path)]
    assert olmo_tap.cli.main(audit_args) == 0
    assert "robustness (adversarial suffixes): ok" in " ".join(capsys.readouterr().out.split())
    # a changed suffix, restamped, fails the audit with the reason
    transcript["robustness"]["attacks"][1]["suffix"] = "zzz"
    transcript["digest"] = content_digest(transcript)
    saved.write_text(json.dumps(transcript))
    assert olmo_tap.cli.main(audit_args) == 1
    assert "attack 1's suffix is not entry 1 of the attack bank" in " ".join(capsys.readouterr().out.split())


def test_generate_robustness_without_a_bank_or_with_a_bad_one(tiny_cli, tmp_path, capsys, monkeypatch):
    base = ["generate", "abc", "--model", "tiny", "--max-new-tokens", "2", "--certainty", "off"]
    assert olmo_tap.cli.main([*base, "--robustness"]) == 0
    assert f"robustness: n/a ({NO_BANK})" in capsys.readouterr().err
    assert olmo_tap.cli.main(base) == 0
    assert "robustness" not in capsys.readouterr().err  # off by default
    with pytest.raises(SystemExit) as exit_:
        olmo_tap.cli.main([*base, "--attack-bank", "x.json"])
    assert exit_.value.code == 2 and "needs --robustness" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")

    def refuse(args):
        raise AssertionError("the model was loaded before the bank was checked")

    monkeypatch.setattr(olmo_tap.cli, "load_model_and_tokenizer", refuse)
    assert olmo_tap.cli.main([*base, "--robustness", "--attack-bank", str(bad)]) == 2
    assert "expected a JSON object" in capsys.readouterr().err


# ----- the service -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(jury, bank, tmp_path_factory):
    from tests.test_serve import make_client

    path = bank.save(tmp_path_factory.mktemp("bank") / "bank.json")
    with make_client(jury[0], default_max_tokens=6, attack_bank=str(path)) as client:
        yield client


def ask(client, **body):
    return client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 4, **body})


def test_the_api_trust_carries_the_record_and_the_audit_replays_it(served, jury, bank):
    response = ask(served, robustness=True, seed=9, temperature=1.0)
    assert response.status_code == 200, response.text
    trust = response.json()["trust"]
    record = trust["robustness"]
    assert record["type"] == "free_text" and record["attempts"] == 3 and record["seed"] == 9
    assert [a["suffix"] for a in record["attacks"]] == SUFFIXES[:3] and record["bank"]["matches_model"]
    # the attacked answers are the ones the probe decodes outside the service for the same answer
    settings = DecodeSettings.from_dict(trust["settings"])
    alone = decode_attacks(*jury, settings, MESSAGES, SUFFIXES[:3])
    assert [a.token_ids for a in alone] == [a["token_ids"] for a in record["attacks"]]
    assert trust["transcript"]["robustness"]["flips"] == record["flips"]
    audited = served.post("/v1/audit", json={"transcript": trust["transcript"]}).json()
    assert audited["honest"] and audited["robustness"]["honest"] and audited["robustness"]["suffixes_checked"]
    forged = copy.deepcopy(trust["transcript"])
    forged["robustness"]["attacks"][0]["suffix"] = "lll"
    forged["digest"] = content_digest(forged)
    audited = served.post("/v1/audit", json={"transcript": forged}).json()
    assert not audited["honest"] and "suffix is not entry 0" in audited["reason"]


def test_robustness_is_off_by_default_and_said_so(served):
    trust = ask(served).json()["trust"]
    assert trust["robustness"] == {"type": "unavailable", "reason": NOT_REQUESTED}
    assert "robustness" not in trust["transcript"]


def test_the_streams_last_chunk_carries_the_record(served):
    from tests.test_serve import sse_events

    body = {"messages": MESSAGES, "stream": True, "robustness": True, "max_tokens": 3, "seed": 2}
    with served.stream("POST", "/v1/chat/completions", json=body) as response:
        events = sse_events(response.iter_lines())
    last = [e for e in events if isinstance(e, dict) and e["choices"] and e["choices"][0]["finish_reason"]][-1]
    record = last["trust"]["robustness"]
    assert record["attempts"] == 3 and record["seed"] == 2
    assert last["trust"]["transcript"]["robustness"]["attacks"][0]["token_ids"] == record["attacks"][0]["token_ids"]


def test_api_analyse_probes_by_default_in_the_originals_schema(served):
    body = served.post("/api/analyse", json={"messages": MESSAGES}).json()
    robustness = body["robustness"]
    assert robustness["type"] == "nlp" and robustness["attempts"] == 3  # the original's word for free text
    assert isinstance(robustness["flipped"], int) and 0 <= robustness["flipped"] <= 3
    assert set(robustness["worst_case"]) == {"suffix", "clean_response", "adv_response", "flipped", "score"}
    assert robustness["worst_case"]["clean_response"] == body["raw_response"]
    assert "robustness" not in body["olmo_tap"]["unavailable"]
    assert body["olmo_tap"]["trust"]["robustness"]["type"] == "free_text"
    skipped = served.post("/api/analyse", json={"messages": MESSAGES, "robustness": False}).json()
    assert skipped["robustness"]["type"] == "unavailable" and "robustness" in skipped["olmo_tap"]["unavailable"]


def test_the_model_card_reports_the_bank(served, bank):
    card = served.get("/v1/models").json()["data"][0]["olmo_tap"]["robustness"]
    assert card == {"attack_bank": True, "attacks": 3, "model": "tiny-letters", "fingerprint": bank.fingerprint,
                    "matches_model": True}  # fmt: skip


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"robustness": "yes"}, "robustness"),
        ({"robustness": 1}, "robustness"),
        ({"robustness_k": 1000}, "robustness_k"),
    ],
)
def test_a_hostile_robustness_request_is_refused_by_name(served, body, field):
    response = ask(served, **body)
    assert response.status_code == 400 and field in response.json()["error"]["message"]
    assert ask(served).status_code == 200


def test_a_conversation_without_a_user_message_cannot_be_attacked(served):
    messages = [{"role": "system", "content": "abc"}]
    response = served.post("/v1/chat/completions", json={"messages": messages, "robustness": True, "max_tokens": 2})
    assert response.status_code == 400 and "no user message" in response.json()["error"]["message"]


def test_without_a_bank_robustness_is_unavailable_and_the_card_says_why(jury):
    from tests.test_serve import make_client

    with make_client(jury[0]) as client:
        assert ask(client, robustness=True).json()["trust"]["robustness"] == {"type": "unavailable", "reason": NO_BANK}
        assert client.get("/v1/models").json()["data"][0]["olmo_tap"]["robustness"]["attack_bank"] is False


def test_a_full_queue_costs_the_robustness_not_the_answer(jury, bank, tmp_path):
    from tests.test_serve import make_client

    path = bank.save(tmp_path / "bank.json")
    with make_client(jury[0], max_batch=2, queue_size=0, attack_bank=str(path)) as client:
        response = ask(client, robustness=True, seed=1)
        assert response.status_code == 200
        record = response.json()["trust"]["robustness"]
        assert record["type"] == "unavailable" and "could not be queued" in record["reason"]
        assert "robustness" not in response.json()["trust"]["transcript"]
        assert ask(client).status_code == 200  # the attacked answers it queued were cancelled


def test_a_malformed_bank_is_a_clear_error_at_startup(jury, tmp_path, capsys, monkeypatch):
    from olmo_tap.serve.app import create_app
    from olmo_tap.serve.config import ServeConfig

    bad = tmp_path / "bank.json"
    bad.write_text('{"format": "olmo-tap-attack-bank", "version": 1, "model": {"fingerprint": "x"}, "entries": [{}]}')
    with pytest.raises(BankError, match="entry 0"):
        create_app(jury[0], jury[1], "tiny", ServeConfig(attack_bank=str(bad)))

    def refuse(args):
        raise AssertionError("the model was loaded before the bank was checked")

    monkeypatch.setattr(olmo_tap.cli, "load_model_and_tokenizer", refuse)
    assert olmo_tap.cli.main(["serve", "--attack-bank", str(bad)]) == 2
    assert "entry 0: missing or malformed field" in capsys.readouterr().err


def test_an_attacked_prompt_past_the_context_costs_the_robustness_not_the_answer(jury, tmp_path):
    from tests.test_serve import CONTEXT, make_client

    path = make_bank("sha256:0", ["abcdefghijkl" * 3]).save(tmp_path / "long.json")
    with make_client(jury[0], attack_bank=str(path)) as client:
        room = CONTEXT - len(LetterTokenizer(VOCAB).encode("abc"))
        response = ask(client, robustness=True, max_tokens=room - 2)
        assert response.status_code == 200, response.text
        record = response.json()["trust"]["robustness"]
        assert record["type"] == "unavailable" and "exceed the model's context of 128 tokens" in record["reason"]
