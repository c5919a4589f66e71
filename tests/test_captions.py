"""The captions adapter (a user's own image-description set): formats, column mapping, splits,
questions from the data, every error and quarantine with its file/row/column, and prepare_shards
end to end. Fixtures are tiny PNGs written here; nothing trains."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import random
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from medift.datasets import DataError, get_dataset, wbcatt
from medift.datasets.captions import DEFAULT_BYTES_CACHE, CaptionsAdapter, CaptionsOptions
from medift.prepare import ShardsConfig, check_patient_splits, prepare_shards
from medift.records import SPLITS, Record
from medift.shards import load_descriptions, load_questions
from tests.fixtures.data import assert_patients_disjoint
from tests.test_prepare import assert_report_consistent

MODALITIES = ("CT", "MRI", " X-ray ", "ultrasound", "PET")
SPLIT_SPELLINGS = {"train": "train", "val": "Validation", "test": "TEST"}


def png_bytes(k: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (k * 37 % 256, k * 91 % 256, 120)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pngs(root: Path, count: int, folder: str = "imgs") -> list[str]:
    (root / folder).mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        (root / folder / f"{k}.png").write_bytes(png_bytes(k))
        paths.append(f"{folder}/{k}.png")
    return paths


def csv_rows(root: Path, count: int = 20) -> list[dict[str, str]]:
    """Rows of a CSV set: two images per patient, split by patient (train/val/test spelled variously)."""
    paths = write_pngs(root, count)
    rows = []
    for k, path in enumerate(paths):
        patient = k // 2
        split = "train" if patient < 6 else ("val" if patient < 8 else "test")
        rows.append(
            {
                "image": path,
                "description": f"A scan of patient region {k}, with finding {k % 3}.",
                "modality": MODALITIES[k % len(MODALITIES)],
                "body_part": "chest" if k % 2 else "Head",
                "patient": f"p{patient}",
                "split": SPLIT_SPELLINGS[split] if k % 4 == 0 else split,
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict[str, str]], sep: str = ",") -> Path:
    pd.DataFrame(rows).to_csv(path, index=False, sep=sep)
    return path


CSV_OPTIONS = {
    "file": "captions.csv",
    "patient_id": "patient",
    "split": "split",
    "attributes": ["modality", "body_part"],
}


@pytest.fixture
def csv_set(tmp_path) -> Path:
    write_csv(tmp_path / "captions.csv", csv_rows(tmp_path))
    return tmp_path


def adapter(**options) -> CaptionsAdapter:
    return get_dataset("captions", options)


# --- options and the registry ---------------------------------------------------------------


def test_options_dataclass():
    fields = dataclasses.fields(CaptionsOptions)
    assert all(f.metadata.get("help") for f in fields)
    assert [
        f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ] == ["file"]
    direct = CaptionsAdapter(CaptionsOptions(file="x.csv", attributes=["a"]))
    assert direct.options == get_dataset("captions", {"file": "x.csv", "attributes": ["a"]}).options


def test_get_dataset_options():
    assert get_dataset("wbcatt") is wbcatt and get_dataset("wbcatt", {}) is wbcatt
    with pytest.raises(ValueError, match="takes no options"):
        get_dataset("wbcatt", {"file": "x.csv"})
    with pytest.raises(ValueError, match="needs options"):
        get_dataset("captions")
    with pytest.raises(ValueError, match=r"unknown captions option\(s\) \['colour', 'imgs'\]"):
        get_dataset("captions", {"file": "x.csv", "imgs": "a", "colour": "b"})
    with pytest.raises(ValueError, match="'file' is required"):
        get_dataset("captions", {"image": "path"})
    with pytest.raises(KeyError, match="captions"):
        get_dataset("nope")
    for bad, message in (
        ({"format": "xlsx"}, "format"),
        ({"attributes": "modality"}, "list of column names"),
        ({"attributes": ["a", "a"]}, "twice"),
        ({"attributes": ["description"]}, "description itself"),
        ({"attributes": ["a"], "question_text": {"b": "?"}}, r"\['b'\]"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "below 1"),
        ({"val_fraction": -0.1}, "val_fraction"),
    ):
        with pytest.raises(ValueError, match=message):
            get_dataset("captions", {"file": "x.csv", **bad})


def test_adapter_api_before_and_after_reading(csv_set):
    captions = adapter(**CSV_OPTIONS, question_text={"body_part": "Which body part is shown?"})
    assert isinstance(captions, CaptionsAdapter) and captions.NAME == "captions"
    assert captions.ATTRIBUTES == {"modality": (), "body_part": ()}  # known before reading
    assert captions.QUESTION_OPTIONS == {}
    assert captions.QUESTION_TEXT == {"modality": "What is the modality?", "body_part": "Which body part is shown?"}
    assert set(captions.QUESTION_TEXT) == set(captions.ATTRIBUTES)
    assert adapter(file="x.csv", attributes=["body_part"]).QUESTION_TEXT == {"body_part": "What is the body part?"}
    captions.read_records(csv_set, seed=0)
    assert captions.ATTRIBUTES == {
        "modality": ("ct", "mri", "pet", "ultrasound", "x-ray"),
        "body_part": ("chest", "head"),
    }
    assert captions.phrases({"modality": "ct", "description": "a CT of the chest"}) == {}
    assert captions.describe({"modality": "ct", "description": "a CT of the chest"}) == "a CT of the chest"
    assert captions.describe({"modality": "ct"}) == ""


# --- formats ------------------------------------------------------------------------------------


def test_csv_with_paths_and_a_split_column(csv_set):
    rows = pd.read_csv(csv_set / "captions.csv", dtype=str)
    result = adapter(**CSV_OPTIONS).read_records(csv_set, seed=0)
    assert result.rows_read == 20 and not result.quarantined and len(result.records) == 20
    assert Counter(r.split for r in result.records) == {"train": 12, "val": 4, "test": 4}
    assert_patients_disjoint(result.records)
    first = result.records[0]
    assert first.dataset == "captions" and first.image_id == "imgs/0.png" and first.patient_id == "p0"
    assert first.image_path == str((csv_set / "imgs" / "0.png").resolve()) and Path(first.image_path).is_absolute()
    assert first.source == "captions.csv:1"
    assert first.attributes == {"modality": "ct", "body_part": "head", "description": rows["description"][0]}
    assert result.records[2].attributes["modality"] == "x-ray"  # stripped, lowercased
    assert [r.attributes["description"] for r in result.records] == list(rows["description"])
    assert result.counts == {"annotation files": 1}
    # The file fixes the splits: the seed changes nothing.
    assert adapter(**CSV_OPTIONS).read_records(csv_set, seed=5).records == result.records


def jsonl_set(root: Path, n_patients: int = 40) -> Path:
    """JSONL, base64 images, no split column; patients with 1 to 3 images each."""
    lines, k = [], 0
    for patient in range(n_patients):
        for _ in range(1 + patient % 3):
            encoded = base64.b64encode(png_bytes(k)).decode()
            row = {
                "name": f"img{k}",
                "png": f"data:image/png;base64,{encoded}" if k == 1 else encoded,
                "text": f"finding {k}",
                "subject": f"s{patient:03d}",
                "grade": k % 4,  # a number in JSON: read as text
            }
            lines.append(json.dumps(row))
            k += 1
    lines.insert(3, "")  # a blank line is skipped, and line numbers stay the file's
    (root / "set.jsonl").write_text("\n".join(lines) + "\n")
    return root


JSONL_OPTIONS = {
    "file": "set.jsonl",
    "image_bytes": "png",
    "description": "text",
    "id": "name",
    "patient_id": "subject",
    "attributes": ["grade"],
}


def test_jsonl_with_base64_bytes_split_by_patient(tmp_path):
    jsonl_set(tmp_path)
    result = adapter(**JSONL_OPTIONS).read_records(tmp_path, seed=0)
    assert result.rows_read == 79 and len(result.records) == 79 and not result.quarantined
    assert result.counts == {"annotation files": 1, "rows with embedded image bytes": 79}
    cache = tmp_path / DEFAULT_BYTES_CACHE
    for k, record in enumerate(result.records):
        path = Path(record.image_path)
        assert path.parent == cache.resolve() and path.suffix == ".png" and path.read_bytes() == png_bytes(k)
        assert record.attributes == {"grade": str(k % 4), "description": f"finding {k}"}
    assert result.records[3].source == "set.jsonl:5"  # the blank line 4 counts as a line
    assert_patients_disjoint(result.records)
    patients = {split: {r.patient_id for r in result.records if r.split == split} for split in SPLITS}
    assert [len(patients[s]) for s in SPLITS] == [32, 4, 4]  # 10 % of the 40 patients each
    again = adapter(**JSONL_OPTIONS).read_records(tmp_path, seed=0)
    assert again.records == result.records  # deterministic (and the cache is reused)
    other = adapter(**JSONL_OPTIONS).read_records(tmp_path, seed=1)
    assert {r.patient_id for r in other.records if r.split == "val"} != patients["val"]
    custom = adapter(**JSONL_OPTIONS, val_fraction=0.25, test_fraction=0.0, bytes_cache=str(tmp_path / "elsewhere"))
    splits = custom.read_records(tmp_path, seed=0).records
    assert len({r.patient_id for r in splits if r.split == "val"}) == 10 and not any(r.split == "test" for r in splits)
    assert all(Path(r.image_path).parent == (tmp_path / "elsewhere").resolve() for r in splits)


def test_parquet_folder_of_two_files_read_in_name_order(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    parts = {"part-1.parquet": range(5, 9), "part-0.parquet": range(0, 5)}
    for name, ks in parts.items():
        frame = pd.DataFrame(
            {
                # Hugging Face's Image struct in one file, plain binary in the other.
                "img": [{"bytes": png_bytes(k), "path": None} for k in ks]
                if name == "part-0.parquet"
                else [png_bytes(k) for k in ks],
                "caption": [f"caption {k}" for k in ks],
                "label": [("Benign", "malignant")[k % 2] for k in ks],
                "split": ["train", "train", "val", "test", "dev"][: len(ks)],
            }
        )
        frame.to_parquet(folder / name)
    (folder / "README.md").write_text("not data")  # other extensions in the folder are ignored
    options = {
        "file": "data",
        "image_bytes": "img",
        "description": "caption",
        "split": "split",
        "attributes": ["label"],
    }
    result = adapter(**options).read_records(tmp_path, seed=0)
    assert result.rows_read == 9 and len(result.records) == 9
    assert [r.attributes["description"] for r in result.records] == [f"caption {k}" for k in range(9)]
    assert [r.source for r in result.records][:6] == [f"part-0.parquet:{n}" for n in range(1, 6)] + ["part-1.parquet:1"]
    # No id or path column: the id is file:row, and each image its own patient.
    assert result.records[5].image_id == "part-1.parquet:1" == result.records[5].patient_id
    assert Counter(r.split for r in result.records) == {"train": 4, "val": 3, "test": 2}
    assert {r.attributes["label"] for r in result.records} == {"benign", "malignant"}
    assert [Path(r.image_path).read_bytes() for r in result.records] == [png_bytes(k) for k in range(9)]


def test_column_mapping_tsv_json_and_image_root(tmp_path):
    paths = write_pngs(tmp_path / "pictures", 6, folder="x")
    rows = [
        {
            "uid": f"u{k}",
            "file": path,
            "caption": f"text {k}",
            "subject": f"s{k // 3}",
            "fold": ("Train", "dev")[k // 3],
        }
        for k, path in enumerate(paths)
    ]
    options = {
        "image": "file",
        "image_root": "pictures",
        "description": "caption",
        "id": "uid",
        "patient_id": "subject",
        "split": "fold",
    }
    write_csv(tmp_path / "meta.tsv", rows, sep="\t")
    (tmp_path / "meta.json").write_text(json.dumps(rows))
    (tmp_path / "meta.txt").write_text(json.dumps(rows))
    read = {}
    for name, extra in (("meta.tsv", {}), ("meta.json", {}), ("meta.txt", {"format": "json"})):
        result = adapter(file=name, **options, **extra).read_records(tmp_path, seed=0)
        read[name] = [(r.image_id, r.image_path, r.patient_id, r.split, r.attributes) for r in result.records]
    assert read["meta.tsv"] == read["meta.json"] == read["meta.txt"]
    assert read["meta.tsv"][4] == (
        "u4",
        str((tmp_path / "pictures" / "x" / "4.png").resolve()),
        "s1",
        "val",
        {"description": "text 4"},
    )
    with pytest.raises(ValueError, match="set the captions option format"):
        adapter(file="meta.txt", **options).read_records(tmp_path, seed=0)
    # An absolute image_root and file work as well.
    absolute = adapter(**{**options, "file": str(tmp_path / "meta.json"), "image_root": str(tmp_path / "pictures")})
    assert len(absolute.read_records(tmp_path / "pictures", seed=0).records) == 6


# --- errors and quarantines, each naming file, row and column ---------------------------------------


@pytest.mark.parametrize(
    "column, option",
    [("description", "description"), ("modality", "attributes"), ("split", "split"), ("image", "image")],
)
def test_missing_required_column(csv_set, column, option):
    rows = [{k: v for k, v in row.items() if k != column} for row in csv_rows(csv_set)]
    write_csv(csv_set / "captions.csv", rows)
    with pytest.raises(DataError, match=rf"captions\.csv: missing column '{column}' \(captions option {option}\)"):
        adapter(**CSV_OPTIONS).read_records(csv_set, seed=0)


def test_unknown_split_value(csv_set):
    rows = csv_rows(csv_set)
    rows[6]["split"] = "holdout"
    write_csv(csv_set / "captions.csv", rows)
    with pytest.raises(DataError) as error:
        adapter(**CSV_OPTIONS).read_records(csv_set, seed=0)
    message = str(error.value)
    assert "captions.csv, data row 7" in message and "spreadsheet row 8" in message
    assert "column 'split'" in message and "'holdout'" in message


def test_patient_in_two_splits_is_an_error(csv_set):
    rows = csv_rows(csv_set)
    rows[1]["split"] = "test"  # patient p0's second image; its first is in train
    write_csv(csv_set / "captions.csv", rows)
    with pytest.raises(DataError) as error:
        adapter(**CSV_OPTIONS).read_records(csv_set, seed=0)
    message = str(error.value)
    assert "captions.csv, data row 2" in message and "columns 'patient' and 'split'" in message
    assert "in test here and in train at captions.csv:1" in message and "p0" not in message
    # The adapter stops it first; prepare's own check would stop such records too.
    write_csv(csv_set / "captions.csv", csv_rows(csv_set))
    records = adapter(**CSV_OPTIONS).read_records(csv_set, seed=0).records
    check_patient_splits(records)
    with pytest.raises(ValueError, match="patients in two splits"):
        check_patient_splits([records[0], dataclasses.replace(records[1], split="test")])


def test_bad_cells_are_errors(tmp_path):
    jsonl_set(tmp_path, n_patients=3)
    lines = (tmp_path / "set.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    for column, value, expected in (
        ("text", ["a", "list"], r"set\.jsonl, line 2, column 'text': a list, not a text value"),
        ("name", "  ", r"set\.jsonl, line 2, column 'name': empty cell"),
        ("subject", None, r"set\.jsonl, line 2, column 'subject': empty cell"),
        ("png", 12, r"set\.jsonl, line 2, column 'png': a int, not image bytes"),
    ):
        bad = lines.copy()
        bad[1] = json.dumps({**row, column: value})
        (tmp_path / "set.jsonl").write_text("\n".join(bad))
        with pytest.raises(DataError, match=expected):
            adapter(**JSONL_OPTIONS).read_records(tmp_path, seed=0)
    (tmp_path / "set.jsonl").write_text("\n".join([*lines[:2], "{not json", *lines[2:]]))
    with pytest.raises(DataError, match=r"set\.jsonl, line 3: not JSON"):
        adapter(**JSONL_OPTIONS).read_records(tmp_path, seed=0)


@pytest.mark.parametrize("name", ["captions.csv", "captions.jsonl", "captions.json", "captions.parquet"])
def test_empty_file_is_an_error_naming_it(tmp_path, name):
    (tmp_path / name).write_bytes(b"" if name.endswith(".parquet") else b" \n")
    with pytest.raises(DataError, match=rf"{name}: empty file"):
        adapter(file=name).read_records(tmp_path, seed=0)


def test_quarantines_counts_and_strict(csv_set):
    rows = csv_rows(csv_set)
    (csv_set / "imgs" / "3.png").unlink()  # a missing file
    rows[4]["image"] = ""  # no image at all
    rows[7]["description"] = "  "  # kept here; prepare quarantines its empty description
    rows.append(dict(rows[5]))  # a repeated image id
    write_csv(csv_set / "captions.csv", rows)
    result = adapter(**CSV_OPTIONS).read_records(csv_set, seed=0)
    assert result.rows_read == 21 == len(result.records) + len(result.quarantined) + len(result.excluded)
    assert len(result.records) == 18
    assert {(q.source, q.reason) for q in result.quarantined} == {
        ("captions.csv:4", "image file missing"),
        ("captions.csv:5", "image file missing"),
        ("captions.csv:21", "duplicated image id"),
    }
    assert next(r for r in result.records if r.source == "captions.csv:8").attributes.get("description") is None
    with pytest.raises(DataError, match=r"captions\.csv:4: image file missing \(strict"):
        adapter(**CSV_OPTIONS).read_records(csv_set, seed=0, strict=True)


def test_bytes_that_are_not_base64_are_quarantined(tmp_path):
    jsonl_set(tmp_path, n_patients=3)
    lines = (tmp_path / "set.jsonl").read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "png": "not*base64!"})
    lines[4] = json.dumps({**json.loads(lines[4]), "png": ""})
    (tmp_path / "set.jsonl").write_text("\n".join(lines))
    result = adapter(**JSONL_OPTIONS).read_records(tmp_path, seed=0)
    assert sorted((q.source, q.reason) for q in result.quarantined) == [
        ("set.jsonl:3", "image bytes not base64"),
        ("set.jsonl:5", "image file missing"),
    ]
    assert result.rows_read == 6 and len(result.records) == 4
    with pytest.raises(DataError, match=r"set\.jsonl:3: image bytes not base64"):
        adapter(**JSONL_OPTIONS).read_records(tmp_path, seed=0, strict=True)


# --- questions ---------------------------------------------------------------------------------------


def test_questions_from_the_observed_values():
    captions = adapter(file="x.csv", attributes=["modality", "side", "rare"])
    record = Record("captions", "i", "/x.png", "p", "val", {"modality": "ct", "side": "left", "description": "d"})
    observed = {"modality": ("ct", "mri", "pet", "ultrasound", "x-ray"), "side": ("left",), "description": ("d",)}
    positions, drawn = set(), set()
    for seed in range(40):
        (question,) = captions.make_questions(record, random.Random(seed), observed)
        assert question.attribute == "modality" and question.question == "What is the modality?"
        assert len(question.options) == 4 and question.options[question.answer_index] == "ct"
        assert set(question.options) <= set(observed["modality"])
        positions.add(question.answer_index)
        drawn.add(frozenset(question.options))
    assert len(positions) == 4 and len(drawn) > 1  # shuffled, and distractors drawn by the rng
    assert captions.make_questions(record, random.Random(3), observed) == captions.make_questions(
        record, random.Random(3), observed
    )
    # Two values seen: a two-option question; one value seen (side): none.
    (two,) = captions.make_questions(record, random.Random(0), {"modality": ("ct", "mri"), "side": ("left",)})
    assert sorted(two.options) == ["ct", "mri"]
    # Without `observed`, the values read_records saw (ATTRIBUTES) are the pool.
    captions.ATTRIBUTES["modality"] = ("ct", "mri", "pet")
    (own,) = captions.make_questions(record, random.Random(0))
    assert sorted(own.options) == ["ct", "mri", "pet"]


# --- prepare_shards end to end --------------------------------------------------------------------------


def test_prepare_shards_end_to_end(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = csv_rows(raw, count=24)
    rows[2]["description"] = ""  # quarantined by prepare: empty description
    (raw / "imgs" / "9.png").unlink()  # quarantined by the adapter: image file missing
    (raw / "imgs" / "17.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # quarantined by the shard writer
    write_csv(raw / "captions.csv", rows)
    options = {**CSV_OPTIONS, "split": ""}  # splits by patient, from the seed
    config = ShardsConfig(
        dataset="captions",
        raw_dir=str(raw),
        out_dir=str(tmp_path / "shards"),
        report=str(tmp_path / "report.json"),
        image_size=16,
        seed=0,
        adapter_options=json.dumps(options),
    )
    report = prepare_shards(config)
    assert report == json.loads((tmp_path / "report.json").read_text())
    assert_report_consistent(report, tmp_path / "shards")
    assert report["dataset"] == "captions" and report["rows_read"] == 24 and report["records_kept"] == 21
    assert report["quarantined_by_reason"] == {
        "empty description": 1,
        "image file missing": 1,
        "image unreadable or truncated": 1,
    }
    assert report["adapter_options"]["file"] == "captions.csv"
    assert report["adapter_options"]["attributes"] == ["modality", "body_part"]
    assert report["adapter_options"]["val_fraction"] == 0.1  # the defaults are recorded too
    assert report["files"]["captions.csv"]["rows_read"] == 24
    descriptions = pd.concat([load_descriptions(tmp_path / "shards", split) for split in SPLITS])
    expected = {row["image"]: row["description"] for row in rows}
    assert {i: expected[i] for i in descriptions["image_id"]} == dict(
        zip(descriptions["image_id"], descriptions["description"])
    )
    questions = pd.concat([load_questions(tmp_path / "shards", split) for split in ("val", "test")])
    splits = report["splits"]
    assert len(questions) == splits["val"]["questions"] + splits["test"]["questions"] > 0
    assert splits["train"]["questions"] == 0
    assert set(questions["attribute"]) == {"modality", "body_part"}
    assert set(questions["question"]) == {"What is the modality?", "What is the body part?"}
    # 12 patients: 1 val, 1 test (10 % each, rounded down).
    assert (splits["val"]["patients"], splits["test"]["patients"]) == (1, 1)

    with pytest.raises(ValueError, match="needs options"):
        prepare_shards(ShardsConfig("captions", str(raw), str(tmp_path / "s2"), str(tmp_path / "r2.json")))
    with pytest.raises(ValueError, match="not JSON"):
        prepare_shards(
            ShardsConfig("captions", str(raw), str(tmp_path / "s2"), str(tmp_path / "r2.json"), adapter_options="{f")
        )
    with pytest.raises(ValueError, match="takes no options"):
        prepare_shards(
            ShardsConfig(
                "wbcatt", str(raw), str(tmp_path / "s2"), str(tmp_path / "r2.json"), adapter_options="{\"file\": 1}"
            )
        )


def test_unreadable_text_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "set.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 cut off")
    with pytest.raises(DataError, match=r"set\.jsonl\.gz: not readable as UTF-8 text"):
        adapter(file="set.jsonl.gz").read_records(tmp_path, seed=0)
    (tmp_path / "set.json").write_bytes(b'[{"description": "\xff"}]')
    with pytest.raises(DataError, match=r"set\.json: not readable as UTF-8 text"):
        adapter(file="set.json").read_records(tmp_path, seed=0)
