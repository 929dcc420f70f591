"""Metrics on constructed inputs whose exact answer is known: edge sizes, precision, exact bounds.

The references here are written with plain Python floats (``math.fsum``), not with NumPy, so a
change of dtype or of a degenerate-case branch in ``core/metrics.py`` shows up as a different number.
"""

import math

import numpy as np
import pytest

from affective_trm_ros.core.metrics import (
    bootstrap_sessions_ci,
    ccc,
    confidence_vs_error,
    mean_sd,
    pearson,
    regression_report,
    rmse,
    spearman,
)


def fsum_ccc(pred, true) -> float:
    """Lin's CCC with population moments in exact-rounded Python float sums."""
    p, t = [float(v) for v in pred], [float(v) for v in true]
    n = len(p)
    mean_p, mean_t = math.fsum(p) / n, math.fsum(t) / n
    var_p = math.fsum((a - mean_p) ** 2 for a in p) / n
    var_t = math.fsum((b - mean_t) ** 2 for b in t) / n
    cov = math.fsum((a - mean_p) * (b - mean_t) for a, b in zip(p, t)) / n
    return 2 * cov / (var_p + var_t + (mean_p - mean_t) ** 2)


def test_a_single_pair_has_an_rmse_and_zero_ccc_but_no_pearson():
    assert rmse([0.5], [0.2]) == pytest.approx(0.3, abs=1e-15)
    assert ccc([0.5], [0.2]) == 0.0           # both sides constant, means differ: 0 / 0.09
    assert math.isnan(ccc([0.5], [0.5]))      # 0 / 0
    assert math.isnan(pearson([0.5], [0.2]))  # undefined for a constant side


def test_a_constant_side_has_exactly_zero_spread_even_when_its_mean_is_inexact():
    # np.mean of three 0.1s is 0.10000000000000002: naive deviations would not be zero.
    constant = np.full(3, 0.1)
    assert np.mean(constant) != 0.1
    varying = np.array([0.0, 0.5, 1.0])
    assert ccc(varying, constant) == 0.0
    assert ccc(constant, varying) == 0.0
    assert math.isnan(ccc(constant, constant.copy()))  # same constant on both sides: 0 / 0


def test_ccc_is_defined_when_the_denominator_happens_to_be_one():
    # var_p = 1, var_t = 0, equal means: denominator exactly 1, covariance 0.
    assert ccc([-1.0, 1.0], [0.0, 0.0]) == 0.0
    # var_p 0.25 + var_t 0.5 + mean difference 0.5 squared = 1; covariance 0.25.
    assert ccc([-0.5, -0.5, 0.5, 0.5], [-0.5, 0.5, 0.5, 1.5]) == 0.5


def test_pearson_of_one_when_the_norm_is_exactly_one():
    # sum(dp^2) = 0.5, sum(dt^2) = 2: norm = 1 exactly.
    assert pearson([-0.5, 0.5], [-1.0, 1.0]) == 1.0
    assert pearson([-0.5, 0.5], [1.0, -1.0]) == -1.0


def test_pearson_is_clamped_to_exactly_plus_minus_one():
    # For these values the raw ratio rounds to 1.0000000000000002 (and its negative).
    x = np.array([0.1, 0.2, 0.7])
    dp, dt = x - x.mean(), 0.3 * x - (0.3 * x).mean()
    raw = np.sum(dp * dt) / math.sqrt(float(np.sum(dp * dp)) * float(np.sum(dt * dt)))
    assert raw > 1.0  # the rounding the clamp exists for
    assert pearson(x, 0.3 * x) == 1.0
    assert pearson(x, -0.3 * x) == -1.0


def test_inputs_are_flattened_before_pairing():
    rng = np.random.default_rng(4)
    pred, true = rng.normal(size=6), rng.normal(size=6)
    expected = fsum_ccc(pred, true)
    assert ccc(pred.reshape(2, 3), true.reshape(3, 2)) == pytest.approx(expected, rel=1e-12)
    assert rmse(pred.reshape(2, 3), true) == pytest.approx(math.sqrt(np.mean((pred - true) ** 2)), rel=1e-12)
    assert pearson(pred.reshape(3, 2), true.reshape(6, 1)) == pytest.approx(np.corrcoef(pred, true)[0, 1],
                                                                          rel=1e-12)


