"""Benchmark tables from per-(dataset, method, seed) prediction files.

Input: `results/<dataset>/<method>/seed-<seed>/predictions.csv`, one row per asked prompt,
with columns PREDICTION_COLUMNS. Rotation 0 is the question as written; rotations 1..n-1
(circular evaluation) ask the same question with its options rotated. Every question
counts: an unparseable answer is wrong (correct=0) and is also reported as a parse failure,
never dropped from the denominator.

Per (dataset, method) the seeds' results are combined: a question's score is the fraction
of seeds that answered it right, the accuracy is the mean over questions (equal to the mean
of the seeds' accuracies), and `seed_std` is the spread of the seeds' accuracies. Every
metric is computed by `medift.metrics` (as a fraction) and shown here in percent.

Outputs:
- table 1 (`accuracy_table`): one row per method, one column per dataset plus `average`
  (mean of the dataset accuracies, unweighted, computed before rounding), accuracy in percent
  rounded to 2 decimals;
- the long table (`long_table`): one row per (method, dataset) with LONG_COLUMNS: n, seeds,
  accuracy with its 95% bootstrap interval and seed spread, parse failures, format retention,
  chance, circular accuracy with its interval, description accuracy with its interval;
- the comparison table (`comparison_table`): for each configured (method, baseline) pair and
  dataset, the paired bootstrap difference of their accuracies on the same questions (a
  method may be compared with several baselines, e.g. ift with zero_shot and caption_ft);
- the per-attribute table (`attribute_table`): accuracy per (method, dataset, attribute);
- figures: a grouped bar chart of table 1 with intervals, a per-attribute heat map.

CLI:
    python -m medift.tables --predictions results/*/*/seed-*/predictions.csv \
        --methods base ift --datasets wbcatt cbis_ddsm --table t1.csv --long t1_long.csv \
        [--attributes t1_attributes.csv] [--figure t1.png] [--heatmap t1_attributes.png] \
        [--compare ift:base ift:caption_ft --comparisons t1_comparisons.csv]
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from medift import metrics
from medift.mcq import LETTERS
from medift.stats import bootstrap_mean_ci, paired_bootstrap_mean_diff

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = (
    "question_id",
    "image_id",
    "attribute",
    "question",
    "options",
    "answer_index",
    "answer_letter",
    "rotation",
    "raw_output",
    "parsed_letter",
    "correct",
    "parse_failed",
)
LONG_COLUMNS = (
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
)
COMPARISON_COLUMNS = (
    "method",
    "baseline",
    "dataset",
    "n",
    "seeds",
    "accuracy",
    "baseline_accuracy",
    "diff",
    "diff_ci_low",
    "diff_ci_high",
)
ATTRIBUTE_COLUMNS = ("method", "dataset", "attribute", "n", "accuracy", "ci_low", "ci_high")
AVERAGE = "average"

# (dataset, method, seed) -> predictions.csv
PredictionFiles = Mapping[tuple[str, str, int], "str | Path"]


class PredictionError(ValueError):
    """A predictions file is missing, malformed or inconsistent; the message names it."""


# --------------------------------------------------------------------------- reading


def _binary_column(frame: pd.DataFrame, column: str, path: Path) -> pd.Series:
    values = pd.to_numeric(frame[column], errors="coerce")
    if values.isna().any() or not values.isin((0, 1)).all():
        raise PredictionError(f"{path}: column {column!r} must hold only 0/1")
    return values.astype(int)


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Read and check one predictions.csv; `correct`/`parse_failed`/`answer_index` become ints.

    The checks make a scoring bug fail loudly here rather than skew a table: every row's
    `correct` must agree with its parsed and true letters, and a parse failure must be wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise PredictionError(f"predictions file not found: {path}")
    # Everything as text, and no NA guessing: "None" or "NA" can be a real model output.
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in PREDICTION_COLUMNS if column not in frame.columns]
    if missing:
        raise PredictionError(f"{path}: missing columns {missing}")
    if frame.empty:
        raise PredictionError(f"{path}: no predictions")
    frame["rotation"] = pd.to_numeric(frame["rotation"], errors="raise").astype(int)
    duplicated = frame.duplicated(["question_id", "rotation"])
    if duplicated.any():
        row = frame[duplicated].iloc[0]
        raise PredictionError(f"{path}: question_id {row['question_id']!r} rotation {row['rotation']} appears twice")

    frame["correct"] = _binary_column(frame, "correct", path)
    frame["parse_failed"] = _binary_column(frame, "parse_failed", path)
    frame["answer_index"] = pd.to_numeric(frame["answer_index"], errors="raise").astype(int)
    frame["n_options"] = [len(json.loads(options)) for options in frame["options"]]

    if not ((frame["answer_index"] >= 0) & (frame["answer_index"] < frame["n_options"])).all():
        raise PredictionError(f"{path}: answer_index outside the options of its question")
    expected_letter = [LETTERS[i] for i in frame["answer_index"]]
    if list(frame["answer_letter"]) != expected_letter:
        raise PredictionError(f"{path}: answer_letter disagrees with answer_index")
    parsed = frame["parsed_letter"].str.strip()
    if not ((parsed == "") == (frame["parse_failed"] == 1)).all():
        raise PredictionError(f"{path}: parse_failed must be 1 exactly when parsed_letter is empty")
    if not ((parsed == frame["answer_letter"]).astype(int) == frame["correct"]).all():
        raise PredictionError(f"{path}: correct disagrees with parsed_letter == answer_letter")
    _check_rotations(frame, path)
    return frame


def _check_rotations(frame: pd.DataFrame, path: Path) -> None:
    """Every question has rotation 0; a circularly evaluated one has all n rotations."""
    rotations = frame.groupby("question_id")["rotation"].agg(["min", "max", "count"])
    n_options = frame.groupby("question_id")["n_options"].first()
    plain = (rotations["max"] == 0) & (rotations["count"] == 1)
    full = (rotations["min"] == 0) & (rotations["max"] == n_options - 1) & (rotations["count"] == n_options)
    if not (plain | full).all():
        bad = rotations.index[~(plain | full)][0]
        raise PredictionError(f"{path}: question_id {bad!r} has an incomplete set of option rotations")
    if plain.any() and full.any():
        raise PredictionError(f"{path}: some questions were asked circularly and some not")


Frames = dict[tuple[str, str], dict[int, pd.DataFrame]]  # (dataset, method) -> {seed: frame}


def _load_requested(pred_files: PredictionFiles, methods: Sequence[str], datasets: Sequence[str]) -> Frames:
    """Read every seed of every requested (dataset, method); all must answer the same questions."""
    frames: Frames = {}
    for (dataset, method, seed), path in sorted(pred_files.items()):
        if dataset in datasets and method in methods:
            frames.setdefault((dataset, method), {})[seed] = read_predictions(path)
    missing = [(d, m) for m in methods for d in datasets if (d, m) not in frames]
    if missing:
        listed = ", ".join(f"{d}/{m}" for d, m in missing)
        raise PredictionError(f"no predictions for (dataset/method): {listed}")
    for dataset in datasets:
        # A method or seed scored on other (or fewer) questions is not comparable in one table.
        reference_key = (dataset, methods[0], min(frames[dataset, methods[0]]))
        reference = _question_set(frames[dataset, methods[0]][reference_key[2]])
        for method in methods:
            for seed, frame in frames[dataset, method].items():
                if _question_set(frame) != reference:
                    raise PredictionError(
                        f"{dataset}: {method} (seed {seed}) and {methods[0]} (seed {reference_key[2]}) "
                        f"were scored on different questions ({pred_files[dataset, method, seed]} "
                        f"vs {pred_files[reference_key]})"
                    )
    return frames


def _question_set(frame: pd.DataFrame) -> set[tuple[str, int]]:
    return set(zip(frame["question_id"], frame["rotation"]))


def scored_questions(seed_frames: Mapping[int, pd.DataFrame], circular: bool = False) -> pd.DataFrame:
    """Per question (index question_id, sorted): its score (`metrics.question_scores`: the
    fraction of seeds right, as written or, `circular`, in every rotation), and its attribute."""
    first = next(iter(seed_frames.values()))
    plain = first[first["rotation"] == 0].set_index("question_id").sort_index()
    return pd.DataFrame(
        {
            "score": metrics.question_scores(list(seed_frames.values()), circular=circular),
            "attribute": plain["attribute"],
            "n_options": plain["n_options"],
        }
    )


# --------------------------------------------------------------------------- tables

# Every metric comes from medift.metrics as a fraction; `metrics.percent` turns it into the
# CSVs' percent. Table 1's average and the seed spread are taken of the unrounded percents.


def _accuracy_from_frames(frames: Frames, methods: Sequence[str], datasets: Sequence[str]) -> pd.DataFrame:
    accuracy = pd.DataFrame(
        [[100.0 * metrics.accuracy(list(frames[d, m].values())) for d in datasets] for m in methods],
        index=pd.Index(list(methods), name="method"),
        columns=list(datasets),
    )
    accuracy[AVERAGE] = accuracy[list(datasets)].mean(axis=1)
    return accuracy.round(2)


def _seed_spread(seed_frames: Mapping[int, pd.DataFrame]) -> float:
    """Sample standard deviation of the seeds' accuracies (percent); NaN for one seed."""
    accuracies = [100.0 * metrics.accuracy(f) for f in seed_frames.values()]
    return round(float(np.std(accuracies, ddof=1)), 2) if len(accuracies) > 1 else float("nan")


