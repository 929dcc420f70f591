"""Time alignment of modality embeddings into fused steps: the video-clocked policy (no rclpy).

One :class:`StreamAligner` per stream (person). Every video embedding at time ``t`` becomes
exactly one :class:`AlignedStep` stamped ``t``:

* **audio**, by ``audio_policy``:

  - ``nearest`` -- the audio embedding whose stamp is nearest to ``t`` within ``audio_slop_s``
    (best alignment; the frame waits for audio from its future);
  - ``causal`` -- the newest audio embedding with stamp <= ``t`` (an audio stamp is the end of its
    window, so: the newest complete window ending at or before the frame) that is at most
    ``audio_max_age_s`` old. Frames never wait (lowest latency);

* **text** -- the latest text embedding with stamp <= ``t`` that is at most ``text_max_age_s`` old;
* a modality with no such embedding, or whose chosen embedding is invalid, is **masked** (None).

With ``nearest``, a frame is released by :meth:`StreamAligner.ready` once the audio watermark
(the newest audio stamp received) reaches ``t + audio_slop_s`` -- every audio embedding that
could be nearest has then arrived, so the result does not depend on how audio and video messages
interleave -- or once the clock reaches the frame's **arrival** time + ``max_wait_s``, so a dead
audio encoder costs latency, never output. The wait is measured from arrival on the consumer's
clock, never from the stamp: stamps are only for matching (a sensor clock running ahead or behind
must not delay or hurry outputs). Video frames leave in stamp order.

Rules for everything else:

* buffers are bounded (``max_pending_frames``, ``max_audio``, ``max_text``); overflow releases the
  oldest pending frame at once or evicts the oldest embedding, and is counted;
* an audio embedding arriving after a frame within its slop was fused is counted as ``audio_late``;
  one too old to serve any frame not yet fused is dropped and counted as ``audio_dropped_late``;
* a text embedding older than the newest fused frame is counted as ``text_late`` (it still applies
  to the frames after it);
* a video stamp equal to the previous one is a duplicate: dropped and counted;
* a video stamp older than the previous one (a bag loop, a clock reset) flushes the pending frames,
  forgets buffered audio/text from the abandoned future, and marks the next step ``reset`` so the
  model state starts afresh; so does a gap without video longer than ``reset_after_s``.

:func:`align_events` runs the same policy over a finished recording (offline feature preparation),
so training features and the fusion node's inputs come from one code path.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from affective_trm_ros.core.modalities import AUDIO, FEATURE_ORDER, MODALITY_BITS, TEXT, VIDEO

#: Reasons a frame left the aligner (AlignedStep.released_by).
RELEASED_BY_AUDIO = 'audio'        # the audio watermark passed t + audio_slop_s
RELEASED_BY_NO_WAIT = 'no_wait'    # the aligner does not wait for audio (causal policy or no audio)
RELEASED_BY_TIMEOUT = 'timeout'    # now >= arrival + max_wait_s
RELEASED_BY_OVERFLOW = 'overflow'  # more than max_pending_frames frames waited
RELEASED_BY_FLUSH = 'flush'        # a reset (time jump or gap) or flush() emptied the queue

#: Boundary comparisons (slop, max wait, max age) allow this much: ROS stamps are integer
#: nanoseconds, and as float seconds since the epoch they carry ~0.24 us of rounding.
STAMP_TOLERANCE_S = 1e-6

#: Audio matching policies (see the module docstring).
AUDIO_NEAREST = 'nearest'
AUDIO_CAUSAL = 'causal'
AUDIO_POLICIES = (AUDIO_NEAREST, AUDIO_CAUSAL)
#: The policy of feature stores and checkpoints that do not record one (every earlier version).
LEGACY_AUDIO_POLICY = AUDIO_NEAREST


@dataclass(frozen=True)
class AlignmentConfig:
    """Parameters of the video-clocked policy (the fusion node's parameters of the same names)."""

    #: How audio is matched to a frame: 'nearest' (within audio_slop_s, waits for the future) or
    #: 'causal' (newest window ending at or before the frame, never waits).
    audio_policy: str = AUDIO_NEAREST
    #: Audio is matched to a frame when its stamp is within this many seconds of the frame's stamp.
    #: Half the audio hop plus margin: with a 0.5 s hop every frame then has an audio candidate.
    audio_slop_s: float = 0.3
    #: causal policy: the newest audio window ending at or before the frame is used while it is at
    #: most this old. Two hops of the default 0.5 s hop: one late window is tolerated.
    audio_max_age_s: float = 1.0
    #: A text embedding stays in force for this long after its stamp (speech is sparse).
    text_max_age_s: float = 10.0
    #: nearest policy: release a frame at the latest when the clock reaches its arrival + this.
    max_wait_s: float = 0.6
    #: A gap without video longer than this resets the stream's model state.
    reset_after_s: float = 5.0
    #: Wait for the audio watermark before releasing a frame (False when audio is not used).
    wait_for_audio: bool = True
    #: Most video frames waiting for their audio; beyond it the oldest leaves at once.
    max_pending_frames: int = 64
    #: Most audio embeddings buffered (at a 0.5 s hop, 64 cover 32 s).
    max_audio: int = 64
    #: Most text embeddings buffered.
    max_text: int = 16

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any], wait_for_audio: bool = True) -> AlignmentConfig:
        """The config from a mapping holding the fusion node's parameters of the same names
        (e.g. the ``ros__parameters`` of config/fusion.yaml); absent names keep their defaults."""
        kwargs = {f.name: type(getattr(cls, f.name))(params[f.name]) for f in dataclasses.fields(cls)
                  if f.name in params and f.name != 'wait_for_audio'}
        config = cls(wait_for_audio=wait_for_audio, **kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if self.audio_policy not in AUDIO_POLICIES:
            raise ValueError(f'audio_policy must be one of {AUDIO_POLICIES}, got {self.audio_policy!r}')
        for name in ('audio_slop_s', 'audio_max_age_s', 'text_max_age_s', 'max_wait_s', 'reset_after_s'):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f'{name} must be a finite number >= 0, got {value!r}')
        if self.max_wait_s < self.audio_slop_s:
            raise ValueError(f'max_wait_s ({self.max_wait_s}) must be >= audio_slop_s '
                             f'({self.audio_slop_s}): a frame cannot be released before every audio '
                             f'embedding within the slop could have been captured')
        if self.reset_after_s <= self.max_wait_s:
            raise ValueError(f'reset_after_s ({self.reset_after_s}) must be > max_wait_s '
                             f'({self.max_wait_s})')
        for name in ('max_pending_frames', 'max_audio', 'max_text'):
            if int(getattr(self, name)) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)!r}')


