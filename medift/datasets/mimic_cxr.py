"""MIMIC-CXR-JPG (chest X-rays) with the MIMIC-CXR reports: raw format, our rules.

Raw layout that `read_records` expects under `raw_dir` (the PhysioNet releases, merged):

    raw_dir/mimic-cxr-2.0.0-metadata.csv.gz    # each of the three also as plain .csv
    raw_dir/mimic-cxr-2.0.0-chexpert.csv.gz    # or mimic-cxr-2.0.0-negbio.csv.gz
    raw_dir/mimic-cxr-2.0.0-split.csv.gz
    raw_dir/files/p10/p10000032/s50414267/<dicom_id>.jpg          # MIMIC-CXR-JPG images
    raw_dir/files/p10/p10000032/s50414267.txt                     # MIMIC-CXR reports, or
    raw_dir/mimic-cxr-reports.zip                                 # the reports archive

The paper's public code has no MIMIC-CXR preprocessing, so these rules are ours
(config/README.md describes them too):

- Unit: one record per study (one row of the label file), with one image chosen by the
  view rule: a `PA` image if the study has one, else an `AP` image; among several, the
  smallest `dicom_id`. A study with neither (lateral views only, or an empty
  ViewPosition) is excluded, counted, never an error.
- Labels: CheXpert labels if `-chexpert` is there, else NegBio. A cell reads `1.0` yes,
  `0.0` no, `-1.0` uncertain, blank not mentioned (left out); anything else is an error.
- Description: the radiologist's report, section chosen like the official MIMIC-CXR
  section parser (`report_section`): the last impression, else the last findings, else the
  report's last paragraph, else the last comparison section; whitespace collapsed. A study
  without a report file is quarantined, one with no usable section too.
- Questions: one per finding the labeller marked definitely (`yes` or `no`), in label
  column order, `Is there <finding>?` with options `yes, no` (fixed order, like WBCAtt's
  yes/no attributes). Uncertain and unmentioned findings are not asked; `No Finding` is
  never asked (the labellers never mark it `0.0`, so its answer would always be yes).
- Split: the official split file (`train`, `validate` -> val, `test`) of the chosen image.
  A patient (subject_id) whose studies the file puts in two splits keeps the
  highest-ranked one (test > val > train); their studies in the other split are
  quarantined. So no patient sits in two splits.

Record: image_id = dicom_id, patient_id = subject_id, attributes = the labelled findings
(`yes`/`no`/`uncertain`) plus `report` (the description text, not asked about).
Messages name files, rows and columns only: never report text or identifiers.
"""

from __future__ import annotations

import dataclasses
import random
import re
import zipfile
from collections import defaultdict
from pathlib import Path

from medift.datasets.common import (
    AdapterResult,
    DataError,
    RowSink,
    check_vocabulary,
    data_row_text,
    find_file,
    read_csv_checked,
    source_of,
)
from medift.records import Question, Record

NAME = "mimic_cxr"
PREFIX = "mimic-cxr-2.0.0-"
METADATA_FILES = (f"{PREFIX}metadata.csv.gz", f"{PREFIX}metadata.csv")
LABEL_FILES = tuple(f"{PREFIX}{labeller}.csv{gz}" for labeller in ("chexpert", "negbio") for gz in (".gz", ""))
SPLIT_FILES = (f"{PREFIX}split.csv.gz", f"{PREFIX}split.csv")
REPORTS_ZIP = "mimic-cxr-reports.zip"
IMAGE_FOLDER = "files"

METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
VIEW_PREFERENCE = ("PA", "AP")  # the view rule: PA, then AP
SPLIT_NAMES = {"train": "train", "validate": "val", "test": "test"}
SPLIT_RANK = {"test": 0, "val": 1, "train": 2}  # a patient in two splits keeps the lower rank

# Label column -> attribute key, in the label file's column order.
FINDINGS = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Enlarged Cardiomediastinum": "enlarged_cardiomediastinum",
    "Fracture": "fracture",
    "Lung Lesion": "lung_lesion",
    "Lung Opacity": "lung_opacity",
    "No Finding": "no_finding",
    "Pleural Effusion": "pleural_effusion",
    "Pleural Other": "pleural_other",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
    "Support Devices": "support_devices",
}
LABEL_VALUES = {"1.0": "yes", "1": "yes", "0.0": "no", "0": "no", "-1.0": "uncertain", "-1": "uncertain"}
NOT_MENTIONED = ""
REPORT_KEY = "report"  # the attribute holding the description text

