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
import re
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


# Characters per CSV field. The csv module's default (131,072) rejects long documents; this
# bound only stops a runaway unterminated quote from growing without end.
CSV_FIELD_LIMIT = 2**31 - 1


def _csv_lines(path: pathlib.Path, text: str) -> list[tuple[int, list[str]]]:
    """``(first physical line, row)`` of every CSV row ([] for a blank line), header included.

    Raises:
      DataFileError: naming the line of the row the csv module cannot parse.
    """
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, start = [], 1
    # The limit is process-wide: raise it for this read only and put it back.
    previous = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1  # fields may span lines
    except csv.Error as e:
        raise DataFileError(path, start, None, f"cannot parse the CSV row ({e})") from None
    finally:
        csv.field_size_limit(previous)
    return rows


def _check_header(path: pathlib.Path, header: list[str], fields: Fields) -> None:
    for name in fields.names():
        count = header.count(name)
        if count == 0:
            raise DataFileError(path, 1, name, f"no such column in the header {header}")
        if count > 1:
            raise DataFileError(
                path,
                1,
                name,
                f"column appears {count} times in the header {header}; give each column its own "
                "name",
            )


def _csv_rows(path: pathlib.Path, text: str, fields: Fields):
    lines = _csv_lines(path, text)
    header = lines[0][1] if lines else []
    _check_header(path, header, fields)
    for start, row in lines[1:]:
        if row:  # blank lines are skipped
            if len(row) != len(header):
                raise DataFileError(
                    path, start, None, f"{len(row)} columns, header has {len(header)}"
                )
            yield start, dict(zip(header, row))


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
        ex["label"] = _label_text(path, line, fields.label, row[fields.label])
        examples.append(ex)
    if not examples:
        raise DataFileError(path, None, None, "the file holds no examples")
    return examples


def _label_text(path: pathlib.Path, line: int, field: str, value: Any) -> str:
    """A label as its class name: a string (stripped), an integer, or an integral float (1.0,
    as pandas writes integer columns with gaps) as the integer, so 1 and 1.0 are one class.

    Raises:
      DataFileError: naming file, line and field for anything else (null, true / false, 1.5,
        lists, objects, blank strings).
    """
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    raise DataFileError(
        path, line, field, f"missing or invalid label {value!r} (expected a string or an integer)"
    )


_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() accepts "²", int() not


def _sorted_labels(labels: set[str]) -> list[str]:
    """Sorted label names; numerically when all are integers ("2" before "10", ties such as
    "01" / "1" by text so the order never depends on set order)."""
    if all(_INTEGER.fullmatch(lab) for lab in labels):
        return sorted(labels, key=lambda lab: (int(lab), lab))
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
