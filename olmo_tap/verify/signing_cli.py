"""``olmo-tap keygen``: make the Ed25519 key pair a server signs its transcripts with (``olmo_tap.verify.signing``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def register(sub: Any, add_model_args: Callable[..., None]) -> None:
    keygen = sub.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing transcripts (serve/generate --signing-key, audit --public-key)",
        description="Writes an unencrypted private key (PKCS8 PEM, mode 0600) to OUT and its public key to "
        "OUT.pub. The server keeps OUT secret (olmo-tap serve --signing-key OUT); auditors get OUT.pub "
        "(olmo-tap audit --public-key OUT.pub). Existing files are never overwritten.",
    )
    keygen.add_argument("out", metavar="OUT", help="path of the private key; the public key goes to OUT.pub")
    keygen.set_defaults(func=cmd_keygen)


def cmd_keygen(args: argparse.Namespace) -> int:
    from olmo_tap.verify.signing import generate_keypair, key_fingerprint, load_public_key

    private_path, public_path = generate_keypair(args.out)
    print(f"private key: {private_path} (keep it secret: olmo-tap serve --signing-key {private_path})")
    print(f"public key:  {public_path} (for auditors: olmo-tap audit --public-key {public_path})")
    print(f"fingerprint: {key_fingerprint(load_public_key(public_path))}")
    return 0
