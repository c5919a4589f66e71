"""Dataset layer: reference descriptions and questions, synthetic round trips, bad input,
and the real annotation files (with placeholder images) when ../shared/data is present."""

from __future__ import annotations

import csv
import random
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from medift.datasets import DATASETS, DataError, cbis_ddsm, get_dataset, wbcatt
from medift.datasets.synthetic import write_synthetic
from medift.records import SPLITS, Question, Record
from tests.fixtures.data import (
    assert_patients_disjoint,
    real_cbis_layout,
    real_data_missing,
    real_wbcatt_layout,
)

WBCATT_EXAMPLE = {
    "label": "Neutrophil",
    "cell_size": "small",
    "cell_shape": "round",
    "nucleus_shape": "unsegmented-band",
    "nuclear_cytoplasmic_ratio": "low",
    "chromatin_density": "densely",
    "cytoplasm_vacuole": "no",
    "cytoplasm_texture": "clear",
    "cytoplasm_colour": "light blue",
    "granule_type": "small",
    "granule_colour": "pink",
    "granularity": "yes",
}
WBCATT_EXAMPLE_TEXT = (
    "small cell size, round cell shape, unsegmented-band nucleus shape, low nuclear "
    "cytoplasmic ratio, densely chromatin density, clear cytoplasm texture, light blue "
    "cytoplasm colour, granularity, small granule type, pink granule colour, Neutrophil"
)


def _record(dataset: str, attributes: dict[str, str], image_id: str = "img") -> Record:
    return Record(
        dataset=dataset, image_id=image_id, image_path="/x.jpg", patient_id="p", split="val", attributes=attributes
    )


def _tree_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(path for path in root.rglob("*") if path.is_file())
    return {str(path.relative_to(root)): path.read_bytes() for path in files}


# --- registry ------------------------------------------------------------------------


def test_registry_modules_share_one_api():
    assert set(DATASETS) >= {"wbcatt", "cbis_ddsm"}
    for name, module in DATASETS.items():
        assert get_dataset(name) is module
        for attribute in (
            "ATTRIBUTES",
            "QUESTION_TEXT",
            "QUESTION_OPTIONS",
            "read_records",
            "describe",
            "make_questions",
        ):
            assert hasattr(module, attribute), (name, attribute)
        assert set(module.QUESTION_TEXT) == set(module.ATTRIBUTES)
        for key, options in module.QUESTION_OPTIONS.items():
            assert set(options) <= set(module.ATTRIBUTES[key])
    with pytest.raises(KeyError):
        get_dataset("nope")


# --- descriptions --------------------------------------------------------------------


def test_wbcatt_description_matches_reference_example():
    assert wbcatt.describe(WBCATT_EXAMPLE) == WBCATT_EXAMPLE_TEXT


def test_wbcatt_description_drops_nil_and_no():
    attributes = dict(
        WBCATT_EXAMPLE,
        granularity="no",
        granule_type="nil",
        granule_colour="nil",
        cytoplasm_vacuole="yes",
        label="Lymphocyte",
    )
    text = wbcatt.describe(attributes)
    assert "nil" not in text and "granul" not in text
    assert "cytoplasm vacuole, " in text and text.endswith(", Lymphocyte")


def test_cbis_descriptions_follow_reference_rules():
    mass = {
        "mass_shape": "irregular-architectural distortion",
        "mass_margins": "spiculated",
        "abnormality_type": "mass",
        "pathology": "malignant",
    }
    assert cbis_ddsm.describe(mass) == (
        "irregular-architectural distortion mass shape, spiculated mass margins, mass, malignant"
    )
    calc = {
        "calc_type": "amorphous",
        "calc_distribution": "clustered",
        "abnormality_type": "calcification",
        "pathology": "benign",
    }
    assert cbis_ddsm.describe(calc) == ("amorphous calc type, clustered calc distribution, calcification, benign")
    no_distribution = {"calc_type": "pleomorphic", "abnormality_type": "calcification", "pathology": "benign"}
    assert cbis_ddsm.describe(no_distribution) == "pleomorphic calc type, calcification, benign"


# --- questions -----------------------------------------------------------------------


