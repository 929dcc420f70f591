"""The training loss on constructed batches whose value is worked out by hand.

``(1 - CCC) + 0.25 * MSE`` per dimension (population moments, supervised frames only), averaged
over the dimensions that have supervision, plus the confidence's Gaussian NLL
``log sigma + e^2 / (2 sigma^2)`` with ``sigma = ref * (1 - c) / c``.
"""

import math

import pytest
import torch

from affective_trm_ros.core.trm import CONFIDENCE_SIGMA_REF
from affective_trm_ros.offline.learning.losses import CCCMSELoss, confidence_nll, masked_ccc

REF = CONFIDENCE_SIGMA_REF


def test_masked_ccc_on_a_hand_computed_case_per_dimension():
    # valence: pred [1, 2, 3, 4] vs [2, 2, 4, 4] -> 2 * 1 / (1.25 + 1 + 0.25) = 0.8
    # arousal: pred [0, 1, 0, 1] vs [0, 0, 1, 1] with the last frame masked -> means 1/3, 1/3,
    #          var 2/9 each, cov -1/9 -> -0.5
    pred = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0], [4.0, 1.0]], dtype=torch.float64)
    true = torch.tensor([[2.0, 0.0], [2.0, 0.0], [4.0, 1.0], [4.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, True], [True, True], [True, False]])
    value = masked_ccc(pred, true, mask)
    torch.testing.assert_close(value, torch.tensor([0.8, -0.5], dtype=torch.float64), rtol=1e-7, atol=1e-7)


def test_masked_ccc_of_equal_constants_is_zero_and_an_unsupervised_dimension_gives_no_gradient():
    pred = torch.full((5, 2), 0.3, requires_grad=True)
    true = torch.full((5, 2), 0.3)
    mask = torch.tensor([[True, False]] * 5)
    value = masked_ccc(pred, true, mask)
    assert value.tolist() == [0.0, 0.0]  # 0 / eps for the constants; no supervised frame for arousal
    value.sum().backward()
    assert pred.grad[:, 1].abs().sum() == 0


def test_masked_ccc_broadcasts_a_frame_mask_and_ignores_nan_labels_under_it():
    pred = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [2.0, 5.0]]], requires_grad=True)
    true = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [float('nan'), float('nan')]]])
    frame_mask = torch.tensor([[[True], [True], [False]]])
    value = masked_ccc(pred, true, frame_mask)
    torch.testing.assert_close(value, torch.tensor([1.0, 1.0]), rtol=1e-6, atol=1e-6)
    value.sum().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[0, 2].abs().sum() == 0


def test_confidence_nll_on_hand_values():
    pred = torch.tensor([[0.5, 0.5], [0.0, 0.9], [0.3, 0.3], [0.1, 0.1]], requires_grad=True)
    labels = torch.tensor([[0.0, 0.0], [0.0, float('nan')], [0.0, 0.0], [float('nan'), float('nan')]])
    confidence = torch.tensor([0.5, 0.8, 0.0, 0.5], requires_grad=True)
    supervised = torch.isfinite(labels)
    nll, used = confidence_nll(pred, labels, confidence, supervised)
    # frame 0: c 0.5 -> sigma = ref, e^2 = 0.25; frame 1: c 0.8 -> sigma = ref / 4, e^2 = 0 (only
    # valence is labelled); frame 2 has confidence 0 and frame 3 no label: both left out.
    expected = (math.log(REF) + 0.25 / (2 * REF ** 2) + math.log(REF / 4)) / 2
    assert used == 2
    assert nll.item() == pytest.approx(expected, rel=1e-6)
    nll.backward()
    assert pred.grad is None or pred.grad.abs().sum() == 0  # the prediction is detached
    # d/dc of frame 0's term / 2: d log sigma / dc = -1 / (c (1 - c)) = -4, and
    # e^2 / (2 sigma^2) = 2 grows as 1 / sigma^2: d/dc = 2 * 2 * 4 = 16 -> (-4 + 16) / 2 = 6.
    assert confidence.grad[0].item() == pytest.approx(6.0, rel=1e-5)
    assert confidence.grad[2].item() == 0 and confidence.grad[3].item() == 0


def test_confidence_nll_clamps_certainty_and_handles_no_usable_frame():
    pred = torch.zeros(2, 2, dtype=torch.float64)
    labels = torch.zeros(2, 2, dtype=torch.float64)
    certain = torch.tensor([1.0, 1.0], dtype=torch.float64)
    nll, used = confidence_nll(pred, labels, certain, torch.ones(2, 2, dtype=torch.bool))
    # c = 1 - 1e-6: sigma = ref * 1e-6 / (1 - 1e-6), zero error -> log sigma only.
    assert used == 2 and nll.item() == pytest.approx(math.log(REF * 1e-6 / (1 - 1e-6)), rel=1e-9)
    confidence = torch.zeros(2, requires_grad=True)
    nll, used = confidence_nll(pred, labels, confidence, torch.ones(2, 2, dtype=torch.bool))
    assert used == 0 and nll.item() == 0.0 and nll.requires_grad


