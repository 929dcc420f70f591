"""`fusion` node: aligns the modality embeddings in time and runs the stateful fusion model.

Subscribes ``affect/embedding/{video,audio,text}`` (affective_msgs/ModalityEmbedding) and publishes
one ``affect/valence_arousal`` (affective_msgs/ValenceArousal) per video embedding, stamped with
the video frame's stamp, and the tracked stream ids on ``affect/tracked_streams``
(affective_msgs/TrackedStreams, transient local) whenever they change. ``affect/reset``
(affective_msgs/srv/ResetState) resets the model memory of one stream or of all.

Runtime: the message callbacks only check an embedding and hand it to the per-stream table
(:mod:`affective_trm_ros.core.streams`), then wake the inference thread. That one thread sleeps
until an embedding arrives or the earliest release deadline passes (a ``/clock`` update wakes it
under simulated time), runs everything due across streams as batched model steps, and publishes.
There is no polling timer, and ingest never waits for the model.

The alignment policy lives in :mod:`affective_trm_ros.core.alignment`, the stream lifecycle in
:mod:`affective_trm_ros.core.streams`, the model behind
:class:`affective_trm_ros.core.predictor.FusionPredictor`. This file only moves messages.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import math
import threading
import time
from typing import Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.clock import JumpThreshold
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from affective_msgs.msg import ModalityEmbedding, TrackedStreams, ValenceArousal
from affective_msgs.srv import ResetState
from affective_trm_ros.core.alignment import (
    AUDIO_POLICIES,
    AlignmentConfig,
    audio_policy_mismatch,
    embedding_mismatch,
)
from affective_trm_ros.core.device import DEVICE_CHOICES_HELP
from affective_trm_ros.core.modalities import AUDIO, FEATURE_ORDER, MODALITY_BITS, TEXT, VIDEO, bits_to_names
from affective_trm_ros.core.stamps import stamp_to_seconds
from affective_trm_ros.core.streams import DEFAULT_STREAM, StreamPolicy, StreamTable
from affective_trm_ros.nodes.common import (
    LATCHED_QOS,
    RELIABLE_QOS,
    Diagnostics,
    LatencyWindow,
    RateMeter,
    add_validator,
    declare,
    run_node,
)

NODE_NAME = 'fusion'
SYNC_POLICIES = ('video_clocked', 'approximate')
#: Embedding topics (relative, so namespaces and remapping work).
EMBEDDING_TOPICS = {m: f'affect/embedding/{m}' for m in (VIDEO, AUDIO, TEXT)}
OUTPUT_TOPIC = 'affect/valence_arousal'
TRACKED_TOPIC = 'affect/tracked_streams'
RESET_SERVICE = 'affect/reset'
#: Text embeddings are published transient-local (a late joiner gets the current utterance);
#: the subscription asks for the same durability so it receives it, with room for a burst.
TEXT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL)
#: One refused-embedding error per (modality, encoder, dim) per this many seconds.
ERROR_PERIOD_S = 5.0
#: Alignment parameters that may change at run time (they only change comparisons, not buffers).
LIVE_ALIGNMENT_PARAMETERS = ('audio_slop_s', 'audio_max_age_s', 'text_max_age_s', 'max_wait_s',
                             'reset_after_s')
#: The inference thread re-checks at least this often (s) even when nothing is due: a guard
#: against a missed wake-up, not the release mechanism (that is the deadline or an arrival).
WAKE_GUARD_S = 1.0


class FusionNode(Node):
    """The fusion node (see the module docstring). ``kwargs`` go to rclpy's Node (context, ...)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._declare_parameters()
        params = self._parameter_values()
        _check_static_parameters(params)
        alignment = AlignmentConfig.from_parameters(params)  # fails early on bad values

        from affective_trm_ros.core.predictor import (
            FusionPredictor,  # torch import: only when a node is built
        )
        self._predictor = FusionPredictor(params['checkpoint'], device=params['device'],
                                          capacity=int(params['max_streams']))
        self._expected = {entry['modality']: entry for entry in self._predictor.encoder_spec}
        self._used = tuple(m for m in params['modalities'] if m in self._expected)
        unused = [m for m in params['modalities'] if m not in self._expected]
        if VIDEO not in self._used:
            raise ValueError(f"the checkpoint {params['checkpoint']} has no video input (its encoder spec: "
                             f'{self._predictor.encoder_spec}); the fusion is clocked by video')
        if unused:
            self.get_logger().warning(f'the checkpoint takes no {unused} input; those embeddings are ignored')
        self._policy = params['sync_policy']
        self._warn_on_policy_mismatch(alignment.audio_policy)
        # Frames wait for audio only when audio is fused (and not already paired by a synchronizer).
        alignment = dataclasses.replace(alignment, wait_for_audio=AUDIO in self._used
                                        and self._policy == 'video_clocked')
        self._table = StreamTable(self._predictor, alignment, StreamPolicy(
            max_streams=int(params['max_streams']), forget_after_s=float(params['stream_forget_after_s']),
            shared_audio_text=bool(params['shared_audio_text'])))

        self._ingest_counts: collections.Counter = collections.Counter()  # ingest thread only
        self._counts: collections.Counter = collections.Counter()         # inference thread only
        self._check_cache: dict = {}
        self._last_error: dict = {}
        self._last_bits = 0
        self._rate = RateMeter()
        self._latency = LatencyWindow()
        self._step_time = LatencyWindow()
        self._sim_time = bool(self.get_parameter('use_sim_time').value)

        self._publisher = self.create_publisher(ValenceArousal, OUTPUT_TOPIC, RELIABLE_QOS)
        self._tracked_publisher = self.create_publisher(TrackedStreams, TRACKED_TOPIC, LATCHED_QOS)
        self._subscribe(params)
        self.create_service(ResetState, RESET_SERVICE, self._on_reset)
        self._diagnostics = Diagnostics(self, self._collect_diagnostics,
                                        float(params['diagnostics_period_s']),
                                        hardware_id=str(self._predictor.device))
        add_validator(self, self._validate_update, self._apply_update)

        # The inference thread and how it is woken: arrivals, resets, and (simulated time) every
        # forward or backward move of the clock.
        self._wake = threading.Condition()
        self._woken = False
        self._stopping = False
        self._clock_jumps = self.get_clock().create_jump_callback(
            JumpThreshold(min_forward=Duration(nanoseconds=1), min_backward=Duration(nanoseconds=-1),
                          on_clock_change=True),
            post_callback=lambda _jump: self._notify())
        self._publish_tracked([])
        self._thread = threading.Thread(target=self._inference_loop, name='fusion_inference', daemon=True)
        self._thread.start()
        self.get_logger().info(
            f"fusion ready: {self._predictor.kind} model from {params['checkpoint']} on "
            f'{self._predictor.device}; modalities {list(self._used)}; policy {self._policy}; audio '
            f'{alignment.audio_policy} (slop {alignment.audio_slop_s} s, max age {alignment.audio_max_age_s} '
            f's), max wait {alignment.max_wait_s} s, text max age {alignment.text_max_age_s} s')

    def destroy_node(self) -> None:
        # A node whose start-up failed is destroyed too (Kilted's rclpy destroys every node of a
        # context at shutdown): only stop what was started.
        if hasattr(self, '_thread'):
            with self._wake:
                self._stopping = True
                self._wake.notify()
            if self._thread is not threading.current_thread():
                self._thread.join(10.0)
        if hasattr(self, '_clock_jumps'):
            self._clock_jumps.unregister()
        super().destroy_node()

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
                'by audio_policy, text latest held text_max_age_s. approximate: only frames '
                'that message_filters.ApproximateTimeSynchronizer pairs with an audio embedding '
                '(needs ROS message_filters).', choices=SYNC_POLICIES, read_only=True)
        declare(self, 'audio_policy', defaults.audio_policy, 'nearest: the audio embedding nearest the '
                'frame within audio_slop_s (frames wait for it, at most max_wait_s). causal: the newest '
                'audio window ending at or before the frame, at most audio_max_age_s old (never waits).',
                choices=AUDIO_POLICIES, read_only=True)
        declare(self, 'audio_slop_s', defaults.audio_slop_s, 'nearest policy: audio is matched to a frame '
                'within this many seconds of its stamp.', min_value=0.0, max_value=10.0)
        declare(self, 'audio_max_age_s', defaults.audio_max_age_s, 'causal policy: the newest audio '
                'window is used while it ended at most this long before the frame.', min_value=0.0,
                max_value=60.0)
        declare(self, 'text_max_age_s', defaults.text_max_age_s, 'A text embedding stays in force this '
                'long after its stamp.', min_value=0.0, max_value=3600.0)
        declare(self, 'max_wait_s', defaults.max_wait_s, 'nearest policy: a frame waits at most this '
                'long after its arrival (node clock) for its audio; must be >= audio_slop_s.',
                min_value=0.0, max_value=60.0)
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
        declare(self, 'shared_audio_text', False, 'Every audio and text embedding serves every stream, '
                'whatever its stream_id (embeddings with an empty stream_id always do).', read_only=True)
        declare(self, 'max_streams', 16, 'Most streams kept; a new one beyond it evicts the least '
                'recently active.', min_value=1, max_value=1024, read_only=True)
        declare(self, 'stream_forget_after_s', 10.0, 'A stream with no embedding for this long (node '
                'clock) is retired: queue and model state freed.', min_value=0.1, max_value=86400.0,
                read_only=True)
        declare(self, 'diagnostics_period_s', 1.0, 'Period of /diagnostics.', min_value=0.1,
                max_value=60.0, read_only=True)

    def _warn_on_policy_mismatch(self, running: str) -> None:
        problem = audio_policy_mismatch(self._predictor.audio_policy, running)
        if problem and AUDIO in self._used:
            self.get_logger().warning(problem)

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
                                                      qos_profile=RELIABLE_QOS)
                           for m in (VIDEO, AUDIO)]
            self._synchronizer = message_filters.ApproximateTimeSynchronizer(
                subscribers, int(params['sync_queue_size']), float(params['sync_slop_s']))
            self._synchronizer.registerCallback(self._on_synchronized)
        else:
            # Audio first: when both are ready at one wake-up, audio is handed over before video.
            for modality in (AUDIO, VIDEO):
                if modality in self._used:
                    self.create_subscription(ModalityEmbedding, EMBEDDING_TOPICS[modality],
                                             lambda msg, m=modality: self._on_embedding(msg, m),
                                             RELIABLE_QOS)
        if TEXT in self._used:
            self.create_subscription(ModalityEmbedding, EMBEDDING_TOPICS[TEXT], on_text, TEXT_QOS)

    # ------------------------------------------------------------ ingest

    def _vector(self, msg: ModalityEmbedding, modality: str) -> Optional[np.ndarray]:
        """The embedding as float32, or None (invalid, refused by the encoder check, or not finite)."""
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
        vector = self._vector(msg, modality)
        meta = (msg.header.stamp, msg.header.frame_id, msg.roi) if modality == VIDEO else None
        self._table.add(modality, msg.stream_id, stamp_to_seconds(msg.header.stamp), vector,
                        self._now_s(), meta=meta)
        self._notify()

    def _on_synchronized(self, video_msg: ModalityEmbedding, audio_msg: ModalityEmbedding) -> None:
        """approximate policy: a video embedding and the audio embedding paired with it."""
        if audio_msg.stream_id and (video_msg.stream_id or DEFAULT_STREAM) != audio_msg.stream_id:
            self._ingest_counts['sync_stream_mismatch'] += 1
            return
        self._on_embedding(audio_msg, AUDIO)
        self._on_embedding(video_msg, VIDEO)

    def _on_reset(self, request: ResetState.Request, response: ResetState.Response) -> ResetState.Response:
        stream = request.stream_id.strip()
        known = self._table.request_reset(stream or None)
        if not stream:
            response.success, response.message = True, f'reset {len(known)} streams'
        elif known:
            response.success, response.message = True, f"reset stream '{stream}'"
        else:
            response.success = False
            response.message = f"unknown stream '{stream}'; known: {self._table.stream_ids()}"
        if response.success:
            self._ingest_counts['resets_service'] += 1
            self._notify()  # applied before the next model step
        self.get_logger().info(f'affect/reset: {response.message}')
        return response

    def _notify(self) -> None:
        with self._wake:
            self._woken = True
            self._wake.notify()

    # ------------------------------------------------------------ inference (its own thread)

    def _inference_loop(self) -> None:
        tracked_version = self._table.version
        while True:
            # The deadline and the clock are read outside the condition: a /clock update wakes us
            # from inside the clock's own call, which must never wait for this thread.
            wake = self._table.next_wake()
            now_s = self._now_s()
            due = wake is not None and now_s + 1e-6 >= wake
            with self._wake:
                if self._stopping:
                    return
                if not self._woken and not due:
                    timeout = WAKE_GUARD_S
                    if wake is not None and not self._sim_time:
                        timeout = min(timeout, max(wake - now_s, 0.0))
                    self._wake.wait(timeout)
                    if self._stopping:
                        return
                    if not self._woken:
                        continue  # the deadline may have passed: look again
                self._woken = False
            try:
                self._infer()
            except Exception as error:  # keep serving: one bad step must not end the node
                self._counts['inference_errors'] += 1
                self._log_error(('inference', type(error).__name__), f'inference failed: {error!r}')
            if self._table.version != tracked_version:
                tracked_version = self._table.version
                self._publish_tracked(self._table.tracked())

    def _infer(self) -> None:
        started = [time.perf_counter()]

        def publish(estimates: list) -> None:  # one batched model step's estimates, at once
            now = time.perf_counter()
            self._step_time.add(now - started[0])
            started[0] = now
            for estimate in estimates:
                self._publish(estimate)

        self._table.run(self._now_s(), on_estimates=publish)

    def _publish(self, estimate) -> None:
        step = estimate.step
        stamp, frame_id, roi = step.meta
        msg = ValenceArousal()
        msg.header.stamp = stamp
        msg.header.frame_id = frame_id
        msg.stream_id = estimate.stream_id
        msg.roi = roi
        msg.valence = float(np.clip(estimate.valence, -1.0, 1.0))
        msg.arousal = float(np.clip(estimate.arousal, -1.0, 1.0))
        msg.confidence = float(np.clip(estimate.confidence, 0.0, 1.0))
        msg.modalities = int(step.bits)
        self._publisher.publish(msg)
        self._rate.tick()
        self._latency.add(self._now_s() - step.stamp_s)
        self._counts['published'] += 1
        self._last_bits = step.bits

    def _publish_tracked(self, ids: list) -> None:
        msg = TrackedStreams(stream_ids=list(ids))
        msg.header.stamp = self.get_clock().now().to_msg()
        self._tracked_publisher.publish(msg)

    # ------------------------------------------------------------ parameters, diagnostics

    def _validate_update(self, proposed: dict) -> Optional[str]:
        try:
            AlignmentConfig.from_parameters(proposed, wait_for_audio=self._table.alignment.wait_for_audio)
        except ValueError as error:
            return str(error)
        return None

    def _apply_update(self, changed: dict) -> None:
        if not set(changed) & set(LIVE_ALIGNMENT_PARAMETERS):
            return
        current = self._parameter_values()
        current.update(changed)
        self._table.set_alignment(AlignmentConfig.from_parameters(
            current, wait_for_audio=self._table.alignment.wait_for_audio))
        self._notify()

    @property
    def alignment(self) -> AlignmentConfig:
        """The alignment configuration in force."""
        return self._table.alignment

    def _collect_diagnostics(self) -> tuple:
        stats = self._table.aligner_stats()
        staleness = self._table.staleness(self._used)
        table_counts = self._table.counts
        counts = self._counts + self._ingest_counts
        values = {
            'device': str(self._predictor.device),
            'model': self._predictor.kind,
            'sync_policy': self._policy,
            'audio_policy': self._table.alignment.audio_policy,
            'modalities': ','.join(self._used),
            'streams': len(self._table.stream_ids()),
            'tracked_streams': ','.join(self._table.tracked()),
            'output_rate_hz': self._rate.rate(),
            'latency_p50_ms': self._latency.percentile(50) * 1e3,
            'latency_p95_ms': self._latency.percentile(95) * 1e3,
            'step_time_p50_ms': self._step_time.percentile(50) * 1e3,   # one batched model step
            'step_time_p95_ms': self._step_time.percentile(95) * 1e3,
            'published': counts['published'],
            'pending_frames': self._table.pending(),
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
            'dropped_evicted_frames': table_counts['frames_dropped_evicted'],
            'streams_evicted': table_counts['streams_evicted'],
            'streams_retired': table_counts['streams_retired'],
            'resets_time_backwards': stats['reset_backwards'],
            'resets_gap': stats['reset_gap'],
            'resets_service': counts['resets_service'],
            'inference_errors': counts['inference_errors'],
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
    if params['audio_policy'] not in AUDIO_POLICIES:
        raise ValueError(f"parameter audio_policy='{params['audio_policy']}': expected one of "
                         f'{AUDIO_POLICIES}')


def ingest_executor():
    """The fusion node's executor: its callbacks only hand messages over, so one thread is enough.

    Not rclpy's experimental EventsExecutor: with rclpy 7.1 (Jazzy) it kept a core busy in an idle
    fusion process and did not stop on SIGINT.
    """
    from rclpy.executors import SingleThreadedExecutor
    return SingleThreadedExecutor()


def build_frozen() -> FusionNode:
    """The node, with everything start-up allocated (torch, rclpy, the model: ~180k objects) moved
    out of the cyclic garbage collector's reach. A full collection over those objects holds the GIL
    for ~0.1 s on an idle CPU and ~0.4 s on a busy one, stalling ingest and inference alike."""
    node = FusionNode()
    gc.collect()
    gc.freeze()
    return node


def main(args=None) -> int:
    return run_node(build_frozen, args=args, name=NODE_NAME, executor_factory=ingest_executor)


if __name__ == '__main__':
    raise SystemExit(main())
