"""Training loss: ``ccc_weight · (1 − CCC) + mse_weight · MSE + nll_weight · NLL``.

CCC is computed per dimension over all supervised frames of the batch at once, with population
moments, exactly like :func:`affective_trm_ros.core.metrics.ccc`. The training loop hands it the
predictions of *whole* (possibly cropped) sessions, many per batch, gathered over every truncated-
BPTT window — not one window, over which the labels hardly vary. MSE is per frame. Padding and
unlabelled frames are excluded through a mask; NaN labels count as unlabelled.

NLL is the Gaussian negative log-likelihood of the (detached) valence/arousal error under the
error scale that the model's confidence encodes (:func:`~affective_trm_ros.core.trm.sigma_from_confidence`):
``log sigma + e² / (2 sigma²)``, e² the mean squared error of the frame over its labelled
dimensions. It trains the confidence alone (the prediction is detached), so a model learns to be
less confident where it errs more, without trading accuracy for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from affective_trm_ros.core.trm import CONFIDENCE_SIGMA_REF

# Keeps the CCC denominator away from 0 when a batch has constant labels and predictions.
CCC_EPS = 1e-8
# Confidence is clamped to [eps, 1 - eps] in the NLL (sigma stays finite and non-zero).
CONFIDENCE_EPS = 1e-6


@dataclass
class LossParts:
    """The loss and the numbers it was made of (detached floats are for logging)."""

    loss: torch.Tensor  # scalar, differentiable
    ccc: torch.Tensor  # (2,) CCC per dimension (detached)
    mse: torch.Tensor  # (2,) MSE per dimension (detached)
    frames: int  # supervised frames in the batch (both dimensions together, max)
    nll: float = float('nan')  # Gaussian NLL of the error under the confidence (nan: not computed)


def masked_ccc(pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CCC per last-axis dimension over all positions where ``mask`` is True.

    ``pred``/``true``: (..., K); ``mask``: (..., K) bool (or broadcastable to it). Returns (K,).
    Dimensions without any supervised position give CCC 0 (and no gradient).
    """
    mask = mask.expand_as(true)
    weight = mask.to(pred.dtype)
    count = weight.sum(dim=tuple(range(weight.dim() - 1)))  # (K,)
    safe_count = count.clamp(min=1.0)
    true = torch.where(mask, true, torch.zeros_like(true))  # NaN labels -> 0, masked out
    reduce_dims = tuple(range(pred.dim() - 1))
    mean_p = (pred * weight).sum(dim=reduce_dims) / safe_count
    mean_t = (true * weight).sum(dim=reduce_dims) / safe_count
    dp = (pred - mean_p) * weight
    dt = (true - mean_t) * weight
    var_p = (dp * dp).sum(dim=reduce_dims) / safe_count
    var_t = (dt * dt).sum(dim=reduce_dims) / safe_count
    cov = (dp * dt).sum(dim=reduce_dims) / safe_count
    value = 2.0 * cov / (var_p + var_t + (mean_p - mean_t) ** 2 + CCC_EPS)
    return torch.where(count > 0, value, torch.zeros_like(value))


def confidence_nll(pred: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor,
                   supervised: torch.Tensor) -> tuple:
    """Mean Gaussian NLL (without the constant) of each frame's error under its confidence.

    ``pred``/``labels``/``supervised`` (..., 2), ``confidence`` (...). Frames with no labelled
    dimension, or with confidence 0 (no modality present: nothing was predicted from data), are
    left out. Returns (scalar loss, frames used). The prediction is detached.
    """
    weight = supervised.to(pred.dtype)
    dims = weight.sum(-1)
    clean = torch.where(supervised, labels, torch.zeros_like(labels))
    error2 = (((pred.detach() - clean) ** 2) * weight).sum(-1) / dims.clamp(min=1.0)
    used = (dims > 0) & (confidence > 0)
    c = confidence.clamp(CONFIDENCE_EPS, 1.0 - CONFIDENCE_EPS)
    log_sigma = math.log(CONFIDENCE_SIGMA_REF) + torch.log1p(-c) - torch.log(c)
    nll = log_sigma + 0.5 * error2 * torch.exp(-2.0 * log_sigma)
    count = int(used.sum().item())
    if count == 0:
        return confidence.sum() * 0.0, 0
    return nll[used].mean(), count


class CCCMSELoss(torch.nn.Module):
    """``ccc_weight · mean_k(1 − CCC_k) + mse_weight · mean_k(MSE_k) [+ nll_weight · NLL]``.

    ``forward(pred (B, T, 2), labels (B, T, 2) with NaN = unlabelled, frame_mask (B, T) bool or None,
    confidence (B, T) or None)``. ``frame_mask`` marks real (non-padding) frames; a frame is
    supervised in dimension k when it is real and its label k is finite. The NLL term is added
    when ``confidence`` is given and ``nll_weight`` > 0.
    """

    def __init__(self, ccc_weight: float = 1.0, mse_weight: float = 0.25, nll_weight: float = 0.0) -> None:
        super().__init__()
        if ccc_weight < 0 or mse_weight < 0 or ccc_weight + mse_weight == 0:
            raise ValueError(f'loss weights must be >= 0 and not both 0 (ccc {ccc_weight}, mse {mse_weight})')
        if nll_weight < 0:
            raise ValueError(f'nll_weight must be >= 0, got {nll_weight}')
        self.ccc_weight = float(ccc_weight)
        self.mse_weight = float(mse_weight)
        self.nll_weight = float(nll_weight)

    def forward(
        self, pred: torch.Tensor, labels: torch.Tensor, frame_mask: torch.Tensor | None = None,
        confidence: torch.Tensor | None = None,
    ) -> LossParts:
        if pred.shape != labels.shape:
            raise ValueError(
                f'prediction {tuple(pred.shape)} and labels {tuple(labels.shape)} differ in shape'
            )
        pred = pred.float()
        labels = labels.float()
        supervised = torch.isfinite(labels)
        if frame_mask is not None:
            supervised = supervised & frame_mask.bool().unsqueeze(-1)
        ccc_k = masked_ccc(pred, labels, supervised)
        weight = supervised.to(pred.dtype)
        reduce_dims = tuple(range(pred.dim() - 1))
        count = weight.sum(dim=reduce_dims)
        clean = torch.where(supervised, labels, torch.zeros_like(labels))
        mse_k = (((pred - clean) ** 2) * weight).sum(dim=reduce_dims) / count.clamp(min=1.0)
        has = count > 0
        if not bool(has.any()):
            zero = pred.sum() * 0.0  # keeps the graph; nothing to learn from this window
            return LossParts(zero, ccc_k.detach(), mse_k.detach(), 0)
        loss = self.ccc_weight * (1.0 - ccc_k[has]).mean() + self.mse_weight * mse_k[has].mean()
        nll_value = float('nan')
        if confidence is not None and self.nll_weight > 0:
            nll, used = confidence_nll(pred, labels, confidence.float(), supervised)
            if used:
                loss = loss + self.nll_weight * nll
                nll_value = float(nll.detach())
        return LossParts(loss, ccc_k.detach(), mse_k.detach(), int(count.max().item()), nll_value)
