"""Metrics (CCC, RMSE, Pearson r) and the CCC + MSE training loss."""

import math

import numpy as np
import pytest
import torch

from affective_trm_ros.core.metrics import ccc, pearson, regression_report, rmse
from affective_trm_ros.offline.learning.losses import CCCMSELoss, masked_ccc


def random_pairs(seed: int, n: int = 200):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = 0.6 * x + rng.normal(scale=0.8, size=n) + rng.normal() + 0.3
    return x * rng.uniform(0.2, 3.0), y


def test_ccc_hand_computed_case():
    pred = np.array([1.0, 2.0, 3.0, 4.0])
    true = np.array([2.0, 2.0, 4.0, 4.0])
    # population moments: mean_p 2.5, mean_t 3, var_p 1.25, var_t 1, cov 1
    expected = 2 * 1.0 / (1.25 + 1.0 + 0.25)
    assert ccc(pred, true) == pytest.approx(expected)  # 0.8
    assert rmse(pred, true) == pytest.approx(math.sqrt(0.5))
    assert pearson(pred, true) == pytest.approx(1.0 / math.sqrt(1.25))


def test_ccc_of_identical_series_is_one_and_detects_offset_and_scale():
    x, _ = random_pairs(1)
    assert ccc(x, x) == pytest.approx(1.0)
    assert ccc(x + 0.5, x) < 1.0  # Pearson would still be 1
    assert pearson(x + 0.5, x) == pytest.approx(1.0)
    assert ccc(2 * x, x) < 1.0


@pytest.mark.parametrize('seed', range(20))
def test_ccc_symmetric_and_bounded_by_pearson(seed):
    x, y = random_pairs(seed)
    assert ccc(x, y) == pytest.approx(ccc(y, x))
    assert abs(ccc(x, y)) <= abs(pearson(x, y)) + 1e-12
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])


def test_constant_prediction_gives_zero_ccc_and_undefined_pearson():
    _, y = random_pairs(3)
    assert ccc(np.full_like(y, 0.3), y) == 0.0
    assert math.isnan(pearson(np.full_like(y, 0.3), y))
    assert math.isnan(ccc(np.ones(5), np.ones(5)))  # 0 / 0


def test_nan_labels_are_ignored_and_empty_gives_nan():
    pred = np.array([1.0, 2.0, 3.0, 4.0, 9.0])
    true = np.array([2.0, 2.0, 4.0, 4.0, np.nan])
    assert ccc(pred, true) == pytest.approx(0.8)
    assert math.isnan(ccc(pred[:0], true[:0]))
    with pytest.raises(ValueError, match='differ in size'):
        ccc(pred, true[:3])


def test_regression_report_is_computed_over_the_whole_set():
    rng = np.random.default_rng(0)
    true = rng.uniform(-1, 1, size=(300, 2))
    pred = true + rng.normal(scale=0.2, size=true.shape)
    true[::7, 1] = np.nan
    report = regression_report(pred, true)
    assert report['valence']['ccc'] == pytest.approx(ccc(pred[:, 0], true[:, 0]))
    assert report['arousal']['n'] == 300 - len(range(0, 300, 7))
    assert report['mean']['ccc'] == pytest.approx((report['valence']['ccc'] + report['arousal']['ccc']) / 2)
    # Averaging per-batch CCCs gives a different (wrong) number: the report must not do that.
    batched = np.mean([ccc(pred[i : i + 10, 0], true[i : i + 10, 0]) for i in range(0, 300, 10)])
    assert report['valence']['ccc'] != pytest.approx(batched)
    with pytest.raises(ValueError, match=r'\(N, 2\)'):
        regression_report(pred[:, :1], true[:, :1])


def test_masked_ccc_matches_numpy_ccc_and_ignores_masked_entries():
    rng = np.random.default_rng(5)
    pred = rng.normal(size=(4, 30, 2))
    true = 0.5 * pred + rng.normal(size=pred.shape)
    mask = rng.random((4, 30)) > 0.3
    value = masked_ccc(torch.tensor(pred), torch.tensor(true), torch.tensor(mask)[..., None])
    for k in range(2):
        assert value[k].item() == pytest.approx(ccc(pred[..., k][mask], true[..., k][mask]), abs=1e-6)
    # Garbage in masked positions changes nothing.
    pred2 = pred.copy()
    pred2[~mask] = 1e3
    value2 = masked_ccc(torch.tensor(pred2), torch.tensor(true), torch.tensor(mask)[..., None])
    assert torch.allclose(value, value2)


