"""CBIS-DDSM (mammography lesions): raw format, description and questions.

Two image sources are read, chosen by what `raw_dir` holds. The four case-description
files are in `raw_dir/csv/` in both (all four required; header-only is fine):

    raw_dir/csv/{mass,calc}_case_description_{train,test}_set.csv

1. The popular JPEG re-release, when `raw_dir/csv/dicom_info.csv` exists:

       raw_dir/csv/dicom_info.csv
       raw_dir/jpeg/<SeriesInstanceUID>/<n>-<k>.jpg   # `image_path` of dicom_info.csv,
                                                      # written there as CBIS-DDSM/jpeg/...

   As the reference does, the first folder of the row's `cropped image file path` (e.g.
   `Mass-Training_P_00001_LEFT_CC_1`) is looked up as `PatientID` among the dicom_info rows
   whose `SeriesDescription` is `cropped images`; if a case has several, the series UID
   (third folder of the path) decides.

2. Otherwise the TCIA DICOM download, in the NBIA Data Retriever's descriptive layout
   (under `raw_dir/CBIS-DDSM/` if that folder exists, else under `raw_dir`):

       <case folder>/<date>-DDSM-NA-<n>/<n>.000000-cropped images-<n>/1-1.dcm

   The case folder is the same first folder of the CSV path. The crop is the one DICOM in
   a series folder named `... cropped images ...`. Where folder names do not settle it,
   the DICOM headers do (`SeriesDescription == 'cropped images'`, then the CSV's series
   UID), and where crop and mask share a series (older downloads), the crop is the
   smaller image: a mask has the full mammogram's size.

In both, the `000000.dcm`/`000001.dcm` file name is never trusted, and the case folder is
the record's `image_id`: one abnormality in one view.

Splits (datasets.md): the official test files are `test`; patients of the official train
files are shuffled with the seed and 10 % of them are `val`. Train-file rows of a patient
who is also in the official test files are quarantined, because no patient may sit in two
splits (records.py) and the official test split must stay as published.

Vocabularies: the single terms seen in the real case-description files, normalised
(lowercase, `_` to space), hard-coded here. Values may be compounds of these joined by `-`.
`QUESTION_OPTIONS` are the reference's option lists (InstFree tools/eval_utils.py): the
terms that occur in the official test split. As in the reference, a shape/margin/type/
distribution question is only asked when the value is one of these single terms, so rare
terms (`dystrophic`, `lucent centered`, `skin`, ...) and compounds get no question.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from medift.datasets.common import (
    AdapterResult,
    DataError,
    RowSink,
    check_vocabulary,
    data_row_text,
    normalise_term,
    read_csv_checked,
    source_of,
    validation_patients,
)
from medift.records import Question, Record

NAME = "cbis_ddsm"
MISSING = ("NA", "")
VAL_FRACTION = 0.1
CSV_DIR = "csv"
DICOM_INFO = "dicom_info.csv"
CROPPED_SERIES = "cropped images"
JPEG_PREFIX = "CBIS-DDSM/"  # dicom_info.csv's image_path starts with it; the folder does not

MASS_HEADER = (
    "patient_id",
    "breast_density",
    "left or right breast",
    "image view",
    "abnormality id",
    "abnormality type",
    "mass shape",
    "mass margins",
    "assessment",
    "pathology",
    "subtlety",
    "image file path",
    "cropped image file path",
    "ROI mask file path",
)
CALC_HEADER = (
    "patient_id",
    "breast density",
    "left or right breast",
    "image view",
    "abnormality id",
    "abnormality type",
    "calc type",
    "calc distribution",
    "assessment",
    "pathology",
    "subtlety",
    "image file path",
    "cropped image file path",
    "ROI mask file path",
)
DICOM_INFO_COLUMNS = ("image_path", "PatientID", "SeriesDescription", "SeriesInstanceUID")
CROPPED_PATH_COLUMN = "cropped image file path"

RAW_PATHOLOGIES = ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK")

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "mass_shape": (
        "architectural distortion",
        "asymmetric breast tissue",
        "focal asymmetric density",
        "irregular",
        "lobulated",
        "lymph node",
        "oval",
        "round",
    ),
    "mass_margins": ("circumscribed", "ill defined", "microlobulated", "obscured", "spiculated"),
    "calc_type": (
        "amorphous",
        "coarse",
        "dystrophic",
        "eggshell",
        "fine linear branching",
        "large rodlike",
        "lucent center",
        "lucent centered",
        "milk of calcium",
        "pleomorphic",
        "punctate",
        "round and regular",
        "skin",
        "vascular",
    ),
    "calc_distribution": ("clustered", "diffusely scattered", "linear", "regional", "segmental"),
    "abnormality_type": ("calcification", "mass"),
    "pathology": ("benign", "malignant"),
}

QUESTION_OPTIONS: dict[str, tuple[str, ...]] = {
    "mass_shape": ATTRIBUTES["mass_shape"],
    "mass_margins": ATTRIBUTES["mass_margins"],
    "calc_type": (
        "amorphous",
        "coarse",
        "eggshell",
        "fine linear branching",
        "lucent center",
        "pleomorphic",
        "punctate",
        "round and regular",
        "vascular",
    ),
    "calc_distribution": ATTRIBUTES["calc_distribution"],
    "abnormality_type": ATTRIBUTES["abnormality_type"],
    "pathology": ATTRIBUTES["pathology"],
}

QUESTION_TEXT: dict[str, str] = {
    "mass_shape": "What is the mass shape?",
    "mass_margins": "What is the mass margin?",  # the reference asks it in the singular
    "calc_type": "What is the calc type?",
    "calc_distribution": "What is the calc distribution?",
    "abnormality_type": "What is the abnormality type?",
    "pathology": "What is the pathology?",
}

# Keys that get "<value> <key>" phrases, then keys whose bare value is the phrase.
LESION_KEYS = ("mass_shape", "mass_margins", "calc_type", "calc_distribution")
BARE_VALUE_KEYS = ("abnormality_type", "pathology")
# Keys with distractor questions, by abnormality type; the others have fixed options.
DISTRACTOR_KEYS = {"mass": ("mass_shape", "mass_margins"), "calcification": ("calc_type", "calc_distribution")}
MAX_DISTRACTORS = 4


@dataclass(frozen=True)
class CaseFile:
    """One of the four case-description files and what its rows must look like."""

    abnormality: str  # "mass" or "calcification"
    official_split: str  # "train" or "test"
    file_name: str
    header: tuple[str, ...]
    lesion_columns: dict[str, str]  # attribute key -> CSV column


CASE_FILES = (
    CaseFile(
        "mass",
        "train",
        "mass_case_description_train_set.csv",
        MASS_HEADER,
        {"mass_shape": "mass shape", "mass_margins": "mass margins"},
    ),
    CaseFile(
        "calcification",
        "train",
        "calc_case_description_train_set.csv",
        CALC_HEADER,
        {"calc_type": "calc type", "calc_distribution": "calc distribution"},
    ),
    CaseFile(
        "mass",
        "test",
        "mass_case_description_test_set.csv",
        MASS_HEADER,
        {"mass_shape": "mass shape", "mass_margins": "mass margins"},
    ),
    CaseFile(
        "calcification",
        "test",
        "calc_case_description_test_set.csv",
        CALC_HEADER,
        {"calc_type": "calc type", "calc_distribution": "calc distribution"},
    ),
)


def _spoken_key(key: str) -> str:
    return key.replace("_", " ")


def phrases(attributes: dict[str, str]) -> dict[str, str]:
    """Attribute key -> its phrase: `<value> <key>` for lesion keys, then bare values."""
    found = {key: f"{attributes[key]} {_spoken_key(key)}" for key in LESION_KEYS if attributes.get(key)}
    found |= {key: attributes[key] for key in BARE_VALUE_KEYS if attributes.get(key)}
    return found


def describe(attributes: dict[str, str]) -> str:
    """The reference description: the attribute phrases, in order."""
    return ", ".join(phrases(attributes).values())


def _distractor_question(record: Record, key: str, rng: random.Random) -> Question | None:
    value = record.attributes.get(key)
    vocabulary = QUESTION_OPTIONS[key]
    # Compounds ("irregular-architectural distortion") and rare terms are never asked.
    if value is None or value not in vocabulary:
        return None
    others = [option for option in vocabulary if option != value]
    options = [value] + rng.sample(others, min(MAX_DISTRACTORS, len(others)))
    rng.shuffle(options)
    return Question(record.image_id, key, QUESTION_TEXT[key], tuple(options), options.index(value))


def _fixed_question(record: Record, key: str) -> Question | None:
    value = record.attributes.get(key)
    if value is None:
        return None
    options = QUESTION_OPTIONS[key]
    return Question(record.image_id, key, QUESTION_TEXT[key], options, options.index(value))


def make_questions(record: Record, rng: random.Random, observed=None) -> list[Question]:
    """Reference questions: lesion keys with shuffled distractors, then type and pathology.

    `observed` (values occurring in the data) is unused: distractors come from the
    reference's option lists.
    """
    del observed
    keys = DISTRACTOR_KEYS.get(record.attributes.get("abnormality_type", ""), ())
    questions = [_distractor_question(record, key, rng) for key in keys]
    questions += [_fixed_question(record, key) for key in BARE_VALUE_KEYS]
    return [question for question in questions if question is not None]


# --- reading -------------------------------------------------------------------------


def _normalise_lesion_value(raw: str, key: str, csv_path: Path, data_row: int, column: str) -> str | None:
    """`IRREGULAR-ARCHITECTURAL_DISTORTION` -> `irregular-architectural distortion`."""
    if raw in MISSING:
        return None
    terms = [normalise_term(term) for term in raw.split("-")]
    for term in terms:
        if term not in ATTRIBUTES[key]:
            raise DataError(
                f"{csv_path.name}, {data_row_text(data_row)}, column {column!r}: "
                f"value {raw!r} has term {term!r} outside the known vocabulary"
            )
    return "-".join(terms)


def _normalise_pathology(raw: str, csv_path: Path, data_row: int) -> str:
    check_vocabulary(raw, RAW_PATHOLOGIES, csv_path, data_row, "pathology")
    # The reference folds "benign without callback" into "benign".
    return normalise_term(raw).replace(" without callback", "")


def _path_parts(raw_path: str, csv_path: Path, data_row: int) -> list[str]:
    parts = raw_path.split("/")
    if len(parts) < 3 or not parts[0] or not parts[2]:
        raise DataError(
            f"{csv_path.name}, {data_row_text(data_row)}, column {CROPPED_PATH_COLUMN!r}: "
            "expected <case folder>/<study UID>/<series UID>/<file>"
        )
    return parts


def _cropped_image_index(raw_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """Case folder (dicom_info `PatientID`) -> [(jpeg path, series UID)] of cropped images."""
    frame = read_csv_checked(raw_dir / CSV_DIR / DICOM_INFO, DICOM_INFO_COLUMNS)
    frame = frame[frame["SeriesDescription"] == CROPPED_SERIES]
    index: dict[str, list[tuple[str, str]]] = {}
    for case, image_path, series in zip(frame["PatientID"], frame["image_path"], frame["SeriesInstanceUID"]):
        index.setdefault(case, []).append((image_path, series))
    return index


def _resolve_jpeg(raw_dir: Path, image_path: str) -> str:
    relative = image_path[len(JPEG_PREFIX) :] if image_path.startswith(JPEG_PREFIX) else image_path
    return str((raw_dir / relative).resolve())


def _find_cropped_image(index: dict[str, list[tuple[str, str]]], case: str, series: str) -> tuple[str | None, str]:
    """(jpeg path or None, reason when None)."""
    candidates = index.get(case, [])
    if len(candidates) > 1:
        candidates = [candidate for candidate in candidates if candidate[1] == series]
    if not candidates:
        return None, f"no cropped image for the case in {CSV_DIR}/{DICOM_INFO}"
    if len(candidates) > 1:
        return None, f"several cropped images for the case in {CSV_DIR}/{DICOM_INFO}"
    return candidates[0][0], ""


class JpegCrops:
    """Cropped-lesion JPEGs of the re-release, found through `csv/dicom_info.csv`."""

    def __init__(self, raw_dir: Path):
        self.raw_dir = raw_dir
        self.index = _cropped_image_index(raw_dir)

    def find(self, case: str, series: str) -> tuple[str | None, str]:
        jpeg, reason = _find_cropped_image(self.index, case, series)
        return (_resolve_jpeg(self.raw_dir, jpeg) if jpeg else None), reason


class DicomCrops:
    """Cropped-lesion DICOMs of the TCIA download, in the NBIA descriptive folder layout."""

    FOLDER_MARK = CROPPED_SERIES  # series folders are named `<n>-<SeriesDescription>-<n>`

    def __init__(self, raw_dir: Path):
        nbia = raw_dir / "CBIS-DDSM"
        self.root = nbia if nbia.is_dir() else raw_dir

    def find(self, case: str, series: str) -> tuple[str | None, str]:
        case_dir = self.root / case
        if not case_dir.is_dir():
            return None, "no DICOM folder for the case"
        files = sorted(case_dir.glob("*/*/*.dcm"))
        named = [f for f in files if self.FOLDER_MARK in f.parent.name]
        if len(named) == 1:
            return str(named[0].resolve()), ""
        crop = _crop_by_headers(files, series)
        if crop is None:
            return None, "no single cropped image in the case's DICOM folder"
        return str(crop.resolve()), ""


def _crop_by_headers(files: list[Path], series: str) -> Path | None:
    """The crop among `files` by their DICOM headers, or None when that is ambiguous."""
    import pydicom  # only the DICOM layout needs it
    from pydicom.errors import InvalidDicomError

    headers = []
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, KeyError, AttributeError):
            continue  # an unreadable file cannot be the crop; the others may settle it
        headers.append(
            (
                path,
                str(header.get("SeriesDescription", "")),
                str(header.get("SeriesInstanceUID", "")),
                int(header.get("Rows", 0)) * int(header.get("Columns", 0)),
            )
        )
    cropped = [h for h in headers if h[1] == CROPPED_SERIES]
    if len(cropped) > 1:
        cropped = [h for h in cropped if h[2] == series]
    if len(cropped) == 1:
        return cropped[0][0]
    if cropped:
        return None  # several crops in the case's series: ambiguous
    # No header names a crop: crop and mask share one series (older downloads). The mask
    # has the full mammogram's size, so the smaller image is the crop.
    in_series = sorted((h for h in headers if h[2] == series), key=lambda h: h[3])
    if len(in_series) >= 2 and in_series[0][3] < in_series[1][3]:
        return in_series[0][0]
    return None


def crop_finder(raw_dir: Path) -> JpegCrops | DicomCrops:
    """The JPEG re-release when `csv/dicom_info.csv` exists, else the TCIA DICOM layout."""
    if (raw_dir / CSV_DIR / DICOM_INFO).is_file():
        return JpegCrops(raw_dir)
    return DicomCrops(raw_dir)


def _read_case_files(raw_dir: Path) -> list[tuple[CaseFile, Path, pd.DataFrame]]:
    tables = []
    for case_file in CASE_FILES:
        csv_path = raw_dir / CSV_DIR / case_file.file_name
        required = (
            "patient_id",
            "abnormality type",
            "pathology",
            CROPPED_PATH_COLUMN,
            *case_file.lesion_columns.values(),
        )
        tables.append((case_file, csv_path, read_csv_checked(csv_path, required)))
    return tables


def _attributes_of(row: dict[str, str], case_file: CaseFile, csv_path: Path, data_row: int) -> dict[str, str]:
    check_vocabulary(row["abnormality type"], (case_file.abnormality,), csv_path, data_row, "abnormality type")
    attributes: dict[str, str] = {}
    for key, column in case_file.lesion_columns.items():
        value = _normalise_lesion_value(row[column], key, csv_path, data_row, column)
        if value is not None:
            attributes[key] = value
    attributes["abnormality_type"] = case_file.abnormality
    attributes["pathology"] = _normalise_pathology(row["pathology"], csv_path, data_row)
    return attributes


def read_records(raw_dir: Path, seed: int, strict: bool = False) -> AdapterResult:
    raw_dir = Path(raw_dir).resolve()
    tables = _read_case_files(raw_dir)
    crops = crop_finder(raw_dir)

    def patients_of(split: str) -> set[str]:
        return {
            pid for case_file, _, frame in tables if case_file.official_split == split for pid in frame["patient_id"]
        }

    test_patients = patients_of("test")
    val_patients = validation_patients(patients_of("train"), seed, VAL_FRACTION)

    sink = RowSink(strict=strict)
    for case_file, csv_path, frame in tables:
        for data_row, row in enumerate(frame.to_dict("records"), start=1):
            sink.rows_read += 1
            attributes = _attributes_of(row, case_file, csv_path, data_row)
            parts = _path_parts(row[CROPPED_PATH_COLUMN], csv_path, data_row)
            image_id, patient_id = parts[0], row["patient_id"]
            source = source_of(csv_path, data_row)
            if case_file.official_split == "test":
                split = "test"
            elif patient_id in test_patients:
                sink.quarantine(source, image_id, "patient also in the official test files")
                continue
            else:
                split = "val" if patient_id in val_patients else "train"
            image_path, reason = crops.find(image_id, parts[2])
            if image_path is None:
                sink.quarantine(source, image_id, reason)
                continue
            sink.accept(
                Record(
                    dataset=NAME,
                    image_id=image_id,
                    image_path=image_path,
                    patient_id=patient_id,
                    split=split,
                    attributes=attributes,
                    source=source,
                )
            )
    return sink.result()
