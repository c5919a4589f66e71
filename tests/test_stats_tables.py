"""Bootstrap intervals, the benchmark tables, the figure and the tables CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medift.mcq import LETTERS
from medift.stats import bootstrap_ci, paired_bootstrap_diff
from medift.tables import (
    PredictionError,
    accuracy_table,
    long_table,
    main,
    plot_table,
    prediction_files_from_paths,
    read_predictions,
)

# ----------------------------------------------------------------------------- stats


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    correct = np.random.default_rng(3).random(200) < 0.7
    lo, hi = bootstrap_ci(correct, seed=5)
    assert 0.0 <= lo <= correct.mean() <= hi <= 1.0
    assert lo < hi
    assert (lo, hi) == bootstrap_ci(correct, seed=5)
    assert bootstrap_ci(correct.astype(int), seed=5) == (lo, hi)


def test_bootstrap_ci_narrows_with_more_questions():
    small = np.array([True, False] * 20)
    large = np.array([True, False] * 2000)
    width_small = np.subtract(*bootstrap_ci(small)[::-1])
    width_large = np.subtract(*bootstrap_ci(large)[::-1])
    assert width_large < width_small / 5


def test_bootstrap_ci_matches_the_normal_approximation():
    correct = np.array([True] * 600 + [False] * 400)
    lo, hi = bootstrap_ci(correct, n_boot=20000)
    half_width = 1.96 * np.sqrt(0.6 * 0.4 / 1000)
    assert lo == pytest.approx(0.6 - half_width, abs=0.005)
    assert hi == pytest.approx(0.6 + half_width, abs=0.005)


def test_bootstrap_ci_all_correct_is_degenerate():
    assert bootstrap_ci(np.ones(30, dtype=bool)) == (1.0, 1.0)


def test_bootstrap_rejects_empty_or_non_binary():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci(np.array([], dtype=bool))
    with pytest.raises(ValueError, match="0/1"):
        bootstrap_ci(np.array([0, 2, 1]))


def test_paired_diff_of_identical_vectors_is_exactly_zero():
    correct = np.random.default_rng(0).random(100) < 0.5
    assert paired_bootstrap_diff(correct, correct.copy()) == (0.0, 0.0, 0.0)


def test_paired_diff_estimate_interval_and_determinism():
    rng = np.random.default_rng(1)
    b = rng.random(500) < 0.5
    a = b | (rng.random(500) < 0.3)  # A right wherever B is, and more
    diff, lo, hi = paired_bootstrap_diff(a, b, seed=2)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert 0.0 < lo <= diff <= hi
    assert (diff, lo, hi) == paired_bootstrap_diff(a, b, seed=2)
    flipped = paired_bootstrap_diff(b, a, seed=2)
    assert flipped[0] == -diff
    with pytest.raises(ValueError, match="length"):
        paired_bootstrap_diff(a, b[:-1])


# ----------------------------------------------------------------------------- tables


def _write_predictions(path: Path, outcomes: list[str], n_options: int = 3) -> Path:
    """One question per outcome: 'c' correct, 'w' wrong letter, 'f' unparseable output."""
    rows = []
    for i, outcome in enumerate(outcomes):
        answer = i % n_options
        answer_letter = LETTERS[answer]
        parsed = {"c": answer_letter, "w": LETTERS[(answer + 1) % n_options], "f": ""}[outcome]
        rows.append(
            {
                "question_id": f"img{i}:size",
                "image_id": f"img{i}",
                "attribute": "size",
                "question": "What is the size?",
                "options": json.dumps([f"opt{k}" for k in range(n_options)]),
                "answer_index": answer,
                "answer_letter": answer_letter,
                "raw_output": f"The correct answer is {parsed}." if parsed else "I think it is big",
                "parsed_letter": parsed,
                "correct": int(outcome == "c"),
                "parse_failed": int(outcome == "f"),
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def predictions(tmp_path) -> dict[tuple[str, str], Path]:
    """Hand-made results: accuracies base 2/4 and 1/3, ift 3/4 and 3/3."""
    root = tmp_path / "results"
    return {
        ("wbcatt", "base"): _write_predictions(root / "wbcatt/base/predictions.csv", list("cwcf")),
        ("wbcatt", "ift"): _write_predictions(root / "wbcatt/ift/predictions.csv", list("cccw")),
        ("skincon", "base"): _write_predictions(root / "skincon/base/predictions.csv", list("cff"), n_options=5),
        ("skincon", "ift"): _write_predictions(root / "skincon/ift/predictions.csv", list("ccc"), n_options=5),
    }


def test_accuracy_table_values(predictions):
    table = accuracy_table(predictions, ["base", "ift"], ["wbcatt", "skincon"])
    assert table.index.name == "method"
    assert list(table.index) == ["base", "ift"]
    assert list(table.columns) == ["wbcatt", "skincon", "average"]
    assert table.loc["base"].tolist() == [50.0, 33.33, 41.67]
    assert table.loc["ift"].tolist() == [75.0, 100.0, 87.5]


def test_long_table_values(predictions):
    long = long_table(predictions, ["base", "ift"], ["wbcatt", "skincon"])
    assert list(long.columns) == [
        "method", "dataset", "n", "correct", "accuracy", "ci_low", "ci_high",
        "parse_failures", "format_retention", "chance",
    ]
    row = long.set_index(["method", "dataset"]).loc[("base", "skincon")]
    assert (row["n"], row["correct"], row["accuracy"]) == (3, 1, 33.33)
    assert row["parse_failures"] == 2 and row["format_retention"] == 33.33
    assert row["chance"] == 20.0
    assert row["ci_low"] <= row["accuracy"] <= row["ci_high"]
    perfect = long.set_index(["method", "dataset"]).loc[("ift", "skincon")]
    assert (perfect["ci_low"], perfect["ci_high"], perfect["format_retention"]) == (100.0, 100.0, 100.0)


def test_missing_method_dataset_pair_is_an_error(predictions):
    del predictions[("skincon", "ift")]
    with pytest.raises(PredictionError, match="skincon/ift"):
        accuracy_table(predictions, ["base", "ift"], ["wbcatt", "skincon"])


def test_inconsistent_prediction_rows_are_refused(tmp_path):
    path = _write_predictions(tmp_path / "d/m/predictions.csv", list("cw"))
    frame = pd.read_csv(path)
    frame.loc[1, "correct"] = 1  # claims a wrong letter is correct
    frame.to_csv(path, index=False)
    with pytest.raises(PredictionError, match="correct disagrees"):
        read_predictions(path)


def test_methods_scored_on_different_questions_are_refused(tmp_path):
    files = {
        ("d", "a"): _write_predictions(tmp_path / "d/a/predictions.csv", list("cc")),
        ("d", "b"): _write_predictions(tmp_path / "d/b/predictions.csv", list("ccc")),
    }
    with pytest.raises(PredictionError, match="different questions"):
        accuracy_table(files, ["a", "b"], ["d"])


def test_paths_give_dataset_and_method():
    files = prediction_files_from_paths(["results/wbcatt/ift/predictions.csv"])
    assert files == {("wbcatt", "ift"): Path("results/wbcatt/ift/predictions.csv")}


def test_plot_table_writes_png(predictions, tmp_path):
    table = accuracy_table(predictions, ["base", "ift"], ["wbcatt", "skincon"])
    long = long_table(predictions, ["base", "ift"], ["wbcatt", "skincon"])
    out = tmp_path / "fig" / "table1.png"
    plot_table(table, out, long_df=long)
    assert out.read_bytes().startswith(b"\x89PNG")
    plot_table(table, tmp_path / "plain.png")  # without intervals too


def test_cli_end_to_end(predictions, tmp_path, capsys):
    table_csv, long_csv, figure = tmp_path / "out/table1.csv", tmp_path / "out/long.csv", tmp_path / "out/t1.png"
    argv = ["--predictions", *map(str, predictions.values()), "--methods", "base", "ift",
            "--datasets", "wbcatt", "skincon", "--table", str(table_csv), "--long", str(long_csv),
            "--figure", str(figure)]
    assert main(argv) == 0
    table = pd.read_csv(table_csv, index_col="method")
    assert table.loc["ift", "average"] == 87.5 and table.loc["base", "skincon"] == 33.33
    long = pd.read_csv(long_csv)
    assert len(long) == 4 and set(long["dataset"]) == {"wbcatt", "skincon"}
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert "wrote" in capsys.readouterr().out

    with pytest.raises(PredictionError, match="wbcatt/other"):
        main(argv[:argv.index("--datasets")] + ["other"] + argv[argv.index("--datasets"):])
