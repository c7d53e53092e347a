"""Reading and validating a user's text-classification files (CSV or JSONL).

Everything is parsed and checked before any dataset is written; every problem raises
`DataFileError` naming the file, the 1-based line (CSV counts the header) and the field.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import pathlib
from collections.abc import Mapping
from typing import Any


class DataFileError(ValueError):
    """Bad user data; the message names the file, the 1-based line (CSV counts the header)
    and the field, where they apply."""

    def __init__(self, path: Any, line: int | None, field: str | None, problem: str):
        where = [str(path)] + [f"line {line}"] * bool(line) + [f"field {field!r}"] * bool(field)
        super().__init__(f"{', '.join(where)}: {problem}")
        self.path, self.line, self.field = str(path), line, field


@dataclasses.dataclass(frozen=True)
class Fields:
    """Names of the text, label and optional second-text columns / JSON keys."""

    text: str
    label: str
    text_pair: str | None = None

    def names(self) -> list[str]:
        return [f for f in (self.text, self.text_pair, self.label) if f]


def check_readable(path: pathlib.Path) -> None:
    """Raises `DataFileError` naming `path` unless it is an existing regular file."""
    if path.is_dir():
        raise DataFileError(path, None, None, "is a directory, expected a data file")
    if not path.is_file():
        raise DataFileError(path, None, None, "file not found")


def decode_file(path: pathlib.Path) -> tuple[bytes, str]:
    """``(raw bytes, text)`` of a UTF-8 file (a BOM is dropped).

    Raises:
      DataFileError: naming the file for a missing or unreadable file, and the line of the
        first byte that is not valid UTF-8.
    """
    check_readable(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataFileError(path, None, None, f"cannot read the file ({e.strerror or e})") from None
    try:
        return raw, raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataFileError(path, line, None, f"not valid UTF-8 ({e.reason})") from None


def jsonl_objects(path: pathlib.Path, text: str):
    """Yields ``(1-based line, JSON object)`` for each non-blank line of a JSONL file's text.

    Raises:
      DataFileError: naming the line, for invalid JSON or a line that is not an object.
    """
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028.
    for line, content in enumerate(text.split("\n"), start=1):
        if not content.strip():
            continue
        try:
            obj = json.loads(content)
        except json.JSONDecodeError as e:
            raise DataFileError(
                path, line, None, f"invalid JSON: {e.msg} (column {e.colno})"
            ) from None
        if not isinstance(obj, dict):
            raise DataFileError(
                path, line, None, f"expected a JSON object, got {type(obj).__name__}"
            )
        yield line, obj


def _csv_rows(path: pathlib.Path, text: str, fields: Fields):
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None) or []
    for name in fields.names():
        if name not in header:
            raise DataFileError(path, 1, name, f"no such column in the header {header}")
    start = reader.line_num + 1  # first physical line of the next row (fields may span lines)
    for row in reader:
        if row:  # blank lines are skipped
            if len(row) != len(header):
                raise DataFileError(
                    path, start, None, f"{len(row)} columns, header has {len(header)}"
                )
            yield start, dict(zip(header, row))
        start = reader.line_num + 1


def _jsonl_rows(path: pathlib.Path, text: str, fields: Fields):
    for line, obj in jsonl_objects(path, text):
        for name in fields.names():
            if name not in obj:
                raise DataFileError(path, line, name, f"missing field (keys: {sorted(obj)})")
        yield line, obj


def _read_examples(path: pathlib.Path, text: str, fields: Fields) -> list[dict[str, Any]]:
    """Parses one file into `{"id", "line", "text", ["text_pair"], "label": str}` dicts."""
    rows = (_csv_rows if path.suffix.lower() == ".csv" else _jsonl_rows)(path, text, fields)
    examples = []
    for line, row in rows:
        ex: dict[str, Any] = {"id": len(examples), "line": line}
        for key, name in (("text", fields.text), ("text_pair", fields.text_pair)):
            if name:
                value = row[name]
                if not isinstance(value, str) or not value.strip():
                    raise DataFileError(path, line, name, f"empty or non-string text {value!r}")
                ex[key] = value
        label = row[fields.label]
        if label is None or isinstance(label, (dict, list)) or not str(label).strip():
            raise DataFileError(path, line, fields.label, f"missing or invalid label {label!r}")
        ex["label"] = str(label).strip()
        examples.append(ex)
    if not examples:
        raise DataFileError(path, None, None, "the file holds no examples")
    return examples


def _sorted_labels(labels: set[str]) -> list[str]:
    """Sorted label names; numerically when all are integers ("2" before "10")."""
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def read_splits(
    files: Mapping[str, pathlib.Path], fields: Fields
) -> tuple[dict[str, list[dict[str, Any]]], list[str], str]:
    """Reads and validates every split file (UTF-8) before anything is written.

    Args:
      files: split name -> path; "train" is required. Format from the extension: `.csv`
        (header row, RFC 4180 quoting) or `.jsonl` / `.ndjson` (one JSON object per line).
      fields: which columns / keys hold the text(s) and the label.

    Returns:
      (split -> examples, label names from the training file, SHA-256 hex of fields + bytes).

    Raises:
      DataFileError: on any bad input; names file, line and field.
    """
    for path in files.values():
        check_readable(path)
        if path.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
            raise DataFileError(path, None, None, "unknown format; use .csv or .jsonl")
    digest = hashlib.sha256(repr(dataclasses.astuple(fields)).encode())
    examples = {}
    for split, path in files.items():
        raw, text = decode_file(path)
        digest.update(f"{split}:{len(raw)}:".encode() + raw)
        examples[split] = _read_examples(path, text, fields)
    label_names = _sorted_labels({ex["label"] for ex in examples["train"]})
    for split in ("validation", "test"):
        for ex in examples.get(split, []):
            if ex["label"] not in label_names:
                raise DataFileError(
                    files[split],
                    ex["line"],
                    fields.label,
                    f"label {ex['label']!r} does not occur in the training file {files['train']}; "
                    f"known labels: {label_names}",
                )
    return examples, label_names, digest.hexdigest()
