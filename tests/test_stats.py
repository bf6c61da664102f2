"""The interval and the paired test of compare/stats.py against the exact bootstrap distribution,
enumerated by brute force over every draw of seeds and rows for small matrices."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from tunelab.compare import stats


def draws(n: int):
    """Every ordered draw of n items with replacement, as index tuples (each equally likely)."""
    return itertools.product(range(n), repeat=n)


def exact_means(m: np.ndarray) -> list[Fraction]:
    """The mean over drawn seeds and drawn rows, for every (seed draw, row draw)."""
    s, n = m.shape
    return [
        Fraction(int(sum(m[i, j] for i in si for j in rj)), s * n)
        for si in draws(s)
        for rj in draws(n)
    ]


def exact_differences(a: np.ndarray, b: np.ndarray) -> list[Fraction]:
    """mean(a) - mean(b) with the rows drawn once for both and the seeds drawn apart."""
    (sa, n), sb = a.shape, b.shape[0]
    out = []
    for rj in draws(n):
        for si in draws(sa):
            ma = Fraction(int(sum(a[i, j] for i in si for j in rj)), sa * n)
            for sk in draws(sb):
                out.append(ma - Fraction(int(sum(b[i, j] for i in sk for j in rj)), sb * n))
    return out


def cdf(values: list[Fraction], x: float, strict: bool = False) -> float:
    x = Fraction(x).limit_denominator(1000)  # the atom a float quantile stands for
    return sum((v < x) if strict else (v <= x) for v in values) / len(values)


A = np.array([[1, 1, 0, 1, 0], [1, 0, 1, 1, 1]])  # 2 seeds x 5 rows
B = np.array([[0, 1, 0, 0, 0], [1, 0, 0, 1, 0], [0, 0, 0, 1, 1]])  # 3 seeds x 5 rows


def test_interval_matches_the_exact_bootstrap():
    exact = exact_means(A)  # 2^2 seed draws x 5^5 row draws
    ci = stats.interval(A, replicates=40_000, seed=1)
    assert ci.mean == pytest.approx(A.mean())
    # the percentile bounds: about 2.5% of the exact distribution on each side
    assert cdf(exact, ci.low, strict=True) <= 0.025 + 0.01 and cdf(exact, ci.low) >= 0.025 - 0.01
    assert cdf(exact, ci.high, strict=True) <= 0.975 + 0.01
    assert cdf(exact, ci.high) >= 0.975 - 0.01
    assert ci.low < ci.mean < ci.high


def test_paired_test_matches_the_exact_bootstrap():
    exact = exact_differences(A, B[:2, :5])  # 5^5 row draws x 2^2 x 2^2 seed draws
    p = stats.paired(A, B[:2], replicates=40_000, seed=2)
    assert p.difference == pytest.approx(A.mean() - B[:2].mean())
    assert p.p_value == pytest.approx(cdf(exact, 0.0), abs=0.01)
    assert cdf(exact, p.low, strict=True) <= 0.035 and cdf(exact, p.low) >= 0.015
    assert p.tied == (p.low <= 0)


def test_paired_rows_make_a_consistent_edge_significant():
    """A method right on 20 more rows of 200, wrong on none the other gets: significant when
    paired, though the two unpaired intervals overlap."""
    rng = np.random.default_rng(0)
    base = (rng.random(200) < 0.6).astype(int)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:20]] = 1
    a, b = np.stack([better, better]), np.stack([base, base])
    p = stats.paired(a, b, seed=3)
    assert not p.tied and p.low > 0 and p.p_value < 0.01
    ia, ib = stats.interval(a), stats.interval(b)
    assert ia.low < ib.high  # overlapping intervals: an unpaired look would call it a tie


def test_a_method_against_itself_is_tied():
    p = stats.paired(A, A, seed=0)
    assert p.tied and p.difference == 0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="different rows"):
        stats.paired(A, B[:, :4])
    with pytest.raises(ValueError, match=r"\(seeds, rows\)"):
        stats.interval([1, 0, 1])
