"""Benchmark tables from per-(dataset, method) prediction files.

Input: `results/<dataset>/<method>/predictions.csv`, one row per question, with columns
PREDICTION_COLUMNS. Every question counts: an unparseable answer is wrong (correct=0) and is
also reported as a parse failure, never dropped from the denominator.

Outputs:
- table 1 (`accuracy_table`): one row per method, one column per dataset plus `average`
  (mean of the dataset accuracies, unweighted, computed before rounding), accuracy in percent
  rounded to 2 decimals;
- the long table (`long_table`): one row per (method, dataset) with n, correct, accuracy,
  95% bootstrap interval, parse failures, format retention and chance level, all in percent;
- a grouped bar chart (`plot_table`) of table 1 with the long table's intervals as error bars.

CLI:
    python -m medift.tables --predictions results/*/*/predictions.csv \
        --methods base ift --datasets wbcatt cbis_ddsm --table t1.csv --long t1_long.csv \
        [--figure t1.png]
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from medift.mcq import LETTERS
from medift.stats import bootstrap_ci

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = (
    "question_id",
    "image_id",
    "attribute",
    "question",
    "options",
    "answer_index",
    "answer_letter",
    "raw_output",
    "parsed_letter",
    "correct",
    "parse_failed",
)
LONG_COLUMNS = (
    "method",
    "dataset",
    "n",
    "correct",
    "accuracy",
    "ci_low",
    "ci_high",
    "parse_failures",
    "format_retention",
    "chance",
)
AVERAGE = "average"

PredictionFiles = Mapping[tuple[str, str], "str | Path"]  # (dataset, method) -> predictions.csv


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
    duplicated = frame["question_id"][frame["question_id"].duplicated()]
    if not duplicated.empty:
        raise PredictionError(f"{path}: duplicated question_id {duplicated.iloc[0]!r}")

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
    return frame


def _load_requested(
    pred_files: PredictionFiles, methods: Sequence[str], datasets: Sequence[str]
) -> dict[tuple[str, str], pd.DataFrame]:
    """Read every requested (dataset, method); all methods must answer the same questions."""
    missing = [(d, m) for m in methods for d in datasets if (d, m) not in pred_files]
    if missing:
        listed = ", ".join(f"{d}/{m}" for d, m in missing)
        raise PredictionError(f"no predictions for (dataset/method): {listed}")
    frames = {(d, m): read_predictions(pred_files[d, m]) for m in methods for d in datasets}
    for dataset in datasets:
        # A method scored on other (or fewer) questions is not comparable in one table.
        reference_method = methods[0]
        reference = set(frames[dataset, reference_method]["question_id"])
        for method in methods[1:]:
            if set(frames[dataset, method]["question_id"]) != reference:
                raise PredictionError(
                    f"{dataset}: {method} and {reference_method} were scored on different questions "
                    f"({pred_files[dataset, method]} vs {pred_files[dataset, reference_method]})"
                )
    return frames


# --------------------------------------------------------------------------- tables


def _percent(fraction: float) -> float:
    return round(100.0 * float(fraction), 2)


def _accuracy_from_frames(
    frames: Mapping[tuple[str, str], pd.DataFrame], methods: Sequence[str], datasets: Sequence[str]
) -> pd.DataFrame:
    accuracy = pd.DataFrame(
        [[100.0 * frames[d, m]["correct"].mean() for d in datasets] for m in methods],
        index=pd.Index(list(methods), name="method"),
        columns=list(datasets),
    )
    accuracy[AVERAGE] = accuracy[list(datasets)].mean(axis=1)
    return accuracy.round(2)


def _long_from_frames(
    frames: Mapping[tuple[str, str], pd.DataFrame],
    methods: Sequence[str],
    datasets: Sequence[str],
    n_boot: int,
    seed: int,
) -> pd.DataFrame:
    rows = []
    for method in methods:
        for dataset in datasets:
            frame = frames[dataset, method]
            correct = frame["correct"].to_numpy(dtype=bool)
            n = int(correct.size)
            low, high = bootstrap_ci(correct, n_boot=n_boot, seed=seed)
            parse_failures = int(frame["parse_failed"].sum())
            rows.append(
                {
                    "method": method,
                    "dataset": dataset,
                    "n": n,
                    "correct": int(correct.sum()),
                    "accuracy": _percent(correct.mean()),
                    "ci_low": _percent(low),
                    "ci_high": _percent(high),
                    "parse_failures": parse_failures,
                    "format_retention": _percent(1.0 - parse_failures / n),
                    # Expected accuracy of a uniform guess over each question's own options.
                    "chance": _percent(np.mean(1.0 / frame["n_options"].to_numpy())),
                }
            )
    return pd.DataFrame(rows, columns=list(LONG_COLUMNS))


def accuracy_table(
    pred_files: PredictionFiles, methods: Sequence[str], datasets: Sequence[str]
) -> pd.DataFrame:
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


# --------------------------------------------------------------------------- figure


def plot_table(
    table_df: pd.DataFrame,
    out_png: str | Path,
    long_df: pd.DataFrame | None = None,
    show_chance: bool = True,
) -> None:
    """Grouped bar chart of table 1: one group per dataset (+ average), one bar per method.

    With `long_df`, dataset bars get the bootstrap interval as error bars and (if
    `show_chance`) a dashed chance line per dataset. The average has no interval.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

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
                    errors[:, j] = [max(0.0, row["accuracy"] - row["ci_low"]), max(0.0, row["ci_high"] - row["accuracy"])]
        bars = ax.bar(
            x, values, bar_width, label=method, color=colours(i % 10),
            yerr=errors if intervals is not None else None, capsize=3, error_kw={"elinewidth": 1},
        )
        if len(groups) * n_methods <= 40:  # value labels only while they stay legible
            # Inside the bar, so they never collide with the error bars above it.
            ax.bar_label(
                bars, labels=[f"{v:.1f}" for v in values], label_type="center", fontsize=7,
                color="white", rotation=90 if n_methods > 3 else 0,
            )

    if intervals is not None and show_chance and "chance" in long_df.columns:
        chance = long_df.groupby("dataset")["chance"].first()
        labelled = False
        for j, group in enumerate(groups):
            if group in chance.index:
                ax.hlines(
                    chance[group], positions[j] - 0.45, positions[j] + 0.45, colors="grey",
                    linestyles="dashed", linewidth=1, label=None if labelled else "chance",
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
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=150)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


