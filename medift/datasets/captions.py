"""Bring your own image-description set: images, one description each, optional attributes.

Instruction-free tuning needs only images and their descriptions. This adapter reads a
user's own set, one row per image, from CSV, TSV, JSONL, JSON or Parquet: one file, or a
folder of files of one format read in sorted name order (hidden files and files of other
extensions in the folder are ignored; `.gz` is read for the text formats). Because it is
configured per dataset it is an object, `CaptionsAdapter(CaptionsOptions(...))`, with the
same API as the dataset modules; `medift.datasets.get_dataset("captions", {...})` builds it
from a dict of options, and `python -m medift.prepare shards --dataset captions
--adapter_options '{"file": "captions.csv"}' ...` passes them as JSON.

Options (`CaptionsOptions`; paths relative to `raw_dir` unless absolute):

- `file` (required): the annotation file, or a folder of files of one format.
- `format`: `auto` (default: by extension: `.csv`, `.tsv`, `.jsonl`/`.ndjson`, `.json` (a
  list of records), `.parquet`), or one of `csv`, `tsv`, `jsonl`, `json`, `parquet`.
- `image_root`: the folder image paths are relative to (default: `raw_dir`); absolute
  paths in the data are used as they are.
- `image`: the column of image paths (default `image`).
- `image_bytes`: a column of encoded image bytes instead of paths (Parquet binary, a
  Hugging Face `Image` struct `{"bytes": ...}`, or base64 text, `data:` URIs included).
  A row whose bytes cell is empty falls back to its path in `image` when that column exists.
- `bytes_cache`: where embedded images are written once, as `<sha256>.<ext>`, so that a
  record can point at a file like every other record (default `<raw_dir>/.captions-images`).
- `description`: the column of descriptions (default `description`).
- `id`: a column of unique image ids (default: the image path, else `<file>:<row>`).
- `patient_id`: a column of patient ids (default: the image id, each image its own patient).
- `split`: a column of `train`, `val` (also `validation`, `valid`, `dev`) or `test`; without
  it splits are made by patient: the sorted unique patient ids of the kept images, shuffled
  with the seed, the first `val_fraction` (default 0.1) of them val, the next
  `test_fraction` (default 0.1) test, the rest train (rounded down, as everywhere here).
- `attributes`: columns holding structured attributes. Their values, stripped and
  lowercased, become the record's attributes (an empty cell: absent); each one's vocabulary
  is the set of values in the data, which `ATTRIBUTES` holds once `read_records` has run.
- `question_text`: attribute column -> question (default `What is the <column, _ as space>?`).

Records: `image_id` as above, `image_path` absolute, `patient_id`, `split`, `attributes` =
the attribute columns plus the description under `description` (as MIMIC-CXR keeps its
report), `source` = `<file name>:<row>` where row is the 1-based data row of a CSV/TSV
(header not counted), the line of a JSONL file, the record of a JSON list or the row of a
Parquet file.

Checks (messages name the file, the row and the column, never their content):
- a required column missing from a file, a cell that is not text, an empty `id` or
  `patient_id` cell, or a `split` value outside the ones above is a `DataError`;
- a patient whose kept rows the `split` column puts in two splits is a `DataError` (the adapter
  says where; `medift.prepare.check_patient_splits` would stop it too);
- a missing image file or an empty image cell is quarantined (`image file missing`), so are
  bytes that are not base64 and a repeated image id (`duplicated image id`); an empty
  description is quarantined by `medift.prepare` (`empty description`) and an image that
  does not decode by the shard writer; with `strict` each of these is an error.
- Every row ends up a record or quarantined: rows read = records + quarantined.

Descriptions are the text as given (stripped); they are free text, so training them should
run with `shuffle_responses: false` (shuffling comma-separated pieces scrambles sentences),
as for MIMIC-CXR.

Questions (val/test): one multiple-choice question per attribute column whose value the
record has: the true value and up to 3 other values of that attribute seen in the data
(sorted, then `rng.sample`), shuffled with `rng`; none for an attribute with fewer than two
values in the data. `QUESTION_OPTIONS` is empty: the options come from the data, like SKINCON's.

`phrases` is always empty: description accuracy looks for `phrases(...)` in a generated
description and `medift.describe` holds the reference description to be exactly those
phrases joined by ", ". A free-text description is not that, and it need not say the
attribute values at all, so description accuracy is not defined here (as for MIMIC-CXR);
the attributes are measured by the questions instead.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import gzip
import hashlib
import json
import logging
import math
import os
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medift.datasets.common import AdapterResult, DataError, RowSink, data_row_text, read_csv_checked, split_by_image
from medift.records import SPLITS, Question, Record

log = logging.getLogger(__name__)

NAME = "captions"
DESCRIPTION_KEY = "description"  # the attribute holding the description text
FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")
EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
}
COMPRESSED = ".gz"  # read for the text formats
SPLIT_VALUES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "dev": "val", "test": "test"}
MAX_DISTRACTORS = 3
DEFAULT_BYTES_CACHE = ".captions-images"
IMAGE_MISSING = "image file missing"  # RowSink's reason for a path that is not a file
NOT_BASE64 = "image bytes not base64"
# Leading bytes of the image formats the shard writer reads -> the cached file's extension.
MAGIC = (
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"\xff\xd8\xff", "jpg"),
    (0, b"GIF87a", "gif"),
    (0, b"GIF89a", "gif"),
    (0, b"BM", "bmp"),
    (0, b"II*\x00", "tif"),
    (0, b"MM\x00*", "tif"),
    (128, b"DICM", "dcm"),
)


@dataclass
class CaptionsOptions:
    """How to read one image-description set (see the module docstring)."""

    file: str = field(metadata={"help": "Annotation file or folder of files of one format (relative to raw_dir)."})
    format: str = field(
        default="auto",
        metadata={"help": "auto (by extension), csv, tsv, jsonl, json (a list of records) or parquet."},
    )
    image_root: str = field(default="", metadata={"help": "Folder the image paths are relative to (default: raw_dir)."})
    image: str = field(default="image", metadata={"help": "Column of image paths."})
    image_bytes: str = field(
        default="",
        metadata={"help": "Column of encoded image bytes instead of paths (binary, {'bytes': ...} or base64)."},
    )
    bytes_cache: str = field(
        default="",
        metadata={"help": f"Folder embedded images are written to once (default: raw_dir/{DEFAULT_BYTES_CACHE})."},
    )
    description: str = field(default="description", metadata={"help": "Column of descriptions."})
    id: str = field(default="", metadata={"help": "Column of unique image ids (default: the image path, or file:row)."})
    patient_id: str = field(
        default="", metadata={"help": "Column of patient ids (default: the image id: each image its own patient)."}
    )
    split: str = field(
        default="",
        metadata={"help": "Column of splits (train, val/validation/valid/dev, test); default: split by patient."},
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of patients in val when there is no split column."}
    )
    test_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of patients in test when there is no split column."}
    )
    attributes: list[str] = field(
        default_factory=list,
        metadata={"help": "Columns of structured attributes (values lowercased; vocabulary: the values seen)."},
    )
    question_text: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "Attribute column -> question (default: 'What is the <column, _ as space>?')."},
    )

    def __post_init__(self) -> None:
        for name in ("file", "format", "image_root", "image", "image_bytes", "bytes_cache", "description"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"captions option {name!r} must be a string, got {getattr(self, name)!r}")
        for name in ("id", "patient_id", "split"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"captions option {name!r} must be a column name (a string)")
        if not self.file:
            raise ValueError("captions option 'file' is required: the annotation file or folder")
        if self.format not in ("auto", *FORMATS):
            raise ValueError(f"captions option format={self.format!r}: expected auto or one of {FORMATS}")
        if not self.description or not (self.image or self.image_bytes):
            raise ValueError("captions options need a description column and an image or image_bytes column")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"captions option {name} must be a number in [0, 1), got {value!r}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("captions options val_fraction + test_fraction must be below 1 (train needs patients)")
        if isinstance(self.attributes, str) or not all(isinstance(a, str) and a for a in self.attributes):
            raise ValueError(f"captions option attributes must be a list of column names, got {self.attributes!r}")
        self.attributes = list(self.attributes)
        repeated = sorted({a for a in self.attributes if self.attributes.count(a) > 1})
        if repeated:
            raise ValueError(f"captions option attributes names {repeated} twice")
        if DESCRIPTION_KEY in self.attributes:
            raise ValueError(f"captions option attributes: {DESCRIPTION_KEY!r} is the key of the description itself")
        if not isinstance(self.question_text, dict):
            raise ValueError("captions option question_text must map attribute columns to questions")
        stray = sorted(set(self.question_text) - set(self.attributes))
        if stray:
            raise ValueError(f"captions option question_text names {stray}, which are not in attributes")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> CaptionsOptions:
        """The options from a dict (JSON): unknown keys are an error naming them."""
        if not isinstance(options, dict):
            raise ValueError(f"captions options must be a dict (JSON object), got {type(options).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown captions option(s) {unknown}; known: {sorted(known)}")
        if "file" not in options:
            raise ValueError("captions option 'file' is required: the annotation file or folder")
        return cls(**options)


# --- reading the tables --------------------------------------------------------------------


class _RowProblem(Exception):
    """A row to quarantine, with its reason."""


@dataclass
class _Table:
    path: Path
    format: str
    columns: list[str]
    rows: list[tuple[int, dict[str, Any]]]  # (row number as messages give it, row)

    def where(self, row: int) -> str:
        if self.format in ("csv", "tsv"):
            return data_row_text(row)
        if self.format == "jsonl":
            return f"line {row}"
        return f"{'record' if self.format == 'json' else 'row'} {row} (1-based)"

    def source(self, row: int) -> str:
        return f"{self.path.name}:{row}"


def format_of(path: Path) -> str | None:
    """The format a file's extension says (`.gz` of a text format included), or None."""
    name = path.name.lower()
    if name.endswith(COMPRESSED):
        fmt = EXTENSIONS.get(Path(name.removesuffix(COMPRESSED)).suffix)
        return fmt if fmt != "parquet" else None
    return EXTENSIONS.get(Path(name).suffix)


