"""Bootstrap confidence intervals for multiple-choice accuracy.

All values are FRACTIONS in [0, 1] (tables.py converts to percent for display).

Both functions use the percentile bootstrap, resampling questions with replacement. Because
every outcome is binary, a resample is fully described by how many draws land in each outcome
class, so instead of materialising an (n_boot x n) index matrix we draw those counts directly:
- one vector: the number of correct answers in a resample of n is Binomial(n, accuracy);
- a paired comparison: the outcome classes "only A correct", "only B correct" and "both or
  neither" are Multinomial(n, class frequencies), and the resampled difference is
  (n_only_a - n_only_b) / n.
This is the same distribution as index resampling (not an approximation), costs O(n_boot)
memory whatever n is, and is deterministic for a seed (numpy's PCG64 `default_rng`).
"""

from __future__ import annotations

import numpy as np


def _as_outcomes(correct: np.ndarray, name: str = "correct") -> np.ndarray:
    array = np.asarray(correct)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: no questions to compute an interval over")
    if array.dtype != bool and not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must hold only booleans or 0/1")
    return array.astype(bool)


def _check_level(level: float, n_boot: int) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return (1.0 - level) / 2.0


def bootstrap_ci(
    correct: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap interval (lo, hi) of the accuracy, as fractions in [0, 1]."""
    outcomes = _as_outcomes(correct)
    tail = _check_level(level, n_boot)
    n = outcomes.size
    rng = np.random.default_rng(seed)
    resampled = rng.binomial(n, outcomes.mean(), size=n_boot) / n
    lo, hi = np.quantile(resampled, [tail, 1.0 - tail])
    return float(lo), float(hi)


def paired_bootstrap_diff(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Accuracy of A minus accuracy of B on the same questions, with a paired interval.

    Returns (diff, lo, hi) as fractions. Position i of both vectors must be the same question;
    pairing removes the between-question variance both methods share, so the interval is
    much tighter than comparing two independent intervals.
    """
    a = _as_outcomes(correct_a, "correct_a")
    b = _as_outcomes(correct_b, "correct_b")
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in length: {a.size} vs {b.size}")
    tail = _check_level(level, n_boot)
    n = a.size
    only_a = np.count_nonzero(a & ~b)
    only_b = np.count_nonzero(~a & b)
    both_or_neither = n - only_a - only_b
    # Classes where A and B agree add nothing to the difference, so they are pooled.
    frequencies = np.array([only_a, only_b, both_or_neither], dtype=np.float64) / n
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, frequencies, size=n_boot)
    resampled = (counts[:, 0] - counts[:, 1]) / n
    lo, hi = np.quantile(resampled, [tail, 1.0 - tail])
    return float((only_a - only_b) / n), float(lo), float(hi)
