"""Regression metrics for continuous valence/arousal: CCC, RMSE and Pearson r.

Every metric is computed over a whole evaluation set (all frames of all sessions at once), never
averaged over batches or sessions, and uses population moments (divide by N). Pairs whose
label (or prediction) is NaN are left out, so unlabelled frames can stay in the arrays.

Degenerate cases are explicit rather than silently patched:

* no valid pair -> NaN for every metric;
* Pearson r is NaN when either side has zero variance (undefined);
* CCC is 0 for a constant prediction against varying labels (the covariance is 0), and NaN only
  when predictions and labels are the same constant (0 / 0).
"""

from __future__ import annotations

import math

import numpy as np

# Names of the two output dimensions, in the column order of every (N, 2) array.
DIMENSIONS = ('valence', 'arousal')
METRICS = ('ccc', 'rmse', 'pearson')


def _valid_pairs(pred, true) -> tuple[np.ndarray, np.ndarray]:
    """Flatten both sides to float64 and keep only the pairs where both are finite."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    true = np.asarray(true, dtype=np.float64).reshape(-1)
    if pred.shape != true.shape:
        raise ValueError(f'prediction and label arrays differ in size: {pred.shape} vs {true.shape}')
    keep = np.isfinite(pred) & np.isfinite(true)
    return pred[keep], true[keep]


def _is_constant(values: np.ndarray) -> bool:
    return bool(values.size) and bool(np.all(values == values[0]))


def ccc(pred, true) -> float:
    """Lin's concordance correlation coefficient ``2·cov / (var_p + var_t + (mean_p − mean_t)²)``."""
    p, t = _valid_pairs(pred, true)
    if p.size == 0:
        return math.nan
    mean_p, mean_t = p.mean(), t.mean()
    # A constant side has exactly zero spread (the mean of N equal floats may not be exact).
    dp = np.zeros_like(p) if _is_constant(p) else p - mean_p
    dt = np.zeros_like(t) if _is_constant(t) else t - mean_t
    var_p, var_t = np.mean(dp * dp), np.mean(dt * dt)
    cov = np.mean(dp * dt)
    denominator = var_p + var_t + (mean_p - mean_t) ** 2
    if denominator == 0.0:
        return math.nan
    return float(2.0 * cov / denominator)


def rmse(pred, true) -> float:
    """Root mean squared error."""
    p, t = _valid_pairs(pred, true)
    if p.size == 0:
        return math.nan
    return float(np.sqrt(np.mean((p - t) ** 2)))


def pearson(pred, true) -> float:
    """Pearson correlation coefficient (NaN when either side is constant)."""
    p, t = _valid_pairs(pred, true)
    if p.size == 0:
        return math.nan
    if _is_constant(p) or _is_constant(t):
        return math.nan
    dp, dt = p - p.mean(), t - t.mean()
    norm = math.sqrt(float(np.sum(dp * dp)) * float(np.sum(dt * dt)))
    if norm == 0.0:
        return math.nan
    return float(np.clip(np.sum(dp * dt) / norm, -1.0, 1.0))


def regression_report(pred, true) -> dict:
    """Metrics per dimension and their mean over the two dimensions.

    ``pred`` and ``true`` are (N, 2) arrays in (valence, arousal) order; NaN labels are ignored.
    Returns ``{'valence': {'ccc', 'rmse', 'pearson', 'n'}, 'arousal': {...}, 'mean': {'ccc', 'rmse',
    'pearson'}}`` where ``n`` counts the labelled frames the metrics were computed on.
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.ndim != 2 or pred.shape[1] != len(DIMENSIONS) or pred.shape != true.shape:
        raise ValueError(f'expected two (N, 2) arrays, got prediction {pred.shape} and labels {true.shape}')
    report: dict = {}
    for column, name in enumerate(DIMENSIONS):
        p, t = pred[:, column], true[:, column]
        report[name] = {
            'ccc': ccc(p, t),
            'rmse': rmse(p, t),
            'pearson': pearson(p, t),
            'n': int(np.sum(np.isfinite(p) & np.isfinite(t))),
        }
    report['mean'] = {
        metric: float(np.mean([report[name][metric] for name in DIMENSIONS])) for metric in METRICS
    }
    return report