def test_wbcatt_options_fixed_order():
    assert wbcatt.QUESTION_OPTIONS["label"] == tuple(sorted(wbcatt.QUESTION_OPTIONS["label"]))
    assert wbcatt.QUESTION_OPTIONS["cytoplasm_vacuole"] == ("yes", "no")
    assert wbcatt.QUESTION_OPTIONS["granularity"] == ("yes", "no")
    assert wbcatt.QUESTION_OPTIONS["granule_type"] == ("coarse", "round", "small")
    assert wbcatt.QUESTION_TEXT["nuclear_cytoplasmic_ratio"] == ("What is the nuclear cytoplasmic ratio?")


def test_wbcatt_one_question_never_on_nil_options_fixed():
    attributes = dict(WBCATT_EXAMPLE, granularity="no", granule_type="nil", granule_colour="nil")
    record = _record("wbcatt", attributes)
    asked = Counter()
    for seed in range(300):
        questions = wbcatt.make_questions(record, random.Random(seed))
        assert len(questions) == 1
        question = questions[0]
        asked[question.attribute] += 1
        assert question.options == wbcatt.QUESTION_OPTIONS[question.attribute]
        assert "nil" not in question.options
        assert question.options[question.answer_index] == attributes[question.attribute]
        assert question.question == wbcatt.QUESTION_TEXT[question.attribute]
    assert "granule_type" not in asked and "granule_colour" not in asked
    assert len(asked) == 10  # every non-nil attribute gets asked at some seed
    first = wbcatt.make_questions(record, random.Random(7))
    assert first == wbcatt.make_questions(record, random.Random(7))


def test_cbis_questions_rules():
    mass = _record(
        "cbis_ddsm",
        {
            "mass_shape": "irregular-architectural distortion",
            "mass_margins": "spiculated",
            "abnormality_type": "mass",
            "pathology": "malignant",
        },
    )
    answers = set()
    for seed in range(50):
        questions = cbis_ddsm.make_questions(mass, random.Random(seed))
        # The compound shape is not asked; margins, type and pathology are.
        assert [q.attribute for q in questions] == ["mass_margins", "abnormality_type", "pathology"]
        margin = questions[0]
        assert margin.question == "What is the mass margin?"
        assert len(margin.options) == 5 and set(margin.options) == set(cbis_ddsm.QUESTION_OPTIONS["mass_margins"])
        assert margin.options[margin.answer_index] == "spiculated"
        answers.add(margin.answer_index)
        assert questions[1].options == ("calcification", "mass")
        assert questions[1].options[questions[1].answer_index] == "mass"
        assert questions[2].options == ("benign", "malignant")
        assert questions[2].options[questions[2].answer_index] == "malignant"
    assert len(answers) > 1  # options are shuffled
    calc = _record(
        "cbis_ddsm",
        {
            "calc_type": "pleomorphic",
            "calc_distribution": "clustered",
            "abnormality_type": "calcification",
            "pathology": "benign",
        },
    )
    questions = cbis_ddsm.make_questions(calc, random.Random(3))
    assert questions == cbis_ddsm.make_questions(calc, random.Random(3))
    calc_type = questions[0]
    assert calc_type.attribute == "calc_type" and len(calc_type.options) == 5
    assert len(set(calc_type.options)) == 5 and "pleomorphic" in calc_type.options
    assert set(calc_type.options) <= set(cbis_ddsm.QUESTION_OPTIONS["calc_type"])
    # A rare term outside the reference options, and a missing value, get no question.
    rare = _record("cbis_ddsm", {"calc_type": "dystrophic", "abnormality_type": "calcification", "pathology": "benign"})
    assert [q.attribute for q in cbis_ddsm.make_questions(rare, random.Random(0))] == ["abnormality_type", "pathology"]


# --- synthetic round trips -----------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_wbcatt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wbcatt")
    write_synthetic("wbcatt", root, seed=5, n_train=30, n_val=10, n_test=12, image_size=64)
    return root


