"""Evaluation of checkpoints on a feature-store split, and the report files.

:func:`evaluate_checkpoints` runs one or more checkpoints (one per training seed) over whole
sessions (state carried over every frame, from the initial state, reset where the fusion node
resets it) and computes CCC, RMSE and Pearson r per dimension over all labelled frames of the
split; with several checkpoints, the mean +- sd over them, the mean CCC of every session and a
bootstrap confidence interval over sessions (:mod:`~affective_trm_ros.offline.evaluation.seeds`).
:func:`write_report` writes ``report.json``, ``report.md``, ``va_plane.png`` and
``timeseries_<session>.png`` plots; the replay report reuses it with the predictions the fusion
node published.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np

from affective_trm_ros.core.checkpoint import check_encoder_spec, load_checkpoint
from affective_trm_ros.core.device import resolve_device
from affective_trm_ros.core.encoders.loading import untrained_line
from affective_trm_ros.core.metrics import DIMENSIONS, confidence_vs_error, mean_sd, regression_report
from affective_trm_ros.offline.evaluation.seeds import BOOTSTRAP_RESAMPLES, seed_session_statistics
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
# Sessions listed one by one on the terminal; a longer list is summarised there (report.md has all).
MAX_PRINTED_SESSIONS = 20
SD_UNAVAILABLE = ('sd not available: one checkpoint was given, and an sd over training seeds needs at '
                  'least two (give one checkpoint per seed)')


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


def evaluate_checkpoints(
    checkpoints: Sequence,
    store,
    split: Union[str, list] = 'test',
    *,
    device: str = 'cpu',
    out_dir=None,
    batch_size: int = 64,
    max_timeseries: int = DEFAULT_MAX_TIMESERIES,
) -> dict:
    """Metrics of ``checkpoints`` (paths or LoadedCheckpoints; one per training seed) on ``split``.

    Every checkpoint must be of the same model kind, trained on the same encoders as each other and
    as the store, and resolve ``split`` to the same sessions (ValueError naming them otherwise).
    The report holds ``metrics`` (one checkpoint: its metrics; several: the mean over them of each
    number), ``seed_statistics`` (:func:`~affective_trm_ros.offline.evaluation.seeds.
    seed_session_statistics`: mean +- sd over the checkpoints, per-session mean CCC, the bootstrap
    CI of the mean CCC over sessions) and ``per_checkpoint`` metrics. Resets: the store's own
    settings, as the fusion node's defaults for these sessions. With ``out_dir`` the report files
    are written too (see :func:`write_report`; the plots show the first checkpoint's predictions).
    """
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError('no checkpoint to evaluate')
    names = [str(c) if isinstance(c, (str, Path)) else f'in memory #{i + 1}'
             for i, c in enumerate(checkpoints)]
    _refuse_repeats(checkpoints)
    loaded = [load_checkpoint(c, device=device) if isinstance(c, (str, Path)) else c for c in checkpoints]
    _check_same_model(loaded, names)
    check_encoder_spec(loaded[0].encoder_spec, store.encoder_spec)
    session_ids, origin = resolve_split(split, store, loaded[0].metadata)
    for name, other in zip(names[1:], loaded[1:]):
        ids, other_origin = resolve_split(split, store, other.metadata)
        if ids != session_ids:
            raise ValueError(f'{name} and {names[0]} give different {split!r} sessions ({other_origin} vs '
                             f'{origin}): they were trained with different splits; evaluate them on the '
                             f'same sessions with --sessions or --split all')
    if not session_ids:
        raise ValueError(f'split {split!r} has no session in {store.root}')
    source = SessionSource(store, session_ids)
    truths = {sid: source.arrays(sid)[2] for sid in session_ids}
    if not any(np.all(np.isfinite(truth), axis=1).any() for truth in truths.values()):
        raise ValueError(f'the {len(session_ids)} session(s) of {origin} in {store.root} have no labelled '
                         f'frame: CCC, RMSE and Pearson r need ground truth (prepare with labels: a label '
                         f'CSV or the affect/ground_truth topic)')
    target = resolve_device(device)
    preds, confidence = [], []
    for model in loaded:
        predictions = predict_sessions(model.model, source, session_ids, target, batch_size)
        preds.append({sid: predictions[sid][0] for sid in session_ids})
        confidence.append({sid: predictions[sid][1] for sid in session_ids})
    timestamps = {sid: source.arrays(sid)[3] for sid in session_ids}
    masks = np.concatenate([source.arrays(sid)[1] for sid in session_ids])
    reports = [build_report(p, truths, confidence=c) for p, c in zip(preds, confidence)]
    report = reports[0] if len(reports) == 1 else _merge_reports(reports, preds, confidence, truths)
    statistics = seed_session_statistics([[p[sid] for sid in session_ids] for p in preds],
                                         [truths[sid] for sid in session_ids], session_ids)
    report.update(
        {
            'checkpoint': names[0] if len(names) == 1 else f'{len(names)} checkpoints',
            'checkpoints': names,
            'model_kind': loaded[0].kind,
            'encoder_spec': loaded[0].encoder_spec,
            'store': str(store.root),
            'store_features_hash': getattr(store, 'info', {}).get('features_hash'),
            'split': split if isinstance(split, str) else 'custom',
            'split_origin': origin,
            'modality_presence': {m: float(masks[:, i].mean()) for i, m in enumerate(store.modalities)},
            'trained_epoch': loaded[0].metadata.get('epoch'),
            'encoders': dict(getattr(store, 'encoder_identities', {})),
            'seed_statistics': statistics,
            'bootstrap': {'resamples': BOOTSTRAP_RESAMPLES, 'over': 'sessions', 'level': 0.95},
            'per_checkpoint': [
                {
                    'checkpoint': name,
                    'training_seed': (model.metadata.get('train_config') or {}).get('seed'),
                    'features_hash': model.metadata.get('features_hash'),
                    'trained_epoch': model.metadata.get('epoch'),
                    'metrics': single['metrics'],
                }
                for name, model, single in zip(names, loaded, reports)
            ],
        }
    )
    if len(names) == 1:
        report['sd_note'] = SD_UNAVAILABLE
    if out_dir is not None:
        write_report(report, out_dir, preds[0], truths, timestamps, confidence=confidence[0],
                     max_timeseries=max_timeseries)
        markdown = Path(out_dir) / REPORT_MD   # its first line says which encoders ran untrained
        markdown.write_text(untrained_line(report['encoders']) + '\n\n' + markdown.read_text())
    return report


def _refuse_repeats(checkpoints: list) -> None:
    """The same file twice would pass for two training seeds that agree perfectly."""
    seen: dict = {}
    for checkpoint in checkpoints:
        if isinstance(checkpoint, (str, Path)):
            key = Path(checkpoint).resolve()
            if key in seen:
                also = f' (also as {seen[key]})' if str(seen[key]) != str(checkpoint) else ''
                raise ValueError(f"{checkpoint} is given twice{also}: give each training seed's checkpoint "
                                 f'once')
            seen[key] = checkpoint


def _check_same_model(loaded: list, names: list) -> None:
    """Checkpoints evaluated together must be one model trained with different seeds: the same kind
    and the same encoders (modality, plugin id, dimension). Their feature order is the same too:
    :func:`load_checkpoint` refuses any other than this code's."""
    first = loaded[0]
    for name, other in zip(names[1:], loaded[1:]):
        if other.kind != first.kind:
            raise ValueError(f'{name} is a {other.kind!r} model but {names[0]} is a {first.kind!r} model: '
                             f'checkpoints evaluated together must be one model kind (one per training seed)')
        try:
            check_encoder_spec(first.encoder_spec, other.encoder_spec)
        except ValueError as error:
            detail = str(error).split('\n', 1)[-1].replace('the checkpoint', names[0]).replace(
                'the configured side', name)
            raise ValueError(f'{name} and {names[0]} were trained on different features, so their metrics '
                             f'cannot be pooled over seeds:\n{detail}') from None


def _merge_reports(reports: list, preds: list, confidence: list, truths: dict) -> dict:
    """One report of several checkpoints: every number is the mean over them (finite values only,
    like the seed statistics), and confidence vs error pools all their frames."""
    ids = list(truths)
    merged = {key: reports[0][key] for key in ('sessions', 'frames', 'labelled_frames')}
    merged['metrics'] = _mean_of(r['metrics'] for r in reports)
    merged['coverage'] = _mean_of(r['coverage'] for r in reports)
    merged['per_session'] = _mean_of(r['per_session'] for r in reports)
    if all('confidence_mean' in r for r in reports):
        merged['confidence_mean'] = _mean_of(r['confidence_mean'] for r in reports)
        merged['confidence_vs_error'] = confidence_vs_error(
            np.concatenate([np.asarray(c[s], np.float64).reshape(-1) for c in confidence for s in ids]),
            np.concatenate([np.asarray(p[s], np.float64).reshape(-1, 2) for p in preds for s in ids]),
            np.concatenate([np.asarray(truths[s], np.float64).reshape(-1, 2) for _ in preds for s in ids]),
        )
    return merged


def _mean_of(values):
    """The mean of numbers, or of dicts of numbers key by key; values equal everywhere (frame counts)
    are kept as they are."""
    values = list(values)
    if isinstance(values[0], dict):
        return {key: _mean_of(v[key] for v in values) for key in values[0]}
    if all(v == values[0] for v in values):
        return values[0]
    return mean_sd(values)[0]


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


def _pm(entry: dict, metric: str) -> str:
    """'mean ± sd' of a seed statistic; the sd is 'n/a' with one checkpoint."""
    return f'{_fmt(entry[metric + "_mean"])} ± {_fmt(entry[metric + "_sd"])}'


def seed_table(statistics: dict) -> str:
    """Markdown table of seed_session_statistics: mean ± sd over the checkpoints per dimension."""
    lines = ['| dimension | CCC | RMSE | Pearson r | per checkpoint (CCC) |', '|---|---|---|---|---|']
    for name in (*DIMENSIONS, 'mean'):
        entry = statistics[name]
        label = f'**{name}**' if name == 'mean' else name
        each = ', '.join(_fmt(v) for v in entry['ccc_per_seed'])
        lines.append(f'| {label} | {_pm(entry, "ccc")} | {_pm(entry, "rmse")} | {_pm(entry, "pearson")} | '
                     f'{each} |')
    return '\n'.join(lines)


def ci_line(statistics: dict, resamples: int = BOOTSTRAP_RESAMPLES) -> str:
    low, high = statistics['ci95_mean_ccc']
    sessions = len(statistics['session_ccc'])
    if not (math.isfinite(low) and math.isfinite(high)):
        return (f'95 % CI of the mean CCC over sessions: n/a ({sessions} session(s); '
                f'resampling sessions needs at least two)')
    return (f'95 % CI of the mean CCC over sessions: [{_fmt(low)}, {_fmt(high)}] (bootstrap: {sessions} '
            f'sessions drawn with replacement, {resamples} draws, fixed seed)')


def session_table(statistics: dict, per_session: dict, limit: Optional[int] = None) -> str:
    """Markdown table of each session's mean CCC (mean over the checkpoints); with ``limit``, longer
    lists are summarised (lowest, median, highest)."""
    scores = statistics['session_ccc']
    if limit is not None and len(scores) > limit:
        finite = sorted(v for v in scores.values() if v is not None and math.isfinite(v))
        if not finite:
            return f'{len(scores)} sessions, none with a finite CCC'
        return (f'{len(scores)} sessions: mean CCC per session lowest {_fmt(finite[0])}, median '
                f'{_fmt(float(np.median(finite)))}, highest {_fmt(finite[-1])} (each session in report.md)')
    lines = ['| session | frames | mean CCC |', '|---|---|---|']
    for sid, value in scores.items():
        lines.append(f'| {sid} | {per_session.get(sid, {}).get("frames", "")} | {_fmt(value)} |')
    return '\n'.join(lines)


def seed_summary_markdown(report: dict, limit: Optional[int] = None) -> str:
    """The seed and session statistics of an evaluation report, as printed and written."""
    statistics = report['seed_statistics']
    count = statistics['seeds']
    lines = [f'Mean ± sd over {count} checkpoint(s) (training seeds), each scored on all labelled '
             'frames:', '', seed_table(statistics), '']
    if report.get('sd_note'):
        lines += [f'Note: {report["sd_note"]}.', '']
    lines += [ci_line(statistics), '', 'Mean CCC per session (mean over the checkpoints):', '',
              session_table(statistics, report.get('per_session', {}), limit)]
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
    checkpoints = report.get('checkpoints') or []
    if len(checkpoints) > 1:
        lines.append('- Checkpoints: ' + ', '.join(checkpoints))
    scope = f', mean over the {len(checkpoints)} checkpoints' if len(checkpoints) > 1 else ''
    lines += [
        '',
        f'## Metrics (all labelled frames of all sessions{scope})',
        '',
        metrics_table(report['metrics']),
        '',
    ]
    if 'seed_statistics' in report:
        lines += ['## Over training seeds and sessions', '', seed_summary_markdown(report), '']
        if len(checkpoints) > 1:
            lines += ["Plots: the first checkpoint's predictions.", '']
    extra = {k: v for k, v in report.items() if k == 'latency_ms'}
    if extra:
        lat = extra['latency_ms']
        lines += ['## Latency', '', ' '.join(f'{k} {_fmt(v, 2)} ms' for k, v in lat.items()), '']
    for plot in report.get('plots', []):
        lines.append(f'![{plot}]({plot})')
    return '\n'.join(lines) + '\n'
