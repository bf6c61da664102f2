"""Read rows of a split from JSONL, CSV, TSV or Parquet, remembering each row's line."""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError, at


@dataclass
class Record:
    """One row of task data and where it came from (for error messages)."""

    fields: dict
    source: str
    line: int

    @property
    def where(self) -> str:
        return at(self.source, self.line)


def json_object(text: str, where: str) -> dict:
    """One JSON object (a JSONL line, a request's input); an error naming `where` otherwise."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TunelabError(f"{where}: not valid JSON ({e.msg}): {text[:80]!r}") from None
    if not isinstance(obj, dict):
        raise TunelabError(f"{where}: expected a JSON object, got {text[:80]!r}")
    return obj


def _read_jsonl(path: Path, text: str) -> list[Record]:
    rows = []
    for n, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            rows.append(Record(json_object(line, at(path, n)), str(path), n))
    return rows


def _read_delimited(path: Path, text: str, delimiter: str) -> list[Record]:
    # io.StringIO, not splitlines(): only \n and \r end a row (latin-1 text may hold \x85)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    try:
        for row in reader:
            if None in row:  # more cells than header names
                raise TunelabError(
                    f"{at(path, reader.line_num)}: {len(row) - 1 + len(row[None])} cells but "
                    f"the header has {len(reader.fieldnames or [])}: {row[None]!r}"
                )
            rows.append(Record(dict(row), str(path), reader.line_num))
    except csv.Error as e:
        raise TunelabError(f"{at(path, reader.line_num)}: malformed row: {e}") from None
    return rows


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise TunelabError(f"{path}: cannot read Parquet file: {e}") from None
    # Parquet has no lines; "line" is the 1-based row number
    return [Record(row, str(path), i) for i, row in enumerate(table.to_pylist(), start=1)]


def read_rows(path: Path, encoding: str = "utf-8") -> list[Record]:
    """All rows of one data file; the format follows the extension."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        if not path.is_file():
            raise TunelabError(f"{path}: data file not found")
        return _read_parquet(path)
    try:
        text = path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise TunelabError(f"{path}: data file not found") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise TunelabError(
            f"{at(path, line)}: not valid {encoding} (byte {e.object[e.start : e.end]!r}); "
            f"set `encoding:` in the task file"
        ) from None
    except OSError as e:
        raise TunelabError(f"{path}: cannot read data file: {e.strerror}") from None
    if text.startswith("\ufeff") and codecs.lookup(encoding).name == "utf-8":
        text = text[1:]  # a byte-order mark would become part of the first header name
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, text)
    if suffix == ".csv":
        return _read_delimited(path, text, ",")
    if suffix == ".tsv":
        return _read_delimited(path, text, "\t")
    raise TunelabError(f"{path}: unknown data format {suffix!r} (use .jsonl, .csv, .tsv, .parquet)")


def read_dataset(name: str, config: str | None, split: str) -> list[Record]:
    """Rows of a Hugging Face `datasets` split (needs the optional `datasets` package)."""
    try:
        import datasets
    except ImportError:
        raise TunelabError(
            f"dataset {name!r}: the `datasets` package is not installed "
            "(pip install 'tunelab[datasets]')"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise TunelabError(f"dataset {name!r} split {split!r}: cannot load: {e}") from None
    source = f"{name}[{split}]"
    return [Record(dict(row), source, i) for i, row in enumerate(ds, start=1)]
