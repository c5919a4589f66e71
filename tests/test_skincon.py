"""SKINCON: reference description and question rules, the two parts and their joins, the
seeded 80/10/10 split, bad input, and the real Fitzpatrick17k metadata."""

from __future__ import annotations

import random
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from medift.datasets import DataError, skincon
from medift.datasets.common import observed_values, split_by_image
from medift.datasets.synthetic import write_synthetic
from medift.datasets.synthetic.skincon import sample_concepts
from medift.records import Record
from tests.fixtures.data import assert_patients_disjoint, placeholders, real_data_missing
from tests.fixtures.skincon import HEADER, _row, _write, real_skincon_layout


def _fitzpatrick_release(root: Path, rows, md5s, images=True) -> Path:
    """Annotations + fitzpatrick17k/ metadata (+ placeholder images) under `root`."""
    _write(root / "annotations_fitzpatrick17k.csv", rows)
    _write(
        root / "fitzpatrick17k" / "fitzpatrick17k.csv",
        [[m, "2", "2", "x", "y", "z", "", "", ""] for m in md5s],
        header=[
            "md5hash",
            "fitzpatrick_scale",
            "fitzpatrick_centaur",
            "label",
            "nine_partition_label",
            "three_partition_label",
            "qc",
            "url",
            "url_alphanum",
        ],
    )
    if images:
        placeholders(root, dict.fromkeys(f"fitzpatrick17k/{row[1]}" for row in rows))
    return root


# --- rules ------------------------------------------------------------------------------


def test_description_is_present_concepts_lowercased_in_column_order():
    present = ["Erythema", "Papule", "Brown(Hyperpigmentation)", "Scale"]
    assert skincon.combination(present) == "papule, scale, brown(hyperpigmentation), erythema"
    # Examples from the reference's option list (InstFree tools/eval_utils.py).
    assert skincon.combination(["Abscess", "Erythema"]) == "abscess, erythema"
    assert skincon.combination(["Nodule", "Crust", "Dome-shaped", "Erythema", "Umbilicated"]) == (
        "nodule, crust, dome-shaped, erythema, umbilicated"
    )
    attributes = {skincon.KEY: skincon.combination(present)}
    assert skincon.describe(attributes) == "papule, scale, brown(hyperpigmentation), erythema"
    assert len(skincon.CONCEPTS) == 48 and len(set(skincon.ATTRIBUTES[skincon.KEY])) == 48


def test_question_options_are_combinations_from_the_data():
    combos = ["papule", "papule, erythema", "nodule", "plaque, scale", "macule, brown(hyperpigmentation)", "bulla"]
    records = [Record("skincon", f"i{k}", "/x", f"i{k}", "val", {skincon.KEY: c}) for k, c in enumerate(combos)]
    observed = observed_values(records)
    answers = set()
    for seed in range(40):
        (question,) = skincon.make_questions(records[1], random.Random(seed), observed)
        assert question.question == "What is the dermatologic feature?"
        assert len(question.options) == 5 and set(question.options) <= set(combos)
        assert question.options[question.answer_index] == "papule, erythema"
        answers.add(question.answer_index)
    assert len(answers) > 2  # shuffled
    again = skincon.make_questions(records[1], random.Random(3), observed)
    assert again == skincon.make_questions(records[1], random.Random(3), observed)
    # Without the dataset's combinations, single concepts are the distractors.
    (alone,) = skincon.make_questions(records[1], random.Random(0))
    assert len(alone.options) == 5 and "papule, erythema" in alone.options


def test_split_is_seeded_80_10_10_by_image_like_the_reference():
    ids = [f"{k:04d}.jpg" for k in range(1000)]
    splits = split_by_image(ids, seed=0)
    assert Counter(splits.values()) == {"train": 800, "val": 100, "test": 100}
    # The reference: sorted, random.Random(0).shuffle, val first, then test.
    ordered = sorted(ids)
    random.Random(0).shuffle(ordered)
    assert {i for i in ordered[:100]} == {i for i, s in splits.items() if s == "val"}
    assert {i for i in ordered[100:200]} == {i for i, s in splits.items() if s == "test"}
    assert split_by_image(reversed(ids), seed=0) == splits
    assert split_by_image(ids, seed=1) != splits


