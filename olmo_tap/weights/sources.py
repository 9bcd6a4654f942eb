"""What a user-given model source is (preset, checkpoint directory, saved ensemble, GGUF file, hub id), and
reading a base (single-tower) checkpoint from any of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from olmo_tap.model.config import TransformerConfig
from olmo_tap.weights.errors import WeightsError
from olmo_tap.weights.hf import CONFIG_NAME, download_from_hub, read_hf_dir
from olmo_tap.weights.presets import PRESETS, convert_gguf, materialize_preset

SourceKind = Literal["preset", "hf_dir", "ensemble_dir", "gguf", "hub"]

# Written by the project when it saves an ensemble; only detected here (loading it is another module's job).
ENSEMBLE_CONFIG_NAME = "hydra_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_FILE_SUFFIXES = (".gguf", ".json", ".safetensors", ".bin", ".pt")  # names with these are meant as local files


@dataclass(frozen=True)
class ResolvedSource:
    kind: SourceKind
    path: Path | None  # the local file or directory; None for presets and hub ids (see ``materialize``)
    name: str  # the source as the user gave it (preset name, hub id or path)

    @property
    def has_own_heads(self) -> bool:
        """A saved ensemble or a trained preset: its heads are its own, not a base model to split at will."""
        return self.kind == "ensemble_dir" or (self.kind == "preset" and PRESETS[self.name].adapters is not None)

    def materialize(self, progress: bool = True) -> Path:
        """A local directory for this source, converting or downloading on first use.

        An HF-style checkpoint directory for every kind except ``ensemble_dir`` (which is returned as is).
        """
        if self.kind == "preset":
            return materialize_preset(self.name, progress=progress)
        if self.kind == "hub":
            return download_from_hub(self.name)
        assert self.path is not None
        if self.kind == "gguf":
            return convert_gguf(self.path, progress=progress)
        return self.path


def _resolve_local(path: Path, given: str) -> ResolvedSource:
    if path.is_dir():
        if (path / ENSEMBLE_CONFIG_NAME).is_file():
            return ResolvedSource("ensemble_dir", path, given)
        if (path / CONFIG_NAME).is_file():
            return ResolvedSource("hf_dir", path, given)
        raise WeightsError(
            f"directory {path} has neither {CONFIG_NAME} (a Hugging Face checkpoint) nor {ENSEMBLE_CONFIG_NAME} "
            "(a saved olmo-tap ensemble)"
        )
    if path.suffix.lower() == ".gguf":
        return ResolvedSource("gguf", path, given)
    if path.name == CONFIG_NAME:
        raise WeightsError(f"{path} is a config file: pass the checkpoint directory {path.parent} instead")
    raise WeightsError(f"{path} is a file but not a .gguf file; expected a checkpoint directory or a .gguf file")


def resolve(source: str | Path | ResolvedSource) -> ResolvedSource:
    """Decide what ``source`` is, in this order: preset name, local directory / .gguf file, hub id (``owner/name``).

    A ``Path`` is always taken as local. Nothing is downloaded or converted here.
    """
    if isinstance(source, ResolvedSource):
        return source
    if isinstance(source, Path):
        path = source.expanduser()
        if not path.exists():
            raise WeightsError(f"no such file or directory: {path}")
        return _resolve_local(path, str(source))
    if not isinstance(source, str) or not source.strip():
        raise WeightsError(f"model source must be a non-empty string or path, got {source!r}")
    given = source.strip()
    if given.lower() in PRESETS:
        return ResolvedSource("preset", None, given.lower())
    path = Path(given).expanduser()
    if path.exists():
        return _resolve_local(path, given)
    looks_local = given.startswith((".", "/", "~")) or given.lower().endswith(_FILE_SUFFIXES)
    if _HUB_ID_RE.fullmatch(given) and not looks_local:
        return ResolvedSource("hub", None, given)
    raise WeightsError(f"no such file, directory, preset or hub id: {given!r} (presets: {', '.join(PRESETS)})")


def find_tokenizer_dir(directory: Path) -> Path | None:
    """``directory`` or its ``tokenizer/`` subdirectory, whichever holds tokenizer files; None if neither does."""
    for candidate in (directory, directory / "tokenizer"):
        if any((candidate / name).is_file() for name in TOKENIZER_FILES):
            return candidate
    return None


def read_base_checkpoint(
    source: str | Path | ResolvedSource, progress: bool = True
) -> tuple[TransformerConfig, dict[str, torch.Tensor], Path | None]:
    """(config, HF-named tensors, tokenizer directory or None) of a single-tower checkpoint.

    GGUF files (the default preset's too) are read from their cached conversion, so the tokenizer directory is
    that conversion. A saved ensemble is not a base checkpoint and raises WeightsError.
    """
    resolved = resolve(source)
    if resolved.kind == "ensemble_dir":
        raise WeightsError(
            f"{resolved.path} is a saved olmo-tap ensemble ({ENSEMBLE_CONFIG_NAME}), not a base checkpoint; "
            "load it with HydraTransformer.from_pretrained"
        )
    directory = resolved.materialize(progress=progress)
    cfg, state = read_hf_dir(directory)
    return cfg, state, find_tokenizer_dir(directory)