def _long_from_frames(
    frames: Frames,
    methods: Sequence[str],
    datasets: Sequence[str],
    n_boot: int,
    seed: int,
) -> pd.DataFrame:
    rows = []
    for method in methods:
        for dataset in datasets:
            seed_frames = frames[dataset, method]
            seeds = list(seed_frames.values())
            scores = scored_questions(seed_frames)
            n = len(scores)
            low, high = bootstrap_mean_ci(scores["score"].to_numpy(), n_boot=n_boot, seed=seed)
            row = {
                "method": method,
                "dataset": dataset,
                "n": n,
                "seeds": len(seed_frames),
                "accuracy": metrics.percent(metrics.accuracy(seeds)),
                "ci_low": metrics.percent(low),
                "ci_high": metrics.percent(high),
                "seed_std": _seed_spread(seed_frames),
                # Summed over seeds, out of n x seeds answers.
                "parse_failures": metrics.parse_failures(seeds),
                "format_retention": metrics.percent(metrics.format_retention(seeds)),
                # Expected accuracy of a uniform guess over each question's own options.
                "chance": metrics.percent(np.mean(1.0 / scores["n_options"].to_numpy())),
            }
            if metrics.is_circular(seeds):
                circular = scored_questions(seed_frames, circular=True)["score"].to_numpy()
                c_low, c_high = bootstrap_mean_ci(circular, n_boot=n_boot, seed=seed)
                row.update(
                    circular_accuracy=metrics.percent(metrics.circular_accuracy(seeds)),
                    circular_ci_low=metrics.percent(c_low),
                    circular_ci_high=metrics.percent(c_high),
                )
            rows.append(row)
    return pd.DataFrame(rows, columns=list(LONG_COLUMNS))