def annotation_files(path: Path, fmt: str) -> list[tuple[Path, str]]:
    """(file, format) to read: `path` itself, or the files of one format in the folder, sorted."""
    if path.is_file():
        found = fmt if fmt != "auto" else format_of(path)
        if found is None:
            raise ValueError(f"{path}: cannot tell the format from the extension; set the captions option format")
        return [(path, found)]
    if not path.is_dir():
        raise FileNotFoundError(f"captions annotation file or folder not found: {path}")
    files = sorted((p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name)
    typed = [(p, format_of(p)) for p in files]
    typed = [(p, f) for p, f in typed if f is not None and (fmt == "auto" or f == fmt)]
    if not typed:
        wanted = "a known extension" if fmt == "auto" else f"{fmt} files"
        raise FileNotFoundError(f"{path}: no annotation files ({wanted}) in the folder")
    formats = sorted({f for _, f in typed})
    if len(formats) > 1:
        raise ValueError(f"{path}: the folder mixes formats {formats}; keep one, or set the captions option format")
    return typed


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        if path.name.lower().endswith(COMPRESSED):
            data = gzip.decompress(data) if data else b""
        return data.decode("utf-8-sig")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as error:  # a cut-off gzip, or not UTF-8 text
        raise DataError(f"{path}: not readable as UTF-8 text ({type(error).__name__}: {error})") from None


def _empty_file(path: Path, what: str) -> DataError:
    return DataError(f"{path}: empty file ({what}); a truncated download or copy?")


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    text = _read_text(path)
    if not text.strip():
        raise _empty_file(path, "no JSON lines")
    rows = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path.name}, line {line_number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path.name}, line {line_number}: not a JSON object (one row per line)")
        rows.append((line_number, row))
    return rows


