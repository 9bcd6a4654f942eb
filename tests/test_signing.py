"""Ed25519 signing of transcript digests: keys, signatures, every way to break one, the CLI and the service.

Transcripts for the signature checks are built by hand (a signature only sees the digested claim); the
service and ``olmo-tap generate`` tests use a tiny random Hydra with letters as tokens.
"""

from __future__ import annotations

import base64
import copy
import json
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from olmo_tap import cli
from olmo_tap.inference.transcript import check_transcript, content_digest
from olmo_tap.serve.app import create_app
from olmo_tap.serve.config import ServeConfig
from olmo_tap.verify.signing import (
    SignatureCheck,
    check_signature,
    generate_keypair,
    key_fingerprint,
    load_private_key,
    load_public_key,
    sign_transcript,
)
from tests.tiny import LetterTokenizer, tiny_hydra

VOCAB = 12
MODEL_ID = "tiny-letters"
PROMPT = [{"role": "user", "content": "abc"}]


def claim() -> dict:
    """A well-formed version-2 transcript (its ``output`` left empty: signatures never look at it)."""
    transcript = {
        "format": "olmo-tap-transcript",
        "version": 2,
        "model": MODEL_ID,
        "settings": {
            "mode": "poe",
            "seed": 7,
            "temperature": 1.0,
            "gamma": 4,
            "beta": 1.0,
            "veto_threshold": None,
            "draft_head": 0,
            "n_llm_heads": 3,
            "max_new_tokens": 5,
        },
        "prompt_ids": [0, 1, 2],
        "token_ids": [3, 4, 5, 6, 7],
    }
    transcript["digest"] = content_digest(transcript)
    transcript["output"] = {}
    return check_transcript(transcript)


@pytest.fixture
def keypair(tmp_path):
    private_path, public_path = generate_keypair(tmp_path / "server.key")
    return load_private_key(private_path), load_public_key(public_path)


@pytest.fixture
def signed(keypair):
    return sign_transcript(claim(), keypair[0])


# ----- keys ----------------------------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_0600_and_its_public_key_and_never_overwrites(tmp_path):
    private_path, public_path = generate_keypair(tmp_path / "k")
    assert private_path == tmp_path / "k" and public_path == tmp_path / "k.pub"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert private_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public_path.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    private, public = load_private_key(private_path), load_public_key(public_path)
    assert key_fingerprint(private.public_key()) == key_fingerprint(public)
    fingerprint = key_fingerprint(public)
    assert fingerprint.startswith("ed25519:") and len(fingerprint) == len("ed25519:") + 16

    before = private_path.read_bytes()
    with pytest.raises(ValueError, match="already exists"):
        generate_keypair(private_path)
    assert private_path.read_bytes() == before
    # an existing .pub alone is enough to refuse, and nothing is left behind
    (tmp_path / "other.pub").write_text("someone's key")
    with pytest.raises(ValueError, match=r"other\.pub already exists"):
        generate_keypair(tmp_path / "other")
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValueError, match="does not exist"):
        generate_keypair(tmp_path / "no-such-dir" / "k")


def test_a_public_key_may_be_the_base64_a_transcript_embeds(tmp_path, signed, keypair):
    path = tmp_path / "embedded.pub"
    path.write_text(signed["signature"]["public_key"] + "\n")
    assert key_fingerprint(load_public_key(path)) == key_fingerprint(keypair[1])
    path.write_text(base64.b64encode(b"x" * 31).decode())
    with pytest.raises(ValueError, match="neither a PEM public key nor the base64"):
        load_public_key(path)


