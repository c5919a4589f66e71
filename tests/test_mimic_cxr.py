"""MIMIC-CXR: report sections, the view rule, labels and questions, official splits with no
patient in two, report sources (files/ tree or zip), bad input, and the synthetic release."""

from __future__ import annotations

import csv
import gzip
import random
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from medift.datasets import DataError, mimic_cxr
from medift.datasets.synthetic import write_synthetic
from medift.datasets.synthetic.mimic_cxr import LABEL_HEADER, METADATA_HEADER, sample_attributes
from medift.records import Record
from tests.fixtures.data import assert_patients_disjoint, placeholders

REPORT = (
    "                                 FINAL REPORT\n"
    " EXAMINATION:  CHEST (PA AND LAT)\n \n"
    " INDICATION:  ___ with cough.\n \n"
    " COMPARISON:  ___\n \n"
    " FINDINGS: \n \n The heart is enlarged.  Small left\n pleural effusion.\n \n"
    " IMPRESSION: \n \n Cardiomegaly and small left effusion.\n"
)


# --- report sections ------------------------------------------------------------------------


def test_impression_is_preferred_and_whitespace_collapsed():
    assert mimic_cxr.report_section(REPORT) == "Cardiomegaly and small left effusion."
    names = [name for name, _ in mimic_cxr.split_sections(REPORT)]
    assert names == ["preamble", "examination", "indication", "comparison", "findings", "impression"]


def test_findings_when_no_impression_and_empty_impression_is_dropped():
    findings_only = REPORT.split(" IMPRESSION:")[0]
    assert mimic_cxr.report_section(findings_only) == "The heart is enlarged. Small left pleural effusion."
    empty_impression = findings_only + " IMPRESSION: \n \n"
    assert mimic_cxr.report_section(empty_impression) == "The heart is enlarged. Small left pleural effusion."


def test_last_paragraph_when_neither_section():
    text = " " * 33 + "FINAL REPORT\n INDICATION:  ___ with cough.\n \n No acute process.\n \n Lungs clear.\n"
    assert mimic_cxr.report_section(text) == "No acute process. Lungs clear."
    assert mimic_cxr.report_section("Unsectioned single paragraph.") == ""


def test_header_spellings_are_normalised():
    assert mimic_cxr.normalise_section_name("IMPRESSON") == "impression"
    assert mimic_cxr.normalise_section_name("CONCLUSION") == "impression"
    assert mimic_cxr.normalise_section_name("PA AND LATERAL VIEWS OF THE CHEST") == "findings"
    assert mimic_cxr.normalise_section_name("FINAL IMPRESSION") == "impression"
    text = REPORT.replace(" IMPRESSION:", " CONCLUSION:")
    assert mimic_cxr.report_section(text) == "Cardiomegaly and small left effusion."


# --- rules ----------------------------------------------------------------------------------


def test_questions_one_per_definite_finding_yes_no():
    record = Record(
        "mimic_cxr",
        "d1",
        "/x",
        "10000001",
        "test",
        {"cardiomegaly": "yes", "pneumothorax": "no", "edema": "uncertain", "no_finding": "yes", "report": "text"},
    )
    questions = mimic_cxr.make_questions(record, random.Random(0))
    assert [(q.attribute, q.question, q.options, q.answer_index) for q in questions] == [
        ("cardiomegaly", "Is there cardiomegaly?", ("yes", "no"), 0),
        ("pneumothorax", "Is there a pneumothorax?", ("yes", "no"), 1),
    ]
    assert mimic_cxr.describe(record.attributes) == "text"
    assert set(mimic_cxr.QUESTION_TEXT) == set(mimic_cxr.ATTRIBUTES) == set(mimic_cxr.FINDINGS.values())


# --- reading a hand-made release ----------------------------------------------------------------


