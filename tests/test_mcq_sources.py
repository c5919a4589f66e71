"""Benchmark readers (medift.datasets.mcq_sources): VLMEvalKit TSVs, JSON/JSONL/Parquet/CSV with
a column mapping, the MedXpertQA / OmniMedVQA / PMC-VQA presets, errors and quarantine."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medift.datasets.common import DataError
from medift.datasets.mcq_sources import (
    PRESETS,
    BenchmarkQuestion,
    ImageRef,
    SourceResult,
    read_records,
    read_vlmevalkit_tsv,
)


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


RED, BLUE = png((255, 0, 0)), png((0, 0, 255))
RED64, BLUE64 = base64.b64encode(RED).decode(), base64.b64encode(BLUE).decode()

TSV_HEADER = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split"]


def write_tsv(path: Path, rows: list[list[str]], header: list[str] = TSV_HEADER) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_images(root: Path, **named: bytes) -> None:
    for name, data in named.items():
        target = root / name.replace("__", "/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def assert_counts(result: SourceResult) -> None:
    assert result.rows_read == len(result.questions) + len(result.quarantined)


# --- VLMEvalKit TSV -------------------------------------------------------------------------


def test_vlmevalkit_tsv_images_references_lists_hints_options_and_labels(tmp_path):
    path = write_tsv(
        tmp_path / "bench.tsv",
        [
            ["10", RED64, "Which organ?", "Axial CT.", "liver", "lung", "heart", "brain", "B", "Organ", "CT", "test"],
            ["11", "10", "Which side?", "", "left", "right", "both", "", "c", "Side", "CT", "test"],
            ["12", str([RED64, BLUE64]), "Which differs?", "nan", "first", "second", "nan", "", "", "", "", ""],
        ],
    )
    result = read_vlmevalkit_tsv(path)
    assert (result.rows_read, result.quarantined) == (3, [])
    first, second, third = result.questions

    assert first.question_id == "10" and first.source == "bench.tsv:1"
    assert first.question == "Hint: Axial CT.\nWhich organ?"
    assert first.options == ("liver", "lung", "heart", "brain") and first.answer_index == 1
    assert first.answer_letter == "B"
    assert (first.category, first.l2_category, first.split) == ("Organ", "CT", "test")
    assert first.images[0].data == RED and first.images[0].path is None
    assert first.instruction().startswith("Hint: Axial CT.\nWhich organ?\nA. liver\nB. lung")

    # The index reference reuses row 10's image: same bytes, same sha256 (questions group by image).
    assert second.question == "Which side?"  # an empty hint adds nothing
    assert second.options == ("left", "right", "both") and second.answer_index == 2  # empty D: 3 options
    assert second.images[0].sha256 == first.images[0].sha256

    assert third.question == "Which differs?"  # "nan" hint is none
    assert third.options == ("first", "second") and third.answer_index is None and third.answer_letter is None
    assert [image.data for image in third.images] == [RED, BLUE]
    assert third.images[0].sha256 == first.images[0].sha256 != third.images[1].sha256
    assert (third.category, third.l2_category, third.split) == (None, None, None)
    assert "bytes>" in repr(third.images[0])  # never the data itself


def test_vlmevalkit_tsv_image_path_column_relative_to_image_root(tmp_path):
    write_images(tmp_path / "imgs", **{"a.png": RED, "sub__b.png": BLUE})
    header = ["index", "image_path", "question", "A", "B"]
    path = write_tsv(
        tmp_path / "paths.tsv",
        [["1", "a.png", "q", "x", "y"], ["2", "['a.png', 'sub/b.png']", "q", "x", "y"]],
        header,
    )
    result = read_vlmevalkit_tsv(path, image_root=tmp_path / "imgs")
    one, two = result.questions
    assert one.images == (ImageRef(path=str(tmp_path / "imgs" / "a.png")),)
    assert [Path(image.path).name for image in two.images] == ["a.png", "b.png"]
    assert one.images[0].sha256 == two.images[0].sha256
    assert one.answer_index is None  # no answer column: unlabelled

    # Default root: the TSV's folder.
    write_images(tmp_path, **{"a.png": RED})
    single = write_tsv(tmp_path / "single.tsv", [["1", "a.png", "q", "x", "y"]], header)
    assert read_vlmevalkit_tsv(single).questions[0].images[0].path == str(tmp_path / "a.png")


@pytest.mark.parametrize(
    "row, column, problem",
    [
        (["1", RED64, "Secret q", "", "zzA", "zzB", "", "zzD", "A", "", "", ""], "D", "gap"),
        (["1", RED64, "Secret q", "", "zzA", "zzB", "zzC", "", "D", "", "", ""], "answer", "not one of the options"),
        (["1", RED64, "Secret q", "", "zzA", "zzB", "zzC", "", "AB", "", "", ""], "answer", "single letter"),
        (["1", "99", "Secret q", "", "zzA", "zzB", "", "", "A", "", "", ""], "image", "names no other row's index"),
        (["", RED64, "Secret q", "", "zzA", "zzB", "", "", "A", "", "", ""], "index", "empty question id"),
    ],
)
def test_vlmevalkit_tsv_errors_name_file_row_and_column(tmp_path, row, column, problem):
    good = ["5", RED64, "Secret q", "", "zzA", "zzB", "", "", "A", "", "", ""]
    path = write_tsv(tmp_path / "bad.tsv", [good, row])
    with pytest.raises(DataError, match=problem) as raised:
        read_vlmevalkit_tsv(path)
    message = str(raised.value)
    assert "bad.tsv" in message and "data row 2 (1-based" in message and f"column {column!r}" in message
    assert "Secret" not in message and "zz" not in message  # no question or option text


def test_vlmevalkit_tsv_reference_to_a_reference_is_an_error(tmp_path):
    rows = [
        ["1", RED64, "q", "", "a", "b", "", "", "", "", "", ""],
        ["2", "1", "q", "", "a", "b", "", "", "", "", "", ""],
        ["3", "2", "q", "", "a", "b", "", "", "", "", "", ""],
    ]
    with pytest.raises(DataError, match=r"data row 3 .*column 'image'.*one level"):
        read_vlmevalkit_tsv(write_tsv(tmp_path / "chain.tsv", rows))


def test_vlmevalkit_tsv_quarantine_is_counted_by_reason_and_strict_raises(tmp_path):
    not_an_image = base64.b64encode(b"this is not an image at all, just some bytes " * 3).decode()
    rows = [
        ["1", RED64, "q", "", "a", "b", "", "", "A", "", "", ""],
        ["1", RED64, "q", "", "a", "b", "", "", "A", "", "", ""],  # duplicated index
        ["2", RED64, "q", "", "a", "", "", "", "A", "", "", ""],  # one option
        ["3", "@@not base64@@" * 8, "q", "", "a", "b", "", "", "", "", "", ""],
        ["4", not_an_image, "q", "", "a", "b", "", "", "", "", "", ""],
        ["5", "", "q", "", "a", "b", "", "", "", "", "", ""],
        ["6", "4", "q", "", "a", "b", "", "", "", "", "", ""],  # reuses an unreadable image
    ]
    path = write_tsv(tmp_path / "mixed.tsv", rows)
    result = read_vlmevalkit_tsv(path)
    assert_counts(result)
    assert [q.question_id for q in result.questions] == ["1"]
    assert result.quarantined[0] == ("mixed.tsv:2", "duplicated question id")
    assert result.quarantine_summary() == {
        "duplicated question id": 1,
        "fewer than 2 options": 1,
        "image unreadable": 3,
        "no image": 1,
    }
    with pytest.raises(DataError, match=r"mixed.tsv:2: duplicated question id \(strict"):
        read_vlmevalkit_tsv(path, strict=True)

    header = ["index", "image_path", "question", "A", "B"]
    missing = write_tsv(tmp_path / "missing.tsv", [["1", "nowhere.png", "q", "x", "y"]], header)
    assert read_vlmevalkit_tsv(missing).quarantined == [("missing.tsv:1", "image file missing")]


def test_vlmevalkit_tsv_missing_columns(tmp_path):
    with pytest.raises(DataError, match=r"nocol.tsv: missing column 'image'"):
        read_vlmevalkit_tsv(write_tsv(tmp_path / "nocol.tsv", [["1", "q", "a", "b"]], ["index", "question", "A", "B"]))
    with pytest.raises(DataError, match=r"noindex.tsv: missing column 'index'"):
        read_vlmevalkit_tsv(write_tsv(tmp_path / "noindex.tsv", [[RED64, "q"]], ["image", "question"]))


# --- JSON / JSONL / Parquet / CSV -----------------------------------------------------------

COLUMNS = {"id": "qid", "question": "q", "options": "opts", "answer": "ans", "image": "img", "category": "cat"}


@pytest.fixture
def images(tmp_path) -> Path:
    write_images(tmp_path, **{"red.png": RED, "blue.png": BLUE})
    return tmp_path


def test_json_list_of_options_with_letter_answers(images):
    rows = [
        {"qid": 1, "q": "Colour?", "opts": ["red", "blue", "green"], "ans": "A", "img": "red.png", "cat": "c1"},
        {"qid": 2, "q": "Colour?", "opts": ["red", "blue"], "ans": "b", "img": "blue.png"},
        {"qid": 3, "q": "Colour?", "opts": "['red', 'blue']", "ans": None, "img": "red.png", "cat": None},
    ]
    (images / "list.json").write_text(json.dumps(rows))
    result = read_records(images / "list.json", columns=COLUMNS)
    one, two, three = result.questions
    assert (one.question_id, one.options, one.answer_index, one.category) == ("1", ("red", "blue", "green"), 0, "c1")
    assert one.images == (ImageRef(path=str(images / "red.png")),) and one.source == "list.json:1"
    assert (two.answer_index, two.category) == (1, None)
    assert three.options == ("red", "blue") and three.answer_index is None
    assert one.images[0].sha256 == three.images[0].sha256 != two.images[0].sha256


def test_json_data_wrapper_dict_options_and_integer_answers(images):
    rows = [
        {"qid": "a", "q": "Q", "opts": {"B": "blue", "A": "red"}, "ans": 1, "img": "blue.png"},
        {"qid": "b", "q": "Q", "opts": {"a": "red", "b": "blue", "c": ""}, "ans": 0.0, "img": "red.png"},
    ]
    (images / "wrapped.json").write_text(json.dumps({"data": rows}))
    one, two = read_records(images / "wrapped.json", columns=COLUMNS).questions
    assert (one.options, one.answer_index) == (("red", "blue"), 1)
    assert (two.options, two.answer_index) == (("red", "blue"), 0)


def test_jsonl_option_objects_text_answers_and_line_numbers(images):
    lines = [
        {"qid": "x", "q": "Q", "opts": [{"letter": "A", "content": "Red"}, {"letter": "B", "content": "Blue"}]},
        {"qid": "y", "q": "Q", "opts": [{"key": "B", "text": "blue"}, {"key": "A", "text": "red"}]},
    ]
    lines[0].update(ans="  blue ", img=["red.png", "blue.png"])
    lines[1].update(ans="RED", img="red.png")
    path = images / "objects.jsonl"
    path.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    one, two = read_records(path, columns=COLUMNS).questions
    assert (one.options, one.answer_index, len(one.images)) == (("Red", "Blue"), 1, 2)
    assert (two.options, two.answer_index) == (("red", "blue"), 0)
    assert two.source == "objects.jsonl:3"  # line 3: the blank line 2 is no row


def test_parquet_option_columns_and_image_bytes(tmp_path):
    table = pa.table(
        {
            "id": ["p1", "p2", "p3"],
            "question": ["Q", "Q", "Q"],
            "opt_a": ["red", "red", "red"],
            "opt_b": ["blue", "blue", "blue"],
            "opt_c": ["green", None, None],
            "label": [2, None, 1],
            # Raw bytes, a Hugging Face Image struct, and a list of both kinds.
            "img": [
                [{"bytes": RED, "path": None}],
                [{"bytes": None, "path": "blue.png"}],
                [{"bytes": RED, "path": None}, {"bytes": BLUE, "path": None}],
            ],
            "part": ["test", "test", "val"],
        }
    )
    pq.write_table(table, tmp_path / "bench.parquet")
    write_images(tmp_path, **{"blue.png": BLUE})
    columns = {
        "id": "id",
        "question": "question",
        "option_columns": ["opt_a", "opt_b", "opt_c"],
        "answer": "label",
        "image_bytes": "img",
        "split": "part",
    }
    one, two, three = read_records(tmp_path / "bench.parquet", columns=columns).questions
    assert (one.options, one.answer_index, one.split) == (("red", "blue", "green"), 2, "test")
    assert one.images[0].data == RED
    assert (two.options, two.answer_index) == (("red", "blue"), None)
    assert two.images[0].path == str(tmp_path / "blue.png")
    assert [image.data for image in three.images] == [RED, BLUE] and three.split == "val"

    plain = pa.table({"id": ["b"], "question": ["Q"], "options": [["x", "y"]], "png": [base64.b64encode(RED).decode()]})
    pq.write_table(plain, tmp_path / "b64.parquet")
    mapping = {"id": "id", "question": "question", "options": "options", "image_bytes": "png"}
    (only,) = read_records(tmp_path / "b64.parquet", columns=mapping).questions
    assert only.images[0].data == RED and only.answer_index is None


# --- presets --------------------------------------------------------------------------------


def test_medxpertqa_mm_preset(tmp_path):
    write_images(tmp_path / "images", **{"MM-1-a.jpeg": RED, "MM-1-b.jpeg": BLUE})
    record = {
        "id": "MM-1",
        "question": "Which finding? Answer Choices: (A) one (B) two (C) three (D) four (E) five",
        "options": {"A": "one", "B": "two", "C": "three", "D": "four", "E": "five"},
        "label": "D",
        "images": ["MM-1-a.jpeg", "MM-1-b.jpeg"],
        "medical_task": "Diagnosis",
        "body_system": "Respiratory",
        "question_type": "Reasoning",
    }
    (tmp_path / "MM").mkdir()
    (tmp_path / "MM" / "test.jsonl").write_text(json.dumps(record) + "\n")
    result = read_records(tmp_path / "MM" / "test.jsonl", preset="medxpertqa_mm", image_root=tmp_path / "images")
    (question,) = result.questions
    assert question.question_id == "MM-1" and question.question == record["question"]
    assert question.options == ("one", "two", "three", "four", "five") and question.answer_index == 3
    assert (question.category, question.l2_category) == ("Diagnosis", "Reasoning")
    assert [Path(image.path).name for image in question.images] == record["images"]


def test_omnimedvqa_preset_matches_the_answer_text(tmp_path):
    write_images(tmp_path, **{"Images__Chest CT__1.png": RED})
    records = [
        {
            "dataset": "Chest CT",
            "question_id": "Chest CT_0001",
            "question_type": "Modality Recognition",
            "question": "What imaging modality was used?",
            "gt_answer": "CT",
            "image_path": "Images/Chest CT/1.png",
            "option_A": "MRI",
            "option_B": "CT",
            "option_C": "X-ray",
            "modality_type": "CT(Computed Tomography)",
        },
        {
            "question_id": "Chest CT_0002",
            "question_type": "Anatomy Identification",
            "question": "Is this the chest?",
            "gt_answer": "yes",
            "image_path": "Images/Chest CT/1.png",
            "option_A": "No",
            "option_B": "Yes",
            "modality_type": "CT(Computed Tomography)",
        },
    ]
    path = tmp_path / "QA information" / "Open-access" / "Chest CT.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(records))
    one, two = read_records(path, preset="omnimedvqa", image_root=tmp_path).questions
    assert (one.options, one.answer_index) == (("MRI", "CT", "X-ray"), 1)
    assert (one.category, one.l2_category) == ("Modality Recognition", "CT(Computed Tomography)")
    assert (two.options, two.answer_index) == (("No", "Yes"), 1)  # casefold match, option_C/D absent
    assert one.images[0].sha256 == two.images[0].sha256


def test_pmc_vqa_preset_strips_letter_prefixes(tmp_path):
    write_images(tmp_path / "images", **{"PMC1_F1.jpg": RED, "PMC2_F3.jpg": BLUE})
    header = ["Figure_path", "Caption", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D"]
    header.append("Answer_label")
    rows = [
        ["PMC1_F1.jpg", "cap", "What is shown?", "Lung", "A:Heart ", " B:Lung", "C:Liver", "D:Bone", "B"],
        ["PMC2_F3.jpg", "cap", "Which stain?", "Giemsa", "A. H&E", "B. Giemsa", "C. PAS", "D. Gram", ""],
    ]
    path = tmp_path / "test_clean.csv"
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    one, two = read_records(path, preset="pmc_vqa", image_root=tmp_path / "images").questions
    assert one.options == ("Heart", "Lung", "Liver", "Bone") and one.answer_index == 1
    assert one.question_id == "1" and one.source == "test_clean.csv:1"  # PMC-VQA has no id: the data row
    assert two.options == ("H&E", "Giemsa", "PAS", "Gram") and two.answer_index == 1  # from the `Answer` text
    assert set(PRESETS) == {"medxpertqa_mm", "omnimedvqa", "pmc_vqa"}


# --- errors and quarantine in mapped files --------------------------------------------------


@pytest.mark.parametrize(
    "row, column, problem",
    [
        ({"opts": ["red", "blue"], "ans": "Purple"}, "ans", "matches no option"),
        ({"opts": ["red", "Red "], "ans": "red"}, "ans", "matches 2 options"),
        ({"opts": ["red", "blue"], "ans": 2}, "ans", r"answer index 2 is outside 0\.\.1"),
        ({"opts": ["red", "blue"], "ans": "C"}, "ans", "not one of the options"),
        ({"opts": ["red", "blue"], "ans": True}, "ans", "boolean"),
        ({"opts": {"A": "red", "C": "green"}, "ans": "A"}, "opts", "option C is given but option B is empty"),
        ({"opts": ["red", "", "green"], "ans": "A"}, "opts", "a gap"),
        ({"opts": {"A1": "red", "B": "blue"}, "ans": "A"}, "opts", "not a single letter"),
        ({"opts": 7, "ans": "A"}, "opts", "expected a list or a dict"),
        ({"qid": "", "opts": ["red", "blue"], "ans": "A"}, "qid", "empty or non-scalar question id"),
    ],
)
def test_mapped_errors_name_file_row_and_column(images, row, column, problem):
    good = {"qid": "ok", "q": "Q", "opts": ["red", "blue"], "ans": "A", "img": "red.png"}
    bad = {"qid": "bad", "q": "Q", "img": "red.png", **row}
    path = images / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=problem) as raised:
        read_records(path, columns=COLUMNS)
    message = str(raised.value)
    assert message.startswith("bad.jsonl, line 2 (1-based), ") and f"column {column!r}" in message
    assert "Purple" not in message and "red" not in message  # no answer or option text


def test_mapped_quarantine_counts_and_strict(images):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")
    rows = [
        {"qid": 1, "q": "Q", "opts": ["red", "blue"], "ans": "A", "img": "red.png"},
        {"qid": 1, "q": "Q", "opts": ["red", "blue"], "ans": "A", "img": "red.png"},
        {"qid": 2, "q": "Q", "opts": ["red"], "ans": "A", "img": "red.png"},
        {"qid": 3, "q": "Q", "opts": ["red", "blue"], "ans": "A", "img": "gone.png"},
        {"qid": 4, "q": "Q", "opts": ["red", "blue"], "ans": "A", "img": "broken.png"},
        {"qid": 5, "q": "Q", "opts": ["red", "blue"], "ans": "A", "img": ["red.png", "gone.png"]},
        {"qid": 6, "q": "Q", "opts": ["red", "blue"], "ans": "A"},
    ]
    path = images / "rows.json"
    path.write_text(json.dumps(rows))
    result = read_records(path, columns=COLUMNS)
    assert_counts(result)
    assert result.rows_read == 7 and len(result.questions) == 1
    assert result.quarantine_summary() == {
        "duplicated question id": 1,
        "fewer than 2 options": 1,
        "image file missing": 2,
        "image unreadable": 1,
        "no image": 1,
    }
    assert ("rows.json:4", "image file missing") in result.quarantined
    with pytest.raises(DataError, match=r"rows.json:2: duplicated question id"):
        read_records(path, columns=COLUMNS, strict=True)


def test_mapping_and_file_checks(images):
    path = images / "one.json"
    path.write_text(json.dumps([{"qid": 1, "q": "Q", "opts": ["a", "b"], "img": "red.png"}]))
    with pytest.raises(ValueError, match="unknown column key"):
        read_records(path, columns={**COLUMNS, "answers": "x"})
    with pytest.raises(ValueError, match="unknown preset"):
        read_records(path, preset="mmmu")
    with pytest.raises(ValueError, match="exactly one of"):
        read_records(path, columns={**COLUMNS, "images": "img"})
    with pytest.raises(ValueError, match="needs 'question'"):
        read_records(path, columns={"options": "opts", "image": "img"})
    with pytest.raises(DataError, match=r"one.json: missing column 'question' \(mapped as 'question'\)"):
        read_records(path, columns={**COLUMNS, "question": "question"})
    # The answer and the descriptive columns may be absent (an unlabelled release, no categories).
    (question,) = read_records(path, columns=COLUMNS).questions
    assert question.answer_index is None and question.category is None
    (images / "bad.jsonl").write_text('{"qid": 1}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2 \(1-based\): not valid JSON"):
        read_records(images / "bad.jsonl", columns=COLUMNS)
    (images / "scalar.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match="expected a list of records"):
        read_records(images / "scalar.json", columns=COLUMNS)
    with pytest.raises(ValueError, match="unknown format"):
        (images / "x.xml").write_text("")
        read_records(images / "x.xml", columns=COLUMNS)


def test_record_types_check_themselves():
    image = ImageRef(data=RED)
    with pytest.raises(ValueError, match="exactly one"):
        ImageRef()
    with pytest.raises(ValueError, match="absolute"):
        ImageRef(path="relative.png")
    with pytest.raises(ValueError, match="options"):
        BenchmarkQuestion("q", "Q", ("only",), None, (image,))
    with pytest.raises(ValueError, match="answer index"):
        BenchmarkQuestion("q", "Q", ("a", "b"), 2, (image,))
    with pytest.raises(ValueError, match="no image"):
        BenchmarkQuestion("q", "Q", ("a", "b"), 0, ())
