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


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties); NaN pairs are left out."""
    x, y = _valid_pairs(a, b)
    if x.size < 2:
        return math.nan

    def ranks(values: np.ndarray) -> np.ndarray:
        order = np.argsort(values, kind='mergesort')
        ranked = np.empty(values.size, np.float64)
        ranked[order] = np.arange(values.size, dtype=np.float64)
        # average the ranks of tied values
        unique, inverse = np.unique(values, return_inverse=True)
        sums = np.bincount(inverse, weights=ranked)
        counts = np.bincount(inverse)
        return (sums / counts)[inverse] if unique.size < values.size else ranked

    return pearson(ranks(x), ranks(y))


def mean_sd(values) -> tuple:
    """(mean, sample standard deviation) of the finite values; sd is NaN for fewer than two."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if finite.size == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else math.nan


def bootstrap_sessions_ci(predictions: list, truths: list, metric=None, resamples: int = 1000,
                          level: float = 0.95, seed: int = 0) -> tuple:
    """Percentile bootstrap confidence interval of a pooled metric over *sessions*.

    ``predictions[r][s]`` and ``truths[s]``: run r's (T_s, 2) prediction of session s (runs are,
    e.g., training seeds) and its labels. Each resample draws sessions with replacement, computes
    ``metric(pooled predictions, pooled labels)`` per run (default: mean CCC over the two
    dimensions) and averages over runs. Returns (low, high); NaN with fewer than two sessions.
    """
    if metric is None:
        def metric(pred, true):
            return regression_report(pred, true)['mean']['ccc']
    sessions = len(truths)
    if sessions < 2 or not predictions:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, sessions, sessions)
        true = np.concatenate([np.asarray(truths[s], np.float64).reshape(-1, 2) for s in pick])
        scores = [metric(np.concatenate([np.asarray(run[s], np.float64).reshape(-1, 2) for s in pick]), true)
                  for run in predictions]
        values.append(float(np.mean(scores)))
    values = np.asarray([v for v in values if math.isfinite(v)])
    if values.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0 * 100.0
    return float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail))


def mean_abs_error_per_frame(pred, true) -> np.ndarray:
    """(N,) mean absolute error over each frame's labelled dimensions; NaN where none is labelled."""
    diff = np.abs(np.asarray(pred, np.float64).reshape(-1, 2) - np.asarray(true, np.float64).reshape(-1, 2))
    finite = np.isfinite(diff)
    count = finite.sum(axis=1)
    total = np.where(finite, diff, 0.0).sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def confidence_vs_error(confidence, predictions, truths, bins: int = 5) -> dict:
    """How a confidence output relates to the absolute error (mean over the labelled dimensions).

    Returns ``{'n', 'spearman' (confidence vs |error|; negative = informative), 'bins': [{'low',
    'high', 'frames', 'mean_confidence', 'mean_abs_error'}...]}`` with bins of equal frame counts
    from the lowest to the highest confidence. Frames without a label or with confidence 0 (no
    input) are left out.
    """
    confidence = np.asarray(confidence, np.float64).reshape(-1)
    pred = np.asarray(predictions, np.float64).reshape(-1, 2)
    true = np.asarray(truths, np.float64).reshape(-1, 2)
    error = mean_abs_error_per_frame(pred, true)
    keep = np.isfinite(error) & np.isfinite(confidence) & (confidence > 0)
    confidence, error = confidence[keep], error[keep]
    result = {'n': int(keep.sum()), 'spearman': spearman(confidence, error), 'bins': []}
    if confidence.size == 0:
        return result
    order = np.argsort(confidence, kind='mergesort')
    for part in np.array_split(order, min(bins, confidence.size)):
        result['bins'].append({
            'low': float(confidence[part].min()), 'high': float(confidence[part].max()),
            'frames': int(part.size), 'mean_confidence': float(confidence[part].mean()),
            'mean_abs_error': float(error[part].mean()),
        })
    return result