def _gz_csv(path: Path, header, rows, gz=True) -> None:
    text = "\n".join(",".join(map(str, row)) for row in [header, *rows]) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8", newline="") as handle:
            handle.write(text)
    else:
        path.with_suffix("").write_text(text) if path.suffix == ".gz" else path.write_text(text)


# (subject, study, [(dicom_id, view)], labels {column: cell}, split, report or None)
STUDIES = [
    (
        "10000001",
        "50000001",
        [("b-lat", "LATERAL"), ("c-ap", "AP"), ("d-pa", "PA"), ("a-pa", "PA")],
        {"Cardiomegaly": "1.0", "Pneumothorax": "0.0"},
        "train",
        REPORT,
    ),
    ("10000001", "50000002", [("e-ap", "AP")], {"Edema": "-1.0"}, "train", REPORT),
    ("10000002", "50000003", [("f-lat", "LATERAL"), ("g-ll", "LL")], {"No Finding": "1.0"}, "test", REPORT),
    ("10000003", "50000004", [("h-ap", "AP"), ("i-none", "")], {"No Finding": "1.0"}, "validate", REPORT),
    ("10000004", "50000005", [("j-pa", "PA")], {"Pneumonia": "1.0"}, "test", None),  # no report
    ("10000005", "50000006", [("k-pa", "PA")], {"Fracture": "0.0"}, "test", REPORT),
    ("10000005", "50000007", [("l-pa", "PA")], {"Fracture": "1.0"}, "train", REPORT),  # patient in 2 splits
]


