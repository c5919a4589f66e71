"""Published medical multiple-choice benchmarks, read into one question record.

A pure reader: no model, no shards. Each reader returns a `SourceResult` with the
`BenchmarkQuestion`s it could use and, counted by reason, the rows it had to put aside.

Formats
-------
`read_vlmevalkit_tsv` reads VLMEvalKit's benchmark TSV (tab-separated, one header row,
every cell read as a string with `keep_default_na=False`, cells stripped):

- `index`: the question id (required; a repeated index is quarantined).
- `image`: base64 of an encoded image; or the `index` of another row, meaning "reuse that
  row's image" (VLMEvalKit stores repeated images once this way; its rule of thumb is that a
  value of at most 64 characters is a reference); or a Python/JSON list literal of base64
  strings (`['...', '...']`) for a question on several images. Only one level is followed,
  as in VLMEvalKit: the row referred to must hold the image itself. A value of at most 64
  characters that is no other row's index is an error. When the file has no `image` column,
  `image_path` is read instead: one path or a list literal of paths, relative to
  `image_root` (default: the TSV's folder). With both columns, `image` wins, as in VLMEvalKit.
- `question`; optional `hint`, prepended as `"Hint: <hint>\\n"` when present, as VLMEvalKit's
  multiple-choice prompt does (so the question text here is what VLMEvalKit asks).
- option columns `A`..`Z`: an empty cell (or a literal `nan`, what pandas writes for a
  missing value after a round trip) is no option; the options must be contiguous from `A`.
- optional `answer`: one letter (either case); empty or `nan` means unlabelled.
- optional `category`, `l2-category` (VLMEvalKit's hyphenated spelling), `split`.

`read_records` reads JSON (a list of objects, or `{"data": [...]}`), JSONL, Parquet or CSV
(chosen by the file's extension) through a column mapping (`COLUMN_KEYS`), given directly
or as one of the `PRESETS` for the releases' own files:

- `medxpertqa_mm`: MedXpertQA's MM subset (`id`, `question`, `options` as a dict
  {"A": ...}, `label`, `images` a list of file names). category = `medical_task`,
  l2_category = `question_type` (Reasoning / Understanding, the split its paper reports);
  `body_system` is not kept. Its question text already lists the answer choices; it is kept
  as released, so a prompt built from it lists them twice.
- `omnimedvqa`: an OmniMedVQA "QA information" json (`question_id`, `question`,
  `option_A`..`option_D`, `gt_answer` the correct option's *text*, `image_path` relative to
  the release's root: pass that root as `image_root`). category = `question_type`,
  l2_category = `modality_type`.
- `pmc_vqa`: a PMC-VQA CSV (`Figure_path`, `Question`, `Choice A`..`Choice D` whose
  values carry an `A:`/`A.` prefix that is stripped, `Answer_label` the letter; `Answer`,
  the answer's text, is used only when `Answer_label` is empty). PMC-VQA has no question id:
  the id is the data row number (1-based), stable for a given file.

Options may be a list, a dict {"A": ...}, a list of {"letter"/"key": ..., "content"/"text":
...} objects (or a string holding a list/dict literal, as CSV stores them), or separate
option columns. The answer may be a letter (a one-letter string, either case), an integer
index (0-based; only from JSON/Parquet, where integers keep their type), or the option's
text, matched after strip + casefold; a text matching no option or several is an error.
In CSV every value is a string, so an answer there is a letter or a text.

Rules shared by all readers (medift.datasets.common's conventions):

- A wrong value is a `DataError` naming the file, the row and the column: a gap in the
  options, an answer outside the options, an unmatched or ambiguous answer text, an empty
  id, an image reference to no row. Messages carry letters and counts, never question,
  option or answer text.
- Quarantined (counted by reason, the run goes on; `strict=True` makes each one a
  `DataError`): "duplicated question id" (the first row holding an id owns it, even if that
  row is itself put aside), "fewer than 2 options", "no image" (an empty image cell),
  "image file missing", "image unreadable" (bad base64, or PIL cannot verify it). A row is
  checked in that order: options first (a row that cannot be a question is put aside
  whatever its answer says), then the answer, then the id, then the images.
- `rows_read == len(questions) + len(quarantined)`: every row ends up in one place.
- Rows are named as in every medift message: CSV/TSV by `data_row_text`, JSON by record
  number, JSONL by line number, Parquet by row number, all 1-based; a question's `source`
  is "file:N" with that number.

Options are not required to be distinct: some releases repeat an option text, and only an
answer given as text needs them told apart (that case is the ambiguity error above).
"""

