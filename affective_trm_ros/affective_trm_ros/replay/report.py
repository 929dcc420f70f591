"""The replay evaluation report: per-frame table, metrics, coverage, latency, plots, CSV and bag.

Input is what a replay recorded (every ``ValenceArousal`` with its arrival wall time, and when each
frame was published); output is ``report.json``/``report.md`` with the plots (written by
:func:`affective_trm_ros.offline.evaluation.evaluate.write_report`), ``estimates.csv`` (one row per video
frame) and ``estimates_bag/`` (an MCAP bag of the estimates and the ground truth, for Foxglove,
PlotJuggler or ``ros2 bag play``). No rclpy here.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from affective_trm_ros.core.encoders.loading import untrained_encoders, untrained_line
from affective_trm_ros.core.metrics import regression_report
from affective_trm_ros.offline.io.bags import VALENCE_AROUSAL, BagWriter, affective_typestore, make_header

ESTIMATES_CSV = 'estimates.csv'
ESTIMATES_BAG = 'estimates_bag'
ESTIMATE_TOPIC = '/affect/valence_arousal'
GROUND_TRUTH_TOPIC = '/affect/ground_truth'
LATENCY_PERCENTILES = (50, 90, 95, 99)


@dataclass
class FrameTable:
    """One row per published video frame, in stamp order (NaN where no estimate came back)."""

    stamps_ns: np.ndarray      # (N,) int64 frame stamps
    estimates: np.ndarray      # (N, 2) valence, arousal
    confidence: np.ndarray     # (N,)
    modalities: np.ndarray     # (N,) int bitmask, -1 where no estimate
    latency_s: np.ndarray      # (N,) wall time from publishing the frame to its estimate
    encode_s: np.ndarray       # (N,) wall time from publishing the frame to its video embedding
    truth: np.ndarray          # (N, 2) ground truth, NaN where unlabelled

    @property
    def times_s(self) -> np.ndarray:
        """Seconds since the first frame."""
        return (self.stamps_ns - self.stamps_ns[0]) / 1e9 if self.stamps_ns.size else np.zeros(0)

    @property
    def covered(self) -> np.ndarray:
        return self.modalities >= 0


def frame_table(frame_stamps_ns: Sequence[int], outputs: Sequence[tuple], publish_wall: Mapping[int, float],
                embedding_wall: Mapping[int, float], truth: Optional[np.ndarray] = None,
                stream_id: Optional[str] = None) -> FrameTable:
    """Join the estimates (stamp_ns, stream, v, a, conf, bits, wall_s) onto the frames.

    With several streams, ``stream_id`` picks one (default: the most frequent). A frame with more
    than one estimate keeps the first.
    """
    stamps = np.array(sorted(set(int(s) for s in frame_stamps_ns)), np.int64)
    count = stamps.size
    if stream_id is None and outputs:
        streams, counts = np.unique([o[1] for o in outputs], return_counts=True)
        stream_id = str(streams[int(np.argmax(counts))])
    index = {int(s): i for i, s in enumerate(stamps)}
    estimates = np.full((count, 2), np.nan)
    confidence = np.full(count, np.nan)
    modalities = np.full(count, -1, np.int64)
    latency = np.full(count, np.nan)
    for stamp_ns, stream, valence, arousal, conf, bits, wall in outputs:
        row = index.get(int(stamp_ns))
        if row is None or stream != stream_id or modalities[row] >= 0:
            continue
        estimates[row] = (valence, arousal)
        confidence[row] = conf
        modalities[row] = bits
        if int(stamp_ns) in publish_wall:
            latency[row] = wall - publish_wall[int(stamp_ns)]
    encode = np.array([embedding_wall[s] - publish_wall[s] if s in embedding_wall and s in publish_wall
                       else np.nan for s in stamps.tolist()])
    if truth is None:
        truth = np.full((count, 2), np.nan)
    truth = np.asarray(truth, np.float64).reshape(count, 2)
    return FrameTable(stamps, estimates, confidence, modalities, latency, encode, truth)


def estimate_streams(outputs: Sequence[tuple]) -> list:
    """The stream ids the estimates name, most estimates first (ties by name)."""
    counts: dict = {}
    for output in outputs:
        counts[output[1]] = counts.get(output[1], 0) + 1
    return sorted(counts, key=lambda stream: (-counts[stream], stream))


def people_tables(frame_stamps_ns: Sequence[int], outputs: Sequence[tuple], publish_wall: Mapping[int, float],
                  embedding_wall: Mapping[int, float],
                  truth_by_stream: Optional[Mapping[str, np.ndarray]]) -> dict:
    """One FrameTable per person (estimate stream), each over every video frame, with that
    person's ground truth: the labels whose stream id is the stream's id (the convention of the
    sample sessions and of feature preparation); with one estimate stream and one labelled stream
    the two are the same person whatever their names."""
    truth_by_stream = dict(truth_by_stream or {})
    streams = estimate_streams(outputs)
    if len(streams) == 1 and len(truth_by_stream) == 1:
        truth_by_stream = {streams[0]: next(iter(truth_by_stream.values()))}
    return {stream: frame_table(frame_stamps_ns, outputs, publish_wall, embedding_wall,
                                truth_by_stream.get(stream), stream_id=stream) for stream in streams}


def people_report(tables: Mapping[str, FrameTable]) -> dict:
    """Metrics and coverage per person, and the metrics pooled over everyone's labelled frames."""
    people = {stream: {'metrics': regression_report(table.estimates, table.truth),
                       'coverage': float(table.covered.mean()) if table.stamps_ns.size else math.nan,
                       'frames_with_estimate': int(table.covered.sum()),
                       'labelled_frames': int(np.all(np.isfinite(table.truth), axis=1).sum())}
              for stream, table in tables.items()}
    if not tables:
        return {'people': {}, 'pooled_metrics': regression_report(np.zeros((0, 2)), np.zeros((0, 2)))}
    estimates = np.concatenate([table.estimates for table in tables.values()])
    truth = np.concatenate([table.truth for table in tables.values()])
    return {'people': people, 'pooled_metrics': regression_report(estimates, truth)}


