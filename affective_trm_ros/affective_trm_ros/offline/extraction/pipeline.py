"""Offline feature extraction for one session, through the serving code paths.

A session is a video (frames with stamps), optionally an audio waveform and optionally stamped
utterances. Each modality goes through the same pieces the ROS nodes use:

* video: every frame through the video encoder plugin (``encode_batch``; a frame without a face is
  an invalid embedding, i.e. masked);
* audio: :class:`~affective_trm_ros.core.audio.AudioWindower` (resampling to the encoder rate,
  ``window_s`` windows every ``hop_s``, stamped at their end) and
  :func:`~affective_trm_ros.core.audio.embed_windows` (silent windows invalid);
* text: :func:`~affective_trm_ros.core.utterance.prepare_utterance`, then the text encoder;
* alignment: :func:`~affective_trm_ros.core.alignment.align_events`, the fusion node's
  video-clocked policy (audio nearest within the slop, text latest within its maximum age).

So the features a model is trained on are the features the fusion node sees live. Every source
(CREMA-D clips, your own videos, rosbags) feeds its inputs into one :class:`EmbeddingCollector`
and aligns the result with :func:`align_embeddings`; :class:`SessionExtractor` does both for
media files, ``extraction.bag`` for recordings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from affective_trm_ros.core.alignment import AlignmentConfig, align_events, steps_to_arrays
from affective_trm_ros.core.audio import (
    DEFAULT_HOP_S,
    DEFAULT_SILENCE_THRESHOLD_DBFS,
    DEFAULT_WINDOW_S,
    AudioWindow,
    AudioWindower,
    embed_windows,
)
from affective_trm_ros.core.modalities import AUDIO, FEATURE_ORDER, TEXT, VIDEO, check_modalities
from affective_trm_ros.core.utterance import prepare_utterance

# Inputs per encode_batch call: large enough to amortise the model call, small enough that a
# batch of 640x480 frames stays well under 100 MB (1 s audio windows and sentences are smaller).
DEFAULT_BATCH_SIZE = 16
DEFAULT_VIDEO_BATCH = DEFAULT_BATCH_SIZE
DEFAULT_AUDIO_BATCH = DEFAULT_BATCH_SIZE
# Audio is pushed through the windower in chunks of this many seconds (bounded memory for long files).
AUDIO_CHUNK_S = 10.0


@dataclass
class ExtractionConfig:
    """How a session is windowed and aligned; the defaults are the nodes' defaults."""

    audio_window_s: float = DEFAULT_WINDOW_S
    audio_hop_s: float = DEFAULT_HOP_S
    silence_threshold_dbfs: float = DEFAULT_SILENCE_THRESHOLD_DBFS
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    video_batch: int = DEFAULT_VIDEO_BATCH
    audio_batch: int = DEFAULT_AUDIO_BATCH

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ExtractionResult:
    """Per-frame aligned arrays of one session, ready for FeatureStore.write_session."""

    timestamps: np.ndarray  # (T,) float64
    features: dict  # modality -> (T, dim) float32, the encoders' modalities only
    mask: np.ndarray  # (T, M) bool, columns in the encoders' modality order
    info: dict  # counts: frames, audio windows, valid embeddings per modality, resets

    def write(self, store, session_id: str, *, speaker: str, labels: np.ndarray, meta: dict) -> None:
        """Write this session into ``store`` with ``labels`` (T, 2) and ``meta`` (plus the counts)."""
        store.write_session(session_id, speaker=speaker, timestamps=self.timestamps, features=self.features,
                            mask=self.mask, labels=labels, meta={**meta, **self.info})


def encoder_spec(encoders: Mapping[str, Any]) -> list:
    """The feature-store / checkpoint encoder spec of loaded encoders, in FEATURE_ORDER:
    ``[{modality, encoder (plugin id), dim, identity ('<plugin>@<weights>')}, ...]``."""
    spec = []
    for modality in FEATURE_ORDER:
        encoder = encoders.get(modality)
        if encoder is None:
            continue
        if encoder.modality != modality:
            raise ValueError(
                f"encoder '{encoder.plugin_id}' encodes {encoder.modality}, but was given for {modality}"
            )
        spec.append({'modality': modality, 'encoder': encoder.plugin_id, 'dim': int(encoder.dim),
                     'identity': encoder.identity})
    check_modalities(encoders)
    if not spec:
        raise ValueError('no encoder given: at least one modality is needed')
    return spec


def _vector(vector) -> Optional[np.ndarray]:
    return None if vector is None else np.asarray(vector, np.float32)


