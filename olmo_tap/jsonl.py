"""JSON Lines in and out: one object per line, and errors that name the file and line."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def is_int(value: Any) -> bool:
    """A JSON integer (``true`` and ``false`` are Python ints too, and are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A JSON number that is neither NaN nor infinite (nor a boolean)."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice. Parsers differ on which value counts (Python's and JavaScript's take the
    last, others the first), so a transcript holding one could be audited as one text and read as another."""

    def __init__(self, key: str) -> None:
        self.key = key
        shown = key if len(key) <= 80 else key[:79] + "…"
        super().__init__(f"the key {shown!r} appears twice in one object")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):  # only then look for the key
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return value


def loads(text: str | bytes) -> Any:
    """``json.loads`` that refuses an object naming a key twice (``DuplicateKeyError``)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def read_json(path: str | Path, what: str = "JSON file", error: type[ValueError] = ValueError) -> Any:
    """Parse a JSON file. Every failure raises ``error`` naming what the file is for, the file and the problem
    (missing, a directory, unreadable, not UTF-8, not JSON, too deep); a leading byte-order mark is skipped."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise error(f"{what} {path} is not UTF-8 (byte 0x{raw[e.start]:02X} on line {line})") from None
    try:
        return loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what} {path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    except DuplicateKeyError as e:
        raise error(f"{what} {path} is ambiguous: {e}") from None
    except RecursionError:
        raise error(f"{what} {path} is too deeply nested to read") from None


def parse_lines(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object, None) for every non-blank line of an existing file, or (line number, None,
    what is wrong) for a line that is not UTF-8 or not JSON: the caller decides whether one bad line ends the read."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, None, f"not UTF-8 (byte 0x{raw[e.start]:02X} is byte {e.start + 1} of the line)"
                continue
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark, as some Windows editors write, is no record
            if not line.strip():
                continue
            try:
                yield number, loads(line), None
            except json.JSONDecodeError as e:
                yield number, None, f"not valid JSON ({e.msg} at column {e.colno})"
            except DuplicateKeyError as e:
                yield number, None, f"ambiguous JSON: {e}"
            except RecursionError:
                yield number, None, "JSON too deeply nested to read"


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line; a line that is not UTF-8 JSON raises ValueError."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a JSONL file")
    if not path.is_file():
        raise ValueError(f"file {path} does not exist")
    for number, record, error in parse_lines(path):
        if error is not None:
            raise ValueError(f"{path}:{number}: {error}")
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