def _release(root: Path, studies=STUDIES, gz=True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    metadata, labels, splits, images = [], [], [], []
    for subject, study, views, cells, split, report in studies:
        folder = mimic_cxr.study_folder(subject, study)
        for dicom_id, view in views:
            metadata.append([dicom_id, subject, study, "CHEST", view, 8, 8, "", "", "", "", ""])
            splits.append([dicom_id, study, subject, split])
            images.append(f"{folder}/{dicom_id}.jpg")
        labels.append([subject, study] + [cells.get(column, "") for column in mimic_cxr.FINDINGS])
        if report is not None:
            (root / f"{folder}.txt").parent.mkdir(parents=True, exist_ok=True)
            (root / f"{folder}.txt").write_text(report)
    _gz_csv(root / mimic_cxr.METADATA_FILES[0], METADATA_HEADER, metadata, gz)
    _gz_csv(root / mimic_cxr.LABEL_FILES[0], LABEL_HEADER, labels, gz)
    _gz_csv(root / mimic_cxr.SPLIT_FILES[0], mimic_cxr.SPLIT_COLUMNS, splits, gz)
    placeholders(root, images)
    return root


def test_view_rule_labels_splits_and_counts(tmp_path):
    result = mimic_cxr.read_records(_release(tmp_path), seed=0)
    by_study = {r.image_path.split("/")[-2]: r for r in result.records}
    assert by_study["s50000001"].image_id == "a-pa"  # PA over AP, then the smallest dicom_id
    assert by_study["s50000002"].image_id == "e-ap"
    assert by_study["s50000004"].image_id == "h-ap" and by_study["s50000004"].split == "val"
    first = by_study["s50000001"]
    assert first.patient_id == "10000001" and first.split == "train"
    assert first.attributes == {
        "cardiomegaly": "yes",
        "pneumothorax": "no",
        "report": "Cardiomegaly and small left effusion.",
    }
    assert by_study["s50000002"].attributes["edema"] == "uncertain"
    assert result.rows_read == 7 and len(result.records) == 4
    assert result.exclusion_summary() == {"no PA or AP image in the study": 1}
    assert result.quarantine_summary() == {"report missing": 1, "patient also in the official test split": 1}
    assert result.counts == {"metadata images": 12, "metadata studies": 7}
    assert_patients_disjoint(result.records)
    with pytest.raises(DataError, match="report missing"):
        mimic_cxr.read_records(tmp_path, seed=0, strict=True)


def test_reports_zip_negbio_and_plain_csv(tmp_path):
    root = _release(tmp_path / "raw", gz=False)
    reports = root / mimic_cxr.REPORTS_ZIP
    with zipfile.ZipFile(reports, "w") as archive:
        for path in sorted((root / "files").rglob("*.txt")):
            archive.write(path, "mimic-cxr-reports/" + str(path.relative_to(root)))
            path.unlink()
    (root / "mimic-cxr-2.0.0-chexpert.csv").rename(root / "mimic-cxr-2.0.0-negbio.csv")
    result = mimic_cxr.read_records(root, seed=0)
    assert len(result.records) == 4 and result.quarantine_summary()["report missing"] == 1
    assert {r.attributes["report"] for r in result.records} == {"Cardiomegaly and small left effusion."}


def test_bad_label_split_and_column_are_errors(tmp_path):
    studies = [list(s) for s in STUDIES]
    studies[1][3] = {"Edema": "2.0"}
    with pytest.raises(DataError) as error:
        mimic_cxr.read_records(_release(tmp_path / "label", studies), seed=0)
    assert "mimic-cxr-2.0.0-chexpert.csv.gz" in str(error.value) and "data row 2" in str(error.value)
    assert "'Edema'" in str(error.value)

    studies = [list(s) for s in STUDIES]
    studies[0][4] = "holdout"
    with pytest.raises(DataError, match=r"split\.csv\.gz.*'split'"):
        mimic_cxr.read_records(_release(tmp_path / "split", studies), seed=0)

    root = _release(tmp_path / "column")
    with gzip.open(root / mimic_cxr.METADATA_FILES[0], "wt") as handle:
        handle.write("dicom_id,subject_id,study_id\na,1,2\n")
    with pytest.raises(ValueError, match=r"metadata\.csv\.gz.*'ViewPosition'"):
        mimic_cxr.read_records(root, seed=0)


def test_missing_and_duplicated_images_are_quarantined(tmp_path):
    studies = STUDIES[:2] + [("10000009", "50000001", [("z-pa", "PA")], {}, "train", REPORT)]
    root = _release(tmp_path, studies)
    (root / mimic_cxr.study_folder("10000001", "50000002") / "e-ap.jpg").unlink()
    result = mimic_cxr.read_records(root, seed=0)
    # The third label row repeats study 50000001 under another subject.
    assert result.quarantine_summary() == {"image file missing": 1, "subject_id differs between labels and metadata": 1}


# --- the synthetic release -------------------------------------------------------------------------


def test_synthetic_round_trip(tmp_path):
    write_synthetic("mimic_cxr", tmp_path, seed=3, n_train=30, n_val=6, n_test=8, image_size=48)
    with gzip.open(tmp_path / mimic_cxr.METADATA_FILES[0], "rt") as handle:
        assert tuple(next(csv.reader(handle))) == METADATA_HEADER
    result = mimic_cxr.read_records(tmp_path, seed=0)
    assert Counter(r.split for r in result.records) == {"train": 30, "val": 6, "test": 8}
    assert not result.quarantined
    assert result.rows_read == len(result.records) + len(result.excluded)
    assert_patients_disjoint(result.records)
    rng = random.Random(0)
    for record in result.records:
        assert mimic_cxr.describe(record.attributes)
        for question in mimic_cxr.make_questions(record, rng):
            assert question.options[question.answer_index] == record.attributes[question.attribute]
    sampled = sample_attributes(random.Random(1))
    assert sampled["report"] and set(sampled) - {"report"} <= set(mimic_cxr.ATTRIBUTES)


def test_patient_in_two_splits_of_the_split_file(tmp_path):
    """The official test split is kept as published; the patient's other studies go."""
    root = _release(tmp_path, STUDIES[5:])
    result = mimic_cxr.read_records(root, seed=0)
    assert [(r.split, r.image_id) for r in result.records] == [("test", "k-pa")]
    assert [q.reason for q in result.quarantined] == ["patient also in the official test split"]
    shutil.rmtree(root)
