"""Evaluation of a checkpoint on a feature-store split, and the report files.

:func:`evaluate_checkpoint` runs a checkpoint over whole sessions (state carried over every frame,
from the initial state, as the fusion node does) and computes CCC, RMSE and Pearson r per
dimension over all labelled frames of the split. :func:`write_report` writes ``report.json``,
``report.md``, ``va_plane.png`` and ``timeseries_<session>.png`` plots; the replay report
reuses it with the predictions the fusion node published.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Union

import numpy as np

from affective_trm_ros.core.checkpoint import check_encoder_spec, load_checkpoint
from affective_trm_ros.core.device import resolve_device
from affective_trm_ros.core.encoders.loading import untrained_line
from affective_trm_ros.core.metrics import DIMENSIONS, confidence_vs_error, regression_report
from affective_trm_ros.offline.learning.data import SessionSource
from affective_trm_ros.offline.learning.splits import (
    DEFAULT_FRACTIONS,
    DEFAULT_SPLIT_SEED,
    SPLIT_NAMES,
    make_splits,
)
from affective_trm_ros.offline.learning.train import predict_sessions, to_json_compatible

# Sessions plotted over time in a report (the first N in id order); more would bloat the folder.
DEFAULT_MAX_TIMESERIES = 4
REPORT_JSON = 'report.json'
REPORT_MD = 'report.md'


def resolve_split(split: Union[str, list], store, metadata: dict) -> tuple:
    """Session ids of ``split`` in ``store`` and a description of where they came from.

    ``split``: 'all', a split name ('train' | 'val' | 'test') or a list of session ids. A split
    name uses the checkpoint's own split when all its sessions are in this store (the usual case:
    evaluating on the store it was trained on); otherwise the split is recomputed on this store
    with the checkpoint's split settings (seed, fractions, speaker-independence).
    """
    if isinstance(split, (list, tuple)):
        missing = [sid for sid in split if not store.has(sid)]
        if missing:
            raise ValueError(f'sessions not in the store: {missing[:5]}')
        return list(split), 'given session ids'
    if split == 'all':
        return store.session_ids(), 'all sessions of the store'
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be 'all', one of {SPLIT_NAMES} or a list of session ids, got {split!r}")
    stored = (metadata.get('splits') or {}).get(split)
    if stored and all(store.has(sid) for sid in stored):
        return list(stored), f"the checkpoint's {split} split"
    settings = metadata.get('train_config') or {}
    splits = make_splits(
        store.speakers(),
        tuple(settings.get('split_fractions', DEFAULT_FRACTIONS)),
        int(settings.get('split_seed', DEFAULT_SPLIT_SEED)),
        settings.get('split_by', 'speaker'),
    )
    return splits[split], f'{split} split recomputed on this store'


def evaluate_checkpoint(
    checkpoint,
    store,
    split: Union[str, list] = 'test',
    *,
    device: str = 'cpu',
    out_dir=None,
    batch_size: int = 64,
    max_timeseries: int = DEFAULT_MAX_TIMESERIES,
) -> dict:
    """Metrics of ``checkpoint`` (path or LoadedCheckpoint) on ``split`` of ``store``.

    Checks that the store's encoder spec matches the checkpoint's (ValueError naming both sides).
    With ``out_dir`` the report files are written too (see :func:`write_report`).
    """
    loaded = load_checkpoint(checkpoint, device=device) if isinstance(checkpoint, (str, Path)) else checkpoint
    check_encoder_spec(loaded.encoder_spec, store.encoder_spec)
    session_ids, origin = resolve_split(split, store, loaded.metadata)
    if not session_ids:
        raise ValueError(f'split {split!r} has no session in {store.root}')
    source = SessionSource(store, session_ids)
    target = resolve_device(device)
    predictions = predict_sessions(loaded.model, source, session_ids, target, batch_size)
    preds = {sid: predictions[sid][0] for sid in session_ids}
    confidence = {sid: predictions[sid][1] for sid in session_ids}
    truths = {sid: source.arrays(sid)[2] for sid in session_ids}
    if not any(np.all(np.isfinite(truth), axis=1).any() for truth in truths.values()):
        raise ValueError(f'the {len(session_ids)} session(s) of {origin} in {store.root} have no labelled '
                         f'frame: CCC, RMSE and Pearson r need ground truth (prepare with labels: a label '
                         f'CSV or the affect/ground_truth topic)')
    timestamps = {sid: source.arrays(sid)[3] for sid in session_ids}
    masks = np.concatenate([source.arrays(sid)[1] for sid in session_ids])
    report = build_report(preds, truths, confidence=confidence)
    report.update(
        {
            'checkpoint': str(checkpoint) if isinstance(checkpoint, (str, Path)) else 'in memory',
            'model_kind': loaded.kind,
            'encoder_spec': loaded.encoder_spec,
            'store': str(store.root),
            'split': split if isinstance(split, str) else 'custom',
            'split_origin': origin,
            'modality_presence': {m: float(masks[:, i].mean()) for i, m in enumerate(store.modalities)},
            'trained_epoch': loaded.metadata.get('epoch'),
            'encoders': dict(getattr(store, 'encoder_identities', {})),
        }
    )
    if out_dir is not None:
        write_report(
            report, out_dir, preds, truths, timestamps, confidence=confidence, max_timeseries=max_timeseries
        )
        markdown = Path(out_dir) / REPORT_MD   # its first line says which encoders ran untrained
        markdown.write_text(untrained_line(report['encoders']) + '\n\n' + markdown.read_text())
    return report


def build_report(predictions: dict, truths: dict, confidence: Optional[dict] = None) -> dict:
    """Whole-set metrics plus per-session RMSE from per-session (T, 2) predictions and labels."""
    ids = list(predictions)
    all_pred = (
        np.concatenate([np.asarray(predictions[s], np.float64) for s in ids]) if ids else np.zeros((0, 2))
    )
    all_true = np.concatenate([np.asarray(truths[s], np.float64) for s in ids]) if ids else np.zeros((0, 2))
    labelled = np.all(np.isfinite(all_true), axis=1)
    report = {
        'metrics': regression_report(all_pred, all_true),
        'sessions': len(ids),
        'frames': int(all_pred.shape[0]),
        'labelled_frames': int(labelled.sum()),
        'coverage': float(np.mean(np.all(np.isfinite(all_pred), axis=1))) if all_pred.size else math.nan,
        'per_session': {},
    }
    if confidence:
        values = np.concatenate([np.asarray(confidence[s], np.float64) for s in ids])
        report['confidence_mean'] = float(np.nanmean(values)) if values.size else math.nan
        report['confidence_vs_error'] = confidence_vs_error(values, all_pred, all_true)
    for sid in ids:
        session = regression_report(np.asarray(predictions[sid]), np.asarray(truths[sid]))
        report['per_session'][sid] = {
            'frames': int(np.asarray(predictions[sid]).shape[0]),
            'rmse_valence': session['valence']['rmse'],
            'rmse_arousal': session['arousal']['rmse'],
            'ccc_mean': session['mean']['ccc'],
        }
    return report


def _as_sessions(value, name: str) -> dict:
    """A (T, k) array means one stream called 'stream'; a dict maps session ids to arrays."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): np.asarray(v) for k, v in value.items()}
    return {'stream': np.asarray(value)}


