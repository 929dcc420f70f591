"""PNG plots of training and evaluation: learning curves, valence/arousal over time, the VA plane.

Matplotlib runs on the non-interactive Agg backend, so plots work on headless machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

# Points drawn on the VA plane at most (a random, seeded subset beyond that keeps files small).
MAX_PLANE_POINTS = 5000
PLOT_DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use('Agg', force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[dict], path) -> Path:
    """Loss (train/val) and validation CCC (valence, arousal, mean) per epoch."""
    plt = _pyplot()
    axis = 'step' if all('step' in row for row in history) else 'epoch'
    epochs = [row[axis] for row in history]
    fig, (ax_loss, ax_ccc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(epochs, [row['train_loss'] for row in history], label='train loss')
    if any(np.isfinite(row.get('val_loss', np.nan)) for row in history):
        ax_loss.plot(epochs, [row.get('val_loss', np.nan) for row in history], label='validation loss')
    ax_loss.set_xlabel(f'optimiser {axis}' if axis == 'step' else axis)
    ax_loss.set_ylabel('(1 - CCC) + w * MSE (+ w * NLL)')
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    for key, label in (
        ('val_ccc_valence', 'valence'),
        ('val_ccc_arousal', 'arousal'),
        ('val_ccc_mean', 'mean'),
    ):
        ax_ccc.plot(epochs, [row.get(key, np.nan) for row in history], label=f'validation CCC {label}')
    ax_ccc.plot(
        epochs, [row.get('train_ccc_mean', np.nan) for row in history], '--',
        label='train CCC mean (whole batch sequences)'
    )
    ax_ccc.set_xlabel(f'optimiser {axis}' if axis == 'step' else axis)
    ax_ccc.set_ylabel('CCC')
    ax_ccc.legend()
    ax_ccc.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_va_plane(
    predictions: np.ndarray, truths: np.ndarray, path, title: str = 'valence-arousal plane', seed: int = 0
) -> Path:
    """Predicted and true points on the valence-arousal plane (labelled frames only)."""
    plt = _pyplot()
    predictions = np.asarray(predictions, dtype=np.float64).reshape(-1, 2)
    truths = np.asarray(truths, dtype=np.float64).reshape(-1, 2)
    keep = np.all(np.isfinite(truths), axis=1) & np.all(np.isfinite(predictions), axis=1)
    predictions, truths = predictions[keep], truths[keep]
    if predictions.shape[0] > MAX_PLANE_POINTS:
        pick = np.random.default_rng(seed).choice(predictions.shape[0], MAX_PLANE_POINTS, replace=False)
        predictions, truths = predictions[pick], truths[pick]
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.scatter(truths[:, 0], truths[:, 1], s=6, alpha=0.35, label='true', color='tab:green')
    ax.scatter(predictions[:, 0], predictions[:, 1], s=6, alpha=0.35, label='predicted', color='tab:blue')
    ax.axhline(0, color='grey', lw=0.6)
    ax.axvline(0, color='grey', lw=0.6)
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(-1.05, 1.05)
    ax.set_aspect('equal')
    ax.set_xlabel('valence')
    ax.set_ylabel('arousal')
    ax.set_title(f'{title} ({predictions.shape[0]} frames)')
    ax.legend(loc='lower right')
    fig.tight_layout()
    return _save(fig, path)


def plot_timeseries(
    timestamps: np.ndarray,
    predictions: np.ndarray,
    truths: Optional[np.ndarray],
    path,
    title: str = '',
    confidence: Optional[np.ndarray] = None,
) -> Path:
    """Valence and arousal over time, prediction against ground truth (and confidence when given)."""
    plt = _pyplot()
    timestamps = np.asarray(timestamps, dtype=np.float64)
    predictions = np.asarray(predictions, dtype=np.float64).reshape(-1, 2)
    fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    for column, (ax, name) in enumerate(zip(axes, ('valence', 'arousal'))):
        if truths is not None:
            ax.plot(
                timestamps,
                np.asarray(truths, dtype=np.float64)[:, column],
                color='tab:green',
                lw=1.5,
                label='true',
            )
        ax.plot(timestamps, predictions[:, column], color='tab:blue', lw=1.0, label='predicted')
        if confidence is not None:
            ax.fill_between(
                timestamps,
                -1.05,
                -1.05 + 0.3 * np.asarray(confidence, dtype=np.float64),
                color='tab:orange',
                alpha=0.3,
                lw=0,
                label='confidence (scaled)',
            )
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(loc='upper right', fontsize='small')
    axes[-1].set_xlabel('time (s)')
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_confidence_error(confidence: np.ndarray, predictions: np.ndarray, truths: np.ndarray, path,
                          title: str = 'confidence vs absolute error', seed: int = 0) -> Path:
    """Scatter of each labelled frame's confidence against its absolute error (mean over the two
    dimensions), with the mean error per confidence quintile."""
    from affective_trm_ros.core.metrics import confidence_vs_error, mean_abs_error_per_frame

    plt = _pyplot()
    confidence = np.asarray(confidence, np.float64).reshape(-1)
    pred = np.asarray(predictions, np.float64).reshape(-1, 2)
    true = np.asarray(truths, np.float64).reshape(-1, 2)
    error = mean_abs_error_per_frame(pred, true)
    keep = np.isfinite(error) & (confidence > 0)
    summary = confidence_vs_error(confidence, pred, true)
    points = np.flatnonzero(keep)
    if points.size > MAX_PLANE_POINTS:
        points = np.random.default_rng(seed).choice(points, MAX_PLANE_POINTS, replace=False)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(confidence[points], error[points], s=5, alpha=0.3, color='tab:blue', label='frames')
    if summary['bins']:
        bins = summary['bins']
        ax.plot([b['mean_confidence'] for b in bins], [b['mean_abs_error'] for b in bins], 'o-',
                color='tab:red', label='mean |error| per confidence quintile')
    ax.set_xlabel('confidence')
    ax.set_ylabel('|error| (mean of valence and arousal)')
    ax.set_title(f"{title} (Spearman {summary['spearman']:.2f}, {summary['n']} frames)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path
