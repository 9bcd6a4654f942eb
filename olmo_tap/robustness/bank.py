"""An attack bank: adversarial suffixes found by ``olmo-tap train attacks``, with where they came from.

A bank is one JSON file::

    {"format": "olmo-tap-attack-bank", "version": 1,
     "model": {"name", "fingerprint"},        # the weights the suffixes were optimised against
     "settings": {...},                       # the GCG settings of the run (``gcg.GCGSettings``)
     "entries": [{"index", "suffix", "token_ids", "target", "questions", "success", "flipped", "n_questions",
                  "loss", "steps", "seconds", "seed", "trace"}, ...]}     # best first

``suffix`` is the text appended to the user's question (after one space); ``token_ids`` the tokens GCG optimised
(the text re-encodes to them where the tokenizer allows; the probe appends the text, as a user would type it).
``target`` is what the suffix was optimised to flip (``"jury"`` or ``"head:<i>"``), ``questions`` the digests of
the training questions it was optimised on, ``success`` the fraction of them whose answer it flipped when it
was made (``flipped`` of ``n_questions``).

The model fingerprint is the sha256 of the model's weights (``model_fingerprint``): a bank says exactly which
weights it attacked; the probe uses any bank's suffixes (they are text) and reports whether they were made for
the weights it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from olmo_tap.jsonl import read_json

FORMAT = "olmo-tap-attack-bank"
VERSION = 1
BANK_RESOURCE = "banks"  # inside the olmo_tap.robustness package: <preset name>.json


class BankError(ValueError):
    """A bank file that cannot be used, with what is wrong with it."""


@dataclass(frozen=True)
class BankEntry:
    index: int  # the entry's place in the build: its training questions and its seed follow from it
    suffix: str
    token_ids: list[int]
    target: str
    questions: list[str]
    flipped: int
    n_questions: int
    loss: float
    steps: int
    seconds: float
    seed: int
    trace: list[list[int]] = field(default_factory=list)  # the suffix's token ids after each GCG step

    @property
    def success(self) -> float:
        return self.flipped / self.n_questions if self.n_questions else 0.0

    def rank_key(self) -> tuple[float, float, int]:
        """Best first: the most questions flipped when made, then the lowest loss, then build order."""
        return (-self.success, self.loss, self.index)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "success": self.success}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> BankEntry:
        if not isinstance(data, dict):
            raise BankError(f"{where}: expected an object, got {type(data).__name__}")
        try:
            entry = cls(
                index=int(data["index"]),
                suffix=data["suffix"],
                token_ids=[int(t) for t in data["token_ids"]],
                target=data["target"],
                questions=list(data["questions"]),
                flipped=int(data["flipped"]),
                n_questions=int(data["n_questions"]),
                loss=float(data["loss"]),
                steps=int(data["steps"]),
                seconds=float(data["seconds"]),
                seed=int(data["seed"]),
                trace=[[int(t) for t in ids] for ids in data.get("trace", [])],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BankError(f"{where}: missing or malformed field ({e!r})") from None
        if not isinstance(entry.suffix, str) or not entry.suffix.strip():
            raise BankError(f"{where}: 'suffix' must be a non-empty string")
        return entry


@dataclass
class AttackBank:
    model_name: str
    fingerprint: str
    settings: dict[str, Any]
    entries: list[BankEntry] = field(default_factory=list)

    @property
    def suffixes(self) -> list[str]:
        return [e.suffix for e in self.entries]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": {"name": self.model_name, "fingerprint": self.fingerprint},
            "settings": self.settings,
            "entries": [e.to_dict() for e in self.entries],
        }

    def save(self, path: str | Path) -> Path:
        """Write atomically (a crash mid-write leaves the previous bank, which is what resuming reads)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a bank is for anyone who runs the model
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, data: Any, where: str = "bank") -> AttackBank:
        if not isinstance(data, dict):
            raise BankError(f"{where}: expected a JSON object")
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise BankError(
                f"{where}: expected format {FORMAT!r} version {VERSION}, "
                f"found {data.get('format')!r} {data.get('version')!r}"
            )
        model = data.get("model")
        if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), str):
            raise BankError(f"{where}: 'model' must be an object with a 'fingerprint'")
        entries = data.get("entries")
        if not isinstance(entries, list):
            raise BankError(f"{where}: 'entries' must be a list")
        settings = data.get("settings")
        return cls(
            model_name=str(model.get("name", "")),
            fingerprint=model["fingerprint"],
            settings=settings if isinstance(settings, dict) else {},
            entries=[BankEntry.from_dict(e, f"{where}: entry {i}") for i, e in enumerate(entries)],
        )


def load_bank(path: str | Path) -> AttackBank:
    """Read a bank file, with a clear error for a missing or malformed one."""
    path = Path(path)
    if not path.exists():
        raise BankError(f"no attack bank at {path} (build one with `olmo-tap train attacks`)")
    data = read_json(path, "attack bank", BankError)
    return AttackBank.from_dict(data, str(path))


def shipped_bank_path(preset: str) -> Path | None:
    """The bank shipped in the package for a preset, if there is one."""
    path = Path(str(resources.files("olmo_tap.robustness").joinpath(BANK_RESOURCE, f"{preset}.json")))
    return path if path.is_file() else None


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """``sha256:<hex>`` of the model's weights: every tensor of its state dict, by name, in name order, as bytes (a
    quantized Hydra: its codes, scales and minimums instead of the released float weights)."""
    h = hashlib.sha256()
    weights = model.weight_tensors() if hasattr(model, "weight_tensors") else model.state_dict()
    for name, tensor in sorted(weights.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()