def _comparisons_from_frames(
    frames: Frames, pairs: Sequence[tuple[str, str]], datasets: Sequence[str], n_boot: int, seed: int
) -> pd.DataFrame:
    """Per (method, baseline, dataset): both accuracies and the paired bootstrap difference
    (method - baseline, percentage points) on the same questions, each question's score
    being its fraction of seeds answered right."""
    rows = []
    for method, baseline in pairs:
        for dataset in datasets:
            scores = scored_questions(frames[dataset, method])["score"]
            other = scored_questions(frames[dataset, baseline])["score"].loc[scores.index]
            diff, low, high = paired_bootstrap_mean_diff(scores.to_numpy(), other.to_numpy(), n_boot=n_boot, seed=seed)
            rows.append(
                {
                    "method": method,
                    "baseline": baseline,
                    "dataset": dataset,
                    "n": len(scores),
                    "seeds": len(frames[dataset, method]),
                    "accuracy": metrics.percent(metrics.accuracy(list(frames[dataset, method].values()))),
                    "baseline_accuracy": metrics.percent(metrics.accuracy(list(frames[dataset, baseline].values()))),
                    "diff": metrics.percent(diff),
                    "diff_ci_low": metrics.percent(low),
                    "diff_ci_high": metrics.percent(high),
                }
            )
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def _attributes_from_frames(
    frames: Frames, methods: Sequence[str], datasets: Sequence[str], n_boot: int, seed: int
) -> pd.DataFrame:
    rows = []
    for dataset in datasets:
        for method in methods:
            seed_frames = frames[dataset, method]
            scores = scored_questions(seed_frames)
            for attribute, group in scores.groupby("attribute", sort=True):
                low, high = bootstrap_mean_ci(group["score"].to_numpy(), n_boot=n_boot, seed=seed)
                asked = [frame[frame["attribute"] == attribute] for frame in seed_frames.values()]
                rows.append(
                    {
                        "method": method,
                        "dataset": dataset,
                        "attribute": attribute,
                        "n": len(group),
                        "accuracy": metrics.percent(metrics.accuracy(asked)),
                        "ci_low": metrics.percent(low),
                        "ci_high": metrics.percent(high),
                    }
                )
    return pd.DataFrame(rows, columns=list(ATTRIBUTE_COLUMNS))


