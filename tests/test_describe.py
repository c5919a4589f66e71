"""Description accuracy: phrase matching, the per-image summary, and a real run on a tiny checkpoint."""

from __future__ import annotations

import json

import pandas as pd

from medift.datasets import cbis_ddsm, mimic_cxr, skincon, wbcatt
from medift.describe import DescribeConfig, phrase_found, run, summarize


def test_a_phrase_counts_only_as_whole_words_case_and_spacing_aside():
    assert phrase_found("large cell size", "A  Large cell size, round nucleus")
    assert not phrase_found("large cell size", "very large cell sizes")
    assert not phrase_found("round", "rounded nucleus")
    assert not phrase_found("oval nucleus shape", "oval cell shape")


def test_the_adapters_phrases_make_their_descriptions():
    cell = {
        "cell_size": "big",
        "cell_shape": "round",
        "nucleus_shape": "segmented-bilobed",
        "nuclear_cytoplasmic_ratio": "low",
        "chromatin_density": "densely",
        "cytoplasm_vacuole": "no",
        "cytoplasm_texture": "clear",
        "cytoplasm_colour": "light blue",
        "granule_type": "small",
        "granule_colour": "pink",
        "granularity": "yes",
        "label": "Neutrophil",
    }
    found = wbcatt.phrases(cell)
    assert wbcatt.describe(cell) == ", ".join(found.values())
    assert "cytoplasm_vacuole" not in found and found["granularity"] == "granularity" and found["label"] == "Neutrophil"
    lesion = {"mass_shape": "oval", "mass_margins": "circumscribed", "abnormality_type": "mass", "pathology": "benign"}
    assert cbis_ddsm.describe(lesion) == ", ".join(cbis_ddsm.phrases(lesion).values())
    assert list(skincon.phrases({skincon.KEY: "papule, erythema"})) == ["papule", "erythema"]
    assert mimic_cxr.phrases({mimic_cxr.REPORT_KEY: "No acute process."}) == {}


def test_summary_weighs_every_image_the_same_and_reports_each_attribute():
    frame = pd.DataFrame(
        {
            "image_id": ["a", "b"],
            "generated": ["", ""],
            "found": [json.dumps({"x": 1, "y": 1, "z": 0, "w": 0}), json.dumps({"x": 0})],
        }
    )
    summary = summarize(frame, n_boot=200)
    assert summary["description_accuracy"] == 25.0  # (2/4 + 0/1) / 2, not 2/5
    assert summary["phrases"] == 5 and summary["per_attribute"]["x"]["accuracy"] == 50.0
    assert summary["ci_low"] <= 25.0 <= summary["ci_high"]
    free_text = summarize(pd.DataFrame({"image_id": ["a"], "generated": [""], "found": ["{}"]}))
    assert free_text["description_accuracy"] is None and "free text" in free_text["reason"]


def test_a_tiny_checkpoint_describes_every_test_image(tmp_path, tiny_wbcatt_shards):
    from medift.shards import load_descriptions
    from medift.testing.tiny_checkpoints import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint("qwen2_vl", tmp_path / "qwen2_vl")
    summary = run(
        DescribeConfig(
            model=str(checkpoint),
            shards=str(tiny_wbcatt_shards),
            adapter="wbcatt",
            out=str(tmp_path / "descriptions.csv"),
            summary=str(tmp_path / "metrics.json"),
            max_new_tokens=8,
        )
    )
    written = pd.read_csv(tmp_path / "descriptions.csv", keep_default_na=False)
    reference = load_descriptions(tiny_wbcatt_shards, "test")
    assert list(written["image_id"]) == list(reference["image_id"])  # every image, in order: nothing dropped
    expected = [list(wbcatt.phrases(json.loads(a))) for a in reference["attributes"]]
    assert [sorted(json.loads(f)) for f in written["found"]] == [sorted(e) for e in expected]
    assert summary["phrases"] == sum(len(e) for e in expected) and 0 <= summary["description_accuracy"] <= 100
    assert json.loads((tmp_path / "metrics.json").read_text())["images"] == len(reference)