@dataclass
class AlignedStep:
    """One fused step: the inputs of one model step for one video frame."""

    stamp_s: float
    #: modality -> vector, or None when masked; every modality of FEATURE_ORDER is a key.
    features: dict
    #: ValenceArousal.modalities bits of the present modalities.
    bits: int
    #: modality -> frame stamp minus the stamp of the embedding used (s; audio may be negative),
    #: None when masked.
    staleness: dict
    #: The model state must be reset before this step (time went backwards, or a gap).
    reset: bool = False
    #: What add_video() was given as ``meta`` (e.g. the original ROS stamp and frame id).
    meta: Any = None
    #: Why the frame was released (one of the RELEASED_BY_* values).
    released_by: str = RELEASED_BY_AUDIO

    @property
    def mask(self) -> np.ndarray:
        """(M,) bool in FEATURE_ORDER: True where the modality is present."""
        return np.array([self.features[m] is not None for m in FEATURE_ORDER], dtype=bool)


@dataclass
class _Frame:
    stamp_s: float
    vector: Optional[np.ndarray]
    meta: Any
    reset: bool
    #: When the frame arrived, on the clock ready() is given (the stamp when not told).
    arrival_s: float


@dataclass
class _Buffer:
    """Embeddings of one modality sorted by stamp, bounded (the oldest stamp is evicted)."""

    limit: int
    stamps: list = field(default_factory=list)
    vectors: list = field(default_factory=list)

    def insert(self, stamp_s: float, vector: Optional[np.ndarray]) -> bool:
        """Insert in stamp order (a repeated stamp replaces the earlier entry); True if one was evicted."""
        index = bisect.bisect_left(self.stamps, stamp_s)
        if index < len(self.stamps) and self.stamps[index] == stamp_s:
            self.vectors[index] = vector
            return False
        self.stamps.insert(index, stamp_s)
        self.vectors.insert(index, vector)
        if len(self.stamps) > self.limit:
            del self.stamps[0], self.vectors[0]
            return True
        return False

    def drop_before(self, stamp_s: float) -> None:
        index = bisect.bisect_left(self.stamps, stamp_s)
        del self.stamps[:index], self.vectors[:index]

    def drop_after(self, stamp_s: float) -> None:
        index = bisect.bisect_right(self.stamps, stamp_s)
        del self.stamps[index:], self.vectors[index:]

    def nearest(self, stamp_s: float, slop_s: float) -> Optional[int]:
        """Index of the entry nearest to stamp_s within slop_s (ties: the earlier one), or None."""
        index = bisect.bisect_left(self.stamps, stamp_s)
        best = None
        for candidate in (index - 1, index):
            if 0 <= candidate < len(self.stamps):
                distance = abs(self.stamps[candidate] - stamp_s)
                if distance <= slop_s + STAMP_TOLERANCE_S and (best is None or distance < best[0]):
                    best = (distance, candidate)
        return None if best is None else best[1]

    def latest_not_after(self, stamp_s: float) -> Optional[int]:
        index = bisect.bisect_right(self.stamps, stamp_s) - 1
        return index if index >= 0 else None