def test_bad_key_files_are_refused_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="no such signing key file"):
        load_private_key(tmp_path / "missing")
    with pytest.raises(ValueError, match="no such public key file"):
        load_public_key(tmp_path / "missing.pub")

    garbage = tmp_path / "garbage"
    garbage.write_text("this is not a key\n")
    with pytest.raises(ValueError, match="not a PEM key file"):
        load_private_key(garbage)
    with pytest.raises(ValueError, match="neither a PEM public key"):
        load_public_key(garbage)
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="not a readable private key"):
        load_private_key(broken)

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    rsa_private = tmp_path / "rsa.key"
    rsa_private.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    rsa_public = tmp_path / "rsa.pub"
    rsa_public.write_bytes(
        rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="is a RSA key; olmo-tap signs with Ed25519 keys only"):
        load_private_key(rsa_private)
    with pytest.raises(ValueError, match="is a RSA key; olmo-tap signatures use Ed25519 keys only"):
        load_public_key(rsa_public)

    ed_key = Ed25519PrivateKey.generate()
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        ed_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ValueError, match="is encrypted; olmo-tap needs an unencrypted private key"):
        load_private_key(encrypted)
    legacy = tmp_path / "legacy-encrypted.key"  # OpenSSL's traditional format: "Proc-Type: 4,ENCRYPTED"
    legacy.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ValueError, match="is encrypted"):
        load_private_key(legacy)

    # the two halves swapped: each refused, naming the mistake
    private_path, public_path = generate_keypair(tmp_path / "pair")
    with pytest.raises(ValueError, match="is a private key; give the public key instead"):
        load_public_key(private_path)
    with pytest.raises(ValueError, match="this is a public key; give the private key"):
        load_private_key(public_path)
    with pytest.raises(ValueError, match="is not a file"):
        load_private_key(tmp_path)


# ----- signatures ----------------------------------------------------------------------------------------------


def test_a_signed_transcript_checks_valid_and_trusted(signed, keypair):
    private, public = keypair
    original = claim()
    assert "signature" not in original and sign_transcript(original, private) is not original
    signature = signed["signature"]
    assert set(signature) == {"algorithm", "public_key", "fingerprint", "digest", "value"}
    assert signature["algorithm"] == "ed25519" and signature["digest"] == signed["digest"] == content_digest(signed)
    assert signature["fingerprint"] == key_fingerprint(public)
    assert len(base64.b64decode(signature["public_key"])) == 32 and len(base64.b64decode(signature["value"])) == 64
    assert check_transcript(json.loads(json.dumps(signed)))["signature"] == signature

    check = check_signature(signed)
    assert (check.present, check.valid, check.trusted) == (True, True, None)
    assert check.fingerprint == key_fingerprint(public)
    check = check_signature(signed, public)
    assert (check.present, check.valid, check.trusted, check.vouched) == (True, True, True, True)
    assert "trusted" in check.reason
    assert check.to_dict() == {
        "present": True,
        "valid": True,
        "trusted": True,
        "fingerprint": key_fingerprint(public),
        "reason": check.reason,
    }


def test_the_signature_covers_the_content_not_the_stored_digest(keypair):
    transcript = claim()
    transcript["digest"] = "sha256:" + "0" * 64  # a wrong stored digest is ignored: the content is what is signed
    signed = sign_transcript(transcript, keypair[0])
    assert signed["signature"]["digest"] == content_digest(transcript) != transcript["digest"]
    assert check_signature(signed, keypair[1]).valid


def test_another_key_is_valid_but_not_trusted(signed, keypair, tmp_path):
    other_private, other_public = generate_keypair(tmp_path / "other")
    check = check_signature(signed, load_public_key(other_public))
    assert (check.valid, check.trusted, check.vouched) == (True, False, False)
    assert "not the trusted key" in check.reason
    # someone edits the answer and re-signs it with their own key: valid, but not by the server
    forged = copy.deepcopy(signed)
    forged["token_ids"][0] = 0
    forged = sign_transcript(forged, load_private_key(other_private))
    check = check_signature(forged, keypair[1])
    assert (check.valid, check.trusted, check.vouched) == (True, False, False)


def _flip(b64: str) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[0] ^= 1
    return base64.b64encode(bytes(raw)).decode()


