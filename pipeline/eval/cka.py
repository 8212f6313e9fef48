"""Linear CKA between two representations of the same n examples (rows), and a bootstrap CI.

``linear_cka(x, y)`` is Kornblith et al. (2019): HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with
linear kernels K = X X^T, L = Y Y^T and the biased (centred-Gram) HSIC estimator.
``debiased=True`` uses the unbiased HSIC estimator of Song et al. (2012) instead, as proposed for
CKA by Nguyen et al. (2021): the biased one drifts towards 1 when features outnumber examples,
so two independent random representations score far above 0; the debiased one is ~0 for them.
Both are invariant to orthogonal transforms and isotropic scaling of either representation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected [n, features], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: contains non-finite values")
    return x


def _hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    """tr(K H L H) / (n-1)^2 with the centring matrix H (Gretton et al. 2005)."""
    n = k.shape[0]
    h = np.eye(n) - 1.0 / n
    return float(np.sum((h @ k @ h) * l)) / (n - 1) ** 2


def _hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), Eq. 5: unbiased HSIC on Gram matrices with their diagonals zeroed."""
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"debiased CKA needs at least 4 examples, got {n}")
    k = k - np.diag(np.diag(k))
    l = l - np.diag(np.diag(l))
    trace = float(np.sum(k * l))
    sums = float(k.sum() * l.sum()) / ((n - 1) * (n - 2))
    cross = 2.0 * float(k.sum(axis=0) @ l.sum(axis=0)) / (n - 2)
    return (trace + sums - cross) / (n * (n - 3))


def linear_cka(x: np.ndarray, y: np.ndarray, *, debiased: bool = True) -> float:
    """Linear CKA of ``x`` [n, p] and ``y`` [n, q] (same examples, row by row)."""
    x, y = _as_matrix(x, "x"), _as_matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y hold different numbers of examples: {x.shape[0]} vs {y.shape[0]}"
        )
    if x.shape[0] < 2:
        raise ValueError("CKA needs at least 2 examples")
    k, l = x @ x.T, y @ y.T
    hsic = _hsic_unbiased if debiased else _hsic_biased
    denominator = np.sqrt(max(hsic(k, k), 0.0) * max(hsic(l, l), 0.0))
    if denominator == 0.0:
        raise ValueError("CKA is undefined: one representation is constant across examples")
    return hsic(k, l) / denominator


@dataclass(frozen=True)
class CKAEstimate:
    value: float
    low: float
    high: float
    confidence: float
    resamples: int
    debiased: bool

    def to_json(self) -> dict[str, float | int | bool]:
        return {
            "value": self.value,
            "ci_low": self.low,
            "ci_high": self.high,
            "confidence": self.confidence,
            "resamples": self.resamples,
            "debiased": self.debiased,
        }


def bootstrap_cka(
    x: np.ndarray,
    y: np.ndarray,
    *,
    debiased: bool = True,
    resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> CKAEstimate:
    """CKA with a percentile bootstrap CI over examples (resampled pairs, a seeded RNG).

    A resample draws examples with replacement; duplicated rows would make the unbiased estimator's
    zeroed diagonals meaningless, so each resample keeps its distinct examples only.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x, y = _as_matrix(x, "x"), _as_matrix(y, "y")
    value = linear_cka(x, y, debiased=debiased)
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    draws = []
    for _ in range(resamples):
        idx = np.unique(rng.integers(0, n, n))
        try:
            draws.append(linear_cka(x[idx], y[idx], debiased=debiased))
        except ValueError:  # a degenerate resample (too few distinct or constant rows)
            continue
    if not draws:
        raise ValueError(f"no usable bootstrap resample out of {resamples} (n = {n})")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return CKAEstimate(value, float(low), float(high), confidence, len(draws), debiased)
