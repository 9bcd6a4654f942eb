"""A transcript: everything needed to replay a response through the jury and audit it later."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from olmo_tap.inference.poe import PoEOutput

FORMAT = "olmo-tap-transcript"
VERSION = 1


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
