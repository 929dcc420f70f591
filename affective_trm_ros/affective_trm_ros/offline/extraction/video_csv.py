"""Your own recordings -> feature store: a video file with audio plus a valence/arousal CSV.

Labels follow the continuous-annotation convention of RECOLA / Aff-Wild2:

* ``time,valence,arousal`` (header required, time in seconds from the start of the video): each
  video frame takes the label row nearest in time, if one lies within ``tolerance_s`` (default:
  half the median spacing of the label rows, at least half a frame); otherwise it is unlabelled;
* ``valence,arousal`` without a time column: one row per video frame, in order (Aff-Wild2 files);
* values outside [-1, 1] (Aff-Wild2 writes -5 for frames nobody annotated) and empty cells mean
  "unlabelled" (NaN), never a target.

Audio comes from the video container (decoded with PyAV) or from a side WAV file whose first
sample is aligned with the first video frame. An optional transcript CSV (``time,text``) feeds the
text encoder with stamped utterances, as a speech recogniser would.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Optional

import numpy as np

from affective_trm_ros.offline.extraction.pipeline import check_label_coverage
from affective_trm_ros.offline.io.media import MediaError, load_container_audio, load_wav, read_video_frames

VIDEO_SUFFIXES = ('.mp4', '.avi', '.mkv', '.mov', '.flv', '.webm', '.mpg', '.mpeg')
# Label rows are matched to frames within this fraction of the label spacing.
DEFAULT_TOLERANCE_FRACTION = 0.5


class LabelFileError(ValueError):
    """The label or transcript CSV is malformed; the message names the file, line and problem."""


def _open_rows(path: Path) -> tuple[list, list]:
    with open(path, newline='') as handle:
        reader = csv.reader(handle)
        try:
            header = [cell.strip().lower() for cell in next(reader)]
        except StopIteration:
            raise LabelFileError(f'{path} is empty') from None
        return header, list(reader)


def _cell_float(path: Path, line: int, cell: str) -> float:
    cell = cell.strip()
    if cell == '' or cell.lower() in ('nan', 'na'):
        return float('nan')
    try:
        return float(cell)
    except ValueError:
        raise LabelFileError(f'{path}:{line}: {cell!r} is not a number') from None


def read_label_csv(path) -> tuple[Optional[np.ndarray], np.ndarray]:
    """Read a label CSV -> (times (N,) float64 or None when per-frame, labels (N, 2) float32, NaN = none)."""
    path = Path(path)
    if not path.exists():
        raise LabelFileError(f'label file {path} does not exist')
    header, rows = _open_rows(path)
    missing = [name for name in ('valence', 'arousal') if name not in header]
    if missing:
        raise LabelFileError(
            f'{path}: header {header} lacks {missing}; expected time,valence,arousal '
            f'(or valence,arousal with one row per video frame)'
        )
    columns = [header.index('valence'), header.index('arousal')]
    time_column = header.index('time') if 'time' in header else None
    times, labels = [], []
    for line, row in enumerate(rows, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise LabelFileError(f'{path}:{line}: {len(row)} cells, the header has {len(header)}')
        labels.append([_cell_float(path, line, row[c]) for c in columns])
        if time_column is not None:
            stamp = _cell_float(path, line, row[time_column])
            if not np.isfinite(stamp):
                raise LabelFileError(f'{path}:{line}: the time cell is empty')
            times.append(stamp)
    if not labels:
        raise LabelFileError(f'{path} has a header but no label rows')
    values = np.asarray(labels, dtype=np.float32)
    values[(values < -1.0) | (values > 1.0)] = np.nan  # Aff-Wild2's -5 and other out-of-range marks
    if time_column is None:
        return None, values
    stamps = np.asarray(times, dtype=np.float64)
    if np.any(np.diff(stamps) < 0):
        raise LabelFileError(f'{path}: the time column must not decrease')
    return stamps, values


def labels_for_frames(
    frame_times: np.ndarray,
    label_times: Optional[np.ndarray],
    labels: np.ndarray,
    fps: float,
    tolerance_s: Optional[float] = None,
) -> np.ndarray:
    """One (valence, arousal) row per frame: the nearest label row in time within the tolerance, else NaN."""
    frame_times = np.asarray(frame_times, dtype=np.float64)
    out = np.full((frame_times.size, 2), np.nan, dtype=np.float32)
    if label_times is None:  # one row per frame, in order
        count = min(frame_times.size, labels.shape[0])
        out[:count] = labels[:count]
        return out
    if tolerance_s is None:
        spacing = float(np.median(np.diff(label_times))) if label_times.size > 1 else 1.0 / fps
        tolerance_s = max(DEFAULT_TOLERANCE_FRACTION * spacing, 0.5 / fps)
    right = np.clip(np.searchsorted(label_times, frame_times), 0, label_times.size - 1)
    left = np.clip(right - 1, 0, label_times.size - 1)
    pick = np.where(
        np.abs(label_times[left] - frame_times) <= np.abs(label_times[right] - frame_times), left, right
    )
    close = np.abs(label_times[pick] - frame_times) <= tolerance_s + 1e-9
    out[close] = labels[pick[close]]
    return out


def read_transcript_csv(path) -> list:
    """A ``time,text`` CSV -> [(stamp_s, utterance)] in time order."""
    path = Path(path)
    if not path.exists():
        raise LabelFileError(f'transcript file {path} does not exist')
    header, rows = _open_rows(path)
    if 'time' not in header or 'text' not in header:
        raise LabelFileError(f'{path}: header {header} must have the columns time and text')
    t_col, x_col = header.index('time'), header.index('text')
    utterances = []
    for line, row in enumerate(rows, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        stamp = _cell_float(path, line, row[t_col])
        if not np.isfinite(stamp):
            raise LabelFileError(f'{path}:{line}: the time cell is empty')
        utterances.append((stamp, row[x_col]))
    return sorted(utterances, key=lambda item: item[0])


def session_id_for(path) -> str:
    """A store-safe session id from a file name."""
    return re.sub(r'[^A-Za-z0-9._-]+', '_', Path(path).stem).strip('._-') or 'session'


def discover_pairs(directory) -> list:
    """(video, labels CSV) pairs in a directory: ``name.<video ext>`` with ``name.csv`` beside it."""
    directory = Path(directory)
    pairs = []
    for video in sorted(p for p in directory.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES):
        labels = video.with_suffix('.csv')
        if labels.exists():
            pairs.append((video, labels))
    if not pairs:
        raise FileNotFoundError(
            f'no <name>.<video> + <name>.csv pairs in {directory} '
            f'(video extensions: {", ".join(VIDEO_SUFFIXES)})'
        )
    return pairs


def prepare_video(
    video_path,
    labels_path,
    store,
    extractor,
    *,
    session_id: Optional[str] = None,
    speaker: Optional[str] = None,
    audio_path=None,
    transcript_path=None,
    tolerance_s: Optional[float] = None,
    overwrite: bool = False,
) -> Optional[str]:
    """Extract one labelled video into ``store``; returns the session id, or None when already there.

    Labels that cover no frame of the video raise
    :class:`~affective_trm_ros.offline.extraction.pipeline.LabelCoverageError` naming the file (nothing
    is written); the session's ``meta['labelled_fraction']`` says how much of it is labelled.

    ``extractor``: a :class:`~.extraction.SessionExtractor`. Audio: ``audio_path`` (a WAV file)
    when given, else the container's audio track; a video without audio is kept with audio masked
    only when no audio encoder is configured.
    """
    from affective_trm_ros.core.modalities import AUDIO

    session_id = session_id or session_id_for(video_path)
    if store.has(session_id) and not overwrite:
        return None
    label_times, label_values = read_label_csv(labels_path)
    frames, fps = read_video_frames(video_path)
    audio = None
    if AUDIO in extractor.encoders:
        try:
            audio = load_wav(audio_path) if audio_path else load_container_audio(video_path)
        except MediaError as error:
            raise MediaError(
                f'{error}. An audio encoder is configured, so audio is required; '
                f'pass --audio FILE.wav or --audio-encoder none'
            ) from error
    texts = read_transcript_csv(transcript_path) if transcript_path else []
    result = extractor.extract(frames, audio=audio, texts=texts)
    labels = labels_for_frames(result.timestamps, label_times, label_values, fps, tolerance_s)
    labelled_fraction = check_label_coverage(labels, f'label file {labels_path}', f"video '{video_path}'",
                                             result.timestamps)
    result.write(store, session_id, speaker=speaker or session_id, labels=labels, meta={
        'source': 'video', 'video': str(video_path), 'labels': str(labels_path),
        'audio': str(audio_path) if audio_path else 'container', 'fps': fps,
        'labelled_fraction': labelled_fraction})
    return session_id