class StreamAligner:
    """The video-clocked alignment policy for one stream (see the module docstring)."""

    def __init__(self, config: Optional[AlignmentConfig] = None) -> None:
        self.config = config or AlignmentConfig()
        self.config.validate()
        self._pending: collections.deque = collections.deque()
        self._released: list = []
        self._audio = _Buffer(self.config.max_audio)
        self._text = _Buffer(self.config.max_text)
        self._audio_watermark = -math.inf
        self._last_video: Optional[float] = None
        self._last_fused: Optional[float] = None
        self._reset_next = False
        #: Counters: frames_in, frames_out, video_duplicate, video_invalid, video_overflow,
        #: audio_late, audio_dropped_late, audio_overflow, text_late, text_overflow,
        #: reset_backwards, reset_gap, masked_<modality>.
        self.stats: collections.Counter = collections.Counter()
        #: modality -> stamp of the newest valid embedding received (for staleness diagnostics).
        self.last_valid_stamp: dict = {}

    # ------------------------------------------------------------ input

    def add(self, modality: str, stamp_s: float, vector: Optional[np.ndarray]) -> None:
        """Add one embedding (None = the encoder found nothing to encode). Video goes to add_video."""
        if modality == VIDEO:
            self.add_video(stamp_s, vector)
        elif modality == AUDIO:
            self._add_audio(float(stamp_s), vector)
        elif modality == TEXT:
            self._add_text(float(stamp_s), vector)
        else:
            raise ValueError(f"unknown modality '{modality}'; expected one of {FEATURE_ORDER}")

    def add_video(self, stamp_s: float, vector: Optional[np.ndarray], meta: Any = None,
                  arrival_s: Optional[float] = None) -> None:
        """Add one video embedding; it becomes exactly one AlignedStep (unless it is a duplicate).

        ``arrival_s``: when it arrived, on the clock later given to :meth:`ready` (default: its
        stamp, as when the clock follows the stamps offline). The maximum wait runs from there.
        """
        stamp_s = float(stamp_s)
        _check_stamp(stamp_s)
        arrival_s = stamp_s if arrival_s is None else float(arrival_s)
        _check_stamp(arrival_s)
        if self._last_video is not None:
            if stamp_s == self._last_video:
                self.stats['video_duplicate'] += 1
                return
            if stamp_s < self._last_video:
                self.stats['reset_backwards'] += 1
                self._restart(forget_after=stamp_s)
            elif stamp_s - self._last_video > self.config.reset_after_s + STAMP_TOLERANCE_S:
                self.stats['reset_gap'] += 1
                self._restart(forget_after=None)
        self._last_video = stamp_s
        self.stats['frames_in'] += 1
        if vector is None:
            self.stats['video_invalid'] += 1
        else:
            self.last_valid_stamp[VIDEO] = stamp_s
        self._pending.append(_Frame(stamp_s, vector, meta, self._reset_next, arrival_s))
        self._reset_next = False
        while len(self._pending) > self.config.max_pending_frames:
            self.stats['video_overflow'] += 1
            self._release(self._pending.popleft(), RELEASED_BY_OVERFLOW)

    def _add_audio(self, stamp_s: float, vector: Optional[np.ndarray]) -> None:
        _check_stamp(stamp_s)
        slop = self.config.audio_slop_s
        if self.config.audio_policy == AUDIO_CAUSAL:
            # A window ending at or before a fused frame came too late for it (it may still serve
            # later frames if it is the newest; older ones are pruned at the next release).
            if self._last_fused is not None and stamp_s <= self._last_fused + STAMP_TOLERANCE_S:
                self.stats['audio_late'] += 1
        elif self._last_fused is not None:
            if stamp_s < self._last_fused - slop - STAMP_TOLERANCE_S:
                self.stats['audio_dropped_late'] += 1
                return
            if stamp_s <= self._last_fused + slop + STAMP_TOLERANCE_S:
                self.stats['audio_late'] += 1
        if self._audio.insert(stamp_s, vector):
            self.stats['audio_overflow'] += 1
        self._audio_watermark = max(self._audio_watermark, stamp_s)
        if vector is not None:
            self.last_valid_stamp[AUDIO] = max(stamp_s, self.last_valid_stamp.get(AUDIO, -math.inf))

    def _add_text(self, stamp_s: float, vector: Optional[np.ndarray]) -> None:
        _check_stamp(stamp_s)
        if self._last_fused is not None and stamp_s < self._last_fused:
            self.stats['text_late'] += 1
        if self._text.insert(stamp_s, vector):
            self.stats['text_overflow'] += 1
        if vector is not None:
            self.last_valid_stamp[TEXT] = max(stamp_s, self.last_valid_stamp.get(TEXT, -math.inf))

    # ------------------------------------------------------------ output

    def ready(self, now_s: float) -> list:
        """The steps due at clock time ``now_s`` (seconds, the clock the stamps are on), in stamp order.

        ``now_s = -inf`` releases only what the audio watermark allows; ``+inf`` releases everything.
        """
        config = self.config
        while self._pending:
            frame = self._pending[0]
            if not self.waits:
                reason = RELEASED_BY_NO_WAIT
            elif self._audio_watermark + STAMP_TOLERANCE_S >= frame.stamp_s + config.audio_slop_s:
                reason = RELEASED_BY_AUDIO
            elif now_s + STAMP_TOLERANCE_S >= frame.arrival_s + config.max_wait_s:
                reason = RELEASED_BY_TIMEOUT
            else:
                break
            self._release(self._pending.popleft(), reason)
        released, self._released = self._released, []
        return released

    @property
    def waits(self) -> bool:
        """True when frames wait for audio (the nearest policy with audio fused)."""
        return self.config.wait_for_audio and self.config.audio_policy == AUDIO_NEAREST

    def next_deadline(self) -> Optional[float]:
        """Clock time at which the oldest pending frame is released whatever audio does (-inf: it
        is due now regardless of the clock; None: nothing pending)."""
        if not self._pending:
            return None
        frame = self._pending[0]
        audio_passed = self._audio_watermark + STAMP_TOLERANCE_S >= frame.stamp_s + self.config.audio_slop_s
        if not self.waits or audio_passed:
            return -math.inf
        return frame.arrival_s + self.config.max_wait_s

    def clock_went_back(self, now_s: float) -> None:
        """The clock that arrivals are measured on jumped back to ``now_s`` (a looping simulated
        clock): waiting frames count as having arrived now, so their wait stays bounded."""
        for frame in self._pending:
            frame.arrival_s = min(frame.arrival_s, now_s)

    def flush(self) -> list:
        """Release every pending frame now (end of a recording)."""
        while self._pending:
            self._release(self._pending.popleft(), RELEASED_BY_FLUSH)
        released, self._released = self._released, []
        return released

    @property
    def pending(self) -> int:
        """Video frames waiting to be released."""
        return len(self._pending)

    @property
    def last_video_stamp(self) -> Optional[float]:
        return self._last_video

    # ------------------------------------------------------------ internals

    def _release(self, frame: _Frame, reason: str) -> None:
        config = self.config
        t = frame.stamp_s
        features = {VIDEO: frame.vector, AUDIO: None, TEXT: None}
        staleness = {VIDEO: 0.0 if frame.vector is not None else None, AUDIO: None, TEXT: None}
        causal = config.audio_policy == AUDIO_CAUSAL
        if causal:
            index = self._audio.latest_not_after(t)
            max_age = config.audio_max_age_s + STAMP_TOLERANCE_S
            if index is not None and t - self._audio.stamps[index] > max_age:
                index = None  # the newest window is too old: audio is stale
        else:
            index = self._audio.nearest(t, config.audio_slop_s)
        if index is not None and self._audio.vectors[index] is not None:
            features[AUDIO] = self._audio.vectors[index]
            staleness[AUDIO] = t - self._audio.stamps[index]
        index = self._text.latest_not_after(t)
        if (index is not None and self._text.vectors[index] is not None
                and t - self._text.stamps[index] <= config.text_max_age_s + STAMP_TOLERANCE_S):
            features[TEXT] = self._text.vectors[index]
            staleness[TEXT] = t - self._text.stamps[index]
        present = {m: features[m] is not None for m in FEATURE_ORDER}
        for modality, is_present in present.items():
            if not is_present:
                self.stats[f'masked_{modality}'] += 1
        bits = sum(MODALITY_BITS[m] for m, is_present in present.items() if is_present)
        self._released.append(AlignedStep(stamp_s=t, features=features, bits=bits, staleness=staleness,
                                          reset=frame.reset, meta=frame.meta, released_by=reason))
        self.stats['frames_out'] += 1
        self._last_fused = t
        # Later frames are newer than t: older audio can never be within their slop (nearest), only
        # the newest audio and text at or before t can still be the latest-not-newer one.
        if causal:
            index = self._audio.latest_not_after(t)
            if index is not None:
                self._audio.drop_before(self._audio.stamps[index])
        else:
            self._audio.drop_before(t - config.audio_slop_s - STAMP_TOLERANCE_S)
        index = self._text.latest_not_after(t)
        if index is not None:
            self._text.drop_before(self._text.stamps[index])

    def _restart(self, forget_after: Optional[float]) -> None:
        """Flush the pending frames and start a new segment whose first step resets the model.

        ``forget_after``: time went back to this stamp; buffered embeddings newer than it belong to
        the abandoned timeline and are dropped (None: a gap, nothing to forget).
        """
        while self._pending:
            self._release(self._pending.popleft(), RELEASED_BY_FLUSH)
        if forget_after is not None:
            ahead = self.config.audio_slop_s if self.config.audio_policy == AUDIO_NEAREST else 0.0
            self._audio.drop_after(forget_after + ahead + STAMP_TOLERANCE_S)
            self._text.drop_after(forget_after)
            self._audio_watermark = self._audio.stamps[-1] if self._audio.stamps else -math.inf
            self.last_valid_stamp = {m: s for m, s in self.last_valid_stamp.items() if s <= forget_after}
        self._last_fused = None
        self._reset_next = True