def test_float32_inputs_are_computed_in_float64():
    """Features near 1000 with a spread of 0.05: float32 moments lose about 1e-4 of the CCC."""
    rng = np.random.default_rng(0)
    pred = (1000 + rng.normal(scale=0.05, size=1000)).astype(np.float32)
    true = (1000 + rng.normal(scale=0.05, size=1000) + np.linspace(0, 0.01, 1000)).astype(np.float32)
    expected = fsum_ccc(pred, true)  # the float32 values, converted exactly, summed exactly
    assert ccc(pred, true) == pytest.approx(expected, rel=1e-9)
    expected_rmse = math.sqrt(math.fsum((float(a) - float(b)) ** 2 for a, b in zip(pred, true)) / pred.size)
    assert rmse(pred, true) == pytest.approx(expected_rmse, rel=1e-9)
    p64, t64 = pred.astype(np.float64), true.astype(np.float64)
    dp, dt = p64 - p64.mean(), t64 - t64.mean()
    expected_r = math.fsum(dp * dt) / math.sqrt(math.fsum(dp * dp) * math.fsum(dt * dt))
    assert pearson(pred, true) == pytest.approx(expected_r, rel=1e-9)


def test_regression_report_on_a_hand_computed_case():
    pred = np.array([[1.0, 0.0], [2.0, 0.5], [3.0, 1.0], [4.0, np.nan]])
    true = np.array([[2.0, 0.0], [2.0, 0.5], [4.0, 1.0], [4.0, 0.2]])
    report = regression_report(pred, true)
    assert report['valence'] == {'ccc': pytest.approx(0.8), 'rmse': pytest.approx(math.sqrt(0.5)),
                                 'pearson': pytest.approx(1 / math.sqrt(1.25)), 'n': 4}
    # arousal: three pairs, identical -> CCC 1, RMSE 0, r 1; the NaN prediction is left out.
    assert report['arousal'] == {'ccc': pytest.approx(1.0), 'rmse': 0.0, 'pearson': pytest.approx(1.0),
                                 'n': 3}
    assert report['mean'] == {'ccc': pytest.approx(0.9), 'rmse': pytest.approx(math.sqrt(0.5) / 2),
                              'pearson': pytest.approx((1 / math.sqrt(1.25) + 1) / 2)}


def test_spearman_uses_average_ranks_for_ties_and_ignores_nan_pairs():
    # ranks [0, 1.5, 1.5, 3] against [0, 1, 2, 3]: 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10).
    assert spearman([1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(3 / math.sqrt(10), rel=1e-12)
    assert spearman([3.0, 1.0, 2.0, np.nan], [30.0, 10.0, 20.0, 0.0]) == 1.0   # unsorted, monotone
    assert spearman([3.0, 1.0, 2.0], [1.0, 3.0, 2.0]) == -1.0
    x = np.array([0.3, -2.0, 1.5, 0.1, 4.0])
    assert spearman(x, np.exp(3 * x)) == 1.0    # any increasing map: rank correlation 1
    assert math.isnan(spearman([1.0, np.nan], [2.0, 3.0]))   # one valid pair
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))   # a constant side


def test_mean_sd_skips_missing_values_and_uses_the_sample_sd():
    assert mean_sd([1.0, None, 2.0, float('nan'), 3.0, float('inf')]) == (2.0, 1.0)
    mean, sd = mean_sd([5.0])
    assert mean == 5.0 and math.isnan(sd)
    assert all(math.isnan(v) for v in mean_sd([None, float('nan')]))


