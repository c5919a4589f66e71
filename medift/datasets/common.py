"""What every dataset adapter shares: the result type, the errors, and strict CSV reading.

Conventions for all adapters:
- Row numbers in messages are 1-based *data* rows: the first row under the header is data
  row 1 (a spreadsheet shows it as row 2). Messages say so, because off-by-one row numbers
  send people to the wrong line.
- A bad value is a `DataError` (the file is wrong, stop); a missing image or a duplicated
  image id is quarantined with a reason (one bad row must not sink a 10k-row release) unless
  `strict` is set.
- A row that the dataset's own rules leave out (a SKINCON image flagged "Do not consider",
  a MIMIC-CXR study without a frontal view) is *excluded* with its reason: counted like a
  quarantined row, but never an error, because nothing is wrong with the file.
- Every data row ends up in exactly one of records, quarantined, excluded
  (`AdapterResult` checks it): nothing is dropped without being counted.
- Messages name files and columns, never patient or report content.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from medift.records import Record

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A raw annotation file holds a value the dataset's rules do not know."""


@dataclass(frozen=True)
class Quarantined:
    source: str  # "file:data row"
    image_id: str
    reason: str


@dataclass
class AdapterResult:
    records: list[Record]
    quarantined: list[Quarantined]
    rows_read: int
    excluded: list[Quarantined] = field(default_factory=list)
    # Named counts an adapter adds to the data report (e.g. images not chosen per study).
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Every data row must end up somewhere; a silent drop would skew every count.
        if self.rows_read != len(self.records) + len(self.quarantined) + len(self.excluded):
            raise AssertionError(
                f"rows_read={self.rows_read} but {len(self.records)} records + "
                f"{len(self.quarantined)} quarantined + {len(self.excluded)} excluded"
            )

    def quarantine_summary(self) -> dict[str, int]:
        return dict(sorted(Counter(q.reason for q in self.quarantined).items()))

    def exclusion_summary(self) -> dict[str, int]:
        return dict(sorted(Counter(q.reason for q in self.excluded).items()))


def data_row_text(data_row: int) -> str:
    """How a row is named in every message (see the module docstring)."""
    return f"data row {data_row} (1-based, header not counted; spreadsheet row {data_row + 1})"


def source_of(path: Path, data_row: int) -> str:
    return f"{path.name}:{data_row}"


def find_file(directory: Path, names: Iterable[str], what: str) -> Path:
    """The first of `names` that exists in `directory` (releases spell some files two ways)."""
    names = tuple(names)
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{what} not found in {directory}: expected one of {names}")


def read_csv_checked(path: Path, required_columns: Iterable[str], sep: str = ",") -> pd.DataFrame:
    """Read a CSV as plain strings and insist on the columns the adapter uses.

    Everything stays a string (`keep_default_na=False`) so that `NA`, `nil` and empty
    cells reach the dataset rules unchanged instead of becoming NaN. Cells are stripped
    because CBIS-DDSM carries a quoted trailing newline in one path column. An empty file
    (0 bytes, or only whitespace, compressed or not) is a `DataError` naming the file: a
    header-only file is the way to give a split without rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    required_columns = tuple(required_columns)
    try:
        # Compression (`.csv.gz`) is inferred from the name.
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        expected = f"expected a header row with the columns {list(required_columns)}" if required_columns else ""
        raise DataError(
            f"{path}: empty file (no header row); {expected or 'expected at least a header row'} "
            "(a truncated download or copy?)"
        ) from None
    frame.columns = [str(column).strip() for column in frame.columns]
    for column in required_columns:
        if column not in frame.columns:
            raise ValueError(f"{path.name}: missing column {column!r}")
    return frame.apply(lambda column: column.str.strip())


def check_vocabulary(value: str, allowed: Iterable[str], path: Path, data_row: int, column: str) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise DataError(
            f"{path.name}, {data_row_text(data_row)}, column {column!r}: value {value!r} is not one of {allowed}"
        )
    return value


@dataclass
class RowSink:
    """Collects records and quarantined rows; raises instead of quarantining when strict."""

    strict: bool
    records: list[Record] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    excluded: list[Quarantined] = field(default_factory=list)
    seen_ids: set[str] = field(default_factory=set)
    rows_read: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def quarantine(self, source: str, image_id: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"{source}: {reason} (strict: quarantine is an error)")
        self.quarantined.append(Quarantined(source=source, image_id=image_id, reason=reason))

    def exclude(self, source: str, image_id: str, reason: str) -> None:
        """Leave a row out by the dataset's own rule; counted, never an error."""
        self.excluded.append(Quarantined(source=source, image_id=image_id, reason=reason))

    def accept(self, record: Record) -> None:
        """Keep a record unless its id repeats or its image is absent."""
        if record.image_id in self.seen_ids:
            self.quarantine(record.source, record.image_id, "duplicated image id")
            return
        if not Path(record.image_path).is_file():
            self.quarantine(record.source, record.image_id, "image file missing")
            return
        self.seen_ids.add(record.image_id)
        self.records.append(record)

    def result(self) -> AdapterResult:
        result = AdapterResult(self.records, self.quarantined, self.rows_read, self.excluded, dict(self.counts))
        # Reasons and counts only: no identifiers in logs.
        if self.quarantined:
            log.warning(
                "quarantined %d of %d rows: %s", len(self.quarantined), self.rows_read, result.quarantine_summary()
            )
        if self.excluded:
            log.info(
                "excluded %d of %d rows by the dataset's rules: %s",
                len(self.excluded),
                self.rows_read,
                result.exclusion_summary(),
            )
        return result


def validation_patients(patient_ids: Iterable[str], seed: int, fraction: float = 0.1) -> set[str]:
    """The reference's patient-level validation split (datasets.md, CBIS-DDSM).

    Sorted unique ids, shuffled with `random.Random(seed)`, the first `int(n * fraction)`
    go to validation: with seed 0 this reproduces the reference's choice.
    """
    unique_ids = sorted(set(patient_ids))
    random.Random(seed).shuffle(unique_ids)
    return set(unique_ids[: int(len(unique_ids) * fraction)])


def split_by_image(
    image_ids: Iterable[str], seed: int, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> dict[str, str]:
    """The reference's random image-level split (datasets.md, SKINCON): image id -> split.

    Sorted unique ids, shuffled with `random.Random(seed)`; the first `int(n * val_fraction)`
    are val, the next `int(n * test_fraction)` test, the rest train. With seed 0 and the
    same images this reproduces the reference's split.
    """
    ordered = sorted(set(image_ids))
    random.Random(seed).shuffle(ordered)
    n_val, n_test = int(len(ordered) * val_fraction), int(len(ordered) * test_fraction)
    splits = {image_id: "val" for image_id in ordered[:n_val]}
    splits.update({image_id: "test" for image_id in ordered[n_val : n_val + n_test]})
    splits.update({image_id: "train" for image_id in ordered[n_val + n_test :]})
    return splits


def observed_values(records: Iterable[Record]) -> dict[str, tuple[str, ...]]:
    """Attribute key -> the values that occur in `records`, sorted (deterministic).

    Datasets whose options are drawn from the data (SKINCON's combinations) get this
    through `make_questions(..., observed=...)`; the others ignore it.
    """
    values: dict[str, set[str]] = {}
    for record in records:
        for key, value in record.attributes.items():
            values.setdefault(key, set()).add(value)
    return {key: tuple(sorted(found)) for key, found in sorted(values.items())}


def normalise_term(raw: str) -> str:
    """CBIS-style value normalisation: lowercase, `_` to space."""
    return raw.strip().lower().replace("_", " ")