# --- reading --------------------------------------------------------------------------------


def test_index_column_is_never_a_concept_and_flagged_rows_are_counted(tmp_path):
    md5s = [f"{k:032x}" for k in range(1, 21)]
    rows = [
        _row(k, f"{m}.jpg", present=["Papule"] if k % 2 else ["Plaque", "Scale"], flagged=k in (3, 7))
        for k, m in enumerate(md5s, start=1)
    ]  # index 1 in row 1: the reference's bug
    root = _fitzpatrick_release(tmp_path, rows, md5s)
    result = skincon.read_records(root, seed=0)
    assert result.rows_read == 20 and len(result.records) == 18 and not result.quarantined
    assert result.exclusion_summary() == {"flagged 'Do not consider this image'": 2}
    first = next(r for r in result.records if r.source.endswith(":1"))
    assert first.attributes == {skincon.KEY: "papule"}  # no "unnamed: 0"
    assert all("unnamed" not in r.attributes[skincon.KEY] for r in result.records)
    assert Counter(r.split for r in result.records) == {"train": 16, "val": 1, "test": 1}
    assert_patients_disjoint(result.records)


def test_either_annotation_file_name_and_float_cells(tmp_path):
    md5s = [f"{k:032x}" for k in range(1, 11)]
    rows = [_row(k, f"{m}.jpg", present=["Nodule"]) for k, m in enumerate(md5s)]
    rows = [[c.replace("1", "1.0") if i > 1 else c for i, c in enumerate(r)] for r in rows]
    rows[4][2:-1] = [""] * 48  # a NaN row: blank cells read as absent -> no concept
    root = _fitzpatrick_release(tmp_path, rows, md5s)
    (root / "annotations_fitzpatrick17k.csv").rename(root / "SKINCON Fitzpatric17k annotations.csv")
    result = skincon.read_records(root, seed=0)
    assert len(result.records) == 9
    assert result.quarantine_summary() == {"no concept present (empty description)": 1}
    assert result.counts == {"rows with blank concept cells (read as absent)": 1}
    with pytest.raises(DataError, match="no concept present"):
        skincon.read_records(root, seed=0, strict=True)


def test_bad_input_names_file_row_and_column(tmp_path):
    md5s = [f"{k:032x}" for k in range(1, 6)]
    rows = [_row(k, f"{m}.jpg", present=["Papule"]) for k, m in enumerate(md5s)]
    rows[2][HEADER.index("Scale")] = "2"
    root = _fitzpatrick_release(tmp_path / "value", rows, md5s)
    with pytest.raises(DataError) as error:
        skincon.read_records(root, seed=0)
    assert "annotations_fitzpatrick17k.csv" in str(error.value) and "data row 3" in str(error.value)
    assert "'Scale'" in str(error.value)

    column = HEADER.index("Erythema")
    missing = [r[:column] + r[column + 1 :] for r in [_row(0, f"{md5s[0]}.jpg")]]
    root = _fitzpatrick_release(tmp_path / "column", missing, md5s, images=False)
    (root / "annotations_fitzpatrick17k.csv").write_text(
        ",".join(h for h in HEADER if h != "Erythema") + "\n" + ",".join(missing[0]) + "\n"
    )
    with pytest.raises(ValueError, match=r"annotations_fitzpatrick17k\.csv.*'Erythema'"):
        skincon.read_records(root, seed=0)

    extra = tmp_path / "extra"
    _fitzpatrick_release(extra, [_row(0, f"{md5s[0]}.jpg", ["Papule"]) + ["1"]], md5s, images=False)
    (extra / "annotations_fitzpatrick17k.csv").write_text(
        ",".join(HEADER + ["Sparkle"]) + "\n" + ",".join(_row(0, f"{md5s[0]}.jpg", ["Papule"]) + ["1"]) + "\n"
    )
    with pytest.raises(DataError, match="unknown columns.*Sparkle"):
        skincon.read_records(extra, seed=0)