def batch():
    """Two sequences of three frames; sequence 1's last frame is padding; one label missing."""
    pred = torch.tensor([[[0.1, 0.2], [0.4, -0.2], [0.9, 0.0]],
                         [[-0.5, 0.5], [0.0, 0.1], [7.0, 7.0]]], requires_grad=True)
    labels = torch.tensor([[[0.0, 0.1], [0.5, float('nan')], [1.0, 0.2]],
                           [[-0.4, 0.3], [0.1, 0.0], [float('nan'), float('nan')]]])
    frames = torch.tensor([[True, True, True], [True, True, False]])
    return pred, labels, frames


def hand_loss(pred, labels, frames, ccc_weight=1.0, mse_weight=0.25):
    """Per dimension over supervised frames with plain Python floats."""
    total, dims = 0.0, 0
    for k in range(2):
        pairs = [(float(pred[b, t, k]), float(labels[b, t, k])) for b in range(2) for t in range(3)
                 if frames[b, t] and math.isfinite(float(labels[b, t, k]))]
        n = len(pairs)
        mp = sum(p for p, _ in pairs) / n
        mt = sum(t for _, t in pairs) / n
        vp = sum((p - mp) ** 2 for p, _ in pairs) / n
        vt = sum((t - mt) ** 2 for _, t in pairs) / n
        cov = sum((p - mp) * (t - mt) for p, t in pairs) / n
        ccc = 2 * cov / (vp + vt + (mp - mt) ** 2)
        mse = sum((p - t) ** 2 for p, t in pairs) / n
        total += ccc_weight * (1 - ccc) + mse_weight * mse
        dims += 1
    return total / dims


def test_ccc_mse_loss_equals_the_hand_computation_and_reports_its_parts():
    pred, labels, frames = batch()
    parts = CCCMSELoss()(pred, labels, frames)
    assert parts.loss.item() == pytest.approx(hand_loss(pred.detach(), labels, frames), rel=1e-5)
    assert parts.frames == 5  # valence: 5 supervised frames, arousal: 4
    assert math.isnan(parts.nll) and not parts.ccc.requires_grad and parts.mse.shape == (2,)
    # valence MSE: (0.01 + 0.01 + 0.01 + 0.01 + 0.01) / 5
    assert parts.mse[0].item() == pytest.approx(0.01, rel=1e-5)
    weighted = CCCMSELoss(ccc_weight=2.0, mse_weight=3.0)(pred, labels, frames)
    assert weighted.loss.item() == pytest.approx(hand_loss(pred.detach(), labels, frames, 2.0, 3.0), rel=1e-5)


def test_a_dimension_without_labels_is_left_out_of_the_mean():
    pred, labels, frames = batch()
    labels = labels.clone()
    labels[..., 1] = float('nan')
    parts = CCCMSELoss()(pred, labels, frames)
    valence_only = 1 - parts.ccc[0].item() + 0.25 * parts.mse[0].item()
    assert parts.loss.item() == pytest.approx(valence_only, rel=1e-6)  # not halved by an empty arousal


def test_nll_term_is_added_with_its_weight_only_when_asked_for():
    pred, labels, frames = batch()
    confidence = torch.full((2, 3), 0.5)
    base = CCCMSELoss()(pred, labels, frames).loss.item()
    nll, used = confidence_nll(pred, labels, confidence, torch.isfinite(labels) & frames[..., None])
    with_nll = CCCMSELoss(nll_weight=0.1)(pred, labels, frames, confidence)
    assert used == 5 and with_nll.nll == pytest.approx(nll.item(), rel=1e-6)
    assert with_nll.loss.item() == pytest.approx(base + 0.1 * nll.item(), rel=1e-6)
    without = CCCMSELoss(nll_weight=0.0)(pred, labels, frames, confidence)
    assert without.loss.item() == pytest.approx(base) and math.isnan(without.nll)
    assert math.isnan(CCCMSELoss(nll_weight=0.1)(pred, labels, frames).nll)
    no_input = CCCMSELoss(nll_weight=0.1)(pred, labels, frames, torch.zeros(2, 3))
    assert no_input.loss.item() == pytest.approx(base) and math.isnan(no_input.nll)


