"""SKINCON (48 skin concepts on Fitzpatrick17k and DDI images): raw format and rules.

Raw layout that `read_records` expects under `raw_dir`; the SKINCON annotation files as
SKINCON ships them, next to one folder per image release:

    raw_dir/annotations_fitzpatrick17k.csv     # or "SKINCON Fitzpatric17k annotations.csv"
    raw_dir/fitzpatrick17k/fitzpatrick17k.csv  # the Fitzpatrick17k metadata (md5hash, ...)
    raw_dir/fitzpatrick17k/<md5hash>.jpg       # the downloaded images, named by md5hash
    raw_dir/annotations_ddi.csv                # or "SKINCON DDI annotations.csv"  } optional:
    raw_dir/ddi/ddi_metadata.csv               # the DDI release (DDI_file, ...)   } the DDI
    raw_dir/ddi/<DDI_file>                     # 000001.png ...                    } part

The Fitzpatrick part is required. The DDI part is read when `ddi/` holds the DDI release
(which needs its own access request); then its annotation file is required too. The
reference uses the Fitzpatrick part only: to reproduce it, leave `ddi/` out.

Joins: a Fitzpatrick annotation's `ImageID` is `<md5hash>.jpg` and must name a row of
`fitzpatrick17k.csv`; a DDI annotation's `ImageID` must be a `DDI_file` of
`ddi_metadata.csv`. An ImageID missing from its metadata is quarantined.

Rows: the unnamed leading index column (pandas `Unnamed: 0`) is ignored and never read as a
concept (the reference's bug of counting it is not copied); any other column outside
`ImageID`, the 48 concepts and `Do not consider this image` is an error. Values are `0`/`1`
(also `0.0`/`1.0`, as pandas writes a column holding NaN); a blank concept cell is read as
absent, as in the reference, and such rows are counted in the report. Rows flagged
`Do not consider this image` are excluded and counted; a row with no concept present has
no description and is quarantined.

Description (reference): the present concepts, lowercased, in column order, joined by
`", "`. It is the record's one attribute, `dermatologic_feature`.
Question (reference): `What is the dermatologic feature?`; options = the correct
combination plus 4 distractor combinations drawn from the combinations that occur in the
dataset (all splits), shuffled.
Split (reference): by image, seeded: sorted image ids shuffled with the seed, first 10 %
val, next 10 % test, the rest train (`common.split_by_image`). Neither release has patient
identifiers, so the image is the patient unit.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pandas as pd

from medift.datasets.common import (
    AdapterResult,
    DataError,
    RowSink,
    data_row_text,
    find_file,
    read_csv_checked,
    source_of,
    split_by_image,
)
from medift.records import Question, Record

NAME = "skincon"
KEY = "dermatologic_feature"
SEPARATOR = ", "
VAL_FRACTION = TEST_FRACTION = 0.1
MAX_DISTRACTORS = 4

# The 48 concept columns, in the release's column order (datasets.md).
CONCEPTS = (
    "Vesicle",
    "Papule",
    "Macule",
    "Plaque",
    "Abscess",
    "Pustule",
    "Bulla",
    "Patch",
    "Nodule",
    "Ulcer",
    "Crust",
    "Erosion",
    "Excoriation",
    "Atrophy",
    "Exudate",
    "Purpura/Petechiae",
    "Fissure",
    "Induration",
    "Xerosis",
    "Telangiectasia",
    "Scale",
    "Scar",
    "Friable",
    "Sclerosis",
    "Pedunculated",
    "Exophytic/Fungating",
    "Warty/Papillomatous",
    "Dome-shaped",
    "Flat topped",
    "Brown(Hyperpigmentation)",
    "Translucent",
    "White(Hypopigmentation)",
    "Purple",
    "Yellow",
    "Black",
    "Erythema",
    "Comedo",
    "Lichenification",
    "Blue",
    "Umbilicated",
    "Poikiloderma",
    "Salmon",
    "Wheal",
    "Acuminate",
    "Burrow",
    "Gray",
    "Pigmented",
    "Cyst",
)
FLAG_COLUMN = "Do not consider this image"
IMAGE_COLUMN = "ImageID"
INDEX_COLUMN_PREFIX = "Unnamed:"  # pandas' name for the release's unnamed index column
PRESENT, ABSENT, BLANK = ("1", "1.0"), ("0", "0.0"), ""

ATTRIBUTES: dict[str, tuple[str, ...]] = {KEY: tuple(c.lower() for c in CONCEPTS)}
# Options are combinations drawn from the data, not a fixed list: see make_questions.
QUESTION_OPTIONS: dict[str, tuple[str, ...]] = {}
QUESTION_TEXT: dict[str, str] = {KEY: "What is the dermatologic feature?"}


@dataclasses.dataclass(frozen=True)
class Part:
    """One image release that SKINCON annotates."""

    name: str
    annotation_files: tuple[str, ...]  # accepted spellings, first found wins
    folder: str  # image release folder under raw_dir
    metadata_file: str
    metadata_column: str  # column whose values the annotations' ImageID must match
    id_prefix: str  # keeps image ids unique across parts


PARTS = (
    Part(
        "fitzpatrick17k",
        ("annotations_fitzpatrick17k.csv", "SKINCON Fitzpatric17k annotations.csv"),
        "fitzpatrick17k",
        "fitzpatrick17k.csv",
        "md5hash",
        "",
    ),
    Part("ddi", ("annotations_ddi.csv", "SKINCON DDI annotations.csv"), "ddi", "ddi_metadata.csv", "DDI_file", "ddi/"),
)


# --- rules -----------------------------------------------------------------------------


def combination(present: list[str]) -> str:
    """Concept column names present -> the description phrase list, in column order."""
    order = {concept: index for index, concept in enumerate(CONCEPTS)}
    return SEPARATOR.join(c.lower() for c in sorted(present, key=order.__getitem__))


def describe(attributes: dict[str, str]) -> str:
    """The reference description: the present concepts, lowercased, in column order."""
    return attributes.get(KEY, "")


def phrases(attributes: dict[str, str]) -> dict[str, str]:
    """Each present concept is a phrase of its own (keyed by itself): the description lists them."""
    return {concept: concept for concept in (c.strip() for c in describe(attributes).split(",")) if concept}


def make_questions(record: Record, rng: random.Random, observed=None) -> list[Question]:
    """The reference question: the true combination among 4 others from the data, shuffled.

    `observed[KEY]` are the combinations occurring in the dataset; without it (a record
    outside any dataset), the single concepts serve as the distractor pool.
    """
    answer = record.attributes.get(KEY)
    if not answer:
        return []
    pool = (observed or {}).get(KEY) or ATTRIBUTES[KEY]
    others = [combo for combo in pool if combo != answer]
    if not others:
        return []
    options = [answer] + rng.sample(others, min(MAX_DISTRACTORS, len(others)))
    rng.shuffle(options)
    return [Question(record.image_id, KEY, QUESTION_TEXT[KEY], tuple(options), options.index(answer))]


# --- reading -----------------------------------------------------------------------------


def _check_columns(frame: pd.DataFrame, path: Path) -> None:
    known = {IMAGE_COLUMN, FLAG_COLUMN, *CONCEPTS}
    unknown = [c for c in frame.columns if c not in known and not c.startswith(INDEX_COLUMN_PREFIX)]
    if unknown:
        raise DataError(
            f"{path.name}: unknown columns {unknown}; expected an index column, "
            f"{IMAGE_COLUMN!r}, the 48 SKINCON concepts and {FLAG_COLUMN!r}"
        )


def _is_set(value: str, path: Path, data_row: int, column: str) -> bool | None:
    """0/1 cell -> False/True; blank -> None (read as absent); anything else is an error."""
    if value in PRESENT:
        return True
    if value in ABSENT:
        return False
    if value == BLANK:
        return None
    raise DataError(f"{path.name}, {data_row_text(data_row)}, column {column!r}: value {value!r} is not 0 or 1")


def _present_concepts(row: dict[str, str], path: Path, data_row: int) -> tuple[list[str], bool]:
    """(present concept columns, whether any concept cell was blank)."""
    present, blank = [], False
    for concept in CONCEPTS:
        state = _is_set(row[concept], path, data_row, concept)
        blank |= state is None
        if state:
            present.append(concept)
    return present, blank


def _metadata_ids(raw_dir: Path, part: Part) -> set[str]:
    frame = read_csv_checked(raw_dir / part.folder / part.metadata_file, (part.metadata_column,))
    return set(frame[part.metadata_column])


def _metadata_key(part: Part, image_id: str) -> str:
    """Fitzpatrick ImageID `<md5hash>.jpg` -> md5hash; DDI ImageID is the file name itself."""
    return image_id.removesuffix(".jpg") if part.name == "fitzpatrick17k" else image_id


def _parts_present(raw_dir: Path) -> list[Part]:
    """Fitzpatrick always (missing files are an error); DDI when its release folder is there."""
    return [
        part
        for part in PARTS
        if part.name == "fitzpatrick17k" or (raw_dir / part.folder / part.metadata_file).is_file()
    ]


def _read_part(raw_dir: Path, part: Part, sink: RowSink) -> None:
    path = find_file(raw_dir, part.annotation_files, f"SKINCON {part.name} annotations")
    frame = read_csv_checked(path, (IMAGE_COLUMN, *CONCEPTS, FLAG_COLUMN))
    _check_columns(frame, path)
    known_ids = _metadata_ids(raw_dir, part)
    for data_row, row in enumerate(frame.to_dict("records"), start=1):
        sink.rows_read += 1
        source, raw_id = source_of(path, data_row), row[IMAGE_COLUMN]
        image_id = part.id_prefix + raw_id
        if _is_set(row[FLAG_COLUMN], path, data_row, FLAG_COLUMN):
            sink.exclude(source, image_id, f"flagged {FLAG_COLUMN!r}")
            continue
        present, blank = _present_concepts(row, path, data_row)
        if blank:
            sink.counts["rows with blank concept cells (read as absent)"] = (
                sink.counts.get("rows with blank concept cells (read as absent)", 0) + 1
            )
        if _metadata_key(part, raw_id) not in known_ids:
            sink.quarantine(source, image_id, f"ImageID not in {part.folder}/{part.metadata_file}")
            continue
        if not present:
            sink.quarantine(source, image_id, "no concept present (empty description)")
            continue
        sink.accept(
            Record(
                dataset=NAME,
                image_id=image_id,
                image_path=str((raw_dir / part.folder / raw_id).resolve()),
                patient_id=image_id,  # no patient identifiers in either release
                split="",  # assigned once every row is read (split_by_image)
                attributes={KEY: combination(present)},
                source=source,
            )
        )


def read_records(raw_dir: Path, seed: int, strict: bool = False) -> AdapterResult:
    raw_dir = Path(raw_dir).resolve()
    sink = RowSink(strict=strict)
    for part in _parts_present(raw_dir):
        _read_part(raw_dir, part, sink)
    # Split the kept images only, as the reference splits the images it found on disk.
    splits = split_by_image([r.image_id for r in sink.records], seed, VAL_FRACTION, TEST_FRACTION)
    sink.records = [dataclasses.replace(r, split=splits[r.image_id]) for r in sink.records]
    return sink.result()
