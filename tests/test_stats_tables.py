"""Bootstrap intervals, the benchmark tables, the figure and the tables CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medift.stats import bootstrap_ci, bootstrap_mean_ci, paired_bootstrap_diff, paired_bootstrap_mean_diff
from medift.tables import (
    COMPARISON_COLUMNS,
    PredictionError,
    accuracy_table,
    attribute_table,
    attributes_figure,
    comparison_table,
    long_table,
    main,
    parse_comparisons,
    plot_attributes,
    plot_table,
    prediction_files_from_paths,
    read_predictions,
    table_figure,
)
from tests.fixtures.predictions import _write_predictions

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


def test_mean_ci_takes_the_exact_path_for_binary_and_resamples_fractions():
    correct = np.random.default_rng(3).random(200) < 0.7
    assert bootstrap_mean_ci(correct.astype(float), seed=5) == bootstrap_ci(correct, seed=5)
    fractions = np.random.default_rng(4).integers(0, 3, 300) / 2  # two seeds: 0, 0.5 or 1
    lo, hi = bootstrap_mean_ci(fractions, seed=1)
    assert lo < fractions.mean() < hi
    half_width = 1.96 * fractions.std() / np.sqrt(fractions.size)
    assert (hi - lo) / 2 == pytest.approx(half_width, rel=0.15)
    assert (lo, hi) == bootstrap_mean_ci(fractions, seed=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bootstrap_mean_ci(np.array([0.5, 1.5]))


def test_paired_mean_diff_matches_the_binary_paired_bootstrap_and_pairs_fractions():
    rng = np.random.default_rng(1)
    b = rng.random(400) < 0.5
    a = b | (rng.random(400) < 0.3)
    assert paired_bootstrap_mean_diff(a * 1.0, b * 1.0, seed=2) == paired_bootstrap_diff(a, b, seed=2)
    a2, b2 = (a + (rng.random(400) < 0.5)) / 2, (b + (rng.random(400) < 0.5)) / 2
    diff, lo, hi = paired_bootstrap_mean_diff(a2, b2, seed=3)
    assert diff == pytest.approx(a2.mean() - b2.mean())
    assert lo <= diff <= hi
    assert paired_bootstrap_mean_diff(a2, a2.copy()) == (0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- tables


@pytest.fixture
def predictions(tmp_path) -> dict[tuple[str, str, int], Path]:
    """Hand-made results: accuracies base 2/4 and 1/3, ift 3/4 and 3/3."""
    root = tmp_path / "results"
    return {
        ("wbcatt", "base", 1): _write_predictions(root / "wbcatt/base/seed-1/predictions.csv", list("cwcf")),
        ("wbcatt", "ift", 1): _write_predictions(root / "wbcatt/ift/seed-1/predictions.csv", list("cccw")),
        ("skincon", "base", 1): _write_predictions(
            root / "skincon/base/seed-1/predictions.csv", list("cff"), n_options=5
        ),
        ("skincon", "ift", 1): _write_predictions(
            root / "skincon/ift/seed-1/predictions.csv", list("ccc"), n_options=5
        ),
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
        "method",
        "dataset",
        "n",
        "seeds",
        "accuracy",
        "ci_low",
        "ci_high",
        "seed_std",
        "parse_failures",
        "format_retention",
        "chance",
        "circular_accuracy",
        "circular_ci_low",
        "circular_ci_high",
        "description_accuracy",
        "description_ci_low",
        "description_ci_high",
    ]
    assert long["description_accuracy"].isna().all()  # no descriptions given
    row = long.set_index(["method", "dataset"]).loc[("base", "skincon")]
    assert (row["n"], row["seeds"], row["accuracy"]) == (3, 1, 33.33)
    assert np.isnan(row["seed_std"]) and np.isnan(row["circular_accuracy"])
    assert row["parse_failures"] == 2 and row["format_retention"] == 33.33
    assert row["chance"] == 20.0
    assert row["ci_low"] <= row["accuracy"] <= row["ci_high"]
    perfect = long.set_index(["method", "dataset"]).loc[("ift", "skincon")]
    assert (perfect["ci_low"], perfect["ci_high"], perfect["format_retention"]) == (100.0, 100.0, 100.0)


def test_missing_method_dataset_pair_is_an_error(predictions):
    del predictions[("skincon", "ift", 1)]
    with pytest.raises(PredictionError, match="skincon/ift"):
        accuracy_table(predictions, ["base", "ift"], ["wbcatt", "skincon"])


def test_inconsistent_prediction_rows_are_refused(tmp_path):
    path = _write_predictions(tmp_path / "d/m/seed-1/predictions.csv", list("cw"))
    frame = pd.read_csv(path)
    frame.loc[1, "correct"] = 1  # claims a wrong letter is correct
    frame.to_csv(path, index=False)
    with pytest.raises(PredictionError, match="correct disagrees"):
        read_predictions(path)


def test_methods_scored_on_different_questions_are_refused(tmp_path):
    files = {
        ("d", "a", 1): _write_predictions(tmp_path / "d/a/seed-1/predictions.csv", list("cc")),
        ("d", "b", 1): _write_predictions(tmp_path / "d/b/seed-1/predictions.csv", list("ccc")),
    }
    with pytest.raises(PredictionError, match="different questions"):
        accuracy_table(files, ["a", "b"], ["d"])


def test_paths_give_dataset_method_and_seed():
    files = prediction_files_from_paths(["results/wbcatt/ift/seed-3/predictions.csv"])
    assert files == {("wbcatt", "ift", 3): Path("results/wbcatt/ift/seed-3/predictions.csv")}
    with pytest.raises(PredictionError, match="seed"):
        prediction_files_from_paths(["results/wbcatt/ift/predictions.csv"])


def test_seeds_give_the_mean_and_the_spread(tmp_path):
    files = {
        ("d", "m", 1): _write_predictions(tmp_path / "d/m/seed-1/predictions.csv", list("ccww")),  # 50 %
        ("d", "m", 2): _write_predictions(tmp_path / "d/m/seed-2/predictions.csv", list("cccw")),  # 75 %
    }
    assert accuracy_table(files, ["m"], ["d"]).loc["m", "d"] == 62.5
    row = long_table(files, ["m"], ["d"]).iloc[0]
    assert (row["seeds"], row["accuracy"], row["seed_std"]) == (2, 62.5, 17.68)  # sample std of 50 and 75: 25 / sqrt(2)
    assert row["ci_low"] <= 62.5 <= row["ci_high"]


def test_circular_accuracy_needs_every_rotation_right(tmp_path):
    # Three 3-option questions: right in all rotations, right only as written, right in none.
    path = _write_predictions(tmp_path / "d/m/seed-1/predictions.csv", ["ccc", "cww", "www"])
    row = long_table({("d", "m", 1): path}, ["m"], ["d"]).iloc[0]
    assert row["accuracy"] == 66.67  # rotation 0: two of three
    assert row["circular_accuracy"] == 33.33
    assert row["circular_ci_low"] <= 33.33 <= row["circular_ci_high"]


def test_incomplete_rotations_are_refused(tmp_path):
    path = _write_predictions(tmp_path / "d/m/seed-1/predictions.csv", ["ccc", "cc"])
    with pytest.raises(PredictionError, match="incomplete set of option rotations"):
        read_predictions(path)


def test_paired_differences_against_several_baselines(tmp_path):
    files = {
        ("d", "ift", 1): _write_predictions(tmp_path / "d/ift/seed-1/predictions.csv", list("ccccw" * 20)),
        ("d", "base", 1): _write_predictions(tmp_path / "d/base/seed-1/predictions.csv", list("cwcww" * 20)),
        ("d", "other", 1): _write_predictions(tmp_path / "d/other/seed-1/predictions.csv", list("ccccw" * 20)),
    }
    table = comparison_table(files, [("ift", "base"), ("ift", "other")], ["d"])
    assert list(table.columns) == list(COMPARISON_COLUMNS)
    rows = table.set_index("baseline")
    assert (rows.loc["base", "diff"], rows.loc["base", "accuracy"], rows.loc["base", "baseline_accuracy"]) == (
        40.0,
        80.0,
        40.0,
    )
    assert 0 < rows.loc["base", "diff_ci_low"] < 40.0 < rows.loc["base", "diff_ci_high"]
    # The same answers: a difference of exactly 0 in every resample.
    assert rows.loc["other", ["diff", "diff_ci_low", "diff_ci_high"]].tolist() == [0.0, 0.0, 0.0]


def test_comparisons_are_checked_against_the_methods():
    assert parse_comparisons(["ift:base", "ift:other"], ["base", "other", "ift"]) == [("ift", "base"), ("ift", "other")]
    with pytest.raises(ValueError, match="not among --methods"):
        parse_comparisons(["ift:missing"], ["ift", "base"])
    with pytest.raises(ValueError, match="given twice"):
        parse_comparisons(["ift:base", "ift:base"], ["ift", "base"])
    with pytest.raises(ValueError, match="two different methods"):
        parse_comparisons(["ift:ift"], ["ift"])


def test_attribute_table_and_heatmap(tmp_path):
    files = {
        ("d", "m", 1): _write_predictions(
            tmp_path / "d/m/seed-1/predictions.csv", list("cwcc"), attributes=("size", "shape")
        ),
    }
    table = attribute_table(files, ["m"], ["d"]).set_index("attribute")
    assert table.loc["size", "accuracy"] == 100.0 and table.loc["shape", "accuracy"] == 50.0
    assert table.loc["size", "n"] == 2
    figure = attributes_figure(table.reset_index())
    heat = figure.axes[0]
    rows = [t.get_text() for t in heat.get_yticklabels()]
    values = heat.images[0].get_array().tolist()  # one column: method m
    assert dict(zip(rows, values, strict=True)) == {"d: size": [100.0], "d: shape": [50.0]}
    assert [t.get_text() for t in heat.texts] == [f"{v[0]:.0f}" for v in values]
    out = tmp_path / "heat.png"
    plot_attributes(table.reset_index(), out)
    assert out.read_bytes().startswith(b"\x89PNG")


def test_table_figure_draws_every_cell_its_interval_and_the_chance_lines(predictions, tmp_path):
    table = accuracy_table(predictions, ["base", "ift"], ["wbcatt", "skincon"])
    long = long_table(predictions, ["base", "ift"], ["wbcatt", "skincon"]).set_index(["method", "dataset"])
    ax = table_figure(table, long.reset_index()).axes[0]
    from matplotlib.container import BarContainer

    bars = {c.get_label(): c for c in ax.containers if isinstance(c, BarContainer)}
    assert sorted(bars) == ["base", "ift"]
    # Heights: the hand-counted accuracies (base 2/4, 1/3; ift 3/4, 3/3) and their averages.
    assert [round(b.get_height(), 2) for b in bars["base"]] == [50.0, 33.33, 41.67]
    assert [round(b.get_height(), 2) for b in bars["ift"]] == [75.0, 100.0, 87.5]
    # Error bars span each dataset's bootstrap interval; the average has none.
    for method, container in bars.items():
        segments = container.errorbar.lines[2][0].get_segments()
        spans = [(round(seg[0][1], 2), round(seg[1][1], 2)) for seg in segments if len(seg)]  # the average: empty
        expected = [(long.loc[(method, d), "ci_low"], long.loc[(method, d), "ci_high"]) for d in ("wbcatt", "skincon")]
        assert spans == expected
    # Chance: 1/3 on wbcatt (3 options), 1/5 on skincon (5 options), once in the legend.
    error_lines = {id(c.errorbar.lines[2][0]) for c in bars.values()}
    chance = [
        seg[0][1]
        for collection in ax.collections
        if id(collection) not in error_lines
        for seg in collection.get_segments()
    ]
    assert sorted(round(y, 2) for y in chance) == [20.0, 33.33]
    assert ax.get_legend_handles_labels()[1] == ["chance", "base", "ift"]
    out = tmp_path / "fig" / "table1.png"
    plot_table(table, out, long_df=long.reset_index())
    assert out.read_bytes().startswith(b"\x89PNG")
    plain = table_figure(table).axes[0]  # without intervals: no error bars, no chance line
    assert all(c.errorbar is None for c in plain.containers if isinstance(c, BarContainer)) and not plain.collections


def test_cli_end_to_end(predictions, tmp_path, capsys):
    table_csv, long_csv, figure = tmp_path / "out/table1.csv", tmp_path / "out/long.csv", tmp_path / "out/t1.png"
    attributes, heatmap = tmp_path / "out/attr.csv", tmp_path / "out/attr.png"
    argv = [
        "--predictions",
        *map(str, predictions.values()),
        "--methods",
        "base",
        "ift",
        "--datasets",
        "wbcatt",
        "skincon",
        "--table",
        str(table_csv),
        "--long",
        str(long_csv),
        "--figure",
        str(figure),
        "--attributes",
        str(attributes),
        "--heatmap",
        str(heatmap),
        "--compare",
        "ift:base",
        "--comparisons",
        str(tmp_path / "out/comparisons.csv"),
    ]
    assert main(argv) == 0
    table = pd.read_csv(table_csv, index_col="method")
    assert table.loc["ift", "average"] == 87.5 and table.loc["base", "skincon"] == 33.33
    long = pd.read_csv(long_csv)
    assert len(long) == 4 and set(long["dataset"]) == {"wbcatt", "skincon"}
    compared = pd.read_csv(tmp_path / "out/comparisons.csv")
    assert list(compared["diff"]) == [25.0, 66.67] and set(compared["baseline"]) == {"base"}
    assert len(pd.read_csv(attributes)) == 4
    assert figure.read_bytes().startswith(b"\x89PNG") and heatmap.read_bytes().startswith(b"\x89PNG")
    assert "wrote" in capsys.readouterr().out

    with pytest.raises(PredictionError, match="wbcatt/other"):
        main(argv[: argv.index("--datasets")] + ["other"] + argv[argv.index("--datasets") :])


def test_description_accuracy_averages_each_image_over_the_seeds(predictions, tmp_path):
    from medift.tables import add_description_accuracy

    long = long_table(predictions, ["base", "ift"], ["wbcatt", "skincon"])
    files = {}
    for seed, found in ((1, [{"a": 1, "b": 1}, {"a": 0}]), (2, [{"a": 1, "b": 0}, {"a": 0}])):
        path = tmp_path / "wbcatt" / "ift" / f"seed-{seed}" / "descriptions.csv"
        path.parent.mkdir(parents=True)
        pd.DataFrame({"image_id": ["x", "y"], "generated": ["", ""], "found": [json.dumps(f) for f in found]}).to_csv(
            path, index=False
        )
        files["wbcatt", "ift", seed] = path
    filled = add_description_accuracy(long, files, n_boot=200, seed=0).set_index(["method", "dataset"])
    # image x: 1.0 and 0.5 over the seeds -> 0.75; image y: 0 -> mean 37.5 %.
    assert filled.loc[("ift", "wbcatt"), "description_accuracy"] == 37.5
    assert (
        filled.loc[("ift", "wbcatt"), "description_ci_low"]
        <= 37.5
        <= filled.loc[("ift", "wbcatt"), "description_ci_high"]
    )
    assert filled.drop(index=("ift", "wbcatt"))["description_accuracy"].isna().all()
