"""The per-stream table of the fusion runtime: alignment, model state, activity, eviction, reset (no rclpy).

One stream per tracked person (``ModalityEmbedding.stream_id``). The :class:`StreamTable` owns,
for every stream, its :class:`~affective_trm_ros.core.alignment.StreamAligner`, when it was last
active, and -- through the model runner it was given (a
:class:`~affective_trm_ros.core.predictor.FusionPredictor`) -- its model state. Everything that
creates, resets, evicts or retires a stream happens here, so the aligners and the model states
cannot drift apart.

Two sides use it, from two threads:

* **ingest** (message callbacks): :meth:`StreamTable.add` hands over one embedding; it never
  touches the model. :meth:`StreamTable.request_reset` queues a reset (the reset service).
* **inference** (one thread): :meth:`StreamTable.run` applies queued resets and frees, retires
  idle streams, takes every step that is due in every stream and runs them through the model in
  as few batched steps as the recurrence allows (the r-th due frame of every stream in step r),
  handing over each step's estimates as soon as they exist. :meth:`StreamTable.next_wake` says
  when to call it again at the latest. All model calls happen on this side, in order.

Conventions:

* a video embedding with an empty stream id belongs to :data:`DEFAULT_STREAM`;
* an audio or text embedding with an empty stream id is **shared context**: it is given to every
  stream, and to streams that appear later (the recent ones are kept for them); with
  ``shared_audio_text`` every audio/text embedding is shared whatever its id;
* activity is measured on the consumer's clock (arrival), never from stamps; a stream with no
  pending frame and no activity for ``forget_after_s`` is retired and its model state freed;
  beyond ``max_streams`` the least recently active stream is evicted;
* :attr:`StreamTable.version` changes whenever the set of streams with video (the tracked
  streams) changes.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np

from affective_trm_ros.core.alignment import STAMP_TOLERANCE_S, AlignedStep, AlignmentConfig, StreamAligner
from affective_trm_ros.core.modalities import AUDIO, TEXT, VIDEO

#: Stream of video embeddings that carry no stream id (one person).
DEFAULT_STREAM = 'default'


class ModelRunner(Protocol):
    """What the table needs from the model side (FusionPredictor has it)."""

    def step(self, items, resets=None) -> list: ...

    def reset(self, stream_id: Optional[str] = None) -> list: ...


@dataclass(frozen=True)
class StreamPolicy:
    """How streams come and go (the fusion node's parameters of the same meaning)."""

    #: Most streams kept; a new one beyond it evicts the least recently active.
    max_streams: int = 16
    #: A stream with nothing pending and no activity for this long (consumer clock, s) is retired.
    forget_after_s: float = 10.0
    #: Every audio/text embedding is shared context, whatever its stream id.
    shared_audio_text: bool = False

    def validate(self) -> None:
        if int(self.max_streams) < 1:
            raise ValueError(f'max_streams must be >= 1, got {self.max_streams!r}')
        if not (math.isfinite(self.forget_after_s) and self.forget_after_s > 0):
            raise ValueError(f'forget_after_s must be a finite number > 0, got {self.forget_after_s!r}')


@dataclass
class Estimate:
    """One model output: the step it answers and the values."""

    stream_id: str
    step: AlignedStep
    valence: float
    arousal: float
    confidence: float


@dataclass
class _Stream:
    aligner: StreamAligner
    last_activity_s: float
    has_video: bool = False


class StreamTable:
    """Per-stream alignment and model state, driven by an ingest side and one inference thread."""

    def __init__(self, runner: ModelRunner, alignment: Optional[AlignmentConfig] = None,
                 policy: Optional[StreamPolicy] = None) -> None:
        self.runner = runner
        self.alignment = alignment or AlignmentConfig()
        self.alignment.validate()
        self.policy = policy or StreamPolicy()
        self.policy.validate()
        self._lock = threading.Lock()
        self._streams: dict = {}
        # Recent shared context, replayed into streams that appear later.
        self._shared = {AUDIO: collections.deque(maxlen=self.alignment.max_audio),
                        TEXT: collections.deque(maxlen=self.alignment.max_text)}
        self._to_free: list = []       # streams whose model state must go (evicted, retired)
        self._to_reset: list = []      # reset requests (a stream id, or None = all)
        self._retired_stats: collections.Counter = collections.Counter()
        self._last_clock_s = -math.inf
        #: Table-level counters: streams_evicted, streams_retired, frames_dropped_evicted,
        #: resets_requested, resets_auto, steps, model_calls.
        self.counts: collections.Counter = collections.Counter()
        #: Changes whenever the set of tracked streams (streams with video) changes.
        self.version = 0

    # ------------------------------------------------------------ ingest side

    def add(self, modality: str, stream_id: str, stamp_s: float, vector: Optional[np.ndarray],
            now_s: float, meta: Any = None) -> None:
        """Hand over one embedding (None = invalid/nothing encoded) that arrived at ``now_s``."""
        with self._lock:
            self._note_clock(now_s)
            if modality == VIDEO:
                stream = self._stream(stream_id or DEFAULT_STREAM, now_s)
                stream.aligner.add_video(stamp_s, vector, meta=meta, arrival_s=now_s)
                if not stream.has_video:
                    stream.has_video = True
                    self.version += 1
            elif modality in (AUDIO, TEXT):
                if not stream_id or self.policy.shared_audio_text:
                    self._shared[modality].append((float(stamp_s), vector))
                    for stream in self._streams.values():
                        stream.aligner.add(modality, stamp_s, vector)
                else:
                    self._stream(stream_id, now_s).aligner.add(modality, stamp_s, vector)
            else:
                raise ValueError(f"unknown modality '{modality}'")

    def request_reset(self, stream_id: Optional[str] = None) -> list:
        """Queue a model-state reset of one stream (None: all); returns the known ids it concerns
        (empty: unknown stream, nothing queued). It takes effect before the next model step."""
        with self._lock:
            known = sorted(self._streams) if stream_id is None else (
                [stream_id] if stream_id in self._streams else [])
            if known or stream_id is None:
                self._to_reset.append(stream_id)
                self.counts['resets_requested'] += 1
            return known

    def set_alignment(self, config: AlignmentConfig) -> None:
        """Apply new alignment parameters to every stream (only comparisons change, not buffers)."""
        config.validate()
        with self._lock:
            self.alignment = config
            for stream in self._streams.values():
                stream.aligner.config = config

    # ------------------------------------------------------------ inference side

    def next_wake(self) -> Optional[float]:
        """Clock time by which :meth:`run` must be called at the latest (-inf: now; None: only when
        something arrives)."""
        with self._lock:
            if self._to_free or self._to_reset:
                return -math.inf
            times = []
            for stream in self._streams.values():
                deadline = stream.aligner.next_deadline()
                if deadline is not None:
                    times.append(deadline)
                else:
                    times.append(stream.last_activity_s + self.policy.forget_after_s)
            return min(times) if times else None

    def run(self, now_s: float, on_estimates: Optional[Callable[[list], None]] = None) -> list:
        """Apply queued resets, retire idle streams, run every due step; returns the Estimates.

        The due frames run in rounds: round r holds the r-th due frame of every stream, one batched
        model call (the recurrence allows no fewer). ``on_estimates`` gets each round's Estimates as
        soon as they exist, so the oldest frames of a burst are not held back by the newer ones.
        """
        with self._lock:
            self._note_clock(now_s)
            for stream_id, stream in list(self._streams.items()):
                idle_s = now_s - stream.last_activity_s
                if not stream.aligner.pending and idle_s + STAMP_TOLERANCE_S >= self.policy.forget_after_s:
                    self._drop(stream_id)
                    self.counts['streams_retired'] += 1
            rounds: list = []
            for stream_id, stream in self._streams.items():
                steps = stream.aligner.ready(now_s)
                if steps:
                    # Releasing counts as activity: a simulated clock that starts after the first
                    # messages must not make a live stream look idle.
                    stream.last_activity_s = max(stream.last_activity_s, now_s)
                for index, step in enumerate(steps):
                    if index == len(rounds):
                        rounds.append([])
                    rounds[index].append((stream_id, step))
            frees, self._to_free = self._to_free, []
            resets, self._to_reset = self._to_reset, []
        # Model calls: only here, in the inference thread, in order (outside the lock: ingest
        # never waits for the model).
        for stream_id in frees:
            self.runner.reset(stream_id)
        for stream_id in resets:
            self.runner.reset(stream_id)
        estimates = []
        for due in rounds:
            flags = [step.reset for _, step in due]
            outputs = self.runner.step([(stream_id, step.features) for stream_id, step in due], flags)
            self.counts['resets_auto'] += sum(flags)
            self.counts['steps'] += len(due)
            self.counts['model_calls'] += 1
            done = [Estimate(stream_id, step, *values) for (stream_id, step), values in zip(due, outputs)]
            if on_estimates is not None:
                on_estimates(done)
            estimates.extend(done)
        return estimates

    # ------------------------------------------------------------ views

    def tracked(self) -> list:
        """Sorted ids of the streams that have video (the people being estimated)."""
        with self._lock:
            return sorted(sid for sid, stream in self._streams.items() if stream.has_video)

    def stream_ids(self) -> list:
        """Sorted ids of every stream in the table (also those with only audio/text so far)."""
        with self._lock:
            return sorted(self._streams)

    def pending(self) -> int:
        """Frames waiting in all streams."""
        with self._lock:
            return sum(stream.aligner.pending for stream in self._streams.values())

    def aligner_stats(self) -> collections.Counter:
        """Alignment counters summed over the live and the retired streams."""
        with self._lock:
            stats = collections.Counter(self._retired_stats)
            for stream in self._streams.values():
                stats.update(stream.aligner.stats)
            return stats

    def staleness(self, modalities) -> dict:
        """modality -> the worst (over streams) age of its newest valid embedding relative to the
        stream's newest frame (s); inf when a stream never had one. Streams without video skipped."""
        with self._lock:
            worst: dict = {}
            for stream in self._streams.values():
                aligner = stream.aligner
                if aligner.last_video_stamp is None:
                    continue
                for modality in modalities:
                    age = aligner.last_video_stamp - aligner.last_valid_stamp.get(modality, -math.inf)
                    worst[modality] = max(worst.get(modality, -math.inf), age)
            return worst

    # ------------------------------------------------------------ internals (lock held)

    def _stream(self, stream_id: str, now_s: float) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            if len(self._streams) >= self.policy.max_streams:
                oldest = min(self._streams, key=lambda s: self._streams[s].last_activity_s)
                self.counts['streams_evicted'] += 1
                self.counts['frames_dropped_evicted'] += self._streams[oldest].aligner.pending
                self._drop(oldest)
            aligner = StreamAligner(self.alignment)
            for modality in (AUDIO, TEXT):
                for stamp_s, vector in self._shared[modality]:
                    aligner.add(modality, stamp_s, vector)
            stream = self._streams[stream_id] = _Stream(aligner, now_s)
        stream.last_activity_s = max(stream.last_activity_s, now_s)
        return stream

    def _drop(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id)
        self._retired_stats.update(stream.aligner.stats)
        self._to_free.append(stream_id)
        if stream.has_video:
            self.version += 1

    def _note_clock(self, now_s: float) -> None:
        """A clock that jumps back (a looping simulated clock) must not hold frames or streams."""
        if now_s + STAMP_TOLERANCE_S < self._last_clock_s:
            for stream in self._streams.values():
                stream.aligner.clock_went_back(now_s)
                stream.last_activity_s = min(stream.last_activity_s, now_s)
            self.counts['clock_went_back'] += 1
        self._last_clock_s = now_s