def accuracy_table(pred_files: PredictionFiles, methods: Sequence[str], datasets: Sequence[str]) -> pd.DataFrame:
    """Table 1: rows = methods (index `method`), columns = datasets + `average`, percent, 2 dp."""
    frames = _load_requested(pred_files, methods, datasets)
    return _accuracy_from_frames(frames, methods, datasets)


def long_table(
    pred_files: PredictionFiles,
    methods: Sequence[str],
    datasets: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (method, dataset): LONG_COLUMNS; percentages rounded to 2 decimals."""
    frames = _load_requested(pred_files, methods, datasets)
    return _long_from_frames(frames, methods, datasets, n_boot, seed)


def comparison_table(
    pred_files: PredictionFiles,
    pairs: Sequence[tuple[str, str]],
    datasets: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (method, baseline) pair and dataset: COMPARISON_COLUMNS (percent, 2 dp)."""
    methods = list(dict.fromkeys(m for pair in pairs for m in pair))
    frames = _load_requested(pred_files, methods, datasets)
    return _comparisons_from_frames(frames, pairs, datasets, n_boot, seed)


def attribute_table(
    pred_files: PredictionFiles, methods: Sequence[str], datasets: Sequence[str], n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Accuracy per (method, dataset, attribute) with its bootstrap interval, percent."""
    frames = _load_requested(pred_files, methods, datasets)
    return _attributes_from_frames(frames, methods, datasets, n_boot, seed)


# --------------------------------------------------------------------------- figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str | Path) -> None:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=150)
    _pyplot().close(fig)


def plot_table(
    table_df: pd.DataFrame, out_png: str | Path, long_df: pd.DataFrame | None = None, show_chance: bool = True
) -> None:
    """table_figure, written to out_png."""
    _save(table_figure(table_df, long_df, show_chance), out_png)


def table_figure(table_df: pd.DataFrame, long_df: pd.DataFrame | None = None, show_chance: bool = True):
    """Grouped bar chart of table 1: one group per dataset (+ average), one bar per method.

    With `long_df`, dataset bars get the bootstrap interval as error bars and (if
    `show_chance`) a dashed chance line per dataset. The average has no interval.
    """
    plt = _pyplot()

    methods = list(table_df.index)
    groups = list(table_df.columns)
    n_methods = len(methods)
    bar_width = 0.8 / max(n_methods, 1)
    positions = np.arange(len(groups), dtype=float)
    intervals = long_df.set_index(["method", "dataset"]) if long_df is not None else None

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.55 * len(groups) * max(n_methods, 2)), 4.5))
    colours = plt.get_cmap("tab10")
    for i, method in enumerate(methods):
        values = table_df.loc[method, groups].to_numpy(dtype=float)
        x = positions - 0.4 + bar_width * (i + 0.5)
        # NaN draws no error bar: the average and any group without an interval get none.
        errors = np.full((2, len(groups)), np.nan)
        if intervals is not None:
            for j, group in enumerate(groups):
                if (method, group) in intervals.index:
                    row = intervals.loc[(method, group)]
                    errors[:, j] = [
                        max(0.0, row["accuracy"] - row["ci_low"]),
                        max(0.0, row["ci_high"] - row["accuracy"]),
                    ]
        bars = ax.bar(
            x,
            values,
            bar_width,
            label=method,
            color=colours(i % 10),
            yerr=errors if intervals is not None else None,
            capsize=3,
            error_kw={"elinewidth": 1},
        )
        if len(groups) * n_methods <= 40:  # value labels only while they stay legible
            # Inside the bar, so they never collide with the error bars above it.
            ax.bar_label(
                bars,
                labels=[f"{v:.1f}" for v in values],
                label_type="center",
                fontsize=7,
                color="white",
                rotation=90 if n_methods > 3 else 0,
            )

    if intervals is not None and show_chance and "chance" in long_df.columns:
        chance = long_df.groupby("dataset")["chance"].first()
        labelled = False
        for j, group in enumerate(groups):
            if group in chance.index:
                ax.hlines(
                    chance[group],
                    positions[j] - 0.45,
                    positions[j] + 0.45,
                    colors="grey",
                    linestyles="dashed",
                    linewidth=1,
                    label=None if labelled else "chance",
                )
                labelled = True

    ax.set_xticks(positions)
    crowded = len(groups) > 6
    ax.set_xticklabels(groups, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel("Accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Multiple-choice accuracy" + (" (95% bootstrap CI)" if intervals is not None else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def plot_attributes(attributes_df: pd.DataFrame, out_png: str | Path) -> None:
    """attributes_figure, written to out_png."""
    _save(attributes_figure(attributes_df), out_png)


def attributes_figure(attributes_df: pd.DataFrame):
    """Heat map of per-attribute accuracy: one row per dataset/attribute, one column per method."""
    plt = _pyplot()

    grid = attributes_df.pivot_table(index=["dataset", "attribute"], columns="method", values="accuracy", sort=False)
    grid = grid[list(dict.fromkeys(attributes_df["method"]))]
    fig, ax = plt.subplots(figsize=(2.0 + 1.1 * grid.shape[1], 1.0 + 0.35 * grid.shape[0]))
    image = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=30, ha="right")
    ax.set_yticks(range(grid.shape[0]), [f"{d}: {a}" for d, a in grid.index], fontsize=8)
    for (i, j), value in np.ndenumerate(grid.to_numpy(dtype=float)):
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7, color="white" if value < 60 else "black")
    fig.colorbar(image, ax=ax, label="Accuracy (%)")
    ax.set_title("Accuracy per attribute")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- CLI


@dataclass
class TablesArguments:
    predictions: list[str] = field(
        metadata={"help": "predictions.csv files, each at .../<dataset>/<method>/seed-<seed>/predictions.csv"}
    )
    methods: list[str] = field(metadata={"help": "methods, in table row order"})
    datasets: list[str] = field(metadata={"help": "datasets, in table column order"})
    table: str = field(metadata={"help": "output CSV of table 1 (accuracy in percent; methods x datasets + average)"})
    long: str = field(metadata={"help": "output CSV of the long table (one row per method and dataset)"})
    attributes: str | None = field(default=None, metadata={"help": "optional output CSV of per-attribute accuracy"})
    figure: str | None = field(default=None, metadata={"help": "optional output PNG of the grouped bar chart"})
    descriptions: list[str] = field(
        default_factory=list,
        metadata={
            "help": "descriptions.csv files (medift.describe), each at .../<dataset>/<method>/seed-<seed>/: "
            "description accuracy in the long table"
        },
    )
    metrics_figure: str | None = field(
        default=None,
        metadata={
            "help": "optional output PNG: accuracy, format retention and description accuracy per method and dataset"
        },
    )
    heatmap: str | None = field(default=None, metadata={"help": "optional output PNG of the per-attribute heat map"})
    compare: list[str] = field(
        default_factory=list,
        metadata={
            "help": (
                "method:baseline pairs (both among --methods) whose paired bootstrap difference goes in --comparisons"
            )
        },
    )
    comparisons: str | None = field(
        default=None, metadata={"help": "output CSV of the paired comparisons (needed with --compare)"}
    )
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples for the intervals"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})
    costs: list[str] = field(
        default_factory=list,
        metadata={
            "help": (
                "method:dataset:seed:file entries: the train_summary.json of each trained (method, seed, dataset) "
                "and of the methods it starts from, and the manifests of their generated data (--data)"
            )
        },
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "optional output CSV: accuracy beside the training data and compute each method used (--costs)"
        },
    )


_SEED_DIR = re.compile(r"seed-(\d+)")


def add_description_accuracy(
    long: pd.DataFrame, description_files: Mapping[tuple[str, str, int], Path], n_boot: int, seed: int
) -> pd.DataFrame:
    """Fill the long table's description columns: per (method, dataset), each image's found
    fraction averaged over the seeds, then the mean over images with its bootstrap interval
    (resampling images). A (method, dataset) with no descriptions file, or whose descriptions
    have no attribute phrases (free-text reports), stays empty."""
    long = long.copy()
    for index, row in long.iterrows():
        per_seed = [
            pd.read_csv(path, keep_default_na=False)
            for (dataset, method, _), path in sorted(description_files.items())
            if dataset == row["dataset"] and method == row["method"]
        ]
        if not per_seed:
            continue
        accuracy = metrics.description_accuracy(per_seed)
        if accuracy is None:
            continue
        low, high = bootstrap_mean_ci(metrics.description_scores(per_seed).to_numpy(), n_boot=n_boot, seed=seed)
        long.loc[index, ["description_accuracy", "description_ci_low", "description_ci_high"]] = [
            metrics.percent(accuracy),
            metrics.percent(low),
            metrics.percent(high),
        ]
    return long


def plot_metrics(long_df: pd.DataFrame, out_png: str | Path) -> None:
    """One panel per dataset: per method, MCQ accuracy, format retention and description
    accuracy side by side (intervals where the long table has them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("accuracy", "ci_low", "ci_high", "MCQ accuracy"),
        ("format_retention", None, None, "format retention"),
        ("description_accuracy", "description_ci_low", "description_ci_high", "description accuracy"),
    ]
    datasets = list(dict.fromkeys(long_df["dataset"]))
    methods = list(dict.fromkeys(long_df["method"]))
    fig, axes = plt.subplots(
        1, len(datasets), figsize=(max(4.5, 1.4 * len(methods) + 1.5) * len(datasets), 4.2), squeeze=False
    )
    colours = plt.get_cmap("Set2")
    width = 0.8 / len(metrics)
    for ax, dataset in zip(axes[0], datasets):
        rows = long_df[long_df["dataset"] == dataset].set_index("method").loc[methods]
        for k, (column, low, high, label) in enumerate(metrics):
            values = pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=float)
            errors = None
            if low is not None:
                errors = np.vstack(
                    [
                        values - pd.to_numeric(rows[low], errors="coerce").to_numpy(dtype=float),
                        pd.to_numeric(rows[high], errors="coerce").to_numpy(dtype=float) - values,
                    ]
                ).clip(min=0)
            ax.bar(
                np.arange(len(methods)) - 0.4 + width * (k + 0.5),
                np.nan_to_num(values),
                width,
                label=label,
                color=colours(k),
                yerr=errors,
                capsize=3,
                error_kw={"elinewidth": 1},
            )
        ax.set_xticks(np.arange(len(methods)))
        ax.set_xticklabels(methods, rotation=20, ha="right")
        ax.set_ylim(0, 105)
        ax.set_title(dataset)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0][0].set_ylabel("%")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=150)
    plt.close(fig)