def audio_policy_mismatch(trained: Optional[str], running: str) -> Optional[str]:
    """Why serving with audio policy ``running`` differs from training (``trained``: the policy the
    checkpoint records, None when it records none), or None when they agree."""
    note = ''
    if trained is None:
        trained = LEGACY_AUDIO_POLICY
        note = ' (the checkpoint records none; checkpoints written before it was recorded used it)'
    if trained == running:
        return None
    return (f"audio_policy '{running}' differs from '{trained}', the policy the checkpoint's training "
            f"features were aligned with{note}: audio reaches the model with other timing than in "
            f"training. Set audio_policy: {trained}, or train on features prepared with '{running}'")


def _check_stamp(stamp_s: float) -> None:
    if not math.isfinite(stamp_s):
        raise ValueError(f'stamp must be finite, got {stamp_s!r}')


# ---------------------------------------------------------------- offline use

def align_events(events: Iterable[tuple], config: Optional[AlignmentConfig] = None) -> list:
    """Run the policy over a whole recording of one stream: (modality, stamp_s, vector|None) events.

    Events are fed in stamp order (a stable sort, so same-stamp events keep their given order)
    with the clock following the stamps, the way simulated time follows a replayed bag, then the
    rest is flushed. With all embeddings present, every frame sees every audio embedding within
    its slop and every text embedding not newer than it -- the result a node gets when audio keeps
    up. Returns one AlignedStep per video event (duplicates dropped), in stamp order.
    """
    aligner = StreamAligner(config)
    ordered = sorted(events, key=lambda event: float(event[1]))
    steps: list = []
    index = 0
    while index < len(ordered):
        stamp_s = float(ordered[index][1])
        while index < len(ordered) and float(ordered[index][1]) == stamp_s:
            modality, _, vector = ordered[index][:3]
            aligner.add(modality, stamp_s, vector)
            index += 1
        steps.extend(aligner.ready(stamp_s))
    steps.extend(aligner.flush())
    return steps