def test_unknown_image_missing_image_and_duplicate_are_quarantined(tmp_path):
    md5s = [f"{k:032x}" for k in range(1, 11)]
    rows = [_row(k, f"{m}.jpg", present=["Papule"]) for k, m in enumerate(md5s)]
    rows.append(_row(10, "ffffffffffffffffffffffffffffffff.jpg", present=["Papule"]))  # not in metadata
    rows.append(_row(11, f"{md5s[0]}.jpg", present=["Plaque"]))  # duplicated ImageID
    root = _fitzpatrick_release(tmp_path, rows, md5s)
    (root / "fitzpatrick17k" / f"{md5s[1]}.jpg").unlink()
    result = skincon.read_records(root, seed=0)
    assert result.rows_read == 12 and len(result.records) == 9
    assert result.quarantine_summary() == {
        "ImageID not in fitzpatrick17k/fitzpatrick17k.csv": 1,
        "duplicated image id": 1,
        "image file missing": 1,
    }


def test_missing_fitzpatrick_annotations_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="SKINCON fitzpatrick17k annotations"):
        skincon.read_records(tmp_path, seed=0)


@pytest.fixture(scope="module")
def synthetic_skincon(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("skincon")
    write_synthetic("skincon", root, seed=5, n_train=80, n_val=10, n_test=10, image_size=48)
    return root


def test_synthetic_round_trip_with_both_parts(synthetic_skincon):
    header = (synthetic_skincon / "annotations_fitzpatrick17k.csv").read_text().splitlines()[0]
    assert header == ",".join(HEADER)
    ddi = pd.read_csv(synthetic_skincon / "annotations_ddi.csv")
    assert ddi.columns[0] == "Unnamed: 0" and ddi["Papule"].dtype == float  # NaN rows -> floats
    result = skincon.read_records(synthetic_skincon, seed=0)
    assert len(result.records) == 100 and not result.quarantined
    assert result.exclusion_summary() == {"flagged 'Do not consider this image'": result.rows_read - 100}
    parts = Counter("ddi" if r.image_id.startswith("ddi/") else "fitzpatrick17k" for r in result.records)
    assert parts == {"fitzpatrick17k": 85, "ddi": 15}
    assert Counter(r.split for r in result.records) == {"train": 80, "val": 10, "test": 10}
    for record in result.records:
        assert Path(record.image_path).is_file() and skincon.describe(record.attributes)
    # Without the DDI release folder only the Fitzpatrick part is read (the reference's data).
    fitz_only = synthetic_skincon.parent / "fitz_only"
    shutil.copytree(synthetic_skincon, fitz_only, ignore=shutil.ignore_patterns("ddi"))
    assert {r.image_id.startswith("ddi/") for r in skincon.read_records(fitz_only, 0).records} == {False}


def test_sampled_concepts_have_structure():
    rng = random.Random(0)
    samples = [sample_concepts(rng) for _ in range(500)]
    assert all(samples) and len({skincon.combination(s) for s in samples}) > 100
    pustules = [s for s in samples if "Pustule" in s]
    assert sum("Yellow" in s for s in pustules) > 0.7 * len(pustules)


# --- the real Fitzpatrick17k metadata ---------------------------------------------------------


@pytest.mark.skipif(
    bool(real_data_missing("fitzpatrick17k/fitzpatrick17k.csv")),
    reason=real_data_missing("fitzpatrick17k/fitzpatrick17k.csv"),
)
def test_real_fitzpatrick17k_metadata_join(tmp_path):
    root = real_skincon_layout(tmp_path)
    result = skincon.read_records(root, seed=0)
    assert result.rows_read == 3690 and not result.quarantined
    assert result.exclusion_summary() == {"flagged 'Do not consider this image'": 460}
    assert Counter(r.split for r in result.records) == {"train": 2584, "val": 323, "test": 323}
    assert_patients_disjoint(result.records)
    observed = observed_values(result.records)
    rng = random.Random(0)
    for record in result.records:
        if record.split != "train":
            (question,) = skincon.make_questions(record, rng, observed)
            assert question.options[question.answer_index] == skincon.describe(record.attributes)