DATA_COLUMNS = (
    "images",
    "generated_rows",
    "kept_rows",
    "judge_calls",
    "training_rows",
    "training_tokens",
    "train_seconds",
)


def seed_costs(files: Sequence[str | Path]) -> dict[str, float]:
    """What one (method, dataset, seed) used, from its cost files: the train summaries of the
    method and of the methods it starts from (tokens and seconds add up; training rows are the
    method's own), the manifests of their generated data (generated rows and judge calls add up).
    Images: the training images any stage read; kept rows: the generated rows trained on."""
    costs = {column: 0.0 for column in DATA_COLUMNS}
    summaries = [json.loads(Path(f).read_text()) for f in files if Path(f).name == "train_summary.json"]
    manifests = [json.loads(Path(f).read_text())["summary"] for f in files if Path(f).name == "manifest.json"]
    for summary in summaries:
        costs["training_tokens"] += summary.get("training_tokens") or 0
        costs["train_seconds"] += summary.get("seconds") or 0
        if not summary["config"].get("train_data"):  # trained on the descriptions: one row per image
            costs["images"] = max(costs["images"], summary["train_images"])
    for manifest in manifests:
        costs["images"] = max(costs["images"], manifest.get("images", 0))
        costs["generated_rows"] += manifest.get("generated_rows", 0)
        costs["judge_calls"] += manifest.get("judge_calls", 0)
    if summaries:
        costs["training_rows"] = summaries[0]["train_images"]  # the method's own (first listed) stage
        if summaries[0]["config"].get("train_data"):
            costs["kept_rows"] = costs["training_rows"]
    return costs


