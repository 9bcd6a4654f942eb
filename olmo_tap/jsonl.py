"""JSON Lines in and out: one object per line, and errors that name the file and line."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line; a line that is not JSON raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file {path} does not exist")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise ValueError(f"{path}:{number}: JSON too deeply nested to read") from None
            yield number, record


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write ``records`` one per line (UTF-8, parent directories created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def json_safe(value: Any) -> Any:
    """JSON has no infinity or NaN: write them as strings (as TokenMetrics.to_dict does): they stay readable."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