def write_report(
    report: dict,
    out_dir,
    predictions,
    truths,
    timestamps,
    *,
    confidence=None,
    max_timeseries: int = DEFAULT_MAX_TIMESERIES,
    title: str = 'Evaluation',
) -> dict:
    """Write report.json, report.md, va_plane.png and timeseries plots into ``out_dir``.

    ``predictions``/``truths``/``timestamps`` are dicts session id -> array ((T, 2), (T, 2), (T,)),
    or single arrays for one stream. ``report`` needs a ``'metrics'`` entry (a regression_report);
    other entries are copied to the JSON as they are. Returns {name: path} of the written files.
    """
    from affective_trm_ros.offline.evaluation.plots import (
        plot_confidence_error,
        plot_timeseries,
        plot_va_plane,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preds = _as_sessions(predictions, 'predictions')
    trues = _as_sessions(truths, 'truths')
    stamps = _as_sessions(timestamps, 'timestamps')
    confs = _as_sessions(confidence, 'confidence')
    files = {}
    if preds:
        all_pred = np.concatenate([preds[s].reshape(-1, 2) for s in preds])
        all_true = np.concatenate(
            [trues[s].reshape(-1, 2) if s in trues else np.full_like(preds[s], np.nan) for s in preds]
        )
        files['va_plane'] = plot_va_plane(all_pred, all_true, out_dir / 'va_plane.png', title=title)
        plotted = []
        for sid in sorted(preds)[:max_timeseries]:
            safe = ''.join(c if c.isalnum() or c in '._-' else '_' for c in sid)
            times = stamps.get(sid, np.arange(preds[sid].shape[0], dtype=np.float64))
            path = plot_timeseries(
                times,
                preds[sid],
                trues.get(sid),
                out_dir / f'timeseries_{safe}.png',
                title=sid,
                confidence=confs.get(sid),
            )
            files[f'timeseries_{safe}'] = path
            plotted.append(path.name)
        if confs and all(s in confs for s in preds):
            all_conf = np.concatenate([np.asarray(confs[s], np.float64).reshape(-1) for s in preds])
            files['confidence_error'] = plot_confidence_error(all_conf, all_pred, all_true,
                                                              out_dir / 'confidence_error.png')
            plotted.append('confidence_error.png')
        report = {**report, 'plots': ['va_plane.png', *plotted]}
    json_path = out_dir / REPORT_JSON
    json_path.write_text(json.dumps(to_json_compatible(report), indent=2))
    files['json'] = json_path
    md_path = out_dir / REPORT_MD
    md_path.write_text(report_markdown(report, title))
    files['markdown'] = md_path
    return files


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return 'n/a'
    return f'{value:.{digits}f}'


def metrics_table(metrics: dict) -> str:
    """Markdown table of a regression_report."""
    lines = ['| dimension | CCC | RMSE | Pearson r | labelled frames |', '|---|---|---|---|---|']
    for name in DIMENSIONS:
        m = metrics[name]
        lines.append(f'| {name} | {_fmt(m["ccc"])} | {_fmt(m["rmse"])} | {_fmt(m["pearson"])} | {m["n"]} |')
    m = metrics['mean']
    lines.append(f'| **mean** | **{_fmt(m["ccc"])}** | {_fmt(m["rmse"])} | {_fmt(m["pearson"])} | |')
    return '\n'.join(lines)


def report_markdown(report: dict, title: str = 'Evaluation') -> str:
    lines = [f'# {title}', '']
    for key, label in (
        ('checkpoint', 'Checkpoint'),
        ('model_kind', 'Model'),
        ('store', 'Feature store'),
        ('split', 'Split'),
        ('split_origin', 'Split from'),
        ('sessions', 'Sessions'),
        ('frames', 'Frames'),
        ('labelled_frames', 'Labelled frames'),
    ):
        if key in report:
            lines.append(f'- {label}: {report[key]}')
    if 'coverage' in report:
        lines.append(f'- Coverage (frames with an output): {_fmt(report["coverage"] * 100, 1)} %')
    if 'confidence_mean' in report:
        lines.append(f'- Mean confidence: {_fmt(report["confidence_mean"])}')
    if report.get('confidence_vs_error'):
        relation = report['confidence_vs_error']
        bins = ', '.join(f"{_fmt(b['mean_confidence'], 2)} -> {_fmt(b['mean_abs_error'])}"
                         for b in relation['bins'])
        lines.append(f"- Confidence vs absolute error: Spearman {_fmt(relation['spearman'])} (negative: "
                     f'lower confidence where the error is larger); mean |error| per confidence quintile: '
                     f'{bins}')
    if 'modality_presence' in report:
        presence = ', '.join(f'{m} {_fmt(v * 100, 1)} %' for m, v in report['modality_presence'].items())
        lines.append(f'- Modality presence: {presence}')
    lines += [
        '',
        '## Metrics (all labelled frames of all sessions)',
        '',
        metrics_table(report['metrics']),
        '',
    ]
    extra = {k: v for k, v in report.items() if k == 'latency_ms'}
    if extra:
        lat = extra['latency_ms']
        lines += ['## Latency', '', ' '.join(f'{k} {_fmt(v, 2)} ms' for k, v in lat.items()), '']
    for plot in report.get('plots', []):
        lines.append(f'![{plot}]({plot})')
    return '\n'.join(lines) + '\n'