def data_table(
    long_df: pd.DataFrame, costs: Sequence[str], methods: Sequence[str], datasets: Sequence[str]
) -> pd.DataFrame:
    """One row per (method, dataset): accuracy (the long table's) beside the mean over seeds of what
    the method used (DATA_COLUMNS), and for a method trained on curated instructions, the share
    of its gain over the base model (zero_shot) that ift recovers."""
    files: dict[tuple[str, str, int], list[str]] = {}
    for entry in costs:
        method, dataset, seed, path = entry.split(":", 3)
        files.setdefault((method, dataset, int(seed)), []).append(path)
    accuracy = long_df.set_index(["method", "dataset"])["accuracy"]
    rows = []
    for method in methods:
        for dataset in datasets:
            seeds = sorted(seed for m, d, seed in files if (m, d) == (method, dataset))
            per_seed = [seed_costs(files[method, dataset, seed]) for seed in seeds]
            row = {"method": method, "dataset": dataset, "accuracy": accuracy.get((method, dataset))}
            row.update({c: float(np.mean([p[c] for p in per_seed])) if per_seed else 0.0 for c in DATA_COLUMNS})
            rows.append(row)
    frame = pd.DataFrame(rows)
    frame["ift_recovers"] = np.nan
    if {"zero_shot", "ift"} <= set(methods):
        for dataset in datasets:
            base = accuracy.get(("zero_shot", dataset))
            gain_ift = accuracy.get(("ift", dataset)) - base
            for method in methods:
                if method in ("zero_shot", "ift", "caption_ft") or not method.startswith("inst_ft"):
                    continue
                gain = accuracy.get((method, dataset)) - base
                if gain > 0:
                    frame.loc[(frame["method"] == method) & (frame["dataset"] == dataset), "ift_recovers"] = (
                        gain_ift / gain
                    )
    return frame


