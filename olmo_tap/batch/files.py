"""A batch job's files: records in (JSONL or Parquet, by extension), results out as they finish, and the job's
identity beside the output so that a rerun resumes it and never mixes two jobs.

- Input: one JSON object per line (``.jsonl`` / ``.json``) or per row (``.parquet``; nested columns come back as
  Python objects). A record's ``where`` is ``FILE:LINE`` (or ``FILE:row N``), for error messages.
- Output, JSONL: one result per line, appended and flushed as each finishes, so an interrupted job loses at most
  the records in flight; a line cut short by the interruption is dropped when the job resumes. Output, Parquet:
  the results go to ``OUTPUT.partial.jsonl`` as they finish and become the Parquet file when the job ends (rows
  in input order; top-level fields as columns, nested ones as JSON text); the journal is then removed.
- ``OUTPUT.job.json``: the job's identity (command, input file, model, options, job seed). A rerun with the same
  identity skips the records already in the output, so records appended to the input since are done then; with
  another identity it is refused (name a new output, or remove the old one). Each result carries its record's
  ``record_sha256``: a record edited since its result was written is refused too, not silently kept.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olmo_tap.jsonl import parse_lines

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def file_format(path: Path, what: str) -> str:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{what} {path}: give a .jsonl (or .json, one object per line) or .parquet file")
    return kind


@dataclass(frozen=True)
class InputRecord:
    index: int  # 0-based position in the input
    where: str  # FILE:LINE for messages
    value: Any  # the parsed object (a record must be a JSON object; the job checks it)
    error: str | None = None  # the line is not UTF-8 JSON


def read_records(path: str | Path) -> Iterator[InputRecord]:
    """The input's records in order; a line that is not UTF-8 JSON comes as a record with its ``error``."""
    path = Path(path)
    kind = file_format(path, "input")
    if path.is_dir():
        raise ValueError(f"input {path} is a directory, not a file")
    if not path.is_file():
        raise ValueError(f"input file {path} does not exist")
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's errors name the problem but not always the file
            raise ValueError(f"{path} is not a readable Parquet file ({e})") from None
        for i, row in enumerate(rows):
            yield InputRecord(i, f"{path}:row {i + 1}", {k: v for k, v in row.items() if v is not None})
        return
    for index, (number, value, error) in enumerate(parse_lines(path)):
        yield InputRecord(index, f"{path}:{number}", value, error)


def record_digest(value: Any) -> str:
    """SHA-256 of a record's canonical JSON: tells whether a record changed since its result was written."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Output:
    """Where results go: ``open`` checks the job's identity and returns the ids already done; ``write`` appends
    one result; ``close`` finishes the file (Parquet: from the journal)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.format = file_format(self.path, "output")
        self.journal = self.path.with_name(self.path.name + ".partial.jsonl") if self.format == "parquet" else self.path
        self.identity_path = self.path.with_name(self.path.name + ".job.json")
        self._file: Any = None

    def open(self, identity: dict[str, Any]) -> dict[str, str]:
        """Start or resume the job ``identity``; id -> record_sha256 of the results already written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existing = self.path.exists() or self.journal.exists()
        if existing:
            if not self.identity_path.is_file():
                raise ValueError(f"{self.path} exists and is not the output of an olmo-tap batch job: choose another")
            saved = json.loads(self.identity_path.read_text())
            if saved != identity:
                changed = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
                raise ValueError(
                    f"{self.path} holds the results of another job (it differs in {', '.join(changed)}): name a new "
                    "output, or remove that one and its .job.json to start over"
                )
        else:
            self.identity_path.write_text(json.dumps(identity, indent=2) + "\n")
        done = self._done_ids()
        self._file = self.journal.open("a", encoding="utf-8")
        return done

    def _done_ids(self) -> dict[str, str]:
        if self.format == "parquet" and self.path.exists() and not self.journal.exists():
            import pyarrow.parquet as pq

            table = pq.read_table(self.path, columns=["id", "record_sha256"])
            return dict(zip(table.column("id").to_pylist(), table.column("record_sha256").to_pylist(), strict=True))
        if not self.journal.exists():
            return {}
        done, good = {}, 0
        with self.journal.open("rb") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    done[str(row["id"])] = row["record_sha256"]
                except (ValueError, KeyError, TypeError):
                    break  # a line the interruption cut short: it and anything after it are redone
                good += len(line)
        with self.journal.open("r+b") as f:
            f.truncate(good)
        return done

    def write(self, result: dict[str, Any]) -> None:
        self._file.write(json.dumps(result, ensure_ascii=False, allow_nan=False) + "\n")
        self._file.flush()

    def close(self, finished: bool) -> None:
        """Close the file; for Parquet, once every record is done, write the Parquet file from the journal."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.format != "parquet" or not finished or not self.journal.exists():
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = sorted(self.rows(), key=lambda r: r["index"])
        names = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("id", "index"), k))
        nested = [k for k in names if any(isinstance(r.get(k), dict | list) for r in rows)]

        def column(name: str) -> list[Any]:
            if name == "id":
                return [str(r["id"]) for r in rows]
            if name in nested:  # an output or a verdict varies in shape from record to record: JSON text
                return [None if r.get(name) is None else json.dumps(r[name], ensure_ascii=False) for r in rows]
            return [r.get(name) for r in rows]

        table = pa.table({k: column(k) for k in names})
        pq.write_table(table.replace_schema_metadata({JSON_COLUMNS: json.dumps(nested)}), self.path)
        self.journal.unlink()

    def rows(self) -> Iterator[dict[str, Any]]:
        """Every result written so far (a finished Parquet file's rows first, then the journal's), nested fields
        parsed back."""
        if self.format == "parquet" and self.path.exists():
            import pyarrow.parquet as pq

            table = pq.read_table(self.path)
            nested = json.loads((table.schema.metadata or {}).get(JSON_COLUMNS.encode(), b"[]"))
            for row in table.to_pylist():
                yield {k: json.loads(v) if k in nested and v is not None else v for k, v in row.items()}
        if self.journal.exists() and (self.format == "jsonl" or self.journal != self.path):
            with self.journal.open(encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)


JSON_COLUMNS = "olmo_tap.json_columns"  # Parquet metadata: the columns that hold JSON text
