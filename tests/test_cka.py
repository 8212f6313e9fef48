"""Linear CKA: a hand computation, the U-statistic definition, invariances, limits, the bootstrap."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.eval.cka import bootstrap_cka, linear_cka


def test_biased_cka_of_one_feature_is_the_squared_correlation_by_hand():
    # centred x = (-1.5, -.5, .5, 1.5), y = (-1.5, .5, -.5, 1.5): cov sum 4, variances 5 -> r = 0.8
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    y = np.array([[1.0], [3.0], [2.0], [4.0]])
    assert linear_cka(x, y, debiased=False) == pytest.approx(0.64, abs=1e-12)


def _hsic_u_statistic(k: np.ndarray, l: np.ndarray) -> float:
    """HSIC = E[k_ij l_ij] + E[k_ij] E[l_qr] - 2 E[k_ij l_iq], averaged over distinct (i, j, q, r)."""
    n = k.shape[0]
    total = sum(
        k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
        for i, j, q, r in itertools.permutations(range(n), 4)
    )
    return total / (n * (n - 1) * (n - 2) * (n - 3))


def test_debiased_cka_matches_the_u_statistic_brute_force():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 2))
    x[:, 0] += y[:, 0]
    k, l = x @ x.T, y @ y.T
    expected = _hsic_u_statistic(k, l) / np.sqrt(_hsic_u_statistic(k, k) * _hsic_u_statistic(l, l))
    assert linear_cka(x, y, debiased=True) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("debiased", [True, False])
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(debiased):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 12))
    y = x[:, :6] @ rng.normal(size=(6, 8)) + 0.5 * rng.normal(size=(40, 8))
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    base = linear_cka(x, y, debiased=debiased)
    assert 0.2 < base < 1
    assert linear_cka(x @ q, y, debiased=debiased) == pytest.approx(base, rel=1e-9)
    assert linear_cka(3.7 * x, 0.01 * y, debiased=debiased) == pytest.approx(base, rel=1e-9)
    # not invariant to a non-isotropic scaling: the test can tell
    assert linear_cka(x * np.linspace(0.1, 10, 12), y, debiased=debiased) != pytest.approx(
        base, rel=1e-3
    )


@pytest.mark.parametrize("debiased", [True, False])
def test_identical_representations_score_one(debiased):
    x = np.random.default_rng(3).normal(size=(20, 5))
    assert linear_cka(x, x, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


def test_independent_wide_representations_are_near_zero_only_when_debiased():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(64, 512)), rng.normal(size=(64, 512))
    assert abs(linear_cka(x, y, debiased=True)) < 0.05
    assert linear_cka(x, y, debiased=False) > 0.5  # the bias the debiased estimator removes


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 10))
    y = x @ rng.normal(size=(10, 4)) + rng.normal(size=(60, 4))
    a = bootstrap_cka(x, y, resamples=100, seed=7)
    assert a == bootstrap_cka(x, y, resamples=100, seed=7)
    assert a.low <= a.value <= a.high and a.high - a.low > 0.001 and a.resamples == 100
    assert bootstrap_cka(x, y, resamples=100, seed=8) != a


def test_clear_errors():
    with pytest.raises(ValueError, match="different numbers of examples"):
        linear_cka(np.ones((4, 2)), np.ones((5, 2)))
    with pytest.raises(ValueError, match="constant across examples"):
        linear_cka(np.ones((6, 2)), np.random.default_rng(0).normal(size=(6, 2)))
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(np.eye(3), np.eye(3))