def percentiles_ms(values: np.ndarray) -> dict:
    """p50/p90/p95/p99/max (ms) of the finite values; NaN when there are none."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {**{f'p{q}': math.nan for q in LATENCY_PERCENTILES}, 'max': math.nan}
    result = {f'p{q}': float(np.percentile(values, q) * 1e3) for q in LATENCY_PERCENTILES}
    result['max'] = float(values.max() * 1e3)
    return result


def build_replay_report(table: FrameTable, *, wall_s: float, mode: str, encoders: Mapping[str, str],
                        extra: Optional[dict] = None) -> dict:
    """Metrics (CCC, RMSE, Pearson per dimension over labelled frames with an estimate), coverage,
    latency, throughput and which encoders ran untrained."""
    frames = int(table.stamps_ns.size)
    covered = table.covered
    bits = table.modalities[covered]
    presence = {name: float(np.mean((bits & bit) > 0)) if bits.size else math.nan
                for name, bit in (('video', 1), ('audio', 2), ('text', 4))}
    report = {
        'mode': mode,
        'metrics': regression_report(table.estimates, table.truth),
        'frames': frames,
        'frames_with_estimate': int(covered.sum()),
        'labelled_frames': int(np.all(np.isfinite(table.truth), axis=1).sum()),
        'coverage': float(covered.mean()) if frames else math.nan,
        'latency_ms': percentiles_ms(table.latency_s),
        'video_encode_ms': percentiles_ms(table.encode_s),
        'throughput_fps': frames / wall_s if wall_s > 0 else math.nan,
        'wall_s': wall_s,
        'duration_s': float(table.times_s[-1]) if frames else 0.0,
        'modality_presence': presence,
        'confidence_mean': float(np.nanmean(table.confidence)) if covered.any() else math.nan,
        'encoders': dict(encoders),
        'untrained_encoders': untrained_encoders(encoders),
    }
    report.update(extra or {})
    return report


def report_notices(report: Mapping) -> list:
    """What a reader must know before reading the numbers: an empty replay, missing ground truth,
    untrained encoders. The report's first lines and the command's summary print these."""
    notices = []
    if not report['frames']:
        notices.append('EMPTY REPLAY: the bag has no video frames, so nothing was estimated or evaluated.')
    else:
        notices.append(untrained_line(report['encoders']))
    if report['frames'] and not report['labelled_frames']:
        source = report.get('labels_looked_for') or 'the ground-truth topic'
        notices.append(f'NO GROUND TRUTH: no labels for these frames in {source}; CCC, RMSE and Pearson r '
                       'are n/a (coverage and latency are still measured).')
    return notices


def write_estimates_csv(path: Path, table: FrameTable) -> Path:
    """estimates.csv: stamp, time, estimate, confidence, modalities, latency, ground truth per frame."""
    with open(path, 'w', newline='') as handle:
        writer = csv.writer(handle)
        writer.writerow(['stamp_ns', 'time_s', 'valence', 'arousal', 'confidence', 'modalities', 'latency_ms',
                         'true_valence', 'true_arousal'])
        for i in range(table.stamps_ns.size):
            writer.writerow([int(table.stamps_ns[i]), f'{table.times_s[i]:.6f}', _num(table.estimates[i, 0]),
                             _num(table.estimates[i, 1]), _num(table.confidence[i]),
                             int(table.modalities[i]) if table.modalities[i] >= 0 else '',
                             _num(table.latency_s[i] * 1e3, 3), _num(table.truth[i, 0]),
                             _num(table.truth[i, 1])])
    return path


def _num(value: float, digits: int = 6) -> str:
    return '' if not np.isfinite(value) else f'{value:.{digits}f}'


def write_estimates_bag(path: Path, table: FrameTable, stream_id: str = 'default',
                        frame_id: str = '') -> Path:
    """An MCAP bag with the estimates (and the ground truth), logged at the frame stamps."""
    store = affective_typestore()
    message = store.types[VALENCE_AROUSAL]
    no_box = store.types['sensor_msgs/msg/RegionOfInterest'](x_offset=0, y_offset=0, height=0, width=0,
                                                              do_rectify=False)
    with BagWriter(path, overwrite=True) as bag:
        bag.add_topic(ESTIMATE_TOPIC, VALENCE_AROUSAL)
        has_truth = bool(np.isfinite(table.truth).any())
        if has_truth:
            bag.add_topic(GROUND_TRUTH_TOPIC, VALENCE_AROUSAL)
        for i in range(table.stamps_ns.size):
            stamp = int(table.stamps_ns[i])
            if table.modalities[i] >= 0:
                bag.write(ESTIMATE_TOPIC, stamp, message(
                    header=make_header(stamp, frame_id, store), stream_id=stream_id, roi=no_box,
                    valence=float(table.estimates[i, 0]), arousal=float(table.estimates[i, 1]),
                    confidence=float(table.confidence[i]), modalities=int(table.modalities[i])))
            if has_truth and np.all(np.isfinite(table.truth[i])):
                bag.write(GROUND_TRUTH_TOPIC, stamp, message(
                    header=make_header(stamp, frame_id, store), stream_id=stream_id, roi=no_box,
                    valence=float(table.truth[i, 0]), arousal=float(table.truth[i, 1]),
                    confidence=1.0, modalities=0))
    return path


def write_replay_report(out_dir: str | Path, table: FrameTable, report: dict, *, title: str,
                        session: str = 'replay') -> dict:
    """Write CSV, bag, report.json, report.md (first lines: :func:`report_notices`) and the plots."""
    from affective_trm_ros.offline.evaluation.evaluate import REPORT_JSON, REPORT_MD, write_report

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_report(report, out_dir, {session: table.estimates}, {session: table.truth},
                         {session: table.times_s}, confidence={session: table.confidence}, title=title)
    files['csv'] = write_estimates_csv(out_dir / ESTIMATES_CSV, table)
    files['bag'] = write_estimates_bag(out_dir / ESTIMATES_BAG, table,
                                       stream_id=report.get('shown_person') or 'default',
                                       frame_id=report.get('frame_id') or '')
    markdown = (out_dir / REPORT_MD).read_text()
    extra = replay_markdown(report)
    notices = '\n\n'.join(report_notices(report))
    (out_dir / REPORT_MD).write_text(f'{notices}\n\n{markdown}\n{extra}')
    saved = json.loads((out_dir / REPORT_JSON).read_text())
    saved['files'] = {name: str(path) for name, path in files.items()}
    (out_dir / REPORT_JSON).write_text(json.dumps(saved, indent=2))
    return files


def replay_markdown(report: dict) -> str:
    """The replay-specific part of report.md."""
    def fmt(value, digits=1):
        return 'n/a' if value is None or not np.isfinite(value) else f'{value:.{digits}f}'

    lines = ['## Replay', '',
             f"- Mode: {report['mode']}",
             f"- Frames: {report['frames']} over {fmt(report['duration_s'])} s of recording; "
             f"{report['frames_with_estimate']} with an estimate "
             f"(coverage {fmt(report['coverage'] * 100, 2)} %)",
             f"- Throughput: {fmt(report['throughput_fps'])} frames/s ({fmt(report['wall_s'])} s wall time)",
             '- Latency, publishing a frame -> its estimate (ms): '
             + ', '.join(f'{k} {fmt(v)}' for k, v in report['latency_ms'].items()),
             '- Video encoding, publishing a frame -> its embedding (ms): '
             + ', '.join(f'{k} {fmt(v)}' for k, v in report['video_encode_ms'].items()),
             '- Encoders: ' + ', '.join(f'{m} `{i}`' for m, i in report['encoders'].items())]
    if len(report.get('people') or {}) > 1:
        lines += ['', '## People', '',
                  'Metrics and coverage per person (stream id); the metrics above pool every person\'s '
                  'labelled frames.', '',
                  '| person | coverage % | labelled frames | CCC valence | CCC arousal | RMSE valence | '
                  'RMSE arousal |', '|---|---|---|---|---|---|---|']
        for stream, person in report['people'].items():
            metrics = person['metrics']
            cells = [fmt(metrics[d][m], 3) for m in ('ccc', 'rmse') for d in ('valence', 'arousal')]
            lines.append(f"| {stream} | {fmt(person['coverage'] * 100, 1)} | {person['labelled_frames']} | "
                         f"{' | '.join(cells)} |")
    if report.get('memory_mb'):
        memory = report['memory_mb']
        lines.append(f'- Resident memory (MB): {fmt(memory[0][1], 0)} at start, '
                     f'{fmt(memory[-1][1], 0)} at the end, peak {fmt(max(m for _, m in memory), 0)}')
    if report.get('baseline'):
        lines += ['', '## Beside the memoryless baseline (same features, offline)', '',
                  '| model | CCC valence | CCC arousal | RMSE valence | RMSE arousal |',
                  '|---|---|---|---|---|']
        for name, metrics in report['baseline'].items():
            cells = [fmt(metrics[d][m], 3) for m in ('ccc', 'rmse') for d in ('valence', 'arousal')]
            lines.append(f"| {name} | {' | '.join(cells)} |")
    return '\n'.join(lines) + '\n'
