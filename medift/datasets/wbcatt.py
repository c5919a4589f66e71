"""WBCAtt (white blood cell attributes): raw format, description and question rules.

Raw layout that `read_records` expects under `raw_dir` (the real release's layout):

    raw_dir/pbc_attr_v1_train.csv
    raw_dir/pbc_attr_v1_val.csv
    raw_dir/pbc_attr_v1_test.csv        # required; may hold the header only
    raw_dir/PBC_dataset_normal_DIB/<lowercase class>/<img_name>   # the CSV's `path` column

All three split files are required, because a silently absent test split would make an
evaluation look complete when it is not. A release without test labels can still be read
by giving a test file with the header and no rows (the tests do this for the real files).

Option order (datasets.md and the reference's `wbcatt_option_dict`): alphabetical, except
the yes/no attributes, which are asked as `yes, no`. `nil` (no granules) is a valid value
and part of the vocabulary in `ATTRIBUTES`, but it is never asked about and never an
option, so `QUESTION_OPTIONS` leaves it out.
"""

from __future__ import annotations

import random
from pathlib import Path

from medift.datasets.common import (
    AdapterResult,
    RowSink,
    check_vocabulary,
    read_csv_checked,
    source_of,
)
from medift.records import Question, Record

NAME = "wbcatt"
NOT_APPLICABLE = "nil"
SPLIT_FILES = {
    "train": "pbc_attr_v1_train.csv",
    "val": "pbc_attr_v1_val.csv",
    "test": "pbc_attr_v1_test.csv",
}
CSV_HEADER = (
    "img_name",
    "label",
    "cell_size",
    "cell_shape",
    "nucleus_shape",
    "nuclear_cytoplasmic_ratio",
    "chromatin_density",
    "cytoplasm_vacuole",
    "cytoplasm_texture",
    "cytoplasm_colour",
    "granule_type",
    "granule_colour",
    "granularity",
    "path",
)

# Key order of the reference description (datasets.md); also the order questions draw from.
DESCRIPTION_ORDER = (
    "cell_size",
    "cell_shape",
    "nucleus_shape",
    "nuclear_cytoplasmic_ratio",
    "chromatin_density",
    "cytoplasm_vacuole",
    "cytoplasm_texture",
    "cytoplasm_colour",
    "granularity",
    "granule_type",
    "granule_colour",
    "label",
)

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "cell_size": ("big", "small"),
    "cell_shape": ("irregular", "round"),
    "nucleus_shape": (
        "irregular",
        "segmented-bilobed",
        "segmented-multilobed",
        "unsegmented-band",
        "unsegmented-indented",
        "unsegmented-round",
    ),
    "nuclear_cytoplasmic_ratio": ("high", "low"),
    "chromatin_density": ("densely", "loosely"),
    "cytoplasm_vacuole": ("yes", "no"),
    "cytoplasm_texture": ("clear", "frosted"),
    "cytoplasm_colour": ("blue", "light blue", "purple blue"),
    "granularity": ("yes", "no"),
    "granule_type": ("coarse", "round", "small", NOT_APPLICABLE),
    "granule_colour": ("pink", "purple", "red", NOT_APPLICABLE),
    "label": ("Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil"),
}

QUESTION_OPTIONS: dict[str, tuple[str, ...]] = {
    key: tuple(value for value in values if value != NOT_APPLICABLE) for key, values in ATTRIBUTES.items()
}


def _spoken_key(key: str) -> str:
    return key.replace("_", " ")


QUESTION_TEXT: dict[str, str] = {key: f"What is the {_spoken_key(key)}?" for key in ATTRIBUTES}


def phrases(attributes: dict[str, str]) -> dict[str, str]:
    """Attribute key -> its phrase of the reference description (see datasets.md, WBCAtt)."""
    found = {}
    for key in DESCRIPTION_ORDER:
        value = attributes.get(key)
        if value is None or value in (NOT_APPLICABLE, "no"):
            continue
        if value == "yes":
            found[key] = _spoken_key(key)
        elif key == "label":
            found[key] = value
        else:
            found[key] = f"{value} {_spoken_key(key)}"
    return found


def describe(attributes: dict[str, str]) -> str:
    """The reference description: the attribute phrases, in order."""
    return ", ".join(phrases(attributes).values())


def make_questions(record: Record, rng: random.Random, observed=None) -> list[Question]:
    """One question on a randomly chosen non-nil attribute; options in fixed order.

    `observed` (values occurring in the data) is unused: the options are the vocabulary.
    """
    del observed
    askable = [key for key in DESCRIPTION_ORDER if record.attributes.get(key) not in (None, NOT_APPLICABLE)]
    if not askable:
        return []
    key = rng.choice(askable)
    options = QUESTION_OPTIONS[key]
    return [
        Question(
            image_id=record.image_id,
            attribute=key,
            question=QUESTION_TEXT[key],
            options=options,
            answer_index=options.index(record.attributes[key]),
        )
    ]


def _row_to_record(row: dict[str, str], raw_dir: Path, csv_path: Path, data_row: int, split: str) -> Record:
    attributes = {
        key: check_vocabulary(row[key], ATTRIBUTES[key], csv_path, data_row, key) for key in DESCRIPTION_ORDER
    }
    # WBCAtt has no patient identifier; the image is the finest unit available.
    return Record(
        dataset=NAME,
        image_id=row["img_name"],
        image_path=str((raw_dir / row["path"]).resolve()),
        patient_id=row["img_name"],
        split=split,
        attributes=attributes,
        source=source_of(csv_path, data_row),
    )


def read_records(raw_dir: Path, seed: int, strict: bool = False) -> AdapterResult:
    """Read the three official split files. `seed` is unused: the splits are official."""
    del seed
    raw_dir = Path(raw_dir).resolve()
    sink = RowSink(strict=strict)
    for split, file_name in SPLIT_FILES.items():
        csv_path = raw_dir / file_name
        frame = read_csv_checked(csv_path, CSV_HEADER)
        for data_row, row in enumerate(frame.to_dict("records"), start=1):
            sink.rows_read += 1
            sink.accept(_row_to_record(row, raw_dir, csv_path, data_row, split))
    return sink.result()
