"""The benchmark's metrics, each defined once here, as FRACTIONS in [0, 1].

Evaluation (`medift.evaluate`, metrics.json), the tables (`medift.tables`), description
accuracy (`medift.describe`) and the base-model report (`medift.embedded`, through
`medift.embedded.pretrain`) all call these functions; none computes a metric itself.

Input of the multiple-choice metrics: a predictions frame, one row per asked prompt, with at
least `question_id`, `rotation` (0: the question as written; 1..n-1: its options rotated, in
circular evaluation), `correct` (0/1) and `parse_failed` (0/1), as `medift.evaluate` writes
predictions.csv and `medift.tables.read_predictions` reads it; or a sequence of such frames,
one per seed of one (method, dataset), all over the same questions.

- accuracy: the fraction of questions answered right as written (rotation 0). With several
  seeds, a question's score is the fraction of seeds that got it right and the accuracy is
  the mean of these scores (equal to the mean of the seeds' accuracies).
- circular accuracy: the fraction of questions answered right in every rotation (a seed gets
  a question right only if every rotation is); None when the questions were not rotated.
- format retention: 1 - parse failures / answers, counting the answers as written (rotation
  0) of every seed: the fraction of answers in the expected format.
- description accuracy: the mean over images of the fraction of each image's attribute
  phrases the model said (`medift.describe`'s frame: `image_id`, `found`); with several seeds,
  each image's fraction is first averaged over the seeds. None when no image has a phrase.

Unit: fractions everywhere in code. Percent exists only in the files people read, and only
through `percent` (the tables' CSVs) and `summary_percent` (metrics.json of evaluation and of
descriptions); the base-model report keeps fractions (4 decimals). The two percent
conversions differ only in how an exact tie of the scaled value is rounded (`percent`
rounds the float correctly, `summary_percent` as numpy does: 19981/20000 is 99.91 in a table
and 99.9 in a metrics.json); both are kept so every existing file stays byte for byte the same.
"""

from __future__ import annotations

import json
from typing import Sequence, Union

import numpy as np
import pandas as pd

Predictions = Union[pd.DataFrame, Sequence[pd.DataFrame]]  # one frame, or one per seed


def _seeds(predictions: Predictions) -> list[pd.DataFrame]:
    return [predictions] if isinstance(predictions, pd.DataFrame) else list(predictions)


def _as_written(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["rotation"] == 0]


def plain_answers(correct: Sequence[bool], parse_failed: Sequence[bool]) -> pd.DataFrame:
    """A predictions frame of questions asked once each, as written (question_id 0..n-1), for
    code that holds only per-question outcomes (the base model's held-out questions)."""
    return pd.DataFrame(
        {
            "question_id": range(len(correct)),
            "rotation": 0,
            "correct": [int(c) for c in correct],
            "parse_failed": [int(f) for f in parse_failed],
        }
    )


def is_circular(predictions: Predictions) -> bool:
    """Whether the questions were also asked with their options rotated (in every seed)."""
    return all((frame["rotation"] > 0).any() for frame in _seeds(predictions))


def question_scores(predictions: Predictions, circular: bool = False) -> pd.Series:
    """Per question (index question_id, sorted): the fraction of seeds that answered it right,
    as written (rotation 0) or, `circular`, in every rotation."""
    per_seed = []
    for frame in _seeds(predictions):
        if circular:
            right = frame.groupby("question_id")["correct"].min()
        else:
            right = _as_written(frame).set_index("question_id")["correct"]
        per_seed.append(right.sort_index())
    return pd.concat(per_seed, axis=1).mean(axis=1)


def accuracy(predictions: Predictions) -> float:
    """Fraction of the questions answered right as written (mean over seeds)."""
    return float(question_scores(predictions).mean())


def circular_accuracy(predictions: Predictions) -> float | None:
    """Fraction of the questions answered right in every rotation; None if not rotated."""
    if not is_circular(predictions):
        return None
    return float(question_scores(predictions, circular=True).mean())


def parse_failures(predictions: Predictions) -> int:
    """Answers as written (rotation 0) not in the expected format, summed over the seeds."""
    return int(sum(_as_written(frame)["parse_failed"].sum() for frame in _seeds(predictions)))


def answers(predictions: Predictions) -> int:
    """Answers as written (rotation 0), summed over the seeds: questions x seeds."""
    return sum(len(_as_written(frame)) for frame in _seeds(predictions))


def format_retention(predictions: Predictions) -> float:
    """Fraction of the answers as written that are in the expected format: 1 - failures / answers."""
    return 1.0 - parse_failures(predictions) / answers(predictions)


def image_scores(descriptions: pd.DataFrame) -> pd.Series:
    """Per image (index image_id): the fraction of its phrases found (NaN: no phrases)."""
    found = [json.loads(f) for f in descriptions["found"]]
    return pd.Series(
        [np.mean(list(f.values())) if f else np.nan for f in found], index=descriptions["image_id"], dtype=float
    )


def description_scores(descriptions: pd.DataFrame | Sequence[pd.DataFrame]) -> pd.Series:
    """Per image with phrases: its found fraction, averaged over the seeds' frames."""
    frames = [descriptions] if isinstance(descriptions, pd.DataFrame) else list(descriptions)
    return pd.concat([image_scores(frame) for frame in frames], axis=1).mean(axis=1).dropna()


def description_accuracy(descriptions: pd.DataFrame | Sequence[pd.DataFrame]) -> float | None:
    """Mean over images of the fraction of their phrases said; None if no image has phrases."""
    scores = description_scores(descriptions).to_numpy()
    return float(scores.mean()) if len(scores) else None


def percent(fraction: float) -> float:
    """A fraction as a percentage with 2 decimals, rounded correctly (the tables' CSVs)."""
    return round(100.0 * float(fraction), 2)


def summary_percent(fraction: float) -> float:
    """A fraction as a percentage with 2 decimals as numpy rounds it (metrics.json files):
    differs from `percent` only on an exact tie of the scaled value (see the module docstring)."""
    return float(np.round(100 * np.float64(fraction), 2))
