"""A transcript: everything needed to replay a response through the jury and audit it later.

Format (JSON object, ``format`` = "olmo-tap-transcript", ``version`` = 1):

- ``model``: the model source the response came from (preset, directory or hub id), or null;
- ``settings``: the decoder's settings (mode, seed, temperature, beta, veto_threshold, draft_head,
  n_llm_heads, max_new_tokens, vocab_limit, stop_ids, n_heads, heads_depth, dtype, device);
- ``prompt_ids`` / ``token_ids``: the templated prompt and the emitted tokens, as ids;
- ``output``: the whole PoEOutput (trust signals, resampled positions and their drafts, abstention, ...).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from olmo_tap.inference.poe import PoEOutput

FORMAT = "olmo-tap-transcript"
VERSION = 1
REQUIRED_SETTINGS = ("mode", "seed", "temperature", "beta", "veto_threshold", "draft_head", "n_llm_heads")


def transcript_dict(output: PoEOutput, model: str | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": None if model is None else str(model),
        "settings": output.settings,
        "prompt_ids": output.prompt_ids,
        "token_ids": output.token_ids,
        "output": output.to_dict(),
    }


def save_transcript(output: PoEOutput, path: str | Path, model: str | None = None) -> Path:
    path = Path(path)
    path.write_text(json.dumps(transcript_dict(output, model), indent=2))
    return path


def _id_list(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"transcript field {name!r} must be a list of integer token ids")
    return value


def check_transcript(data: Any) -> dict[str, Any]:
    """``data`` if it is a well-formed transcript; otherwise ValueError naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"a transcript must be a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ValueError(f"not an olmo-tap transcript: 'format' is {data.get('format')!r}, expected {FORMAT!r}")
    if data.get("version") != VERSION:
        raise ValueError(f"unsupported transcript version {data.get('version')!r} (this olmo-tap reads {VERSION})")
    settings = data.get("settings")
    if not isinstance(settings, dict):
        raise ValueError("transcript field 'settings' must be an object")
    missing = [k for k in REQUIRED_SETTINGS if k not in settings]
    if missing:
        raise ValueError(f"transcript settings lack {', '.join(missing)}")
    if not _id_list(data.get("prompt_ids"), "prompt_ids"):
        raise ValueError("transcript field 'prompt_ids' must not be empty")
    _id_list(data.get("token_ids"), "token_ids")
    if not isinstance(data.get("output", {}), dict):
        raise ValueError("transcript field 'output' must be an object")
    return data


def read_transcript(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such transcript file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    return check_transcript(data)