def _count(counts: dict, key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


class _Batch:
    """Inputs of one modality waiting for one encode_batch call, with their stamps."""

    def __init__(self, encode, size: int) -> None:
        if size < 1:
            raise ValueError(f'batch size must be >= 1, got {size}')
        self.encode, self.size = encode, size
        self.stamps: list = []
        self.inputs: list = []

    def add(self, stamp_s: float, item: Any) -> bool:
        """Queue one input; True when the batch is full."""
        self.stamps.append(float(stamp_s))
        self.inputs.append(item)
        return len(self.inputs) >= self.size

    def take(self) -> list:
        """Encode what is queued -> [(stamp_s, input, vector | None)]."""
        if not self.inputs:
            return []
        items = list(zip(self.stamps, self.inputs, self.encode(self.inputs)))
        self.stamps, self.inputs = [], []
        return items


def _encode_rows(encoder) -> Any:
    """encode_batch -> one vector per input, None for the invalid ones; ``None`` inputs (an image that
    did not decode) are invalid without reaching the encoder, as in the node."""
    def encode(inputs: list) -> list:
        rows = [i for i, item in enumerate(inputs) if item is not None]
        vectors: list = [None] * len(inputs)
        if rows:
            result = encoder.encode_batch([inputs[i] for i in rows])
            for row, index in enumerate(rows):
                if result.valid[row]:
                    vectors[index] = np.asarray(result.embeddings[row], np.float32)
        return vectors
    return encode


@dataclass
class VideoPath:
    """How the video node turns a frame into per-face embeddings, for offline use.

    ``make_faces()`` returns a fresh face path (``process(rgb, t) -> FrameFaces``; one per
    recording, since it tracks faces from frame to frame), ``stream_id(track_id)`` names a face's
    stream, and ``single_person`` says the node publishes exactly one embedding per frame (the
    ``stream_id`` parameter's stream; invalid without a face).
    """

    make_faces: Callable[[], Any]
    stream_id: Callable[[int], str]
    single_person: bool = True


DEFAULT_STREAM = 'default'


class EmbeddingCollector:
    """Encodes one recording's inputs the way the encoder nodes encode them.

    Feed frames (:meth:`add_frame`; ``None`` for a frame that failed to decode), audio windows
    (:meth:`add_audio_windows`, from the shared windower) and utterances (:meth:`add_text`) in any
    order, then :meth:`finish`. A modality without an encoder is not encoded; video frames still
    clock the session. ``embeddings[modality]`` holds ``(stamp_s, vector | None)`` in stamp order;
    ``video_streams`` holds the video embeddings per stream (one per tracked face; audio and text
    are shared by every stream).

    Video goes through ``video_path`` (the node's face path, frame by frame) when given, else the
    whole frames are encoded ``batch_size`` at a time (``encode_batch``: the ``full_frame`` path).
    """

    def __init__(self, encoders: Mapping[str, Any], *, batch_size: int = DEFAULT_BATCH_SIZE,
                 audio_batch: Optional[int] = None,
                 silence_threshold_dbfs: float = DEFAULT_SILENCE_THRESHOLD_DBFS,
                 text_cache: Optional[dict] = None, video_path: Optional[VideoPath] = None) -> None:
        self.encoders = {m: e for m, e in encoders.items() if e is not None}
        self.silence_threshold_dbfs = float(silence_threshold_dbfs)
        self.embeddings: dict = {m: [] for m in FEATURE_ORDER if m in self.encoders or m == VIDEO}
        self.video_streams: dict = {}
        self.counts: dict = {}
        self.video_stamps: list = []
        self._audio_batch = int(audio_batch or batch_size)
        self._windows: list = []
        self._text_cache = {} if text_cache is None else text_cache
        self._batches = {m: _Batch(_encode_rows(self.encoders[m]), batch_size)
                         for m in (VIDEO, TEXT) if m in self.encoders}
        self._video_path = video_path if VIDEO in self.encoders else None
        self._faces = video_path.make_faces() if self._video_path else None
        single = video_path is not None and video_path.single_person
        self._single_stream = video_path.stream_id(0) if single else DEFAULT_STREAM

    def add_frame(self, stamp_s: float, frame: Optional[np.ndarray]) -> None:
        stamp_s = float(stamp_s)
        self.video_stamps.append(stamp_s)
        if VIDEO not in self.encoders:  # the frames still clock the steps, without a video feature
            self._video(self._single_stream).append((stamp_s, None))
        elif self._faces is None:
            if self._batches[VIDEO].add(stamp_s, frame):
                self._flush(VIDEO)
        else:
            self._add_faces(stamp_s, frame)

    def _add_faces(self, stamp_s: float, frame: Optional[np.ndarray]) -> None:
        """One frame through the node's face path: an embedding per face (single person: per frame)."""
        faces = self._faces.process(frame, stamp_s).faces if frame is not None else []
        if self._video_path.single_person:
            face = faces[0] if faces else None
            vector = face.embedding if face is not None and face.valid else None
            self._video(self._single_stream).append((stamp_s, _vector(vector)))
            return
        for face in faces:
            vector = face.embedding if face.valid else None
            self._video(self._video_path.stream_id(face.track_id)).append((stamp_s, _vector(vector)))

    def _video(self, stream_id: str) -> list:
        return self.video_streams.setdefault(stream_id, [])

    def add_audio_windows(self, windows: Sequence[AudioWindow]) -> None:
        if AUDIO not in self.encoders:
            return
        self._windows.extend(windows)
        self._flush_audio(whole_batches_only=True)

    def add_text(self, stamp_s: float, utterance: str) -> None:
        if TEXT not in self.encoders:
            return
        text, truncated = prepare_utterance(utterance)
        _count(self.counts, 'text_truncated', int(truncated))
        if text in self._text_cache:
            self.embeddings[TEXT].append((float(stamp_s), self._text_cache[text]))
        elif self._batches[TEXT].add(stamp_s, text):
            self._flush(TEXT)

    def finish(self) -> dict:
        """Encode what is still queued; returns ``embeddings`` (each modality in stamp order)."""
        for modality in self._batches:
            self._flush(modality)
        self._flush_audio()
        for items in self.video_streams.values():
            items.sort(key=lambda item: item[0])
        self.embeddings[VIDEO] = sorted((item for items in self.video_streams.values() for item in items),
                                        key=lambda item: item[0])
        for modality, items in self.embeddings.items():
            items.sort(key=lambda item: item[0])
            self.counts[f'{modality}_embeddings'] = len(items)
            self.counts[f'{modality}_valid'] = sum(vector is not None for _, vector in items)
        if len(self.video_streams) > 1:
            self.counts['video_streams'] = len(self.video_streams)
        return self.embeddings

    def streams(self) -> list:
        """The video streams (people) found, in name order."""
        return sorted(self.video_streams)

    def events(self, stream_id: Optional[str] = None) -> list:
        """(modality, stamp_s, vector | None) events of one stream for core.alignment.align_events:
        its own video embeddings plus the shared audio and text (``stream_id`` None: the only stream)."""
        if stream_id is None:
            if len(self.video_streams) > 1:
                raise ValueError(f'{len(self.video_streams)} video streams ({", ".join(self.streams())}): '
                                 f'name the stream')
            stream_id = next(iter(self.video_streams), self._single_stream)
        shared = [(m, stamp, vector) for m, items in self.embeddings.items() if m != VIDEO
                  for stamp, vector in items]
        return [(VIDEO, stamp, vector) for stamp, vector in self.video_streams.get(stream_id, [])] + shared

    def _flush(self, modality: str) -> None:
        for stamp, item, vector in self._batches[modality].take():
            if modality == TEXT:
                self._text_cache[item] = vector
            target = self._video(self._single_stream) if modality == VIDEO else self.embeddings[modality]
            target.append((stamp, vector))

    def _flush_audio(self, whole_batches_only: bool = False) -> None:
        """Encode the queued windows, ``audio_batch`` at a time (the rest too unless whole_batches_only)."""
        while self._windows and (len(self._windows) >= self._audio_batch or not whole_batches_only):
            batch, self._windows = self._windows[:self._audio_batch], self._windows[self._audio_batch:]
            for item in embed_windows(self.encoders[AUDIO], batch, self.silence_threshold_dbfs):
                self.embeddings[AUDIO].append((item.end_stamp_s, item.vector))
                _count(self.counts, f'audio_{item.reason}')


class LabelCoverageError(ValueError):
    """A label source that labels none of a session's frames; the message names the source."""


def check_label_coverage(labels: np.ndarray, source: Optional[str], session: str,
                         timestamps: Optional[np.ndarray] = None) -> float:
    """The fraction of frames with both labels; a label source that labels no frame is an error.

    ``source``: where the labels came from (a file, a topic), None when the session has none.
    """
    labels = np.asarray(labels, np.float32).reshape(-1, 2)
    labelled = np.all(np.isfinite(labels), axis=1)
    if source is not None and labelled.size and not labelled.any():
        span = ''
        if timestamps is not None and len(timestamps):
            span = f' ({timestamps[0]:.2f}-{timestamps[-1]:.2f} s)'
        raise LabelCoverageError(
            f'{source} labels none of the {labelled.size} frames of {session}{span}: its times lie '
            f'outside the video, or every value is empty, NaN or outside [-1, 1]')
    return float(labelled.mean()) if labelled.size else 0.0


def align_embeddings(events: Iterable[tuple], alignment: AlignmentConfig, dims: Mapping[str, int]) -> tuple:
    """Align (modality, stamp_s, vector | None) events with the fusion node's policy.

    ``dims``: the encoders' modalities and dimensions. Returns ``(timestamps (T,), features
    {modality: (T, dim)} for those modalities, mask (T, len(dims)) in their order, resets (T,))``.
    """
    steps = align_events(events, alignment)
    all_dims = {m: int(dims.get(m, 0)) for m in FEATURE_ORDER}
    timestamps, features, mask, resets = steps_to_arrays(steps, all_dims)
    columns = [FEATURE_ORDER.index(m) for m in FEATURE_ORDER if m in dims]
    return timestamps, {m: features[m] for m in FEATURE_ORDER if m in dims}, mask[:, columns], resets


def record_store_provenance(store) -> dict:
    """Record in the store's info what training compares against: ``features_hash`` (the content hash
    of every stored session's features, mask, labels, stamps and resets; the definition checkpoints
    record, :func:`~affective_trm_ros.offline.learning.data.store_digest`) and ``torch_threads``
    (``torch.get_num_threads()`` during extraction: some encoders' last digits depend on it).
    Called after a preparation run; returns the recorded entries."""
    import torch

    from affective_trm_ros.offline.learning.data import store_digest

    entries = {'features_hash': store_digest(store), 'torch_threads': torch.get_num_threads()}
    store.update_info(**entries)
    return entries

class SessionExtractor:
    """Turns sessions (frames, audio, utterances) into aligned per-frame features.

    ``encoders``: modality -> Encoder plugin instance (a modality without an encoder is left out of
    the store). The video frames always clock the session, with or without a video encoder.
    Text embeddings are cached by utterance (CREMA-D repeats twelve sentences).
    """

    def __init__(self, encoders: dict, config: Optional[ExtractionConfig] = None,
                 video_path: Optional[VideoPath] = None) -> None:
        self.encoders = {m: e for m, e in encoders.items() if e is not None}
        self.spec = encoder_spec(self.encoders)
        self.config = config or ExtractionConfig()
        self.config.alignment.validate()
        self.video_path = video_path
        self._text_cache: dict = {}

    @property
    def dims(self) -> dict:
        return {entry['modality']: entry['dim'] for entry in self.spec}

    def identities(self) -> dict:
        """modality -> '<plugin id>@<weights identity>' (says when an encoder ran untrained)."""
        return {m: e.identity for m, e in self.encoders.items()}

    def extract(
        self, frames: Iterable, audio: Optional[tuple] = None, texts: Iterable = ()
    ) -> ExtractionResult:
        """``frames``: iterable of (stamp_s, RGB uint8 frame); ``audio``: (float32 mono, sample_rate)
        whose first sample is at stamp 0 of the frames' clock; ``texts``: (stamp_s, utterance) pairs.
        """
        collector = EmbeddingCollector(self.encoders, batch_size=self.config.video_batch,
                                       audio_batch=self.config.audio_batch,
                                       silence_threshold_dbfs=self.config.silence_threshold_dbfs,
                                       text_cache=self._text_cache, video_path=self.video_path)
        for stamp, frame in frames:
            collector.add_frame(stamp, frame)
        if not collector.video_stamps:
            raise ValueError('the session has no video frame: frames clock the fused steps')
        info: dict = {'frames': len(collector.video_stamps)}
        if AUDIO in self.encoders and audio is not None:
            info['audio_windows'] = self._feed_audio(collector, audio)
        if TEXT in self.encoders:
            texts = list(texts)
            for stamp, utterance in texts:
                collector.add_text(stamp, utterance)
            info['utterances'] = len(texts)
        collector.finish()
        if len(collector.streams()) > 1:
            streams = collector.streams()
            raise ValueError(f'{len(streams)} faces were tracked ({", ".join(streams)}) but the labels '
                             f'describe one person: set the video node parameter max_faces to 1')
        timestamps, features, mask, resets = align_embeddings(collector.events(), self.config.alignment,
                                                              self.dims)
        info['present_frames'] = {m: int(mask[:, i].sum()) for i, m in enumerate(self.dims)}
        info['resets'] = int(resets.sum())
        return ExtractionResult(timestamps, features, mask, info)

    def _feed_audio(self, collector: EmbeddingCollector, audio: tuple) -> int:
        waveform, sample_rate = audio
        waveform = np.asarray(waveform, dtype=np.float32).reshape(-1)
        rate_out = int(self.encoders[AUDIO].sample_rate or 16000)
        windower = AudioWindower(rate_out, self.config.audio_window_s, self.config.audio_hop_s)
        chunk = max(1, int(AUDIO_CHUNK_S * sample_rate))
        count = 0
        for start in range(0, waveform.size, chunk):
            windows = windower.push(waveform[start : start + chunk], int(sample_rate),
                                    0.0 if start == 0 else None)
            collector.add_audio_windows(windows)
            count += len(windows)
        return count