ATTRIBUTES: dict[str, tuple[str, ...]] = {key: ("yes", "no", "uncertain") for key in FINDINGS.values()}
QUESTION_OPTIONS: dict[str, tuple[str, ...]] = {key: ("yes", "no") for key in FINDINGS.values() if key != "no_finding"}
QUESTION_TEXT: dict[str, str] = {
    "atelectasis": "Is there atelectasis?",
    "cardiomegaly": "Is there cardiomegaly?",
    "consolidation": "Is there consolidation?",
    "edema": "Is there edema?",
    "enlarged_cardiomediastinum": "Is there an enlarged cardiomediastinum?",
    "fracture": "Is there a fracture?",
    "lung_lesion": "Is there a lung lesion?",
    "lung_opacity": "Is there lung opacity?",
    "no_finding": "Is there no finding?",  # never asked (see the module docstring)
    "pleural_effusion": "Is there pleural effusion?",
    "pleural_other": "Is there another pleural abnormality?",
    "pneumonia": "Is there pneumonia?",
    "pneumothorax": "Is there a pneumothorax?",
    "support_devices": "Are there support devices?",
}


# --- report sections (after the official MIMIC-CXR section parser) -----------------------

SECTION_HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s", re.DOTALL)
SECTION_PREFERENCE = ("impression", "findings", "last_paragraph", "comparison")
# Frequent header spellings -> normalised name (the official parser's table, abridged to
# the names the preference above can pick, plus their common misspellings).
SECTION_ALIASES = {
    "conclusion": "impression",
    "findings and impression": "impression",
    "findings/impression": "impression",
    "findings/ impression": "impression",
    "impresson": "impression",
    "imprression": "impression",
    "imoression": "impression",
    "impressoin": "impression",
    "imprssion": "impression",
    "impresion": "impression",
    "imperssion": "impression",
    "mpression": "impression",
    "impession": "impression",
    "chest, two views": "findings",
    "finding": "findings",
    "findins": "findings",
    "findindgs": "findings",
    "findgings": "findings",
    "findngs": "findings",
    "findnings": "findings",
    "finidngs": "findings",
    "reference findings": "findings",
    "comparisons": "comparison",
    "reference exam": "comparison",
    "comparison exam": "comparison",
    "comparison film": "comparison",
    "comparision": "comparison",
    "comparsion": "comparison",
    "comparrison": "comparison",
    "comparisions": "comparison",
    "clinical history": "history",
    "clinical information": "history",
    "patient history": "history",
    "reason for examination": "indication",
    "reason for exam": "indication",
    "clinical indication": "indication",
}
MAIN_SECTIONS = ("impression", "findings", "history", "comparison", "addendum")
FINDINGS_HEADER = re.compile(
    "(chest|portable|pa and lateral|lateral and pa|ap and lateral|lateral and ap|frontal and|"
    "two views|frontal view|pa view|ap view|one view|lateral view|bone window|frontal upright|"
    "frontal semi-upright|ribs|pa and lat)"
)


def normalise_section_name(header: str) -> str:
    name = header.lower().strip()
    if name in SECTION_ALIASES:
        return SECTION_ALIASES[name]
    for main in MAIN_SECTIONS:
        if main in name:
            return main
    return "findings" if FINDINGS_HEADER.search(name) else name


def split_sections(text: str) -> list[tuple[str, str]]:
    """(normalised name, text) of each section, like the official `section_text`.

    Headers start a line with one space (`\\n IMPRESSION: `). Empty impression/findings
    sections are dropped; without either, the last section's paragraphs after its first
    become a `last_paragraph` section.
    """
    sections: list[tuple[str, str]] = []
    match = SECTION_HEADER.search(text)
    if match is None:
        sections.append(("full report", text))
    else:
        sections.append(("preamble", text[: match.start(1)]))
        while match is not None:
            name, start = match.group(1), match.end()
            # Skip past the first newline after the header, to avoid some bad parses.
            skip = max(text[start:].find("\n"), 0)
            match = SECTION_HEADER.search(text, start + skip)
            sections.append((normalise_section_name(name), text[start : match.start() if match else len(text)]))
    sections = [
        (name, body) for name, body in sections if not (name in ("impression", "findings") and not body.strip())
    ]
    names = [name for name, _ in sections]
    if "impression" not in names and "findings" not in names and "\n \n" in sections[-1][1]:
        name, body = sections[-1]
        first, *rest = body.split("\n \n")
        sections[-1] = (name, first)
        sections.append(("last_paragraph", "\n \n".join(rest)))
    return sections