def steps_to_arrays(steps: Sequence[AlignedStep], dims: Mapping[str, int]) -> tuple:
    """AlignedSteps -> (timestamps (T,) float64, features {modality: (T, dim) float32}, mask (T, M) bool,
    resets (T,) bool). Masked rows are zeros; mask columns follow FEATURE_ORDER.
    """
    count = len(steps)
    timestamps = np.array([step.stamp_s for step in steps], dtype=np.float64)
    features = {m: np.zeros((count, int(dims[m])), dtype=np.float32) for m in FEATURE_ORDER}
    mask = np.zeros((count, len(FEATURE_ORDER)), dtype=bool)
    resets = np.array([step.reset for step in steps], dtype=bool)
    for row, step in enumerate(steps):
        for column, modality in enumerate(FEATURE_ORDER):
            vector = step.features[modality]
            if vector is None:
                continue
            vector = np.asarray(vector, dtype=np.float32).reshape(-1)
            if vector.shape[0] != features[modality].shape[1]:
                raise ValueError(f'{modality} embedding at t={step.stamp_s:.3f} s has {vector.shape[0]} '
                                 f'values, expected {features[modality].shape[1]}')
            features[modality][row] = vector
            mask[row, column] = True
    return timestamps, features, mask, resets


# ---------------------------------------------------------------- input checks