def test_bootstrap_interval_on_sessions_with_known_resampling_distribution():
    """Two one-frame sessions with labels 0 and 1, metric = pooled label mean: a resample's value is
    0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4."""
    truths = [np.array([[0.0, 0.0]]), np.array([[1.0, 1.0]])]
    predictions = [[np.zeros((1, 2)), np.zeros((1, 2))]]

    def label_mean(pred, true):
        return float(true[:, 0].mean())

    assert bootstrap_sessions_ci(predictions, truths, label_mean) == (0.0, 1.0)                # 2.5 / 97.5 %
    assert bootstrap_sessions_ci(predictions, truths, label_mean, level=0.4) == (0.5, 0.5)     # 30 / 70 %
    # The metric of each run is averaged over runs: predictions 0 and 1 average to 0.5 every time.
    runs = [[np.zeros((1, 2)), np.zeros((1, 2))], [np.ones((1, 2)), np.ones((1, 2))]]
    assert bootstrap_sessions_ci(runs, truths, lambda p, t: float(p.mean())) == (0.5, 0.5)
    # Default metric: mean CCC; a perfect prediction of varying sessions gives (1, 1).
    labels = [np.array([[0.1, 0.2], [0.5, -0.3], [0.9, 0.4]]), np.array([[-0.4, 0.0], [0.2, 0.7]])]
    assert bootstrap_sessions_ci([labels], labels, resamples=50) == (pytest.approx(1.0), pytest.approx(1.0))
    assert all(math.isnan(v) for v in bootstrap_sessions_ci(predictions[:1], truths[:1], label_mean))
    assert all(math.isnan(v) for v in bootstrap_sessions_ci([], truths, label_mean))
    assert all(math.isnan(v) for v in bootstrap_sessions_ci(predictions, truths, lambda p, t: math.nan))


def test_confidence_vs_error_bins_on_a_constructed_case():
    confidence = [0.9, 0.8, 0.2, 0.1, 0.0, 0.5]
    pred = np.array([[0.0, 0.0], [0.1, 0.1], [0.5, 0.5], [0.8, np.nan], [1.0, 1.0], [0.3, 0.3]])
    true = np.array([[0.0, 0.2], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [np.nan, np.nan]])
    # errors (mean over labelled dims): 0.1, 0.1, 0.5, 0.8; frame 4 has no input, frame 5 no label.
    result = confidence_vs_error(confidence, pred, true, bins=2)
    assert result['n'] == 4
    assert result['spearman'] == pytest.approx(-3 / math.sqrt(10), rel=1e-12)   # ties in the errors
    assert result['bins'] == [
        {'low': 0.1, 'high': 0.2, 'frames': 2, 'mean_confidence': pytest.approx(0.15),
         'mean_abs_error': pytest.approx(0.65)},
        {'low': 0.8, 'high': 0.9, 'frames': 2, 'mean_confidence': pytest.approx(0.85),
         'mean_abs_error': pytest.approx(0.1)}]
    assert len(confidence_vs_error(confidence, pred, true, bins=10)['bins']) == 4   # at most one per frame
    empty = confidence_vs_error([0.0], [[0.1, 0.1]], [[0.0, 0.0]])
    assert empty['n'] == 0 and empty['bins'] == [] and math.isnan(empty['spearman'])


def test_small_samples_and_defaults_of_the_summary_statistics():
    assert spearman([1.0, 2.0], [3.0, 4.0]) == 1.0   # two pairs are enough for a rank correlation
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))
    truths = [np.array([[0.0, 0.1], [0.3, 0.2]]), np.array([[0.5, -0.2], [0.1, 0.4]]), np.array([[0.9, 0.0]])]
    runs = [[t + 0.1 for t in truths]]
    assert bootstrap_sessions_ci(runs, truths) == bootstrap_sessions_ci(runs, truths, seed=0, resamples=1000)
    confidence = np.linspace(0.1, 0.9, 12)
    result = confidence_vs_error(confidence, np.zeros((12, 2)), np.full((12, 2), 0.5))
    assert [b['frames'] for b in result['bins']] == [3, 3, 2, 2, 2]   # five bins by default