def test_loss_argument_errors():
    with pytest.raises(ValueError, match='differ in shape'):
        CCCMSELoss()(torch.zeros(1, 3, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match='not both 0'):
        CCCMSELoss(ccc_weight=-1.0, mse_weight=1.0)
    with pytest.raises(ValueError, match='not both 0'):
        CCCMSELoss(ccc_weight=1.0, mse_weight=-0.5)
    with pytest.raises(ValueError, match='nll_weight'):
        CCCMSELoss(nll_weight=-0.1)
    assert CCCMSELoss(ccc_weight=0.0, mse_weight=1.0).ccc_weight == 0.0
    assert CCCMSELoss(ccc_weight=1.0, mse_weight=0.0).mse_weight == 0.0


def test_a_dimension_with_a_single_supervised_frame():
    # One labelled valence frame: its CCC is 0 (no spread), its MSE the squared error, and it
    # still counts in the loss; arousal has three frames.
    pred = torch.tensor([[[0.5, 0.0], [0.2, 0.5], [0.1, 1.0]]])
    labels = torch.tensor([[[0.2, 0.0], [float('nan'), 0.5], [float('nan'), 1.0]]])
    value = masked_ccc(pred, labels, torch.isfinite(labels))
    assert value[0].item() == 0.0 and value[1].item() == pytest.approx(1.0, abs=1e-6)
    parts = CCCMSELoss()(pred, labels)
    assert parts.mse[0].item() == pytest.approx(0.09, rel=1e-5)
    # valence: (1 - 0) + 0.25 * 0.09; arousal: (1 - 1) + 0; mean over both dimensions.
    assert parts.loss.item() == pytest.approx((1 + 0.25 * 0.09) / 2, rel=1e-5)
    assert parts.frames == 3


def test_confidence_nll_uses_the_signed_error_over_the_labelled_dimensions_only():
    pred = torch.tensor([[0.5, 0.3], [0.4, 0.9]])
    labels = torch.tensor([[0.1, 0.1], [-0.2, float('nan')]])
    confidence = torch.tensor([0.5, 0.5])
    nll, used = confidence_nll(pred, labels, confidence, torch.isfinite(labels))
    # e^2: (0.16 + 0.04) / 2 = 0.1 and 0.36 (one labelled dimension); sigma = ref for both.
    expected = math.log(REF) + (0.1 + 0.36) / 2 / (2 * REF ** 2)
    assert used == 2 and nll.item() == pytest.approx(expected, rel=1e-5)


def test_nothing_to_learn_gives_an_exact_zero():
    pred = torch.ones(1, 3, 2, requires_grad=True)
    labels = torch.full((1, 3, 2), float('nan'))
    nll, used = confidence_nll(pred, labels, torch.full((1, 3), 0.7), torch.isfinite(labels))
    assert used == 0 and nll.item() == 0.0
    parts = CCCMSELoss(nll_weight=0.5)(pred, labels, None, torch.full((1, 3), 0.7))
    assert parts.loss.item() == 0.0 and parts.frames == 0 and math.isnan(parts.nll)
    assert parts.ccc.tolist() == [0.0, 0.0] and parts.mse.tolist() == [0.0, 0.0]
    parts.loss.backward()
    assert pred.grad.abs().sum() == 0


def test_default_weights_and_equal_weights():
    pred, labels, frames = batch()
    loss = CCCMSELoss()
    assert (loss.ccc_weight, loss.mse_weight, loss.nll_weight) == (1.0, 0.25, 0.0)
    # By default a given confidence is not trained: no NLL term.
    with_confidence = loss(pred, labels, frames, torch.full((2, 3), 0.5))
    assert math.isnan(with_confidence.nll)
    assert with_confidence.loss.item() == pytest.approx(hand_loss(pred.detach(), labels, frames), rel=1e-5)
    equal = CCCMSELoss(ccc_weight=1.0, mse_weight=1.0)(pred, labels, frames)
    assert equal.loss.item() == pytest.approx(hand_loss(pred.detach(), labels, frames, 1.0, 1.0), rel=1e-5)


def test_ccc_epsilon_floors_the_denominator_of_nearly_constant_series():
    # Identical series with variance 0.5e-8: 2 cov / (var_p + var_t + eps) = 1e-8 / 2e-8 = 0.5.
    a = math.sqrt(0.5e-8)
    series = torch.tensor([[-a, -a], [a, a]], dtype=torch.float64)
    value = masked_ccc(series, series.clone(), torch.ones(2, 2, dtype=torch.bool))
    torch.testing.assert_close(value, torch.tensor([0.5, 0.5], dtype=torch.float64), rtol=1e-9, atol=0)
