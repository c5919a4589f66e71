"""Parquet shards: round trip, integrity checks, determinism across workers, streaming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medift.images import ImageLoadError, decode_image, load_and_letterbox
from medift.records import Question, Record
from medift.shards import (
    ShardError,
    ShardRows,
    load_descriptions,
    load_questions,
    read_manifest,
    verify_split,
    write_shards,
)

IMAGE_SIZE = 24


def _make_dataset(tmp_path: Path, n: int = 10, splits=("train", "train", "train", "train", "val", "test")):
    """n tiny noisy images (PNG and JPEG, various shapes) with records, descriptions, questions."""
    image_dir = tmp_path / "raw"
    image_dir.mkdir()
    rng = np.random.default_rng(0)
    records, descriptions, questions = [], {}, {}
    # Ids in reverse order so the writer's own ordering is exercised.
    for i in reversed(range(n)):
        image_id = f"img{i:03d}"
        split = splits[i % len(splits)]
        suffix, fmt = (".png", "PNG") if i % 2 else (".jpg", "JPEG")
        path = image_dir / f"{image_id}{suffix}"
        shape = (10 + 3 * i, 20 + i % 7, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path, format=fmt)
        attributes = {"size": "big" if i % 3 else "small", "colour": "blue"}
        records.append(Record("toy", image_id, str(path), f"patient{i // 2}", split, attributes, f"toy.csv:{i + 1}"))
        descriptions[image_id] = f"{attributes['size']} size, blue colour"
        if split != "train":
            questions[image_id] = [
                Question(image_id, "size", "What is the size?", ("big", "small"), int(i % 3 == 0)),
                Question(image_id, "colour", "What is the colour?", ("blue", "red", "green"), 0),
            ]
    return records, descriptions, questions


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_round_trip_rows_in_equal_rows_out(tmp_path):
    records, descriptions, questions = _make_dataset(tmp_path)
    out = tmp_path / "shards"
    manifest = write_shards(records, descriptions, questions, out, IMAGE_SIZE, rows_per_shard=4, seed=7)

    assert manifest == read_manifest(out)
    assert manifest["config"] == {
        "image_size": IMAGE_SIZE,
        "rows_per_shard": 4,
        "seed": 7,
        "image_format": "png",
        "letterbox_fill": [0, 0, 0],
    }
    by_id = {record.image_id: record for record in records}
    seen = []
    for split in ("train", "val", "test"):
        frame = load_descriptions(out, split)
        expected = sorted(r.image_id for r in records if r.split == split)
        assert list(frame["image_id"]) == expected  # sorted by image_id, whatever the input order
        assert list(frame.columns) == ["image_id", "patient_id", "split", "image", "description", "attributes"]
        for row in frame.itertuples():
            record = by_id[row.image_id]
            assert row.split == split and row.patient_id == record.patient_id
            assert row.description == descriptions[row.image_id]
            assert json.loads(row.attributes) == record.attributes
            assert row.attributes == json.dumps(record.attributes, sort_keys=True)
            assert row.image == load_and_letterbox(record.image_path, IMAGE_SIZE)
            assert decode_image(row.image).size == (IMAGE_SIZE, IMAGE_SIZE)
        seen += list(frame["image_id"])
        assert manifest["totals"]["descriptions"][split] == len(frame)
    assert sorted(seen) == sorted(by_id)

    assert load_questions(out, "train").empty
    for split in ("val", "test"):
        frame = load_questions(out, split)
        expected = [
            q for r in sorted(records, key=lambda r: r.image_id) if r.split == split for q in questions[r.image_id]
        ]
        assert len(frame) == len(expected) == manifest["totals"]["questions"][split]
        for row, question in zip(frame.itertuples(), expected):
            assert row.question_id == f"{question.image_id}:{question.attribute}"
            assert (row.image_id, row.attribute, row.question) == (
                question.image_id,
                question.attribute,
                question.question,
            )
            assert row.options == list(question.options)
            assert row.answer_index == question.answer_index
            assert row.image == load_and_letterbox(by_id[row.image_id].image_path, IMAGE_SIZE)
        assert str(frame["answer_index"].dtype) == "int32"


def test_manifest_lists_every_file_with_checksum_and_totals(tmp_path):
    records, descriptions, questions = _make_dataset(tmp_path)
    out = tmp_path / "shards"
    manifest = write_shards(records, descriptions, questions, out, IMAGE_SIZE, rows_per_shard=4)
    listed = {entry["path"] for entry in manifest["files"]}
    assert listed | {"manifest.json"} == {path.name for path in out.iterdir()}
    for entry in manifest["files"]:
        assert set(entry) == {"path", "split", "kind", "rows", "sha256"}
        assert entry["path"] == f"{entry['kind']}-{entry['split']}-{entry['path'][-13:-8]}.parquet"
    assert manifest["totals"]["images"] == 10
    assert manifest["totals"]["descriptions"]["all"] == 10
    assert manifest["totals"]["questions"]["all"] == 2 * sum(r.split != "train" for r in records)
    assert "time" not in json.dumps(manifest).lower()


def test_streaming_rows_per_shard_bounds_each_file(tmp_path):
    records, descriptions, _ = _make_dataset(tmp_path, splits=("train",))
    manifest = write_shards(records, descriptions, {}, tmp_path / "shards", IMAGE_SIZE, rows_per_shard=4)
    train = [e for e in manifest["files"] if e["kind"] == "descriptions"]
    assert [e["path"] for e in train] == [f"descriptions-train-0000{i}.parquet" for i in range(3)]
    assert [e["rows"] for e in train] == [4, 4, 2]


def test_output_is_byte_identical_across_thread_counts(tmp_path):
    records, descriptions, questions = _make_dataset(tmp_path, n=20)
    one = tmp_path / "one"
    two = tmp_path / "two"
    write_shards(records, descriptions, questions, one, IMAGE_SIZE, rows_per_shard=3, threads=1)
    write_shards(list(reversed(records)), descriptions, questions, two, IMAGE_SIZE, rows_per_shard=3, threads=2)
    assert _file_bytes(one) == _file_bytes(two)


def test_tampered_or_missing_file_is_detected_by_name(tmp_path):
    records, descriptions, questions = _make_dataset(tmp_path)
    out = tmp_path / "shards"
    write_shards(records, descriptions, questions, out, IMAGE_SIZE, rows_per_shard=4)
    target = out / "descriptions-train-00001.parquet"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="descriptions-train-00001.parquet"):
        read_manifest(out)
    with pytest.raises(ShardError, match="descriptions-train-00001.parquet"):
        load_descriptions(out, "train")
    load_questions(out, "val")  # files that were not touched still load
    # What training verifies once, on rank 0: one split's files.
    with pytest.raises(ShardError, match="descriptions-train-00001.parquet"):
        verify_split(out, "descriptions", "train")
    assert verify_split(out, "questions", "val") == 1
    # The other ranks read without hashing; row counts are still checked.
    assert len(ShardRows(out, "descriptions", "train", ["image_id"], verify=False)) == 8

    (out / "questions-test-00000.parquet").unlink()
    with pytest.raises(ShardError, match="questions-test-00000.parquet"):
        load_questions(out, "test")
    (out / "manifest.json").unlink()
    with pytest.raises(ShardError, match="manifest.json"):
        read_manifest(out)


def test_rewrite_removes_stale_shards(tmp_path):
    records, descriptions, questions = _make_dataset(tmp_path)
    out = tmp_path / "shards"
    write_shards(records, descriptions, questions, out, IMAGE_SIZE, rows_per_shard=1)
    manifest = write_shards(records, descriptions, questions, out, IMAGE_SIZE, rows_per_shard=100)
    assert {e["path"] for e in manifest["files"]} | {"manifest.json"} == {p.name for p in out.iterdir()}


def test_unreadable_image_names_the_file_and_writes_no_manifest(tmp_path):
    records, descriptions, questions = _make_dataset(tmp_path)
    broken = Path(records[3].image_path)
    broken.write_bytes(broken.read_bytes()[:40])
    out = tmp_path / "shards"
    for threads in (1, 2):
        with pytest.raises(ImageLoadError, match=broken.name):
            write_shards(records, descriptions, questions, out, IMAGE_SIZE, rows_per_shard=4, threads=threads)
        assert not (out / "manifest.json").exists()


def test_inconsistent_inputs_are_refused_before_decoding(tmp_path):
    records, descriptions, questions = _make_dataset(tmp_path)
    out = tmp_path / "shards"
    missing = dict(descriptions)
    del missing[records[0].image_id]
    with pytest.raises(ValueError, match="no description"):
        write_shards(records, missing, questions, out, IMAGE_SIZE)
    with pytest.raises(ValueError, match="duplicated image_id"):
        write_shards(records + records[:1], descriptions, questions, out, IMAGE_SIZE)
    train_id = next(r.image_id for r in records if r.split == "train")
    asked = dict(questions)
    asked[train_id] = [Question(train_id, "size", "What is the size?", ("big", "small"), 0)]
    with pytest.raises(ValueError, match="train image"):
        write_shards(records, descriptions, asked, out, IMAGE_SIZE)


def test_shards_are_written_while_images_are_still_being_decoded(tmp_path, monkeypatch):
    """Streaming, observed: when image k is decoded, the shards of the first k images exist."""
    import medift.shards as shards

    records, descriptions, _ = _make_dataset(tmp_path, splits=("train",))
    out = tmp_path / "shards"
    on_disk_when_decoding = []

    def spying_load(path, size):
        on_disk_when_decoding.append(len(list(out.glob("descriptions-*.parquet"))))
        return load_and_letterbox(path, size)

    monkeypatch.setattr(shards, "load_and_letterbox", spying_load)
    write_shards(records, descriptions, {}, out, IMAGE_SIZE, rows_per_shard=4)
    assert on_disk_when_decoding == [k // 4 for k in range(10)]


def test_row_group_sizes_follow_the_files(tmp_path, monkeypatch):
    import medift.shards as shards

    monkeypatch.setattr(shards, "ROW_GROUP_SIZE", 3)
    records, descriptions, questions = _make_dataset(tmp_path, splits=("train",))
    write_shards(records, descriptions, questions, tmp_path / "shards", IMAGE_SIZE, rows_per_shard=4)
    assert ShardRows(tmp_path / "shards", "descriptions", "train", ["image_id"]).group_sizes() == [3, 1, 3, 1, 2]
