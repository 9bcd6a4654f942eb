"""Ed25519 signatures of transcript digests: which server vouched for an answer.

An audit (``olmo-tap audit``) shows that the jury produced an answer: it replays the transcript's claim
(format, version, model, settings, prompt ids, token ids) and re-takes every decision. It cannot say who
served it: anyone can write a transcript that replays honestly. A server started with ``--signing-key``
therefore signs each transcript's digest (``content_digest``, the sha256 of exactly that claim) with its
Ed25519 key, so a third party holding the server's public key can check both things: the jury's answer, and
that this server stood behind it.

What is signed is the ASCII digest string (``sha256:<hex>``), recomputed from the content at signing time,
never the transcript's stored ``digest`` field, which is only a convenience and could disagree with the
content. ``output`` is not covered: every field of it is derived from the claim and checked by the audit.

The signature object a transcript carries::

    "signature": {"algorithm": "ed25519", "public_key": <base64 of the 32 raw bytes>,
                  "fingerprint": "ed25519:<16 hex>", "digest": "sha256:<hex>", "value": <base64, 64 bytes>}

Keys are plain files: the private key an unencrypted PKCS8 PEM (mode 0600, written by ``olmo-tap keygen``),
the public key a SubjectPublicKeyInfo PEM or the base64 of its 32 raw bytes on one line (what a transcript
embeds, so a key can be copied from one).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from olmo_tap.inference.transcript import content_digest

ALGORITHM = "ed25519"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
SIGNATURE_FIELDS = ("algorithm", "public_key", "fingerprint", "digest", "value")


# ----- keys ----------------------------------------------------------------------------------------------------


def public_key_path(path: str | Path) -> Path:
    """Where ``generate_keypair`` writes the public half of the key at ``path``: ``path`` + ".pub"."""
    return Path(str(path) + ".pub")


def generate_keypair(path: str | Path) -> tuple[Path, Path]:
    """A new Ed25519 key: the private key (unencrypted PKCS8 PEM, mode 0600) at ``path``, the public key
    (SubjectPublicKeyInfo PEM) at ``path`` + ".pub". Returns both paths; never overwrites a file."""
    private_path, public_path = Path(path), public_key_path(path)
    for existing in (private_path, public_path):
        if existing.exists():
            raise ValueError(f"{existing} already exists; refusing to overwrite a key (choose another path)")
    if not private_path.parent.is_dir():
        raise ValueError(f"cannot write {private_path}: directory {private_path.parent} does not exist")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # O_EXCL: a file appearing between the check above and here is still never overwritten, and the secret
    # is created 0600 from the start rather than chmod-ed after being readable for a moment.
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ValueError(f"{private_path} already exists; refusing to overwrite a key (choose another path)") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # the umask can only remove bits, but be explicit about the result
        f.write(private_pem)
    try:
        with open(public_path, "xb") as f:
            f.write(public_pem)
    except FileExistsError:
        private_path.unlink()  # half a key pair is worse than none: the caller can simply retry elsewhere
        raise ValueError(f"{public_path} already exists; refusing to overwrite a key (choose another path)") from None
    return private_path, public_path


def _read_key_file(path: str | Path, what: str) -> bytes:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"no such {what} file: {path}")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _pem_label(data: bytes) -> str | None:
    """The label of the first PEM block ("PRIVATE KEY", "PUBLIC KEY", ...), or None when ``data`` is not PEM."""
    start = data.find(b"-----BEGIN ")
    if start < 0:
        return None
    end = data.find(b"-----", start + 11)
    return data[start + 11 : end].decode("ascii", "replace") if end > 0 else None


def _key_kind(key: Any) -> str:
    name = type(key).__name__.lstrip("_")
    for suffix in ("PrivateKey", "PublicKey"):
        name = name.removesuffix(suffix)
    return name or "unknown"


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in ``path`` (unencrypted PEM, as ``olmo-tap keygen`` writes); ValueError
    saying what is wrong otherwise."""
    data = _read_key_file(path, "signing key")
    label = _pem_label(data)
    if label is None:
        raise ValueError(f"signing key {path} is not a PEM key file (make one with `olmo-tap keygen PATH`)")
    if "ENCRYPTED" in label or b"Proc-Type: 4,ENCRYPTED" in data:
        raise ValueError(f"signing key {path} is encrypted; olmo-tap needs an unencrypted private key (PKCS8 PEM)")
    if "PRIVATE KEY" not in label:
        hint = " (this is a public key; give the private key, not the .pub file)" if "PUBLIC KEY" in label else ""
        raise ValueError(f"signing key {path} holds a {label!r} PEM block, not a private key{hint}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography raises TypeError when a password is needed: the key is encrypted after all.
        raise ValueError(
            f"signing key {path} is encrypted; olmo-tap needs an unencrypted private key (PKCS8 PEM)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ValueError(f"signing key {path} is not a readable private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"signing key {path} is a {_key_kind(key)} key; olmo-tap signs with Ed25519 keys only")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The Ed25519 public key in ``path``: a SubjectPublicKeyInfo PEM, or the base64 of the 32 raw bytes on
    one line (as a transcript's ``signature.public_key`` holds it). A private key is refused rather than
    used: whoever was handed it for checking holds a secret they should not."""
    data = _read_key_file(path, "public key")
    label = _pem_label(data)
    if label is None:
        text = data.strip()
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != PUBLIC_KEY_BYTES or b"\n" in text:
            raise ValueError(
                f"public key {path} is neither a PEM public key nor the base64 of a 32-byte Ed25519 key on one line"
            )
        return Ed25519PublicKey.from_public_bytes(raw)
    if "PRIVATE KEY" in label:
        raise ValueError(
            f"{path} is a private key; give the public key instead (the .pub file `olmo-tap keygen` wrote), "
            "and keep the private key secret"
        )
    if "PUBLIC KEY" not in label:
        raise ValueError(f"public key {path} holds a {label!r} PEM block, not a public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ValueError(f"public key {path} is not a readable public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"public key {path} is a {_key_kind(key)} key; olmo-tap signatures use Ed25519 keys only")
    return key


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(
        "ascii"
    )


def public_key_base64(public_key: Ed25519PublicKey) -> str:
    return base64.b64encode(raw_public_bytes(public_key)).decode("ascii")


def public_key_info(public_key: Ed25519PublicKey) -> dict[str, str]:
    """The public key in every form a checker may want (what ``GET /v1/signing-key`` answers)."""
    return {
        "algorithm": ALGORITHM,
        "public_key_pem": public_key_pem(public_key),
        "public_key": public_key_base64(public_key),
        "fingerprint": key_fingerprint(public_key),
    }


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """``ed25519:`` + the first 16 hex digits of the sha256 of the 32 raw key bytes: short enough to read out."""
    return f"{ALGORITHM}:" + hashlib.sha256(raw_public_bytes(public_key)).hexdigest()[:16]


# ----- signing and checking ------------------------------------------------------------------------------------


def sign_transcript(transcript: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of ``transcript`` (shallow) with a ``signature`` of its content digest; an old one is replaced."""
    digest = content_digest(transcript)
    public_key = private_key.public_key()
    value = private_key.sign(digest.encode("ascii"))
    return {
        **transcript,
        "signature": {
            "algorithm": ALGORITHM,
            "public_key": public_key_base64(public_key),
            "fingerprint": key_fingerprint(public_key),
            "digest": digest,
            "value": base64.b64encode(value).decode("ascii"),
        },
    }


@dataclass
class SignatureCheck:
    """What ``check_signature`` found.

    ``valid``: the signature verifies over the transcript's content as it is now (None: no signature).
    ``trusted``: the embedded public key is the trusted key (None: no trusted key given, or no signature);
    it says nothing on its own: a server vouched for the content only when ``valid`` and ``trusted`` both hold.
    ``fingerprint``: of the embedded public key, computed here (not the claimed field), when it parses.
    """

    present: bool
    valid: bool | None
    trusted: bool | None
    fingerprint: str | None
    reason: str

    @property
    def vouched(self) -> bool:
        """A valid signature by the trusted key."""
        return bool(self.valid and self.trusted)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _b64_field(signature: dict[str, Any], name: str, size: int) -> bytes:
    value = signature.get(name)
    if not isinstance(value, str):
        raise ValueError(f"signature.{name} must be a base64 string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"signature.{name} is not valid base64") from None
    if len(raw) != size:
        raise ValueError(f"signature.{name} must decode to {size} bytes, got {len(raw)}")
    return raw


def check_signature(transcript: dict[str, Any], trusted: Ed25519PublicKey | None = None) -> SignatureCheck:
    """Whether ``transcript`` carries a valid signature of its current content, and (with ``trusted``) whether
    the signing key is the trusted one. Never raises on a malformed signature: it is reported as invalid."""
    signature = transcript.get("signature") if isinstance(transcript, dict) else None
    if signature is None:
        if trusted is not None:
            reason = f"the transcript is unsigned: no server vouched for it (expected {key_fingerprint(trusted)})"
        else:
            reason = "the transcript is unsigned"
        return SignatureCheck(present=False, valid=None, trusted=None, fingerprint=None, reason=reason)

    def invalid(reason: str, fingerprint: str | None = None, key: Ed25519PublicKey | None = None) -> SignatureCheck:
        # A key that parses can still be compared with the trusted one: "whose key is it" and "does it verify"
        # are separate questions, and a reader may want both answers.
        match = None if trusted is None else key is not None and raw_public_bytes(key) == raw_public_bytes(trusted)
        return SignatureCheck(present=True, valid=False, trusted=match, fingerprint=fingerprint, reason=reason)

    if not isinstance(signature, dict):
        return invalid(f"the signature must be an object, got {type(signature).__name__}")
    if signature.get("algorithm") != ALGORITHM:
        return invalid(f"signature algorithm {signature.get('algorithm')!r} is not supported (only {ALGORITHM!r})")
    try:
        key = Ed25519PublicKey.from_public_bytes(_b64_field(signature, "public_key", PUBLIC_KEY_BYTES))
        value = _b64_field(signature, "value", SIGNATURE_BYTES)
    except ValueError as e:
        return invalid(str(e))
    fingerprint = key_fingerprint(key)
    claimed_digest = signature.get("digest")
    if not isinstance(claimed_digest, str):
        return invalid("signature.digest must be a string (sha256:<hex>)", fingerprint, key)
    claimed_fingerprint = signature.get("fingerprint")
    if claimed_fingerprint is not None and claimed_fingerprint != fingerprint:
        return invalid(
            f"signature.fingerprint {claimed_fingerprint!r} is not that of its public key ({fingerprint})",
            fingerprint,
            key,
        )
    try:
        digest = content_digest(transcript)
    except (ValueError, TypeError):
        return invalid("the transcript's content cannot be digested (a value JSON cannot represent)", fingerprint, key)

    def verifies(message: str) -> bool:
        try:
            key.verify(value, message.encode("ascii", "replace"))
        except InvalidSignature:
            return False
        return True

    if not verifies(digest):
        if claimed_digest != digest and verifies(claimed_digest):
            reason = (
                f"the transcript was edited after signing: the signature covers {claimed_digest}, "
                f"the content now hashes to {digest}"
            )
        else:
            reason = f"the signature does not verify over the transcript's content ({digest}) with its public key"
        return invalid(reason, fingerprint, key)
    if claimed_digest != digest:
        return invalid(
            f"signature.digest {claimed_digest} is not the content's digest {digest} (the field was altered)",
            fingerprint,
            key,
        )
    if trusted is None:
        return SignatureCheck(True, True, None, fingerprint, f"valid signature by {fingerprint} (no trusted key given)")
    if raw_public_bytes(key) == raw_public_bytes(trusted):
        return SignatureCheck(True, True, True, fingerprint, f"valid signature by the trusted key {fingerprint}")
    return SignatureCheck(
        True,
        True,
        False,
        fingerprint,
        f"valid signature by {fingerprint}, which is not the trusted key {key_fingerprint(trusted)}",
    )
