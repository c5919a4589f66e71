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

With several seeds a question's score is the fraction of seeds that got it right, no longer
binary; `bootstrap_mean_ci` and `paired_bootstrap_mean_diff` then resample question indices
(in chunks, so memory stays bounded) and fall back to nothing: binary input takes the exact
fast path above, anything else the index resampling.
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


def bootstrap_ci(correct: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
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


def _as_scores(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: no questions to compute an interval over")
    if not np.all((array >= 0) & (array <= 1)):
        raise ValueError(f"{name} must hold per-question scores in [0, 1]")
    return array


def _resampled_means(values: np.ndarray, n_boot: int, seed: int, chunk: int = 256) -> np.ndarray:
    """Means of `n_boot` index resamples of `values`, drawn `chunk` resamples at a time."""
    rng = np.random.default_rng(seed)
    n = values.size
    means = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        means[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def _is_binary(values: np.ndarray) -> bool:
    return bool(np.isin(values, (0.0, 1.0)).all())


def bootstrap_mean_ci(
    scores: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap interval of a mean of per-question scores in [0, 1]."""
    values = _as_scores(scores, "scores")
    if _is_binary(values):
        return bootstrap_ci(values.astype(bool), n_boot, seed, level)
    tail = _check_level(level, n_boot)
    lo, hi = np.quantile(_resampled_means(values, n_boot, seed), [tail, 1.0 - tail])
    return float(lo), float(hi)


def paired_bootstrap_mean_diff(
    scores_a: np.ndarray, scores_b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of A minus mean of B over the same questions, with a paired bootstrap interval."""
    a = _as_scores(scores_a, "scores_a")
    b = _as_scores(scores_b, "scores_b")
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in length: {a.size} vs {b.size}")
    if _is_binary(a) and _is_binary(b):
        return paired_bootstrap_diff(a.astype(bool), b.astype(bool), n_boot, seed, level)
    tail = _check_level(level, n_boot)
    lo, hi = np.quantile(_resampled_means(a - b, n_boot, seed), [tail, 1.0 - tail])
    return float(a.mean() - b.mean()), float(lo), float(hi)