def test_loss_value_gradient_and_masks():
    rng = np.random.default_rng(2)
    labels = torch.tensor(rng.uniform(-1, 1, size=(3, 20, 2)), dtype=torch.float32)
    labels[0, :5, 0] = float('nan')  # unlabelled frames
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[2, 15:] = False  # padding
    pred = torch.tensor(rng.uniform(-1, 1, size=(3, 20, 2)), dtype=torch.float32, requires_grad=True)
    parts = CCCMSELoss(ccc_weight=1.0, mse_weight=0.25)(pred, labels, valid)
    supervised = torch.isfinite(labels) & valid[..., None]
    expected = 0.0
    for k in range(2):
        m = supervised[..., k].numpy()
        p, t = pred.detach().numpy()[..., k][m], labels.numpy()[..., k][m]
        expected += ((1 - ccc(p, t)) + 0.25 * np.mean((p - t) ** 2)) / 2
    assert parts.loss.item() == pytest.approx(expected, abs=1e-5)
    parts.loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[2, 15:].abs().sum() == 0  # padding gets no gradient
    assert pred.grad[0, :5, 0].abs().sum() == 0  # nor do unlabelled frames
    assert pred.grad[0, :5, 1].abs().sum() > 0  # the labelled dimension of those frames does


def test_loss_weights_and_perfect_prediction():
    labels = torch.linspace(-1, 1, 40).reshape(1, 20, 2)
    perfect = CCCMSELoss()(labels.clone(), labels)
    assert perfect.loss.item() == pytest.approx(0.0, abs=1e-6)
    mse_only = CCCMSELoss(ccc_weight=0.0, mse_weight=1.0)(labels + 0.1, labels)
    assert mse_only.loss.item() == pytest.approx(0.01, abs=1e-6)
    with pytest.raises(ValueError):
        CCCMSELoss(ccc_weight=0.0, mse_weight=0.0)


def test_loss_without_supervised_frames_is_zero_and_keeps_graph():
    pred = torch.zeros(2, 5, 2, requires_grad=True)
    parts = CCCMSELoss()(pred, torch.full((2, 5, 2), float('nan')))
    assert parts.frames == 0 and parts.loss.item() == 0.0
    parts.loss.backward()


def test_spearman_matches_scipy_with_ties_and_nans():
    from scipy.stats import spearmanr

    from affective_trm_ros.core.metrics import spearman

    rng = np.random.default_rng(3)
    a = np.round(rng.normal(size=200), 1)  # many ties
    b = a + rng.normal(scale=0.5, size=200)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    a_nan = a.copy()
    a_nan[:10] = np.nan
    assert spearman(a_nan, b) == pytest.approx(spearmanr(a[10:], b[10:]).statistic, abs=1e-12)
    assert math.isnan(spearman([1.0], [2.0]))


def test_mean_sd_is_the_sample_standard_deviation():
    from affective_trm_ros.core.metrics import mean_sd

    assert mean_sd([0.5, 0.7, 0.9]) == pytest.approx((0.7, 0.2))
    mean, sd = mean_sd([0.4, float('nan')])
    assert mean == 0.4 and math.isnan(sd)


def test_bootstrap_ci_over_sessions_brackets_the_pooled_value():
    from affective_trm_ros.core.metrics import bootstrap_sessions_ci, regression_report

    rng = np.random.default_rng(0)
    truths = [np.clip(rng.normal(0, 0.5, (100, 2)), -1, 1) for _ in range(6)]
    good = [[t + rng.normal(0, 0.2, t.shape) for t in truths] for _ in range(2)]  # two runs (seeds)
    low, high = bootstrap_sessions_ci(good, truths, resamples=300)
    pooled = np.mean([regression_report(np.concatenate(run), np.concatenate(truths))['mean']['ccc']
                      for run in good])
    assert low <= pooled <= high and 0 < high - low < 0.3
    # one session far worse than the rest widens the interval
    bad = [[t + rng.normal(0, 0.2, t.shape) for t in truths[:-1]] + [-truths[-1]] for _ in range(2)]
    low_bad, high_bad = bootstrap_sessions_ci(bad, truths, resamples=300)
    assert high_bad - low_bad > high - low
    assert all(math.isnan(v) for v in bootstrap_sessions_ci([[run[0]] for run in good], truths[:1]))


def test_confidence_vs_error_orders_bins_and_skips_frames_without_input():
    from affective_trm_ros.core.metrics import confidence_vs_error

    rng = np.random.default_rng(1)
    truth = rng.uniform(-1, 1, (500, 2))
    error_scale = rng.uniform(0.01, 0.5, 500)
    pred = truth + rng.normal(size=(500, 2)) * error_scale[:, None]
    confidence = 1.0 / (1.0 + error_scale / 0.25)
    confidence[:50] = 0.0  # no input: left out
    result = confidence_vs_error(confidence, pred, truth, bins=5)
    assert result['n'] == 450 and result['spearman'] < -0.5
    errors = [b['mean_abs_error'] for b in result['bins']]
    assert errors == sorted(errors, reverse=True)  # higher confidence, smaller error
    assert sum(b['frames'] for b in result['bins']) == 450