def result_files_from_paths(paths: Sequence[str | Path], name: str) -> dict[tuple[str, str, int], Path]:
    """`.../<dataset>/<method>/seed-<seed>/<name>` -> {(dataset, method, seed): path}."""
    files: dict[tuple[str, str, int], Path] = {}
    for raw in paths:
        path = Path(raw)
        match = _SEED_DIR.fullmatch(path.parent.name)
        if len(path.parts) < 4 or match is None or path.name != name:
            raise PredictionError(
                f"cannot read dataset/method/seed from {path}; expected .../<dataset>/<method>/seed-<seed>/{name}"
            )
        key = (path.parent.parent.parent.name, path.parent.parent.name, int(match.group(1)))
        if key in files:
            raise PredictionError(f"two {name} files for {key[0]}/{key[1]} seed {key[2]}: {files[key]} and {path}")
        files[key] = path
    return files


def prediction_files_from_paths(paths: Sequence[str | Path]) -> dict[tuple[str, str, int], Path]:
    """`.../<dataset>/<method>/seed-<seed>/predictions.csv` -> {(dataset, method, seed): path}."""
    return result_files_from_paths(paths, "predictions.csv")


def parse_comparisons(pairs: Sequence[str], methods: Sequence[str]) -> list[tuple[str, str]]:
    """`method:baseline` strings -> pairs, in order; both methods must be among `methods`."""
    parsed = []
    for pair in pairs:
        method, sep, baseline = pair.partition(":")
        if not sep or not method or not baseline or method == baseline:
            raise ValueError(f"--compare takes method:baseline with two different methods, got {pair!r}")
        missing = [m for m in (method, baseline) if m not in methods]
        if missing:
            raise ValueError(f"--compare {pair}: {', '.join(missing)} not among --methods {' '.join(methods)}")
        if (method, baseline) in parsed:
            raise ValueError(f"--compare {pair} given twice")
        parsed.append((method, baseline))
    return parsed