def split_encoder_identity(identity: str) -> tuple:
    """'<plugin id>@<weights identity>' -> (plugin id, weights identity); no '@' -> (identity, '')."""
    plugin, _, weights = (identity or '').partition('@')
    return plugin.strip(), weights.strip()


def embedding_mismatch(expected: Mapping[str, Any], modality: str, encoder_identity: str,
                       dim: Optional[int]) -> Optional[str]:
    """Why an embedding does not fit the model's encoder spec entry, or None when it fits.

    ``expected`` is the spec entry ``{'modality', 'encoder', 'dim'}``; ``dim`` is the embedding's
    length (None for an invalid embedding, whose data is empty).
    """
    plugin, _ = split_encoder_identity(encoder_identity)
    want_plugin, want_dim = str(expected['encoder']), int(expected['dim'])
    problems = []
    if plugin != want_plugin:
        problems.append(f"encoder '{plugin or '<empty>'}' instead of '{want_plugin}'")
    if dim is not None and int(dim) != want_dim:
        problems.append(f'dim {dim} instead of {want_dim}')
    if not problems:
        return None
    return (f"{modality} embeddings from '{encoder_identity}' (dim {dim if dim is not None else '?'}) do "
            f"not match the checkpoint, which expects {modality} from '{want_plugin}' with dim "
            f"{want_dim}: {', '.join(problems)}")