def report_section(text: str) -> str:
    """The section a report is described by: the last impression, else findings, else the
    last paragraph, else comparison; whitespace collapsed. '' when none has text."""
    sections = split_sections(text)
    for wanted in SECTION_PREFERENCE:
        bodies = [body for name, body in sections if name == wanted]
        if bodies:
            return " ".join(bodies[-1].split())
    return ""


# --- rules ---------------------------------------------------------------------------------


def describe(attributes: dict[str, str]) -> str:
    """The chosen report section (see `report_section`)."""
    return attributes.get(REPORT_KEY, "")


def phrases(attributes: dict[str, str]) -> dict[str, str]:
    """None: a report is free text, not attribute phrases (description accuracy is not defined)."""
    del attributes
    return {}


def make_questions(record: Record, rng: random.Random, observed=None) -> list[Question]:
    """One yes/no question per finding labelled yes or no; options in fixed order.

    `rng` and `observed` are unused: the questions follow from the labels alone.
    """
    del rng, observed
    questions = []
    for key, options in QUESTION_OPTIONS.items():
        value = record.attributes.get(key)
        if value in options:
            questions.append(Question(record.image_id, key, QUESTION_TEXT[key], options, options.index(value)))
    return questions


# --- reading -------------------------------------------------------------------------------


def study_folder(subject_id: str, study_id: str) -> str:
    """`files/p10/p10000032/s50414267` (relative to raw_dir)."""
    return f"{IMAGE_FOLDER}/p{subject_id[:2]}/p{subject_id}/s{study_id}"


class Reports:
    """Report text by (subject_id, study_id), from the `files/` tree or the reports zip."""

    def __init__(self, raw_dir: Path):
        self.raw_dir = raw_dir
        self.archive = None
        self.members: dict[str, str] = {}
        zip_path = raw_dir / REPORTS_ZIP
        if zip_path.is_file():
            try:
                self.archive = zipfile.ZipFile(zip_path)
            except zipfile.BadZipFile as error:
                # A 0-byte or cut-off download: say which file, not just "not a zip file".
                kind = "empty file" if zip_path.stat().st_size == 0 else f"not a readable zip archive ({error})"
                raise DataError(f"{zip_path}: {kind}; expected the MIMIC-CXR reports archive") from None
            # Index members by their last three parts, whatever folder the archive adds.
            for member in self.archive.namelist():
                if member.endswith(".txt"):
                    self.members["/".join(member.split("/")[-3:])] = member

    def text(self, subject_id: str, study_id: str) -> str | None:
        relative = f"{study_folder(subject_id, study_id)}.txt"
        path = self.raw_dir / relative
        if path.is_file():
            return path.read_text(encoding="utf-8", errors="replace")
        if self.archive is not None:
            member = self.members.get("/".join(relative.split("/")[-3:]))
            if member is not None:
                return self.archive.read(member).decode("utf-8", errors="replace")
        return None

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()


def _chosen_images(raw_dir: Path) -> tuple[dict[str, tuple[str, str]], dict[str, str], int]:
    """study_id -> (dicom_id, subject_id) of the view rule's image; study_id -> why none; images."""
    path = find_file(raw_dir, METADATA_FILES, "MIMIC-CXR-JPG metadata")
    frame = read_csv_checked(path, METADATA_COLUMNS)
    by_study: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for dicom_id, subject_id, study_id, view in zip(
        frame["dicom_id"], frame["subject_id"], frame["study_id"], frame["ViewPosition"]
    ):
        rank = VIEW_PREFERENCE.index(view) if view in VIEW_PREFERENCE else len(VIEW_PREFERENCE)
        by_study[study_id].append((rank, dicom_id, subject_id))
    chosen, no_frontal = {}, {}
    for study_id, images in by_study.items():
        rank, dicom_id, subject_id = min(images)
        if rank == len(VIEW_PREFERENCE):
            no_frontal[study_id] = "no PA or AP image in the study"
        else:
            chosen[study_id] = (dicom_id, subject_id)
    return chosen, no_frontal, len(frame)