EDITS = {
    "token id": lambda t: t["token_ids"].__setitem__(2, 9),
    "token appended": lambda t: t["token_ids"].append(1),
    "prompt id": lambda t: t["prompt_ids"].__setitem__(0, 5),
    "setting": lambda t: t["settings"].__setitem__("temperature", 0.5),
    "setting added": lambda t: t["settings"].__setitem__("veto_threshold", 0.1),
    "model": lambda t: t.__setitem__("model", "another-model"),
    "version": lambda t: t.__setitem__("version", 1),
    "signature value": lambda t: t["signature"].__setitem__("value", _flip(t["signature"]["value"])),
    "public key": lambda t: t["signature"].__setitem__("public_key", _flip(t["signature"]["public_key"])),
    "signed digest": lambda t: t["signature"].__setitem__("digest", "sha256:" + "1" * 64),
    "fingerprint": lambda t: t["signature"].__setitem__("fingerprint", "ed25519:0123456789abcdef"),
    "algorithm": lambda t: t["signature"].__setitem__("algorithm", "rsa"),
    "no algorithm": lambda t: t["signature"].pop("algorithm"),
    "garbage base64 value": lambda t: t["signature"].__setitem__("value", "not base64 !!"),
    "garbage base64 key": lambda t: t["signature"].__setitem__("public_key", "%%%"),
    "short value": lambda t: t["signature"].__setitem__("value", base64.b64encode(b"x" * 63).decode()),
    "short key": lambda t: t["signature"].__setitem__("public_key", base64.b64encode(b"x" * 31).decode()),
    "value not a string": lambda t: t["signature"].__setitem__("value", 12),
    "digest not a string": lambda t: t["signature"].__setitem__("digest", None),
    "signature not an object": lambda t: t.__setitem__("signature", "signed, honestly"),
    "settings unrepresentable": lambda t: t["settings"].__setitem__("beta", float("nan")),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_every_edit_breaks_the_signature(signed, keypair, edit):
    tampered = copy.deepcopy(signed)
    EDITS[edit](tampered)
    for trusted in (None, keypair[1]):
        check = check_signature(tampered, trusted)
        assert isinstance(check, SignatureCheck)
        assert check.present and check.valid is False and not check.vouched, (edit, check)
        assert check.reason


def test_an_edit_after_signing_is_named_as_such(signed):
    tampered = copy.deepcopy(signed)
    tampered["token_ids"][0] = 11
    check = check_signature(tampered)
    assert "edited after signing" in check.reason and signed["signature"]["digest"] in check.reason
    # updating the stored digests too does not help: the signature is over the old content
    tampered["digest"] = tampered["signature"]["digest"] = content_digest(tampered)
    assert check_signature(tampered).valid is False


def test_unsigned_transcripts(keypair):
    check = check_signature(claim())
    assert (check.present, check.valid, check.trusted, check.fingerprint) == (False, None, None, None)
    check = check_signature(claim(), keypair[1])
    assert (check.present, check.valid, check.trusted) == (False, None, None)
    assert "unsigned" in check.reason and key_fingerprint(keypair[1]) in check.reason


# ----- the command line ----------------------------------------------------------------------------------------


def test_keygen_command(tmp_path, capsys):
    out = tmp_path / "server.key"
    assert cli.main(["keygen", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and f"{out}.pub" in printed
    assert key_fingerprint(load_public_key(f"{out}.pub")) in printed
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert cli.main(["keygen", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("olmo-tap: error:") and "already exists" in err


def test_generate_signing_key_needs_save_and_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "abc", "--signing-key", str(tmp_path / "k")])
    assert e.value.code == 2 and "needs --save" in capsys.readouterr().err

    def no_model(args):
        raise AssertionError("the model was loaded before the key was checked")

    monkeypatch.setattr(cli, "load_model_and_tokenizer", no_model)
    argv = ["generate", "abc", "--save", str(tmp_path / "t.json"), "--signing-key", str(tmp_path / "missing")]
    assert cli.main(argv) == 2
    assert "no such signing key file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny():
    return tiny_hydra(vocab=VOCAB, n_heads=4)


def test_generate_saves_a_signed_transcript(tmp_path, capsys, monkeypatch, tiny):
    key, public = generate_keypair(tmp_path / "k")
    monkeypatch.setattr(cli, "load_model_and_tokenizer", lambda args: (tiny, LetterTokenizer(VOCAB)))
    saved = tmp_path / "t.json"
    argv = ["generate", "abc", "--max-new-tokens", "5", "--seed", "3", "--no-color", "--save", str(saved)]
    assert cli.main([*argv, "--signing-key", str(key)]) == 0
    transcript = json.loads(saved.read_text())
    check = check_signature(transcript, load_public_key(public))
    assert check.valid and check.trusted
    err = capsys.readouterr().err
    assert err.count(f"transcript saved to {saved} (digest {transcript['digest']})") == 1
    assert f"signed by {check.fingerprint}" in err

    assert cli.main(argv) == 0  # no key: unsigned, and no "signed by" line
    assert "signature" not in json.loads(saved.read_text())
    assert "signed by" not in capsys.readouterr().err


def test_serve_refuses_a_bad_key_before_loading_the_model(tmp_path, capsys, monkeypatch):
    def no_model(args):
        raise AssertionError("the model was loaded before the key was checked")

    monkeypatch.setattr(cli, "load_model_and_tokenizer", no_model)
    assert cli.main(["serve", "--signing-key", str(tmp_path / "missing")]) == 2
    assert "no such signing key file" in capsys.readouterr().err
    (tmp_path / "k").write_text("nonsense")
    monkeypatch.setenv("OLMO_TAP_SERVE_SIGNING_KEY", str(tmp_path / "k"))
    assert cli.main(["serve"]) == 2
    assert "not a PEM key file" in capsys.readouterr().err


# ----- the service ---------------------------------------------------------------------------------------------


def client_for(model, **config):
    from fastapi.testclient import TestClient

    app = create_app(model, LetterTokenizer(VOCAB), MODEL_ID, ServeConfig(**config))
    return TestClient(app, base_url="http://localhost", raise_server_exceptions=False)


def test_the_service_signs_every_transcript(tmp_path, tiny):
    key, _ = generate_keypair(tmp_path / "server.key")
    request = {"messages": PROMPT, "temperature": 1.0, "seed": 7, "max_tokens": 8}
    with client_for(tiny, signing_key=str(key)) as client:
        info = client.get("/v1/signing-key").json()
        whole = client.post("/v1/chat/completions", json=request).json()
        with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
            lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert info["algorithm"] == "ed25519" and info["public_key_pem"].startswith("-----BEGIN PUBLIC KEY-----")
    pem = tmp_path / "server.pub.pem"
    pem.write_text(info["public_key_pem"])
    raw = tmp_path / "server.pub.b64"
    raw.write_text(info["public_key"])
    server_key = load_public_key(pem)
    assert key_fingerprint(server_key) == key_fingerprint(load_public_key(raw)) == info["fingerprint"]

    trust = whole["trust"]
    transcript = check_transcript(trust["transcript"])
    assert trust["digest"] == transcript["digest"] == content_digest(transcript)
    assert trust["signed_by"] == info["fingerprint"]
    check = check_signature(transcript, server_key)
    assert (check.valid, check.trusted) == (True, True), check.reason

    chunks = [json.loads(d) for d in lines if d != "[DONE]"]
    final = next(c["trust"] for c in chunks if "transcript" in c.get("trust", {}))
    assert final["signed_by"] == info["fingerprint"] and final["digest"] == final["transcript"]["digest"]
    assert check_signature(final["transcript"], server_key).vouched
    assert final["transcript"]["token_ids"] == transcript["token_ids"]


def test_a_service_without_a_key_does_not_sign(tiny):
    with client_for(tiny) as client:
        response = client.get("/v1/signing-key")
        whole = client.post("/v1/chat/completions", json={"messages": PROMPT, "max_tokens": 4}).json()
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "not_found_error" and "does not sign" in error["message"]
    trust = whole["trust"]
    assert trust["signed_by"] is None and "signature" not in trust["transcript"]
    assert trust["digest"] == trust["transcript"]["digest"]


def test_create_app_refuses_a_bad_key(tmp_path, tiny):
    with pytest.raises(ValueError, match="no such signing key file"):
        create_app(tiny, LetterTokenizer(VOCAB), MODEL_ID, ServeConfig(signing_key=str(tmp_path / "missing")))