def _read_json(path: Path) -> list[tuple[int, dict]]:
    text = _read_text(path)
    if not text.strip():
        raise _empty_file(path, "no JSON list")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path.name}: not JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path.name}: expected a JSON list of records (one object per image)")
    for number, row in enumerate(records, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path.name}, record {number} (1-based): not a JSON object")
    return list(enumerate(records, start=1))


def _read_parquet(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    if path.stat().st_size == 0:
        raise _empty_file(path, "no Parquet data")
    try:
        frame = pd.read_parquet(path)
    except Exception as error:  # pyarrow's errors differ by version; the point is naming the file
        raise DataError(f"{path}: not a readable Parquet file ({type(error).__name__}: {error})") from None
    return [str(c) for c in frame.columns], list(enumerate(frame.to_dict("records"), start=1))


def read_table(path: Path, fmt: str) -> _Table:
    if fmt in ("csv", "tsv"):
        frame = read_csv_checked(path, (), sep="\t" if fmt == "tsv" else ",")
        return _Table(path, fmt, list(frame.columns), list(enumerate(frame.to_dict("records"), start=1)))
    if fmt == "parquet":
        columns, rows = _read_parquet(path)
        return _Table(path, fmt, columns, rows)
    rows = _read_jsonl(path) if fmt == "jsonl" else _read_json(path)
    columns: dict[str, None] = {}
    for _, row in rows:
        columns.update(dict.fromkeys(str(key) for key in row))
    # A key that a JSON row leaves out reads as an empty cell; one no row has is a missing column.
    return _Table(path, fmt, list(columns), rows)


# --- cells ------------------------------------------------------------------------------------


def _scalar(value: Any) -> Any:
    """numpy scalars -> Python ones; pandas' and numpy's missing values -> None."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def cell_text(table: _Table, number: int, row: dict[str, Any], column: str) -> str:
    """A cell as stripped text ('' when empty or absent); a list, object or bytes is an error."""
    value = _scalar(row.get(column))
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # Parquet and pandas keep integer columns with gaps as floats: 3.0 is the id 3.
        return str(int(value)) if value.is_integer() else repr(value)
    raise DataError(
        f"{table.path.name}, {table.where(number)}, column {column!r}: a {type(value).__name__}, not a text value"
    )


def cell_bytes(table: _Table, number: int, row: dict[str, Any], column: str) -> bytes | None:
    """An image-bytes cell: binary, a {"bytes": ...} struct or base64 text; None when empty."""
    value = _scalar(row.get(column))
    if isinstance(value, dict):  # a Hugging Face datasets Image: {"bytes": ..., "path": ...}
        value = _scalar(value.get("bytes"))
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value) or None
    if isinstance(value, str):
        text = "".join(value.split())
        if text.startswith("data:") and "," in text:  # a data URI: data:image/png;base64,...
            text = text.split(",", 1)[1]
        if not text:
            return None
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise _RowProblem(NOT_BASE64) from None
    raise DataError(
        f"{table.path.name}, {table.where(number)}, column {column!r}: a {type(value).__name__}, "
        "not image bytes (binary, {'bytes': ...} or base64 text)"
    )


def image_extension(data: bytes) -> str:
    for offset, magic, extension in MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return extension
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"  # the shard writer lets PIL tell, and quarantines what it cannot read


def cache_image(data: bytes, folder: Path) -> Path:
    """`folder/<sha256>.<ext>`, written once (atomically, so a crash leaves no half file)."""
    path = folder / f"{hashlib.sha256(data).hexdigest()}.{image_extension(data)}"
    if path.is_file() and path.stat().st_size == len(data):
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{path.name}.{os.getpid()}.partial"
        partial.write_bytes(data)
        os.replace(partial, path)
    except OSError as error:
        raise OSError(
            f"cannot write embedded images to {folder} ({error}); set the captions option bytes_cache to a "
            "writable folder"
        ) from error
    return path


# --- the adapter -------------------------------------------------------------------------------


class CaptionsAdapter:
    """A user's image-description set, with the dataset modules' API (see the module docstring)."""

    NAME = NAME

    def __init__(self, options: CaptionsOptions):
        self.options = options
        # Known before reading (the workflow asks whether there are attributes); the values
        # are filled in by read_records, from the data.
        self.ATTRIBUTES: dict[str, tuple[str, ...]] = {column: () for column in options.attributes}
        self.QUESTION_OPTIONS: dict[str, tuple[str, ...]] = {}
        self.QUESTION_TEXT: dict[str, str] = {
            column: options.question_text.get(column, f"What is the {column.replace('_', ' ')}?")
            for column in options.attributes
        }

    def __repr__(self) -> str:
        return f"CaptionsAdapter({self.options!r})"

    # --- rules ---

    def describe(self, attributes: dict[str, str]) -> str:
        """The description as given."""
        return attributes.get(DESCRIPTION_KEY, "")

    def phrases(self, attributes: dict[str, str]) -> dict[str, str]:
        """None: the description is free text (see the module docstring)."""
        del attributes
        return {}

    def make_questions(self, record: Record, rng: random.Random, observed=None) -> list[Question]:
        """One question per attribute the record has: its value among up to 3 others seen, shuffled."""
        questions = []
        for column in self.options.attributes:
            answer = record.attributes.get(column)
            if not answer:
                continue
            pool = (observed or {}).get(column) or self.ATTRIBUTES.get(column, ())
            others = sorted(set(pool) - {answer})
            if not others:
                continue
            options = [answer, *rng.sample(others, min(MAX_DISTRACTORS, len(others)))]
            rng.shuffle(options)
            questions.append(
                Question(record.image_id, column, self.QUESTION_TEXT[column], tuple(options), options.index(answer))
            )
        return questions

    # --- reading ---

    def _folder(self, raw_dir: Path, option: str, default: str) -> Path:
        return (raw_dir / (option or default)).resolve()  # an absolute option stays as it is

    def _required(self) -> dict[str, str]:
        """Column -> the option naming it, for every column a file must have."""
        options = self.options
        required = {options.description: "description"}
        if options.image_bytes:
            required[options.image_bytes] = "image_bytes"
        else:
            required[options.image] = "image"
        for name in ("id", "patient_id", "split"):
            if getattr(options, name):
                required[getattr(options, name)] = name
        required.update({column: "attributes" for column in options.attributes})
        return required

    def _check_columns(self, table: _Table) -> None:
        present = set(table.columns)
        for column, option in self._required().items():
            if column not in present:
                shown = table.columns[:30] + (["..."] if len(table.columns) > 30 else [])
                raise DataError(
                    f"{table.path.name}: missing column {column!r} (captions option {option}); its columns: {shown}"
                )

    def _split(self, table: _Table, number: int, row: dict[str, Any]) -> str:
        column = self.options.split
        raw = cell_text(table, number, row, column)
        split = SPLIT_VALUES.get(raw.lower())
        if split is None:
            raise DataError(
                f"{table.path.name}, {table.where(number)}, column {column!r}: split {raw!r} is not one of "
                f"{sorted(SPLIT_VALUES)}"
            )
        return split

    def _image_path(self, table, number, row, image_root: Path, cache: Path, sink: RowSink) -> Path | None:
        """The row's image file, or None when it has none (bytes and path both empty)."""
        options = self.options
        if options.image_bytes:
            data = cell_bytes(table, number, row, options.image_bytes)
            if data is not None:
                sink.counts["rows with embedded image bytes"] = sink.counts.get("rows with embedded image bytes", 0) + 1
                return cache_image(data, cache)
        if options.image in table.columns:
            relative = cell_text(table, number, row, options.image)
            if relative:
                return (image_root / relative).resolve()
        return None

    def _row_record(self, table, number, row, image_root, cache, sink) -> Record | None:
        """The row's record (split '' when the splits are drawn later), or None if quarantined."""
        options = self.options
        source = table.source(number)
        image_value = cell_text(table, number, row, options.image) if options.image in table.columns else ""
        image_id = cell_text(table, number, row, options.id) if options.id else (image_value or source)
        patient_id = cell_text(table, number, row, options.patient_id) if options.patient_id else image_id
        for column, value in ((options.id, image_id), (options.patient_id, patient_id)):
            if column and not value:
                raise DataError(f"{table.path.name}, {table.where(number)}, column {column!r}: empty cell")
        split = self._split(table, number, row) if options.split else ""
        attributes = {}
        for column in options.attributes:
            value = cell_text(table, number, row, column).lower()
            if value:
                attributes[column] = value
        description = cell_text(table, number, row, options.description)
        if description:  # else prepare quarantines the record: empty description
            attributes[DESCRIPTION_KEY] = description
        try:
            path = self._image_path(table, number, row, image_root, cache, sink)
        except _RowProblem as problem:
            sink.quarantine(source, image_id, str(problem))
            return None
        if path is None:
            sink.quarantine(source, image_id, IMAGE_MISSING)
            return None
        return Record(NAME, image_id, str(path), patient_id, split, attributes, source)

    def read_records(self, raw_dir: Path, seed: int, strict: bool = False) -> AdapterResult:
        options = self.options
        raw_dir = Path(raw_dir).resolve()
        image_root = self._folder(raw_dir, options.image_root, ".")
        cache = self._folder(raw_dir, options.bytes_cache, DEFAULT_BYTES_CACHE)
        sink = RowSink(strict=strict)
        first_split: dict[str, tuple[str, str]] = {}  # patient -> (split, source) where first seen
        files = annotation_files(raw_dir / options.file, options.format)
        sink.counts["annotation files"] = len(files)
        for path, fmt in files:
            table = read_table(path, fmt)
            self._check_columns(table)
            for number, row in table.rows:
                sink.rows_read += 1
                record = self._row_record(table, number, row, image_root, cache, sink)
                if record is None:
                    continue
                kept = len(sink.records)
                sink.accept(record)
                if options.split and len(sink.records) > kept:
                    # Kept rows only: a quarantined row (say a repeated id) never reaches a split.
                    seen = first_split.setdefault(record.patient_id, (record.split, record.source))
                    if seen[0] != record.split:
                        raise DataError(
                            f"{path.name}, {table.where(number)}, columns {options.patient_id or options.id!r} and "
                            f"{options.split!r}: the patient is in {record.split} here and in {seen[0]} at "
                            f"{seen[1]}; a patient's images must all be in one split"
                        )
        if not options.split:
            splits = split_by_image(
                [r.patient_id for r in sink.records], seed, options.val_fraction, options.test_fraction
            )
            sink.records = [dataclasses.replace(r, split=splits[r.patient_id]) for r in sink.records]
        empty = [s for s in SPLITS if not any(r.split == s for r in sink.records)]
        if empty and sink.records:
            log.warning("captions: no images in split(s) %s", empty)
        for column in options.attributes:
            values = {r.attributes[column] for r in sink.records if column in r.attributes}
            self.ATTRIBUTES[column] = tuple(sorted(values))
        return sink.result()