@dataclass
class TablesArguments:
    predictions: list[str] = field(
        metadata={"help": "predictions.csv files, each at .../<dataset>/<method>/predictions.csv"}
    )
    methods: list[str] = field(metadata={"help": "methods, in table row order"})
    datasets: list[str] = field(metadata={"help": "datasets, in table column order"})
    table: str = field(metadata={"help": "output CSV of table 1 (accuracy in percent; methods x datasets + average)"})
    long: str = field(metadata={"help": "output CSV of the long table (one row per method and dataset)"})
    figure: str | None = field(default=None, metadata={"help": "optional output PNG of the grouped bar chart"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples for the intervals"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})


def prediction_files_from_paths(paths: Sequence[str | Path]) -> dict[tuple[str, str], Path]:
    """`.../<dataset>/<method>/predictions.csv` -> {(dataset, method): path}."""
    files: dict[tuple[str, str], Path] = {}
    for raw in paths:
        path = Path(raw)
        if len(path.parts) < 3:
            raise PredictionError(f"cannot read dataset/method from {path}; expected .../<dataset>/<method>/predictions.csv")
        key = (path.parent.parent.name, path.parent.name)
        if key in files:
            raise PredictionError(f"two predictions files for {key[0]}/{key[1]}: {files[key]} and {path}")
        files[key] = path
    return files


def _parse_args(argv: Sequence[str] | None) -> TablesArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(TablesArguments, description="Build the benchmark tables from predictions.")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    files = prediction_files_from_paths(args.predictions)
    unused = sorted(set(files) - {(d, m) for d in args.datasets for m in args.methods})
    if unused:
        log.warning("ignoring predictions not requested: %s", ", ".join(f"{d}/{m}" for d, m in unused))
    frames = _load_requested(files, args.methods, args.datasets)
    table = _accuracy_from_frames(frames, args.methods, args.datasets)
    long = _long_from_frames(frames, args.methods, args.datasets, args.n_boot, args.seed)
    for out in (args.table, args.long):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.table, float_format="%.2f")
    long.to_csv(args.long, index=False, float_format="%.2f")
    if args.figure:
        plot_table(table, args.figure, long_df=long)
    print(table.to_string())
    print(f"wrote {args.table}, {args.long}" + (f", {args.figure}" if args.figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