from __future__ import annotations

import ast
import base64
import binascii
import hashlib
import io
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import pandas as pd
from PIL import Image

from medift.datasets.common import DataError, data_row_text, source_of
from medift.mcq import LETTERS, build_mcq_instruction

log = logging.getLogger(__name__)

# VLMEvalKit's rule of thumb: an `image` value this short is another row's index.
REFERENCE_MAX_CHARS = 64
MIN_OPTIONS, MAX_OPTIONS = 2, len(LETTERS)

DUPLICATED_ID = "duplicated question id"
TOO_FEW_OPTIONS = "fewer than 2 options"
NO_IMAGE = "no image"
IMAGE_MISSING = "image file missing"
IMAGE_UNREADABLE = "image unreadable"


# --- records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """One image of a question: a file (`path`, absolute) or encoded bytes (`data`)."""

    path: str | None = None
    data: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError("an ImageRef holds exactly one of path and data")
        if self.path is not None and not os.path.isabs(self.path):
            raise ValueError("an ImageRef's path must be absolute")

    @cached_property
    def sha256(self) -> str:
        """Hex digest of the encoded image: equal for questions on the same image file or bytes."""
        digest = hashlib.sha256()
        if self.data is not None:
            digest.update(self.data)
        else:
            with open(self.path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        return digest.hexdigest()

    def open(self) -> Image.Image:
        """The image, opened (lazily decoded) with PIL."""
        return Image.open(self.path if self.data is None else io.BytesIO(self.data))

    def __repr__(self) -> str:
        if self.data is not None:
            return f"ImageRef(data=<{len(self.data)} bytes>)"
        return f"ImageRef(path={self.path!r})"


@dataclass(frozen=True)
class BenchmarkQuestion:
    question_id: str
    question: str  # with "Hint: ...\n" in front when the release gives a hint
    options: tuple[str, ...]  # in letter order, 2..26
    answer_index: int | None  # None: unlabelled (predicted, not scored)
    images: tuple[ImageRef, ...]  # one or more
    category: str | None = None
    l2_category: str | None = None
    split: str | None = None
    source: str = ""  # "file:N" for messages

    def __post_init__(self) -> None:
        if not MIN_OPTIONS <= len(self.options) <= MAX_OPTIONS:
            raise ValueError(f"question {self.source}: {len(self.options)} options, need 2..26")
        if self.answer_index is not None and not 0 <= self.answer_index < len(self.options):
            raise ValueError(f"question {self.source}: answer index out of range")
        if not self.images:
            raise ValueError(f"question {self.source}: no image")

    @property
    def answer_letter(self) -> str | None:
        return None if self.answer_index is None else LETTERS[self.answer_index]

    def instruction(self) -> str:
        """medift's multiple-choice prompt (medift.mcq) for this question."""
        return build_mcq_instruction(self.question, self.options)


class Rejected(NamedTuple):
    source: str  # "file:N"
    reason: str


@dataclass
class SourceResult:
    questions: list[BenchmarkQuestion]
    quarantined: list[Rejected]
    rows_read: int

    def __post_init__(self) -> None:
        if self.rows_read != len(self.questions) + len(self.quarantined):
            raise AssertionError(
                f"rows_read={self.rows_read} but {len(self.questions)} questions + {len(self.quarantined)} quarantined"
            )

    def quarantine_summary(self) -> dict[str, int]:
        return dict(sorted(Counter(rejected.reason for rejected in self.quarantined).items()))


# --- shared row handling --------------------------------------------------------------------


class _Place:
    """Where a row is: the file and its row number, named the way the format counts rows."""

    def __init__(self, path: Path, number: int, describe: Callable[[int], str]):
        self.path, self.number, self._describe = path, number, describe

    @property
    def source(self) -> str:
        return source_of(self.path, self.number)

    def error(self, column: str, problem: str) -> DataError:
        return DataError(f"{self.path.name}, {self._describe(self.number)}, column {column!r}: {problem}")


def _record_text(number: int) -> str:
    return f"record {number} (1-based)"


def _line_text(number: int) -> str:
    return f"line {number} (1-based)"


def _parquet_row_text(number: int) -> str:
    return f"row {number} (1-based)"


class _Quarantine(Exception):
    """Put this row aside for `reason` (internal control flow)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Collector:
    def __init__(self, strict: bool):
        self.strict = strict
        self.questions: list[BenchmarkQuestion] = []
        self.quarantined: list[Rejected] = []
        self.rows_read = 0
        self.seen_ids: set[str] = set()
        self._readable: dict[str, bool] = {}  # sha256 or path -> PIL could verify it

    def claim_id(self, question_id: str) -> None:
        """The first row with an id owns it, whatever becomes of that row."""
        if question_id in self.seen_ids:
            raise _Quarantine(DUPLICATED_ID)
        self.seen_ids.add(question_id)

    def check_images(self, images: list[ImageRef]) -> None:
        if not images:
            raise _Quarantine(NO_IMAGE)
        for image in images:
            if image.path is not None and not os.path.isfile(image.path):
                raise _Quarantine(IMAGE_MISSING)
        for image in images:
            key = image.path if image.path is not None else image.sha256
            if key not in self._readable:
                self._readable[key] = _verifies(image)
            if not self._readable[key]:
                raise _Quarantine(IMAGE_UNREADABLE)

    def row(self, place: _Place, build: Callable[[], BenchmarkQuestion]) -> None:
        self.rows_read += 1
        try:
            self.questions.append(build())
        except _Quarantine as aside:
            if self.strict:
                raise DataError(f"{place.source}: {aside.reason} (strict: quarantine is an error)") from None
            self.quarantined.append(Rejected(place.source, aside.reason))

    def result(self) -> SourceResult:
        result = SourceResult(self.questions, self.quarantined, self.rows_read)
        if self.quarantined:
            # Reasons and counts only: no ids or question text in logs.
            log.warning(
                "quarantined %d of %d questions: %s", len(self.quarantined), self.rows_read, result.quarantine_summary()
            )
        return result


def _verifies(image: ImageRef) -> bool:
    try:
        with image.open() as opened:
            opened.verify()
    except Image.DecompressionBombError:
        return True  # PIL parsed it and refuses only for size: decoding is the image pipeline's call
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad files
        return False
    return True


def _blank(value: Any) -> bool:
    """No value: None, a float NaN, an empty string or a literal "nan" (pandas' round trip)."""
    if value is None:
        return True
    if isinstance(value, float):
        return value != value
    if isinstance(value, str):
        stripped = value.strip()
        return stripped == "" or stripped.lower() == "nan"
    return False


def _text(value: Any) -> str | None:
    return None if _blank(value) else str(value).strip()


def _literal_list(value: str, place: _Place, column: str) -> list:
    """A Python or JSON list literal of strings (VLMEvalKit writes `str(list)`)."""
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        try:
            parsed = json.loads(value)
        except ValueError:
            raise place.error(column, "starts with '[' but is not a list literal") from None
    if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
        raise place.error(column, "is not a list of strings")
    return parsed


def _contiguous(by_letter: dict[str, str | None], place: _Place, column_of: Callable[[str], str]) -> tuple[str, ...]:
    """Options in letter order; an empty letter followed by a filled one is a gap (an error)."""
    options: list[str] = []
    gap: str | None = None
    for letter in LETTERS:
        text = by_letter.get(letter)
        if text is None:
            gap = gap or letter
            continue
        if gap is not None:
            raise place.error(column_of(letter), f"option {letter} is given but option {gap} is empty (a gap)")
        options.append(text)
    return tuple(options)


def _answer_from_letter(value: str, n_options: int, place: _Place, column: str) -> int:
    letter = value.upper()
    if letter not in LETTERS[:n_options]:
        raise place.error(column, f"answer {letter!r} is not one of the options {LETTERS[:n_options]}")
    return LETTERS.index(letter)


def _answer_from_text(value: str, options: tuple[str, ...], place: _Place, column: str) -> int:
    wanted = value.strip().casefold()
    matches = [index for index, option in enumerate(options) if option.strip().casefold() == wanted]
    if len(matches) != 1:
        what = "matches no option" if not matches else f"matches {len(matches)} options"
        raise place.error(column, f"the answer text {what} (of {len(options)})")
    return matches[0]


def _answer(value: Any, options: tuple[str, ...], place: _Place, column: str) -> int | None:
    """A letter, a 0-based integer index, or an option's text; blank means unlabelled."""
    if isinstance(value, bool):
        raise place.error(column, "answer is a boolean, not a letter, index or option text")
    if isinstance(value, float) and value == value and value.is_integer():
        value = int(value)  # a Parquet/JSON column holding integers and nulls
    if isinstance(value, int):
        if not 0 <= value < len(options):
            raise place.error(column, f"answer index {value} is outside 0..{len(options) - 1}")
        return value
    if _blank(value):
        return None
    if not isinstance(value, str):
        raise place.error(column, f"answer of type {type(value).__name__} is not a letter, index or option text")
    value = value.strip()
    if len(value) == 1 and value.upper() in LETTERS:
        return _answer_from_letter(value, len(options), place, column)
    return _answer_from_text(value, options, place, column)


def _b64(text: str) -> bytes:
    """Standard base64, line breaks allowed; anything else that is not base64 raises binascii.Error."""
    return base64.b64decode("".join(text.split()), validate=True)


def _with_hint(question: str, hint: str | None) -> str:
    # VLMEvalKit's multiple-choice prompt: f"Hint: {hint}\n" + question.
    return question if hint is None else f"Hint: {hint}\n{question}"


def _resolve(root: Path, relative: str) -> str:
    return os.path.abspath(root / relative)


# --- VLMEvalKit TSV -------------------------------------------------------------------------


def read_vlmevalkit_tsv(path: str | Path, image_root: str | Path | None = None, strict: bool = False) -> SourceResult:
    """A VLMEvalKit benchmark TSV (see the module docstring) -> questions and quarantined rows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    root = Path(image_root) if image_root is not None else path.parent
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    frame.columns = [str(column).strip() for column in frame.columns]
    for column in ("index", "question"):
        if column not in frame.columns:
            raise DataError(f"{path.name}: missing column {column!r}")
    image_column = "image" if "image" in frame.columns else "image_path" if "image_path" in frame.columns else None
    if image_column is None:
        raise DataError(f"{path.name}: missing column 'image' (or 'image_path')")
    frame = frame.apply(lambda column: column.str.strip())
    letters = [letter for letter in LETTERS if letter in frame.columns]
    rows = frame.to_dict("records")

    # index -> that row's image cell (the first row holding the index), for references.
    cells: dict[str, str] = {}
    for row in rows:
        cells.setdefault(row["index"], row[image_column])
    decoded: dict[str, list[ImageRef] | None] = {}  # image cell -> its images (None: bad base64)

    def base64_images(cell: str, place: _Place) -> list[ImageRef]:
        if cell not in decoded:
            encoded = _literal_list(cell, place, "image") if cell.startswith("[") else [cell]
            try:
                decoded[cell] = [ImageRef(data=_b64(item)) for item in encoded]
            except binascii.Error:
                decoded[cell] = None
        if decoded[cell] is None:
            raise _Quarantine(IMAGE_UNREADABLE)
        return decoded[cell]

    def images_of(row: dict[str, str], place: _Place) -> list[ImageRef]:
        cell = row[image_column]
        if cell == "":
            return []
        if image_column == "image_path":
            names = _literal_list(cell, place, image_column) if cell.startswith("[") else [cell]
            return [ImageRef(path=_resolve(root, name)) for name in names]
        if cell in cells and cell != row["index"]:
            target = cells[cell]
            if len(target) <= REFERENCE_MAX_CHARS:
                raise place.error(
                    "image", "refers to a row whose image cell holds no image data (only one level is followed)"
                )
            return base64_images(target, place)
        if len(cell) <= REFERENCE_MAX_CHARS:
            raise place.error("image", f"a short value (<= {REFERENCE_MAX_CHARS} chars) names no other row's index")
        return base64_images(cell, place)

    def build(row: dict[str, str], place: _Place) -> BenchmarkQuestion:
        question_id = row["index"]
        if question_id == "":
            raise place.error("index", "empty question id")
        options = _contiguous({letter: _text(row[letter]) for letter in letters}, place, lambda letter: letter)
        if len(options) < MIN_OPTIONS:
            raise _Quarantine(TOO_FEW_OPTIONS)
        answer = row.get("answer", "")
        answer_index = None
        if not _blank(answer):
            if len(answer) != 1:
                raise place.error("answer", "answer is not a single letter")
            answer_index = _answer_from_letter(answer, len(options), place, "answer")
        collector.claim_id(question_id)
        images = images_of(row, place)
        collector.check_images(images)
        return BenchmarkQuestion(
            question_id=question_id,
            question=_with_hint(row["question"], _text(row.get("hint"))),
            options=options,
            answer_index=answer_index,
            images=tuple(images),
            category=_text(row.get("category")),
            l2_category=_text(row.get("l2-category")),
            split=_text(row.get("split")),
            source=place.source,
        )

    collector = _Collector(strict)
    for number, row in enumerate(rows, start=1):
        place = _Place(path, number, data_row_text)
        collector.row(place, lambda: build(row, place))
    return collector.result()


# --- JSON / JSONL / Parquet / CSV with a column mapping --------------------------------------

COLUMN_KEYS = (
    "id",  # question id; absent: the row number
    "question",
    "hint",  # prepended as "Hint: ...\n"
    "options",  # list / {"A": ...} / [{"letter": .., "content": ..}] / a literal of those
    "option_columns",  # a list of columns, in letter order (instead of `options`)
    "answer",  # letter, 0-based index or option text
    "answer_text",  # the answer's text, used when `answer` is empty or not mapped
    "image",  # a path (or a list of paths)
    "images",  # a list of paths (or one path)
    "image_bytes",  # encoded bytes, {"bytes": ..., "path": ...} (Hugging Face), base64 text, or a list
    "category",
    "l2_category",
    "split",
)
IMAGE_KEYS = ("image", "images", "image_bytes")
OPTIONAL_KEYS = ("hint", "answer", "answer_text", "category", "l2_category", "split")


@dataclass(frozen=True)
class Preset:
    columns: Mapping[str, Any]
    strip_option_prefix: bool = False  # drop a leading "A:" / "A." that repeats the option's letter


PRESETS: dict[str, Preset] = {
    "medxpertqa_mm": Preset(
        {
            "id": "id",
            "question": "question",
            "options": "options",
            "answer": "label",
            "images": "images",
            "category": "medical_task",
            "l2_category": "question_type",
        }
    ),
    "omnimedvqa": Preset(
        {
            "id": "question_id",
            "question": "question",
            "option_columns": ("option_A", "option_B", "option_C", "option_D"),
            "answer": "gt_answer",
            "image": "image_path",
            "category": "question_type",
            "l2_category": "modality_type",
        }
    ),
    "pmc_vqa": Preset(
        {
            "question": "Question",
            "option_columns": ("Choice A", "Choice B", "Choice C", "Choice D"),
            "answer": "Answer_label",
            "answer_text": "Answer",
            "image": "Figure_path",
        },
        strip_option_prefix=True,
    ),
}


def _mapping(preset: str | None, columns: Mapping[str, Any] | None) -> tuple[dict[str, Any], bool]:
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    chosen = PRESETS[preset] if preset is not None else Preset({})
    merged = dict(chosen.columns)
    for key, column in (columns or {}).items():
        if key not in COLUMN_KEYS:
            raise ValueError(f"unknown column key {key!r}; known: {COLUMN_KEYS}")
        if column is None:
            merged.pop(key, None)  # None removes a preset's mapping
        else:
            merged[key] = column
    if "question" not in merged:
        raise ValueError("the column mapping needs 'question' (give a preset or columns)")
    if ("options" in merged) == ("option_columns" in merged):
        raise ValueError("the column mapping needs exactly one of 'options' and 'option_columns'")
    if "option_columns" in merged:
        merged["option_columns"] = tuple(merged["option_columns"])
        if not 1 <= len(merged["option_columns"]) <= MAX_OPTIONS:
            raise ValueError("'option_columns' needs 1..26 columns")
    if sum(key in merged for key in IMAGE_KEYS) != 1:
        raise ValueError(f"the column mapping needs exactly one of {IMAGE_KEYS}")
    return merged, chosen.strip_option_prefix


def _load_rows(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], Callable[[int], str]]:
    """The file's rows as (row number, plain Python dict), and how its rows are named.

    JSONL rows are numbered by their line (blank lines are skipped, not rows), the other
    formats by their position, 1-based.
    """
    suffix = path.suffix.lower()
    if suffix == ".json":
        with open(path, encoding="utf-8") as handle:
            try:
                loaded = json.load(handle)
            except ValueError as error:
                raise DataError(f"{path.name}: not valid JSON ({error})") from None
        if isinstance(loaded, dict) and isinstance(loaded.get("data"), list):
            loaded = loaded["data"]
        if not isinstance(loaded, list):
            raise DataError(f"{path.name}: expected a list of records or {{\"data\": [...]}}")
        numbered, describe = list(enumerate(loaded, start=1)), _record_text
    elif suffix == ".jsonl":
        numbered, describe = [], _line_text
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    numbered.append((number, json.loads(line)))
                except ValueError:
                    raise DataError(f"{path.name}, {_line_text(number)}: not valid JSON") from None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        numbered, describe = list(enumerate(pq.read_table(path).to_pylist(), start=1)), _parquet_row_text
    elif suffix == ".csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
        frame.columns = [str(column).strip() for column in frame.columns]
        numbered, describe = list(enumerate(frame.to_dict("records"), start=1)), data_row_text
    else:
        raise ValueError(f"{path.name}: unknown format {suffix!r} (expected .json, .jsonl, .parquet or .csv)")
    for number, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{path.name}, {describe(number)}: expected an object, got {type(row).__name__}")
    return numbered, describe


def _parse_literal(value: Any, place: _Place, column: str) -> Any:
    """A list or dict written as text (CSV cells) -> the list or dict."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            try:
                return json.loads(value)
            except ValueError:
                raise place.error(column, "is neither a list nor a dict literal") from None
    return value


_OPTION_LETTER_KEYS = ("letter", "key", "label")
_OPTION_TEXT_KEYS = ("content", "text", "option", "value")


def _options_by_letter(value: Any, place: _Place, column: str) -> dict[str, str | None]:
    value = _parse_literal(value, place, column)
    if _blank(value):
        return {}
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list) and all(isinstance(item, dict) for item in value) and value:
        items = []
        for item in value:
            letter = next((item[key] for key in _OPTION_LETTER_KEYS if key in item), None)
            text = next((item[key] for key in _OPTION_TEXT_KEYS if key in item), None)
            if letter is None:
                raise place.error(column, f"an option object has none of the keys {_OPTION_LETTER_KEYS}")
            items.append((letter, text))
    elif isinstance(value, list):
        if len(value) > MAX_OPTIONS:
            raise place.error(column, f"{len(value)} options, at most {MAX_OPTIONS}")
        items = list(zip(LETTERS, value))
    else:
        raise place.error(column, f"options of type {type(value).__name__}: expected a list or a dict")
    by_letter: dict[str, str | None] = {}
    for letter, text in items:
        if not isinstance(letter, str) or len(letter.strip()) != 1 or letter.strip().upper() not in LETTERS:
            raise place.error(column, "an option's key is not a single letter")
        letter = letter.strip().upper()
        if letter in by_letter:
            raise place.error(column, f"option {letter} is given twice")
        by_letter[letter] = _text(text)
    return by_letter


def _strip_prefix(text: str | None, letter: str) -> str | None:
    if text is None:
        return None
    stripped = re.sub(rf"^{letter}\s*[:.]\s*", "", text, count=1)
    return stripped if stripped else None


def _image_refs(value: Any, key: str, root: Path, place: _Place, column: str) -> list[ImageRef]:
    value = _parse_literal(value, place, column) if key != "image_bytes" else value
    if _blank(value):
        return []
    items = value if isinstance(value, list) else [value]
    refs: list[ImageRef] = []
    for item in items:
        if isinstance(item, dict):  # a Hugging Face Image feature: {"bytes": ..., "path": ...}
            if item.get("bytes") is not None:
                item = item["bytes"]
            elif not _blank(item.get("path")):
                refs.append(ImageRef(path=_resolve(root, str(item["path"]))))
                continue
            else:
                continue
        if isinstance(item, (bytes, bytearray)):
            refs.append(ImageRef(data=bytes(item)))
        elif isinstance(item, str) and not _blank(item):
            if key == "image_bytes":
                try:
                    refs.append(ImageRef(data=_b64(item)))
                except binascii.Error:
                    raise _Quarantine(IMAGE_UNREADABLE) from None
            else:
                refs.append(ImageRef(path=_resolve(root, item.strip())))
        elif not _blank(item):
            raise place.error(column, f"an image of type {type(item).__name__} is neither a path nor bytes")
    return refs


def read_records(
    path: str | Path,
    preset: str | None = None,
    columns: Mapping[str, Any] | None = None,
    image_root: str | Path | None = None,
    strict: bool = False,
) -> SourceResult:
    """A JSON / JSONL / Parquet / CSV benchmark, read through a preset and/or a column mapping.

    `columns` maps `COLUMN_KEYS` to the file's column names and overrides the preset's
    entries (a key mapped to None drops the preset's). Image paths are relative to
    `image_root` (default: the file's folder).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    mapping, strip_prefix = _mapping(preset, columns)
    root = Path(image_root) if image_root is not None else path.parent
    rows, describe = _load_rows(path)

    # A required column that no row holds is a wrong mapping, not missing data. The answer and
    # the descriptive columns may be absent (an unlabelled release, a file without categories):
    # that is logged. Of the option columns only the first must appear.
    present = set().union(*(row.keys() for _, row in rows)) if rows else set()
    for key, column in mapping.items():
        if key in OPTIONAL_KEYS:
            if rows and column not in present:
                log.warning("%s: no column %r (mapped as %r): every question has none", path.name, column, key)
            continue
        needed = column[:1] if key == "option_columns" else (column,)
        for name in needed:
            if rows and name not in present:
                raise DataError(f"{path.name}: missing column {name!r} (mapped as {key!r})")
    image_key = next(key for key in IMAGE_KEYS if key in mapping)

    def build(row: dict[str, Any], place: _Place) -> BenchmarkQuestion:
        if "option_columns" in mapping:
            names = mapping["option_columns"]
            by_letter = {letter: _text(row.get(name)) for letter, name in zip(LETTERS, names)}
            column_of = dict(zip(LETTERS, names)).__getitem__
        else:
            by_letter = _options_by_letter(row.get(mapping["options"]), place, mapping["options"])
            column_of = lambda letter: mapping["options"]  # noqa: E731
        if strip_prefix:
            by_letter = {letter: _strip_prefix(text, letter) for letter, text in by_letter.items()}
        options = _contiguous(by_letter, place, column_of)
        if len(options) < MIN_OPTIONS:
            raise _Quarantine(TOO_FEW_OPTIONS)
        answer_index = None
        if "answer" in mapping:
            answer_index = _answer(row.get(mapping["answer"]), options, place, mapping["answer"])
        if answer_index is None and "answer_text" in mapping and not _blank(row.get(mapping["answer_text"])):
            text = row[mapping["answer_text"]]
            if not isinstance(text, str):
                raise place.error(mapping["answer_text"], "the answer text is not a string")
            answer_index = _answer_from_text(text, options, place, mapping["answer_text"])
        if "id" in mapping:
            raw_id = row.get(mapping["id"])
            if _blank(raw_id) or isinstance(raw_id, (dict, list)):
                raise place.error(mapping["id"], "empty or non-scalar question id")
            question_id = str(raw_id).strip()
        else:
            question_id = str(place.number)
        collector.claim_id(question_id)
        images = _image_refs(row.get(mapping[image_key]), image_key, root, place, mapping[image_key])
        collector.check_images(images)
        question = row.get(mapping["question"])
        if question is not None and not isinstance(question, str):
            raise place.error(mapping["question"], "the question is not a string")
        hint = _text(row.get(mapping["hint"])) if "hint" in mapping else None
        return BenchmarkQuestion(
            question_id=question_id,
            question=_with_hint((question or "").strip(), hint),
            options=options,
            answer_index=answer_index,
            images=tuple(images),
            category=_text(row.get(mapping["category"])) if "category" in mapping else None,
            l2_category=_text(row.get(mapping["l2_category"])) if "l2_category" in mapping else None,
            split=_text(row.get(mapping["split"])) if "split" in mapping else None,
            source=place.source,
        )

    collector = _Collector(strict)
    for number, row in rows:
        place = _Place(path, number, describe)
        collector.row(place, lambda: build(row, place))
    return collector.result()
