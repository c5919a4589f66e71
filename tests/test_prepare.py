"""Raw release -> shards + data report, for every adapter: counts in = counts out + counts
rejected (overall, per file, per split), bad input quarantined or an error under `strict`,
and the real annotation files of ../shared/data run through descriptions, questions and shards."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from medift.datasets import DATASETS, DataError, cbis_ddsm, wbcatt
from medift.datasets.common import RowSink
from medift.datasets.synthetic import write_synthetic
from medift.images import ImageLoadError
from medift.prepare import ShardsConfig, prepare_shards
from medift.records import SPLITS, Record
from medift.shards import load_descriptions, load_questions, read_manifest
from tests.fixtures.data import placeholders, real_cbis_layout, real_data_missing, real_wbcatt_layout

SIZES = dict(n_train=24, n_val=6, n_test=8, image_size=32)


def _prepare(raw: Path, out: Path, dataset: str, **overrides) -> dict:
    config = ShardsConfig(
        dataset=dataset,
        raw_dir=str(raw),
        out_dir=str(out / "shards"),
        report=str(out / "data_report.json"),
        image_size=16,
        seed=0,
        **overrides,
    )
    return prepare_shards(config)


def assert_report_consistent(report: dict, shard_dir: Path) -> None:
    """The report's counts add up, and agree with the shards actually written."""
    assert report["balanced"] and report["patients_in_two_splits"] == 0
    assert report["rows_read"] == report["records_kept"] + report["quarantined"] + report["excluded"]
    assert sum(report["quarantined_by_reason"].values()) == report["quarantined"]
    assert sum(report["excluded_by_reason"].values()) == report["excluded"]
    files = report["files"].values()
    assert sum(f["rows_read"] for f in files) == report["rows_read"]
    assert sum(f["kept"] for f in files) == report["records_kept"]
    manifest = read_manifest(shard_dir)
    splits = report["splits"]
    assert sum(s["records"] for s in splits.values()) == report["records_kept"] == manifest["totals"]["images"]
    for split in SPLITS:
        assert splits[split]["descriptions"] == manifest["totals"]["descriptions"][split]
        assert splits[split]["questions"] == manifest["totals"]["questions"][split]
        assert sum(splits[split]["questions_by_attribute"].values()) == splits[split]["questions"]
    described = pd.concat([load_descriptions(shard_dir, split) for split in SPLITS])
    assert described["description"].str.strip().ne("").all()
    patients = described.groupby("patient_id")["split"].nunique()
    assert (patients == 1).all()


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_every_adapter_end_to_end_on_its_synthetic_release(dataset, tmp_path):
    write_synthetic(dataset, tmp_path / "raw", seed=2, **SIZES)
    report = _prepare(tmp_path / "raw", tmp_path / "out", dataset)
    assert report == json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert_report_consistent(report, tmp_path / "out" / "shards")
    assert report["splits"]["test"]["questions"] > 0 and report["splits"]["train"]["questions"] == 0
    questions = load_questions(tmp_path / "out" / "shards", "test")
    for _, row in questions.iterrows():
        assert row["question"] == DATASETS[dataset].QUESTION_TEXT[row["attribute"]]


def test_shards_and_report_are_deterministic(tmp_path):
    write_synthetic("skincon", tmp_path / "raw", seed=2, **SIZES)
    first = _prepare(tmp_path / "raw", tmp_path / "a", "skincon")
    second = _prepare(tmp_path / "raw", tmp_path / "b", "skincon", threads=2)
    assert first == second
    assert read_manifest(tmp_path / "a" / "shards")["files"] == read_manifest(tmp_path / "b" / "shards")["files"]


def test_unreadable_image_is_quarantined_or_an_error_when_strict(tmp_path):
    write_synthetic("wbcatt", tmp_path / "raw", seed=2, **SIZES)
    records = wbcatt.read_records(tmp_path / "raw", seed=0).records
    cut = Path(next(r for r in records if r.split == "test").image_path)
    cut.write_bytes(cut.read_bytes()[:200])  # a truncated JPEG
    report = _prepare(tmp_path / "raw", tmp_path / "out", "wbcatt", threads=2)
    assert report["quarantined_by_reason"] == {"image unreadable or truncated": 1}
    assert report["records_kept"] == 37 and report["splits"]["test"]["records"] == 7
    assert_report_consistent(report, tmp_path / "out" / "shards")
    assert report["files"]["pbc_attr_v1_test.csv"] == {
        "rows_read": 8,
        "kept": 7,
        "quarantined": {"image unreadable or truncated": 1},
        "excluded": {},
    }
    with pytest.raises(ImageLoadError, match=cut.name):
        _prepare(tmp_path / "raw", tmp_path / "strict", "wbcatt", strict=True)