def _parse_args(argv: Sequence[str] | None) -> TablesArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TablesArguments, description="Build the benchmark tables from predictions.")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    pairs = parse_comparisons(args.compare, args.methods)
    if pairs and not args.comparisons:
        raise ValueError("--compare needs --comparisons (the CSV they are written to)")
    files = prediction_files_from_paths(args.predictions)
    unused = sorted({(d, m) for d, m, _ in files} - {(d, m) for d in args.datasets for m in args.methods})
    if unused:
        log.warning("ignoring predictions not requested: %s", ", ".join(f"{d}/{m}" for d, m in unused))
    frames = _load_requested(files, args.methods, args.datasets)
    table = _accuracy_from_frames(frames, args.methods, args.datasets)
    long = _long_from_frames(frames, args.methods, args.datasets, args.n_boot, args.seed)
    if args.descriptions:
        long = add_description_accuracy(
            long, result_files_from_paths(args.descriptions, "descriptions.csv"), args.n_boot, args.seed
        )
    outputs = [args.table, args.long]
    table.to_csv(_ready(args.table), float_format="%.2f")
    long.to_csv(_ready(args.long), index=False, float_format="%.2f")
    if args.comparisons:
        compared = _comparisons_from_frames(frames, pairs, args.datasets, args.n_boot, args.seed)
        compared.to_csv(_ready(args.comparisons), index=False, float_format="%.2f")
        outputs.append(args.comparisons)
    if args.attributes or args.heatmap:
        attributes = _attributes_from_frames(frames, args.methods, args.datasets, args.n_boot, args.seed)
        if args.attributes:
            attributes.to_csv(_ready(args.attributes), index=False, float_format="%.2f")
            outputs.append(args.attributes)
        if args.heatmap:
            plot_attributes(attributes, args.heatmap)
            outputs.append(args.heatmap)
    if args.data:
        data_table(long, args.costs, args.methods, args.datasets).to_csv(
            _ready(args.data), index=False, float_format="%.4g"
        )
        outputs.append(args.data)
    if args.figure:
        plot_table(table, args.figure, long_df=long)
        outputs.append(args.figure)
    if args.metrics_figure:
        plot_metrics(long, args.metrics_figure)
        outputs.append(args.metrics_figure)
    print(table.to_string())
    print("wrote " + ", ".join(map(str, outputs)))
    return 0


def _ready(path: str) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