def _official_splits(raw_dir: Path) -> dict[str, str]:
    path = find_file(raw_dir, SPLIT_FILES, "MIMIC-CXR-JPG split file")
    frame = read_csv_checked(path, SPLIT_COLUMNS)
    splits = {}
    for data_row, (dicom_id, split) in enumerate(zip(frame["dicom_id"], frame["split"]), start=1):
        check_vocabulary(split, SPLIT_NAMES, path, data_row, "split")
        splits[dicom_id] = SPLIT_NAMES[split]
    return splits


def _labels(row: dict[str, str], path: Path, data_row: int) -> dict[str, str]:
    labels = {}
    for column, key in FINDINGS.items():
        raw = row[column]
        if raw == NOT_MENTIONED:
            continue
        if raw not in LABEL_VALUES:
            raise DataError(
                f"{path.name}, {data_row_text(data_row)}, column {column!r}: "
                f"value {raw!r} is not one of 1.0, 0.0, -1.0 or blank"
            )
        labels[key] = LABEL_VALUES[raw]
    return labels


def _patient_splits(candidates: list[tuple[Record, str]]) -> dict[str, str]:
    """subject_id -> the one split the patient keeps (test > val > train)."""
    kept: dict[str, str] = {}
    for record, _ in candidates:
        current = kept.get(record.patient_id)
        if current is None or SPLIT_RANK[record.split] < SPLIT_RANK[current]:
            kept[record.patient_id] = record.split
    return kept


def _candidates(raw_dir: Path, sink: RowSink) -> list[tuple[Record, str]]:
    """(record without its report, subject_id) for every label row with an image and a split."""
    chosen, no_frontal, n_images = _chosen_images(raw_dir)
    splits = _official_splits(raw_dir)
    path = find_file(raw_dir, LABEL_FILES, "MIMIC-CXR-JPG label file (CheXpert or NegBio)")
    frame = read_csv_checked(path, ("subject_id", "study_id", *FINDINGS))
    sink.counts["metadata images"] = n_images
    sink.counts["metadata studies"] = len(chosen) + len(no_frontal)
    candidates = []
    for data_row, row in enumerate(frame.to_dict("records"), start=1):
        sink.rows_read += 1
        source, study_id, subject_id = source_of(path, data_row), row["study_id"], row["subject_id"]
        labels = _labels(row, path, data_row)
        if study_id in no_frontal:
            sink.exclude(source, study_id, no_frontal[study_id])
            continue
        if study_id not in chosen:
            sink.quarantine(source, study_id, "study has no image in the metadata")
            continue
        dicom_id, image_subject = chosen[study_id]
        if image_subject != subject_id:
            sink.quarantine(source, dicom_id, "subject_id differs between labels and metadata")
            continue
        if dicom_id not in splits:
            sink.quarantine(source, dicom_id, "image not in the split file")
            continue
        record = Record(
            dataset=NAME,
            image_id=dicom_id,
            image_path=str((raw_dir / study_folder(subject_id, study_id) / f"{dicom_id}.jpg").resolve()),
            patient_id=subject_id,
            split=splits[dicom_id],
            attributes=labels,
            source=source,
        )
        candidates.append((record, study_id))
    return candidates


def read_records(raw_dir: Path, seed: int, strict: bool = False) -> AdapterResult:
    """Read the release; `seed` is unused: the split file fixes the splits."""
    del seed
    raw_dir = Path(raw_dir).resolve()
    sink = RowSink(strict=strict)
    candidates = _candidates(raw_dir, sink)
    patient_split = _patient_splits(candidates)
    reports = Reports(raw_dir)
    try:
        for record, study_id in candidates:
            keep = patient_split[record.patient_id]
            if record.split != keep:
                sink.quarantine(record.source, record.image_id, f"patient also in the official {keep} split")
                continue
            text = reports.text(record.patient_id, study_id)
            if text is None:
                sink.quarantine(record.source, record.image_id, "report missing")
                continue
            section = report_section(text)
            if not section:
                sink.quarantine(record.source, record.image_id, "report has no impression, findings or final paragraph")
                continue
            sink.accept(dataclasses.replace(record, attributes={**record.attributes, REPORT_KEY: section}))
    finally:
        reports.close()
    return sink.result()