def _fake_adapter(records: list[Record]) -> SimpleNamespace:
    """A dataset module whose rules describe the `text` attribute and ask nothing."""

    def read_records(raw_dir, seed, strict=False):
        sink = RowSink(strict=strict)
        for record in records:
            sink.rows_read += 1
            sink.accept(record)
        return sink.result()

    return SimpleNamespace(
        read_records=read_records,
        describe=lambda a: a.get("text", ""),
        make_questions=lambda record, rng, observed=None: [],
    )


def _image(tmp_path: Path, name: str) -> str:
    placeholders(tmp_path, [name])
    return str(tmp_path / name)


def test_empty_description_is_quarantined_or_an_error_when_strict(tmp_path, monkeypatch):
    records = [
        Record(
            "fake",
            f"i{k}",
            _image(tmp_path, f"i{k}.jpg"),
            f"p{k}",
            "train",
            {"text": "a, b" if k else "  "},
            f"fake.csv:{k + 1}",
        )
        for k in range(3)
    ]
    monkeypatch.setitem(DATASETS, "fake", _fake_adapter(records))
    report = _prepare(tmp_path, tmp_path / "out", "fake")
    assert report["quarantined_by_reason"] == {"empty description": 1} and report["records_kept"] == 2
    assert report["files"]["fake.csv"]["rows_read"] == 3
    with pytest.raises(DataError, match=r"fake\.csv:1: empty description"):
        _prepare(tmp_path, tmp_path / "strict", "fake", strict=True)


def test_patient_in_two_splits_is_an_error_before_decoding(tmp_path, monkeypatch):
    records = [
        Record("fake", f"i{k}", str(tmp_path / "absent.jpg"), "p1", split, {"text": "a"}, f"fake.csv:{k}")
        for k, split in enumerate(("train", "test"))
    ]
    monkeypatch.setitem(DATASETS, "fake", _fake_adapter(records))
    monkeypatch.setattr(RowSink, "accept", lambda self, record: self.records.append(record))
    with pytest.raises(ValueError, match="patients in two splits"):
        _prepare(tmp_path, tmp_path / "out", "fake")
    assert not (tmp_path / "out" / "shards").exists()


# --- the real annotation files, through descriptions, questions and shards ------------------------


def _layouts():
    from tests.fixtures.cbis_dicom import real_cbis_dicom_layout
    from tests.fixtures.skincon import real_skincon_layout

    return {
        "wbcatt": ("wbcatt", real_wbcatt_layout, "wbcatt"),
        "cbis_ddsm_jpeg": ("cbis-ddsm", lambda root: real_cbis_layout(root) or root, "cbis_ddsm"),
        "cbis_ddsm_dicom": ("cbis-ddsm", real_cbis_dicom_layout, "cbis_ddsm"),
        "skincon": ("fitzpatrick17k", real_skincon_layout, "skincon"),
    }


EXPECTED = {  # rows read, kept, excluded; records per split; questions per split
    "wbcatt": (7199, 7199, 0, {"train": 6169, "val": 1030, "test": 0}, {"train": 0, "val": 1030, "test": 0}),
    "cbis_ddsm_jpeg": (2864, 2864, 0, None, None),
    "cbis_ddsm_dicom": (2864, 2864, 0, None, None),
    "skincon": (3690, 3230, 460, {"train": 2584, "val": 323, "test": 323}, {"train": 0, "val": 323, "test": 323}),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_annotation_files_through_shards(name, tmp_path):
    folder, build, adapter = _layouts()[name]
    if real_data_missing(folder):
        pytest.skip(real_data_missing(folder))
    raw = tmp_path / "raw"
    raw.mkdir()
    build(raw)
    report = _prepare(raw, tmp_path / "out", adapter, threads=2)
    assert_report_consistent(report, tmp_path / "out" / "shards")
    rows, kept, excluded, per_split, questions = EXPECTED[name]
    assert (report["rows_read"], report["records_kept"], report["quarantined"], report["excluded"]) == (
        rows,
        kept,
        0,
        excluded,
    )
    if per_split:
        assert {s: v["records"] for s, v in report["splits"].items()} == per_split
        assert {s: v["questions"] for s, v in report["splits"].items()} == questions
    if adapter == "cbis_ddsm":
        splits = report["splits"]
        assert splits["test"]["records"] == 0 and splits["val"]["patients"] == int(
            (splits["train"]["patients"] + splits["val"]["patients"]) * cbis_ddsm.VAL_FRACTION
        )
        assert report["files"]["mass_case_description_train_set.csv"]["rows_read"] == 1318
        assert report["files"]["calc_case_description_train_set.csv"]["rows_read"] == 1546
