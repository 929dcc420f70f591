"""`fusion` node: aligns the modality embeddings in time and runs the stateful fusion model.

Subscribes ``affect/embedding/{video,audio,text}`` (affective_msgs/ModalityEmbedding) and publishes
one ``affect/valence_arousal`` (affective_msgs/ValenceArousal) per video embedding, stamped with
the video frame's stamp. One alignment queue and one model state per ``stream_id``; frames of
several streams that are due together run as one batched model step. ``affect/reset``
(affective_msgs/srv/ResetState) resets the model memory of one stream or of all.

The alignment policy lives in :mod:`affective_trm_ros.core.alignment`; the model behind
:class:`affective_trm_ros.core.predictor.FusionPredictor`. This file only moves messages.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
from typing import Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from affective_msgs.msg import ModalityEmbedding, ValenceArousal
from affective_msgs.srv import ResetState

from affective_trm_ros.core.alignment import AlignmentConfig, StreamAligner, embedding_mismatch
from affective_trm_ros.core.device import DEVICE_CHOICES_HELP
from affective_trm_ros.core.modalities import AUDIO, FEATURE_ORDER, MODALITY_BITS, TEXT, VIDEO, bits_to_names
from affective_trm_ros.nodes.common import RELIABLE_QOS, Diagnostics, LatencyWindow, RateMeter, add_validator, declare, run_node

NODE_NAME = 'fusion'
SYNC_POLICIES = ('video_clocked', 'approximate')
#: Embedding topics (relative, so namespaces and remapping work).
EMBEDDING_TOPICS = {m: f'affect/embedding/{m}' for m in (VIDEO, AUDIO, TEXT)}
OUTPUT_TOPIC = 'affect/valence_arousal'
RESET_SERVICE = 'affect/reset'
#: Text embeddings are published transient-local (a late joiner gets the current utterance);
#: the subscription asks for the same durability so it receives it, with room for a burst.
TEXT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)
#: Stream id used when an embedding carries none.
DEFAULT_STREAM = 'default'
#: One refused-embedding error per (modality, encoder, dim) per this many seconds.
ERROR_PERIOD_S = 5.0
#: Alignment parameters that may change at run time (they only change comparisons, not buffers).
LIVE_ALIGNMENT_PARAMETERS = ('audio_slop_s', 'text_max_age_s', 'max_wait_s', 'reset_after_s')


def stamp_to_seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


class FusionNode(Node):
    """The fusion node (see the module docstring). ``kwargs`` go to rclpy's Node (context, ...)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._declare_parameters()
        params = self._parameter_values()
        _check_static_parameters(params)
        self._alignment = AlignmentConfig.from_parameters(params)  # fails early on bad values

        from affective_trm_ros.core.predictor import FusionPredictor  # torch import: only when a node is built
        self._predictor = FusionPredictor(params['checkpoint'], device=params['device'])
        self._expected = {entry['modality']: entry for entry in self._predictor.encoder_spec}
        self._used = tuple(m for m in params['modalities'] if m in self._expected)
        unused = [m for m in params['modalities'] if m not in self._expected]
        if VIDEO not in self._used:
            raise ValueError(f"the checkpoint {params['checkpoint']} has no video input (its encoder spec: "
                             f'{self._predictor.encoder_spec}); the fusion is clocked by video')
        if unused:
            self.get_logger().warning(f'the checkpoint takes no {unused} input; those embeddings are ignored')
        # Frames wait for audio only when audio is fused (and not already paired by a synchronizer).
        self._alignment = dataclasses.replace(self._alignment, wait_for_audio=AUDIO in self._used
                                              and params['sync_policy'] == 'video_clocked')
        self._shared_audio_text = bool(params['shared_audio_text'])
        self._max_streams = int(params['max_streams'])
        self._forget_after_s = float(params['stream_forget_after_s'])

        self._lock = threading.Lock()  # guards the aligners (ingest and inference run in different threads)
        self._aligners: dict = {}
        self._last_activity: dict = {}
        self._retired_stats: collections.Counter = collections.Counter()
        # Counters written by the ingest thread and by the inference thread, kept apart.
        self._ingest_counts: collections.Counter = collections.Counter()
        self._counts: collections.Counter = collections.Counter()
        self._check_cache: dict = {}
        self._last_error: dict = {}
        self._last_bits = 0
        self._rate = RateMeter()
        self._latency = LatencyWindow()
        self._step_time = LatencyWindow()

        self._ingest_group = MutuallyExclusiveCallbackGroup()
        self._inference_group = MutuallyExclusiveCallbackGroup()
        self._publisher = self.create_publisher(ValenceArousal, OUTPUT_TOPIC, RELIABLE_QOS)
        self._policy = params['sync_policy']
        self._subscribe(params)
        self.create_service(ResetState, RESET_SERVICE, self._on_reset, callback_group=self._inference_group)
        # Polling runs on the steady clock so it also ticks while simulated time is paused; the
        # release decision itself uses the node clock (simulated time under use_sim_time).
        self.create_timer(float(params['release_period_s']), self._on_release_timer,
                          callback_group=self._inference_group, clock=Clock(clock_type=ClockType.STEADY_TIME))
        self._diagnostics = Diagnostics(self, self._collect_diagnostics,
                                        float(params['diagnostics_period_s']),
                                        hardware_id=str(self._predictor.device))
        add_validator(self, self._validate_update, self._apply_update)
        alignment = self._alignment
        self.get_logger().info(
            f"fusion ready: {self._predictor.kind} model from {params['checkpoint']} on "
            f'{self._predictor.device}; modalities {list(self._used)}; policy {self._policy}; audio slop '
            f'{alignment.audio_slop_s} s, max wait {alignment.max_wait_s} s, text max age '
            f'{alignment.text_max_age_s} s')

    # ------------------------------------------------------------ set-up

    def _declare_parameters(self) -> None:
        defaults = AlignmentConfig()
        declare(self, 'checkpoint', '', 'Fusion checkpoint file (affective-trm train output, or the '
                'prototype state dict emotion_model_sequential_av.pth).', read_only=True)
        declare(self, 'device', 'auto', f'Where the model runs: {DEVICE_CHOICES_HELP}.', read_only=True)
        declare(self, 'modalities', [VIDEO, AUDIO, TEXT],
                'Modalities to fuse (video is required: it clocks the output); embeddings of the '
                'others are ignored and masked.', read_only=True)
        declare(self, 'sync_policy', 'video_clocked', 'video_clocked: one output per video frame, audio '
                'nearest within audio_slop_s, text latest held text_max_age_s. approximate: only frames '
                'that message_filters.ApproximateTimeSynchronizer pairs with an audio embedding '
                '(needs ROS message_filters).', choices=SYNC_POLICIES, read_only=True)
        declare(self, 'audio_slop_s', defaults.audio_slop_s, 'Audio is matched to a frame within this '
                'many seconds of its stamp.', min_value=0.0, max_value=10.0)
        declare(self, 'text_max_age_s', defaults.text_max_age_s, 'A text embedding stays in force this '
                'long after its stamp.', min_value=0.0, max_value=3600.0)
        declare(self, 'max_wait_s', defaults.max_wait_s, 'A frame waits at most this long (node clock) '
                'for its audio; must be >= audio_slop_s.', min_value=0.0, max_value=60.0)
        declare(self, 'reset_after_s', defaults.reset_after_s, 'A gap without video longer than this '
                'resets the stream model state; must be > max_wait_s.', min_value=0.0, max_value=3600.0)
        declare(self, 'max_pending_frames', defaults.max_pending_frames, 'Most video frames waiting '
                'for audio per stream; the oldest leaves early beyond it.', min_value=1, max_value=10000,
                read_only=True)
        declare(self, 'max_audio', defaults.max_audio, 'Most audio embeddings buffered per stream.',
                min_value=1, max_value=10000, read_only=True)
        declare(self, 'max_text', defaults.max_text, 'Most text embeddings buffered per stream.',
                min_value=1, max_value=10000, read_only=True)
        declare(self, 'sync_queue_size', 30, 'approximate policy: ApproximateTimeSynchronizer queue size.',
                min_value=1, max_value=10000, read_only=True)
        declare(self, 'sync_slop_s', 0.1, 'approximate policy: ApproximateTimeSynchronizer slop (s).',
                min_value=0.0, max_value=10.0, read_only=True)
        declare(self, 'shared_audio_text', False, 'Audio and text embeddings serve every stream, '
                'whatever their stream_id (one microphone, several faces).', read_only=True)
        declare(self, 'max_streams', 16, 'Most streams kept; a new one beyond it evicts the least '
                'recently active.', min_value=1, max_value=1024, read_only=True)
        declare(self, 'stream_forget_after_s', 60.0, 'A stream with no embedding for this long (node '
                'clock) is forgotten: queue and model state.', min_value=1.0, max_value=86400.0,
                read_only=True)
        declare(self, 'release_period_s', 0.01, 'How often due frames are looked for (steady clock).',
                min_value=0.001, max_value=1.0, read_only=True)
        declare(self, 'diagnostics_period_s', 1.0, 'Period of /diagnostics.', min_value=0.1,
                max_value=60.0, read_only=True)

    def _subscribe(self, params: dict) -> None:
        on_text = lambda msg: self._on_embedding(msg, TEXT)  # noqa: E731
        if self._policy == 'approximate':
            try:
                import message_filters
            except ImportError as error:
                raise RuntimeError(
                    "sync_policy 'approximate' needs ROS 2 message_filters, which is not importable here "
                    f'({error}); install it (apt install ros-$ROS_DISTRO-message-filters) or use '
                    "sync_policy 'video_clocked'") from error
            if AUDIO not in self._used:
                raise ValueError("sync_policy 'approximate' pairs video with audio; "
                                 "add 'audio' to modalities")
            subscribers = [message_filters.Subscriber(self, ModalityEmbedding, EMBEDDING_TOPICS[m],
                                                      qos_profile=RELIABLE_QOS,
                                                      callback_group=self._ingest_group)
                           for m in (VIDEO, AUDIO)]
            self._synchronizer = message_filters.ApproximateTimeSynchronizer(
                subscribers, int(params['sync_queue_size']), float(params['sync_slop_s']))
            self._synchronizer.registerCallback(self._on_synchronized)
        else:
            for modality in (VIDEO, AUDIO):
                if modality in self._used:
                    self.create_subscription(ModalityEmbedding, EMBEDDING_TOPICS[modality],
                                             lambda msg, m=modality: self._on_embedding(msg, m),
                                             RELIABLE_QOS, callback_group=self._ingest_group)
        if TEXT in self._used:
            self.create_subscription(ModalityEmbedding, EMBEDDING_TOPICS[TEXT], on_text, TEXT_QOS,
                                     callback_group=self._ingest_group)

    # ------------------------------------------------------------ ingest

    def _vector(self, msg: ModalityEmbedding, modality: str) -> Optional[np.ndarray]:
        """The embedding as float32, or None (invalid, refused by the encoder check, or not finite).

        Caller holds the lock.
        """
        counts = self._ingest_counts
        if msg.modality and msg.modality != modality:
            counts[f'rejected_{modality}'] += 1
            self._log_error(('topic', modality, msg.modality), f"a '{msg.modality}' embedding arrived on "
                                                               f'the {modality} topic; treated as invalid')
            return None
        dim = len(msg.data) if msg.valid else None
        key = (modality, msg.encoder, dim)
        if key not in self._check_cache:
            if len(self._check_cache) > 256:  # bounded: a misbehaving publisher cannot grow it
                self._check_cache.clear()
            self._check_cache[key] = embedding_mismatch(self._expected[modality], modality, msg.encoder, dim)
        problem = self._check_cache[key]
        if problem is not None:
            counts[f'rejected_{modality}'] += 1
            self._log_error(key, f"{problem}; refusing them (checkpoint "
                                 f"{self.get_parameter('checkpoint').value})")
            return None
        if not msg.valid:
            return None
        vector = np.array(msg.data, dtype=np.float32)
        if not np.isfinite(vector).all():
            counts[f'nonfinite_{modality}'] += 1
            self._log_error(('nonfinite', modality),
                            f'{modality} embedding holds NaN or inf; treated as invalid')
            return None
        return vector

    def _on_embedding(self, msg: ModalityEmbedding, modality: str) -> None:
        stream = msg.stream_id or DEFAULT_STREAM
        stamp_s = stamp_to_seconds(msg.header.stamp)
        now_s = self._now_s()
        with self._lock:
            vector = self._vector(msg, modality)
            if modality == VIDEO:
                meta = (msg.header.stamp, msg.header.frame_id)
                self._aligner(stream, now_s).add_video(stamp_s, vector, meta=meta)
            elif self._shared_audio_text:
                for aligner in self._aligners.values():
                    aligner.add(modality, stamp_s, vector)
            else:
                self._aligner(stream, now_s).add(modality, stamp_s, vector)

    def _on_synchronized(self, video_msg: ModalityEmbedding, audio_msg: ModalityEmbedding) -> None:
        """approximate policy: a video embedding and the audio embedding paired with it."""
        if (video_msg.stream_id or DEFAULT_STREAM) != (audio_msg.stream_id or DEFAULT_STREAM):
            self._ingest_counts['sync_stream_mismatch'] += 1
            return
        self._on_embedding(audio_msg, AUDIO)
        self._on_embedding(video_msg, VIDEO)

    def _aligner(self, stream: str, now_s: float) -> StreamAligner:
        """The stream's aligner, created on first use (caller holds the lock)."""
        self._last_activity[stream] = now_s
        aligner = self._aligners.get(stream)
        if aligner is None:
            if len(self._aligners) >= self._max_streams:
                oldest = min(self._aligners, key=lambda s: self._last_activity.get(s, -math.inf))
                self._ingest_counts['streams_evicted'] += 1
                self._ingest_counts['frames_dropped_evicted'] += self._aligners[oldest].pending
                self._retire(oldest)
                self.get_logger().warning(f"more than {self._max_streams} streams: evicted '{oldest}'")
            aligner = self._aligners[stream] = StreamAligner(self._alignment)
        return aligner

    def _retire(self, stream: str) -> None:
        """Forget a stream's aligner and model state (caller holds the lock)."""
        self._retired_stats.update(self._aligners.pop(stream).stats)
        self._last_activity.pop(stream, None)
        self._predictor.reset(stream)

    # ------------------------------------------------------------ inference

    def _on_release_timer(self) -> None:
        now_s = self._now_s()
        with self._lock:
            due = {}
            for stream, aligner in list(self._aligners.items()):
                steps = aligner.ready(now_s)
                idle_s = now_s - self._last_activity.get(stream, now_s)
                if steps:
                    due[stream] = steps
                    # Releasing counts as activity: a clock that starts after the first messages
                    # (simulated time) must not make a live stream look idle.
                    self._last_activity[stream] = now_s
                elif not aligner.pending and idle_s > self._forget_after_s:
                    self._retire(stream)
                    self.get_logger().info(f"stream '{stream}' idle for {self._forget_after_s} s: forgotten")
        if due:
            self._run(due)

    def _run(self, due: dict) -> None:
        """Run the due steps: round r batches the r-th due step of every stream into one model step."""
        rounds = max(len(steps) for steps in due.values())
        for index in range(rounds):
            batch = [(stream, steps[index]) for stream, steps in due.items() if index < len(steps)]
            for stream, step in batch:
                if step.reset:
                    self._predictor.reset(stream)
                    self._counts['resets_auto'] += 1
            started = time.perf_counter()
            outputs = self._predictor.step([(stream, step.features) for stream, step in batch])
            self._step_time.add(time.perf_counter() - started)
            for (stream, step), (valence, arousal, confidence) in zip(batch, outputs):
                self._publish(stream, step, valence, arousal, confidence)

    def _publish(self, stream: str, step, valence: float, arousal: float, confidence: float) -> None:
        stamp, frame_id = step.meta
        msg = ValenceArousal()
        msg.header.stamp = stamp
        msg.header.frame_id = frame_id
        msg.stream_id = stream
        msg.valence = float(np.clip(valence, -1.0, 1.0))
        msg.arousal = float(np.clip(arousal, -1.0, 1.0))
        msg.confidence = float(np.clip(confidence, 0.0, 1.0))
        msg.modalities = int(step.bits)
        self._publisher.publish(msg)
        self._rate.tick()
        self._latency.add(self._now_s() - step.stamp_s)
        self._counts['published'] += 1
        self._last_bits = step.bits

    def _on_reset(self, request: ResetState.Request, response: ResetState.Response) -> ResetState.Response:
        stream = request.stream_id.strip()
        with self._lock:
            known = sorted(set(self._aligners) | set(self._predictor.streams()))
        if not stream:
            self._predictor.reset(None)
            response.success, response.message = True, f'reset {len(known)} streams'
        elif stream in known:
            self._predictor.reset(stream)
            response.success, response.message = True, f"reset stream '{stream}'"
        else:
            response.success = False
            response.message = f"unknown stream '{stream}'; known: {known}"
        if response.success:
            self._counts['resets_service'] += 1
        self.get_logger().info(f'affect/reset: {response.message}')
        return response

    # ------------------------------------------------------------ parameters, diagnostics

    def _validate_update(self, proposed: dict) -> Optional[str]:
        try:
            AlignmentConfig.from_parameters(proposed, wait_for_audio=self._alignment.wait_for_audio)
        except ValueError as error:
            return str(error)
        return None

    def _apply_update(self, changed: dict) -> None:
        if not set(changed) & set(LIVE_ALIGNMENT_PARAMETERS):
            return
        current = self._parameter_values()
        current.update(changed)
        config = AlignmentConfig.from_parameters(current, wait_for_audio=self._alignment.wait_for_audio)
        with self._lock:
            self._alignment = config
            for aligner in self._aligners.values():
                aligner.config = config

    def _collect_diagnostics(self) -> tuple:
        with self._lock:
            stats = collections.Counter(self._retired_stats)
            staleness = {}
            for aligner in self._aligners.values():
                stats.update(aligner.stats)
                if aligner.last_video_stamp is None:
                    continue
                for modality in self._used:
                    age = aligner.last_video_stamp - aligner.last_valid_stamp.get(modality, -math.inf)
                    staleness[modality] = max(staleness.get(modality, -math.inf), age)
            streams = len(self._aligners)
        counts = self._counts + self._ingest_counts
        values = {
            'device': str(self._predictor.device),
            'model': self._predictor.kind,
            'sync_policy': self._policy,
            'modalities': ','.join(self._used),
            'streams': streams,
            'output_rate_hz': self._rate.rate(),
            'latency_p50_ms': self._latency.percentile(50) * 1e3,
            'latency_p95_ms': self._latency.percentile(95) * 1e3,
            'step_time_p50_ms': self._step_time.percentile(50) * 1e3,
            'step_time_p95_ms': self._step_time.percentile(95) * 1e3,
            'published': counts['published'],
            'last_modalities': ','.join(bits_to_names(self._last_bits)) or 'none',
        }
        for modality in self._used:
            age = staleness.get(modality)
            values[f'staleness_{modality}_s'] = 'never' if age is None or math.isinf(age) else age
            values[f'masked_{modality}'] = stats[f'masked_{modality}']
            values[f'rejected_{modality}'] = counts[f'rejected_{modality}']
        values.update({
            'dropped_late_audio': stats['audio_dropped_late'],
            'late_audio': stats['audio_late'],
            'late_text': stats['text_late'],
            'dropped_duplicate_video': stats['video_duplicate'],
            'early_release_overflow': stats['video_overflow'],
            'dropped_buffer_overflow': stats['audio_overflow'] + stats['text_overflow'],
            'dropped_evicted_frames': counts['frames_dropped_evicted'],
            'resets_time_backwards': stats['reset_backwards'],
            'resets_gap': stats['reset_gap'],
            'resets_service': counts['resets_service'],
        })
        rejected = [m for m in self._used if counts[f'rejected_{m}']]
        if rejected:
            message = f'refusing {",".join(rejected)} embeddings (encoder mismatch)'
            return DiagnosticStatus.ERROR, message, values
        missing = [m for m in (VIDEO, AUDIO)
                   if m in self._used and counts['published'] and not self._last_bits & MODALITY_BITS[m]]
        if missing:
            return DiagnosticStatus.WARN, f'masked: {",".join(missing)}', values
        return DiagnosticStatus.OK, f"{values['output_rate_hz']:.1f} Hz", values

    # ------------------------------------------------------------ helpers

    def _parameter_values(self) -> dict:
        return {name: parameter.value for name, parameter in self.get_parameters_by_prefix('').items()}

    def _now_s(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _log_error(self, key, message: str) -> None:
        if len(self._last_error) > 256:  # bounded: a misbehaving publisher cannot grow it
            self._last_error.clear()
        now = time.monotonic()
        if now - self._last_error.get(key, -math.inf) >= ERROR_PERIOD_S:
            self._last_error[key] = now
            self.get_logger().error(message)


def _check_static_parameters(params: dict) -> None:
    """Start-up checks of the read-only parameters; ValueError says what to fix."""
    if not params['checkpoint']:
        raise ValueError("parameter 'checkpoint' is empty: set it to a fusion checkpoint file "
                         '(affective-trm train writes one)')
    modalities = list(params['modalities'])
    unknown = [m for m in modalities if m not in FEATURE_ORDER]
    if unknown or len(set(modalities)) != len(modalities):
        raise ValueError(f'parameter modalities={modalities}: expected distinct names from '
                         f'{list(FEATURE_ORDER)}')
    if VIDEO not in modalities:
        raise ValueError(f'parameter modalities={modalities} must include video: the fusion is clocked '
                         f'by video')
    if params['sync_policy'] not in SYNC_POLICIES:
        raise ValueError(f"parameter sync_policy='{params['sync_policy']}': expected one of {SYNC_POLICIES}")


def main(args=None) -> int:
    return run_node(FusionNode, args=args)


if __name__ == '__main__':
    raise SystemExit(main())