@pytest.fixture(scope="module")
def synthetic_cbis(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cbis")
    write_synthetic("cbis_ddsm", root, seed=5, n_train=54, n_val=6, n_test=16, image_size=64)
    return root


def test_synthetic_wbcatt_round_trip(synthetic_wbcatt):
    header = (synthetic_wbcatt / "pbc_attr_v1_train.csv").read_text().splitlines()[0]
    assert header == ",".join(wbcatt.CSV_HEADER)
    result = wbcatt.read_records(synthetic_wbcatt, seed=0)
    assert result.rows_read == 52 and not result.quarantined
    assert Counter(r.split for r in result.records) == {"train": 30, "val": 10, "test": 12}
    for record in result.records:
        assert Path(record.image_path).is_absolute() and Path(record.image_path).is_file()
        label_folder = Path(record.image_path).parent.name
        assert label_folder == record.attributes["label"].lower()
        assert Image.open(record.image_path).size == (64, 64)
    assert_patients_disjoint(result.records)
    assert len({r.attributes["label"] for r in result.records}) >= 4


def test_synthetic_cbis_round_trip(synthetic_cbis):
    csv_dir = synthetic_cbis / "csv"
    mass_bytes = (csv_dir / "mass_case_description_train_set.csv").read_bytes()
    calc_bytes = (csv_dir / "calc_case_description_train_set.csv").read_bytes()
    assert mass_bytes.startswith(",".join(cbis_ddsm.MASS_HEADER).encode() + b"\r\n")
    assert calc_bytes.startswith(",".join(cbis_ddsm.CALC_HEADER).encode() + b"\r\n")
    assert b'.dcm\n"\r\n' in mass_bytes  # quoted trailing newline in the last column
    assert b'.dcm\n",' in calc_bytes  # ... and in the cropped-image column
    dicom_info = pd.read_csv(csv_dir / "dicom_info.csv", dtype=str)
    assert set(dicom_info["SeriesDescription"]) == {"full mammogram images", "cropped images", "ROI mask images"}

    result = cbis_ddsm.read_records(synthetic_cbis, seed=0)
    assert result.rows_read == 76 and not result.quarantined
    splits = Counter(r.split for r in result.records)
    assert splits["test"] == 16 and splits["train"] + splits["val"] == 60 and splits["val"] > 0
    assert_patients_disjoint(result.records)
    for record in result.records:
        assert Path(record.image_path).is_file() and "\n" not in record.image_id
        assert record.image_id.split("_")[0] in ("Mass-Training", "Calc-Training", "Mass-Test", "Calc-Test")
        assert cbis_ddsm.describe(record.attributes)
    # The validation patients are 10 % of the training patients, by the seed.
    train_patients = {r.patient_id for r in result.records if r.split in ("train", "val")}
    val_patients = {r.patient_id for r in result.records if r.split == "val"}
    assert len(val_patients) == int(len(train_patients) * 0.1)
    other = cbis_ddsm.read_records(synthetic_cbis, seed=1)
    assert {r.patient_id for r in other.records if r.split == "val"} != val_patients


@pytest.mark.parametrize("name", ["wbcatt", "cbis_ddsm", "skincon", "mimic_cxr"])
def test_synthetic_is_deterministic(name, tmp_path):
    for run in ("a", "b"):
        write_synthetic(name, tmp_path / run, seed=11, n_train=8, n_val=3, n_test=4, image_size=48)
    first, second = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert first == second and len(first) > 10
    write_synthetic(name, tmp_path / "c", seed=12, n_train=8, n_val=3, n_test=4, image_size=48)
    assert _tree_bytes(tmp_path / "c") != first


def test_synthetic_attributes_vary_within_a_class(tmp_path):
    from medift.datasets.synthetic.wbcatt import sample_attributes

    rng = random.Random(0)
    samples = [sample_attributes(rng) for _ in range(600)]
    neutrophils = [s for s in samples if s["label"] == "Neutrophil"]
    shapes = Counter(s["nucleus_shape"] for s in neutrophils)
    assert len(shapes) >= 4  # not determined by the label ...
    assert shapes.most_common(1)[0][0] in ("unsegmented-band", "segmented-multilobed")
    granules = Counter((s["granule_type"], s["granule_colour"]) for s in neutrophils)
    assert granules.most_common(1)[0][0] == ("small", "pink")  # ... but shaped by it
    for s in samples:
        assert (s["granularity"] == "no") == (s["granule_type"] == "nil" == s["granule_colour"])


@pytest.mark.parametrize("name", ["wbcatt", "cbis_ddsm"])
def test_sampled_attributes_fit_the_rules(name):
    """`synthetic_<name>.sample_attributes` gives attributes as read_records would."""
    import importlib

    module = get_dataset(name)
    sampler = importlib.import_module(f"medift.datasets.synthetic.{name}").sample_attributes
    rng = random.Random(1)
    for _ in range(200):
        attributes = sampler(rng)
        for key, value in attributes.items():
            assert set(value.split("-")) <= set(module.ATTRIBUTES[key]) or (value in module.ATTRIBUTES[key]), (
                key,
                value,
            )
        assert module.describe(attributes)
        for question in module.make_questions(_record(name, attributes), rng):
            assert question.options[question.answer_index] == attributes[question.attribute]


def test_synthetic_cbis_attributes_match_sampler_normalisation(synthetic_cbis):
    from medift.datasets.synthetic.cbis_ddsm import sample_attributes

    read = {tuple(sorted(r.attributes)) for r in cbis_ddsm.read_records(synthetic_cbis, 0).records}
    rng = random.Random(2)
    sampled = {tuple(sorted(sample_attributes(rng))) for _ in range(300)}
    assert read <= sampled  # the same key sets (missing values omitted alike)


# --- bad input -----------------------------------------------------------------------


def _copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _rewrite_csv(path: Path, edit, line_end: str = "\n") -> None:
    """Apply `edit(rows)` to a CSV's rows (header first), keeping its line ends."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    rows = edit(rows)
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle, lineterminator=line_end).writerows(rows)


def test_wbcatt_missing_column(synthetic_wbcatt, tmp_path):
    root = _copy_tree(synthetic_wbcatt, tmp_path / "raw")
    column = wbcatt.CSV_HEADER.index("cell_shape")
    _rewrite_csv(root / "pbc_attr_v1_val.csv", lambda rows: [row[:column] + row[column + 1 :] for row in rows])
    with pytest.raises(ValueError, match=r"pbc_attr_v1_val\.csv.*'cell_shape'"):
        wbcatt.read_records(root, seed=0)


def test_wbcatt_unknown_value_names_file_row_column(synthetic_wbcatt, tmp_path):
    root = _copy_tree(synthetic_wbcatt, tmp_path / "raw")
    column = wbcatt.CSV_HEADER.index("cytoplasm_colour")

    def edit(rows):
        rows[3][column] = "green"  # the third data row
        return rows

    _rewrite_csv(root / "pbc_attr_v1_test.csv", edit)
    with pytest.raises(DataError) as error:
        wbcatt.read_records(root, seed=0)
    message = str(error.value)
    assert "pbc_attr_v1_test.csv" in message and "data row 3" in message
    assert "'cytoplasm_colour'" in message and "spreadsheet row 4" in message


def test_wbcatt_missing_image_and_duplicate_id_quarantined(synthetic_wbcatt, tmp_path):
    root = _copy_tree(synthetic_wbcatt, tmp_path / "raw")
    records = wbcatt.read_records(root, seed=0).records
    Path(records[0].image_path).unlink()

    def duplicate_first_data_row(rows):
        return rows + [rows[1]]

    _rewrite_csv(root / "pbc_attr_v1_val.csv", duplicate_first_data_row)
    val_first = [r for r in records if r.split == "val"][0]
    result = wbcatt.read_records(root, seed=0)
    assert result.rows_read == 53 and len(result.records) == 51
    assert sorted(q.reason for q in result.quarantined) == ["duplicated image id", "image file missing"]
    assert {q.image_id for q in result.quarantined} == {records[0].image_id, val_first.image_id}
    with pytest.raises(DataError, match="image file missing"):
        wbcatt.read_records(root, seed=0, strict=True)


def test_wbcatt_requires_test_file(synthetic_wbcatt, tmp_path):
    root = _copy_tree(synthetic_wbcatt, tmp_path / "raw")
    (root / "pbc_attr_v1_test.csv").unlink()
    with pytest.raises(FileNotFoundError, match="pbc_attr_v1_test.csv"):
        wbcatt.read_records(root, seed=0)


def test_cbis_missing_column(synthetic_cbis, tmp_path):
    root = _copy_tree(synthetic_cbis, tmp_path / "raw")
    column = cbis_ddsm.CALC_HEADER.index("calc distribution")
    _rewrite_csv(
        root / "csv" / "calc_case_description_test_set.csv",
        lambda rows: [row[:column] + row[column + 1 :] for row in rows],
        "\r\n",
    )
    expected = r"calc_case_description_test_set\.csv.*'calc distribution'"
    with pytest.raises(ValueError, match=expected):
        cbis_ddsm.read_records(root, seed=0)


def test_cbis_unknown_term_in_compound(synthetic_cbis, tmp_path):
    root = _copy_tree(synthetic_cbis, tmp_path / "raw")
    column = cbis_ddsm.MASS_HEADER.index("mass shape")

    def edit(rows):
        rows[2][column] = "OVAL-STAR_SHAPED"
        return rows

    _rewrite_csv(root / "csv" / "mass_case_description_train_set.csv", edit, "\r\n")
    with pytest.raises(DataError) as error:
        cbis_ddsm.read_records(root, seed=0)
    message = str(error.value)
    assert "mass_case_description_train_set.csv" in message and "data row 2" in message
    assert "'mass shape'" in message and "star shaped" in message


def test_cbis_unknown_pathology(synthetic_cbis, tmp_path):
    root = _copy_tree(synthetic_cbis, tmp_path / "raw")
    column = cbis_ddsm.CALC_HEADER.index("pathology")

    def edit(rows):
        rows[1][column] = "MAYBE"
        return rows

    _rewrite_csv(root / "csv" / "calc_case_description_train_set.csv", edit, "\r\n")
    with pytest.raises(DataError, match=r"data row 1 .*'pathology'"):
        cbis_ddsm.read_records(root, seed=0)


def test_cbis_missing_image_unlisted_crop_and_duplicate(synthetic_cbis, tmp_path):
    root = _copy_tree(synthetic_cbis, tmp_path / "raw")
    records = cbis_ddsm.read_records(root, seed=0).records
    missing, unlisted = records[0], records[1]
    Path(missing.image_path).unlink()
    dicom_info = pd.read_csv(root / "csv" / "dicom_info.csv", dtype=str, keep_default_na=False)
    dicom_info = dicom_info[dicom_info["PatientID"] != unlisted.image_id]
    dicom_info.to_csv(root / "csv" / "dicom_info.csv", index=False)
    _rewrite_csv(root / "csv" / "mass_case_description_test_set.csv", lambda rows: rows + [rows[1]], "\r\n")
    result = cbis_ddsm.read_records(root, seed=0)
    assert result.rows_read == 77 and len(result.records) == 74
    reasons = Counter(q.reason for q in result.quarantined)
    assert reasons == {
        "image file missing": 1,
        "duplicated image id": 1,
        "no cropped image for the case in csv/dicom_info.csv": 1,
    }


def test_cbis_train_rows_of_test_patients_quarantined(synthetic_cbis, tmp_path):
    root = _copy_tree(synthetic_cbis, tmp_path / "raw")
    result = cbis_ddsm.read_records(root, seed=0)
    test_patient = next(r.patient_id for r in result.records if r.split == "test")
    column = cbis_ddsm.MASS_HEADER.index("patient_id")
    first_train_patient = sorted({r.patient_id for r in result.records if r.split != "test"})[0]
    moved = sum(r.patient_id == first_train_patient for r in result.records)

    def edit(rows):
        for row in rows[1:]:
            if row[column] == first_train_patient:
                row[column] = test_patient
        return rows

    for name in ("mass_case_description_train_set.csv", "calc_case_description_train_set.csv"):
        _rewrite_csv(root / "csv" / name, edit, "\r\n")
    again = cbis_ddsm.read_records(root, seed=0)
    assert [q.reason for q in again.quarantined] == ["patient also in the official test files"] * moved
    assert_patients_disjoint(again.records)


# --- the real annotation files -------------------------------------------------------


@pytest.mark.skipif(bool(real_data_missing("wbcatt")), reason=real_data_missing("wbcatt"))
def test_real_wbcatt_files(tmp_path):
    real_wbcatt_layout(tmp_path)

    result = wbcatt.read_records(tmp_path, seed=0)
    assert result.rows_read == 6169 + 1030 and not result.quarantined
    assert Counter(r.split for r in result.records) == {"train": 6169, "val": 1030}
    rng = random.Random(0)
    for record in result.records:
        assert wbcatt.describe(record.attributes)
        if record.split == "val":
            (question,) = wbcatt.make_questions(record, rng)
            assert isinstance(question, Question)
    example = next(r for r in result.records if r.image_id == "BNE_422954.jpg")
    assert wbcatt.describe(example.attributes) == WBCATT_EXAMPLE_TEXT


@pytest.mark.skipif(bool(real_data_missing("cbis-ddsm")), reason=real_data_missing("cbis-ddsm"))
def test_real_cbis_files(tmp_path):
    real_cbis_layout(tmp_path)
    result = cbis_ddsm.read_records(tmp_path, seed=0)
    assert result.rows_read == 1318 + 1546 and not result.quarantined
    records = result.records
    assert all(r.image_path.endswith("/1-1.jpg") for r in records)
    assert_patients_disjoint(records)
    patients = {r.patient_id for r in records}
    val_patients = {r.patient_id for r in records if r.split == "val"}
    assert len(val_patients) == int(len(patients) * 0.1)
    assert set(Counter(r.split for r in records)) == {"train", "val"}
    first = next(r for r in records if r.image_id == "Mass-Training_P_00001_LEFT_CC_1")
    assert cbis_ddsm.describe(first.attributes) == (
        "irregular-architectural distortion mass shape, spiculated mass margins, mass, malignant"
    )
    rng = random.Random(0)
    asked = Counter()
    for record in records:
        assert record.split in SPLITS
        for question in cbis_ddsm.make_questions(record, rng):
            asked[question.attribute] += 1
            assert question.options[question.answer_index] == record.attributes[question.attribute]
    assert asked["pathology"] == len(records) and asked["abnormality_type"] == len(records)
    assert 0 < asked["mass_shape"] < 1318 and 0 < asked["calc_type"] < 1546


# --- empty annotation files -------------------------------------------------------------


@pytest.mark.parametrize("name", ["wbcatt", "cbis_ddsm", "skincon", "mimic_cxr"])
@pytest.mark.parametrize("content", [b"", b"  \n\t\n"], ids=["zero-bytes", "whitespace"])
def test_empty_annotation_file_is_a_data_error_naming_it(name, content, tmp_path):
    """Every annotation file of every adapter, emptied in turn: a DataError naming the file
    (not pandas' bare EmptyDataError)."""
    import gzip

    write_synthetic(name, tmp_path, seed=0, n_train=4, n_val=2, n_test=2, image_size=32)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and ".csv" in p.name)
    assert files
    get_dataset(name).read_records(tmp_path, seed=0)  # the intact release reads
    for path in files:
        intact = path.read_bytes()
        # A gzip file may be empty itself or hold an empty text; both are an empty file.
        path.write_bytes(gzip.compress(content) if path.suffix == ".gz" and content else content)
        with pytest.raises(DataError, match="empty file") as error:
            get_dataset(name).read_records(tmp_path, seed=0)
        assert path.name in str(error.value), (path, str(error.value))
        path.write_bytes(intact)


def test_empty_mimic_reports_zip_is_a_data_error_naming_it(tmp_path):
    from medift.datasets import mimic_cxr

    write_synthetic("mimic_cxr", tmp_path, seed=0, n_train=4, n_val=2, n_test=2, image_size=32)
    (tmp_path / mimic_cxr.REPORTS_ZIP).write_bytes(b"")
    with pytest.raises(DataError, match=r"mimic-cxr-reports\.zip: empty file"):
        mimic_cxr.read_records(tmp_path, seed=0)
