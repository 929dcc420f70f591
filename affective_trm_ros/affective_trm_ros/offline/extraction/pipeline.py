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

So the features a model is trained on are the features the fusion node sees live.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from affective_trm_ros.core.alignment import AlignmentConfig, align_events, steps_to_arrays
from affective_trm_ros.core.audio import (
    DEFAULT_HOP_S,
    DEFAULT_SILENCE_THRESHOLD_DBFS,
    DEFAULT_WINDOW_S,
    AudioWindower,
    embed_windows,
)
from affective_trm_ros.core.modalities import AUDIO, FEATURE_ORDER, TEXT, VIDEO
from affective_trm_ros.core.utterance import prepare_utterance

# Frames per video encode_batch call: large enough to amortise the model call, small enough
# that a batch of 640x480 frames stays well under 100 MB.
DEFAULT_VIDEO_BATCH = 16
# Audio windows per encode_batch call (1 s at 16 kHz each).
DEFAULT_AUDIO_BATCH = 16
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


def encoder_spec(encoders: dict) -> list:
    """The encoder spec (FEATURE_ORDER list of {modality, encoder, dim}) of a modality -> Encoder map."""
    spec = []
    for modality in FEATURE_ORDER:
        encoder = encoders.get(modality)
        if encoder is None:
            continue
        if encoder.modality != modality:
            raise ValueError(
                f"encoder '{encoder.plugin_id}' encodes {encoder.modality}, but was given for {modality}"
            )
        spec.append({'modality': modality, 'encoder': encoder.plugin_id, 'dim': int(encoder.dim)})
    if not spec:
        raise ValueError('no encoder given: at least one modality is needed')
    return spec


class SessionExtractor:
    """Turns sessions (frames, audio, utterances) into aligned per-frame features.

    ``encoders``: modality -> Encoder plugin instance (a modality without an encoder is left out of
    the store). The video frames always clock the session, with or without a video encoder.
    Text embeddings are cached by utterance (CREMA-D repeats twelve sentences).
    """

    def __init__(self, encoders: dict, config: Optional[ExtractionConfig] = None) -> None:
        self.encoders = {m: e for m, e in encoders.items() if e is not None}
        self.spec = encoder_spec(self.encoders)
        self.config = config or ExtractionConfig()
        self.config.alignment.validate()
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
        events: list = []
        info: dict = {}
        video_stamps = self._video_events(frames, events)
        if not video_stamps:
            raise ValueError('the session has no video frame: frames clock the fused steps')
        info['frames'] = len(video_stamps)
        if AUDIO in self.encoders and audio is not None:
            info['audio_windows'] = self._audio_events(audio, events)
        if TEXT in self.encoders:
            info['utterances'] = self._text_events(texts, events)
        steps = align_events(events, self.config.alignment)
        all_dims = {m: self.dims.get(m, 0) for m in FEATURE_ORDER}
        timestamps, features, mask, resets = steps_to_arrays(steps, all_dims)
        columns = [FEATURE_ORDER.index(m) for m in self.dims]
        mask = mask[:, columns]
        info['present_frames'] = {m: int(mask[:, i].sum()) for i, m in enumerate(self.dims)}
        info['resets'] = int(resets.sum())
        return ExtractionResult(timestamps, {m: features[m] for m in self.dims}, mask, info)

    def _video_events(self, frames: Iterable, events: list) -> list:
        encoder = self.encoders.get(VIDEO)
        stamps: list = []
        batch_stamps: list = []
        batch_frames: list = []

        def flush():
            if encoder is None:  # the frames still clock the steps, without a video feature
                events.extend((VIDEO, s, None) for s in batch_stamps)
            else:
                result = encoder.encode_batch(batch_frames)
                for row, stamp in enumerate(batch_stamps):
                    vector = result.embeddings[row] if result.valid[row] else None
                    events.append((VIDEO, stamp, vector))
            batch_stamps.clear()
            batch_frames.clear()

        for stamp, frame in frames:
            stamps.append(float(stamp))
            batch_stamps.append(float(stamp))
            if encoder is not None:
                batch_frames.append(frame)
            if len(batch_stamps) >= self.config.video_batch:
                flush()
        if batch_stamps:
            flush()
        return stamps

    def _audio_events(self, audio: tuple, events: list) -> int:
        waveform, sample_rate = audio
        waveform = np.asarray(waveform, dtype=np.float32).reshape(-1)
        encoder = self.encoders[AUDIO]
        rate_out = int(encoder.sample_rate or 16000)
        windower = AudioWindower(rate_out, self.config.audio_window_s, self.config.audio_hop_s)
        chunk = max(1, int(AUDIO_CHUNK_S * sample_rate))
        windows: list = []
        for start in range(0, waveform.size, chunk):
            windows += windower.push(
                waveform[start : start + chunk], int(sample_rate), 0.0 if start == 0 else None
            )
        for start in range(0, len(windows), self.config.audio_batch):
            batch = windows[start : start + self.config.audio_batch]
            for item in embed_windows(encoder, batch, self.config.silence_threshold_dbfs):
                events.append((AUDIO, item.end_stamp_s, item.vector))
        return len(windows)

    def _text_events(self, texts: Iterable, events: list) -> int:
        encoder = self.encoders[TEXT]
        count = 0
        for stamp, utterance in texts:
            text, _ = prepare_utterance(utterance)
            if text not in self._text_cache:
                vector, valid = encoder.encode(text)
                self._text_cache[text] = np.asarray(vector, np.float32) if valid else None
            events.append((TEXT, float(stamp), self._text_cache[text]))
            count += 1
        return count
