"""How sure a comparison is: bootstrap intervals over the test rows and the seeds, and a paired
bootstrap between two methods scored on the same rows.

A method's runs form a (seeds, rows) matrix of per-row scores (1 right, 0 wrong). One bootstrap
replicate draws the seeds with replacement and the rows with replacement and takes the mean,
so the interval covers both the test sample and the training randomness (initialisation, batch
order, dropout). Two methods share the rows drawn in each replicate (they were scored on the
same rows) and draw their seeds independently (seed 1 of one method has nothing to do with seed 1
of another). Efron and Tibshirani 1993; the paired test as in Koehn 2004 and Dror et al. 2018.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REPLICATES = 4000
LEVEL = 0.95


@dataclass
class Interval:
    mean: float
    low: float
    high: float


@dataclass
class Paired:
    """`best` minus `other`, and whether `other` is tied with `best` (the interval of the
    difference holds 0: not significantly worse at the level)."""

    difference: float
    low: float
    high: float
    p_value: float  # share of replicates where `other` matched or beat `best` (one-sided)
    tied: bool


def _scores(scores) -> np.ndarray:
    m = np.asarray(scores, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"per-row scores must be (seeds, rows), got shape {m.shape}")
    return m


def _row_weights(rng: np.random.Generator, n: int, replicates: int) -> np.ndarray:
    """(R, n) how often each row is drawn in each replicate, over n."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=replicates) / n


def _seed_means(m: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(R,) the replicate means: seeds drawn with replacement, rows weighted by `rows`."""
    seeds = rng.multinomial(len(m), np.full(len(m), 1.0 / len(m)), size=len(rows)) / len(m)
    return np.einsum("rs,sn,rn->r", seeds, m, rows)  # (R, S) x (S, N) x (R, N)


def _quantiles(x: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    lo, hi = np.quantile(x, [tail, 1 - tail])
    return float(lo), float(hi)


def interval(scores, replicates: int = REPLICATES, seed: int = 0, level: float = LEVEL) -> Interval:
    """Mean per-row score over every seed and row, with a percentile bootstrap interval."""
    m = _scores(scores)
    rng = np.random.default_rng(seed)
    means = _seed_means(m, _row_weights(rng, m.shape[1], replicates), rng)
    return Interval(float(m.mean()), *_quantiles(means, level))


def paired(
    best, other, replicates: int = REPLICATES, seed: int = 0, level: float = LEVEL
) -> Paired:
    """Paired bootstrap of mean(best) - mean(other) over the rows both were scored on."""
    a, b = _scores(best), _scores(other)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"scored on different rows: {a.shape[1]} against {b.shape[1]}")
    rng = np.random.default_rng(seed)
    rows = _row_weights(rng, a.shape[1], replicates)  # the same rows for both
    diff = _seed_means(a, rows, rng) - _seed_means(b, rows, rng)
    lo, hi = _quantiles(diff, level)
    p = float((np.sum(diff <= 0) + 1) / (replicates + 1))
    return Paired(float(a.mean() - b.mean()), lo, hi, p, tied=lo <= 0)
