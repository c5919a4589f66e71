"""Evaluation-only benchmarks (medift.benchmarks) and their evaluation: shards of a VLMEvalKit TSV
and of JSONL records, questions on several images asked where the family takes them and refused
(counted) elsewhere, unlabelled questions answered and written but not scored, categories."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from medift.benchmarks import UNLABELLED, BenchmarkConfig, make_benchmark_shards
from medift.evaluate import SEVERAL_IMAGES, EvaluateConfig, evaluate
from medift.model.families import FAMILIES
from medift.shards import BENCHMARK, ShardRows
from medift.tables import read_predictions
from medift.testing.tiny_checkpoints import build_tiny_checkpoint
from tests.fixtures.own_data import write_jsonl_records, write_vlmevalkit_tsv


@pytest.fixture(scope="module")
def tsv_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark-tsv")
    facts = write_vlmevalkit_tsv(root / "bench.tsv")
    manifest = make_benchmark_shards(
        BenchmarkConfig(file=str(root / "bench.tsv"), out_dir=str(root / "shards"), report=str(root / "report.json"))
    )
    return root / "shards", facts, manifest


def test_a_vlmevalkit_tsv_becomes_benchmark_shards(tsv_shards):
    shards, facts, manifest = tsv_shards
    rows = ShardRows(shards, BENCHMARK, "test", ["question_id", "image_id", "images", "answer_index", "attribute"])
    frame = rows.frame()
    assert len(frame) == facts["rows"] == manifest["summary"]["questions"]
    assert manifest["summary"]["unlabelled"] == (frame["answer_index"] == UNLABELLED).sum() == facts["unlabelled"]
    assert manifest["summary"]["several_images"] == (frame["images"].map(len) > 1).sum() == facts["several_images"]
    by_id = frame.set_index("question_id")
    # Row 2 reuses row 1's image by its index: one image, one image_id, questions grouped.
    assert by_id.loc["1", "image_id"] == by_id.loc["2", "image_id"]
    assert set(frame["attribute"]) == facts["categories"]
    # The same image is stored once per question but letterboxed once: 5 distinct images in the file.
    assert manifest["summary"]["images"] == 5
    assert manifest["summary"]["rows_read"] == facts["rows"] and manifest["summary"]["quarantined"] == 0


def test_jsonl_records_with_a_mapping_become_benchmark_shards(tmp_path):
    entry = write_jsonl_records(tmp_path)
    manifest = make_benchmark_shards(
        BenchmarkConfig(
            file=entry["file"],
            format="records",
            columns=json.dumps(entry["columns"]),
            out_dir=str(tmp_path / "shards"),
            report=str(tmp_path / "report.json"),
        )
    )
    frame = ShardRows(tmp_path / "shards", BENCHMARK, "test", ["options", "answer_index", "attribute"]).frame()
    assert len(frame) == 5 and (frame["attribute"] == "stain").all()
    # The answer was the option's text: its index in the options.
    assert list(frame["answer_index"]) == [0, 1, 2, 0, 1]
    assert json.loads((tmp_path / "report.json").read_text())["questions"] == manifest["summary"]["questions"] == 5


@pytest.mark.parametrize("family", ["mllama", "qwen2_vl"])
def test_benchmark_evaluation_asks_several_images_where_the_family_takes_them(family, tsv_shards, tmp_path):
    shards, facts, _ = tsv_shards
    checkpoint = build_tiny_checkpoint(family, tmp_path / family)
    summary = evaluate(
        EvaluateConfig(
            model=str(checkpoint),
            shards=str(shards),
            out=str(tmp_path / "predictions.csv"),
            summary=str(tmp_path / "metrics.json"),
            unlabelled=str(tmp_path / "unlabelled.csv"),
            max_new_tokens=4,
            device="cpu",
        )
    )
    several = FAMILIES[json.loads((checkpoint / "config.json").read_text())["model_type"]].several_images
    assert several == (family == "mllama")
    predictions = read_predictions(tmp_path / "predictions.csv")  # the tables' own checks pass
    asked = set(predictions["question_id"])
    labelled = {"1", "2", "3", "4"} | ({"5"} if several else set())
    assert asked == labelled and summary["n"] == len(labelled)
    assert summary["refused"] == ({} if several else {SEVERAL_IMAGES: facts["several_images"]})
    # Circular evaluation of the labelled ones: every rotation of each.
    options = {"1": 3, "2": 2, "3": 3, "4": 4, "5": 2}
    assert len(predictions) == sum(options[q] for q in labelled)
    assert set(predictions["category"]) == facts["categories"]
    # The unlabelled question is asked once and its answer written, never scored.
    unlabelled = pd.read_csv(tmp_path / "unlabelled.csv", keep_default_na=False, dtype=str)
    assert list(unlabelled["question_id"]) == ["6"] and summary["unlabelled"] == 1
    assert "correct" not in unlabelled.columns and "answer_letter" not in unlabelled.columns


def test_a_question_on_several_images_gets_the_same_answers_with_and_without_encode_once(tsv_shards, tmp_path):
    shards, _, _ = tsv_shards
    checkpoint = build_tiny_checkpoint("mllama", tmp_path / "mllama")
    written = {}
    for encode_once in (False, True):
        out = tmp_path / str(encode_once)
        out.mkdir()
        evaluate(
            EvaluateConfig(
                model=str(checkpoint),
                shards=str(shards),
                out=str(out / "predictions.csv"),
                summary=str(out / "metrics.json"),
                scoring="letter",
                encode_once=encode_once,
                device="cpu",
            )
        )
        written[encode_once] = (out / "predictions.csv").read_bytes()
    assert written[True] == written[False]
