"""Replay driver node: plays a rosbag into the real nodes on simulated time and records what they say.

The driver publishes the bag's raw sensor messages (their recorded CDR bytes, unchanged) in
log-time order, each preceded by ``/clock`` = its log time, so nodes running with
``use_sim_time`` see the recording's clock. Two modes:

* **as fast as possible** (default), with back-pressure so that no frame is dropped and the run is
  deterministic: after a video frame the driver waits for that frame's video embedding; after an
  audio message for the audio embeddings its windows produce (counted with the same
  ``core.audio`` windowing the audio node runs); after a speech message for its text embedding.
  Before each message it waits until every frame published before ``clock - max_wait`` has its
  ``ValenceArousal`` — due by the fusion policy, which measures the wait from a frame's arrival —
  which bounds the frames in flight, and (nodes in this process) until every node's clock reads
  the new ``/clock``; frames with several faces only at the end (the fusion may take a later face
  after clocks the driver cannot know). At the end the clock is advanced past the last frame +
  ``max_wait`` so the last frames are released.
* **real time** (``rate`` x wall clock): messages leave on schedule and nothing is waited for;
  nodes that cannot keep up drop frames as they would live, and the coverage shows it.

Every ``ValenceArousal`` is recorded with the wall time it arrived, so latency is measured from
publishing a frame to receiving its estimate. Optionally every embedding is recorded too (the
train/serve parity test compares them with the offline features).
"""

from __future__ import annotations

import collections
import importlib
import math
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from rclpy.clock import JumpThreshold
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosgraph_msgs.msg import Clock

from affective_msgs.msg import ModalityEmbedding, ValenceArousal
from affective_trm_ros.core import audio as audio_core
from affective_trm_ros.core.modalities import AUDIO, TEXT, VIDEO
from affective_trm_ros.nodes.common import LATCHED_QOS

# Raw inputs the driver publishes (role -> node input topic default).
ROLE_IMAGE, ROLE_COMPRESSED, ROLE_AUDIO, ROLE_AUDIO_INFO, ROLE_SPEECH = (
    'image', 'compressed_image', 'audio', 'audio_info', 'speech')
# Headerless audio: the audio node starts its sample clock at the first message's arrival time.
AUDIO_DATA_TYPE = 'audio_common_msgs/msg/AudioData'
EMBEDDING_TOPICS = {m: f'affect/embedding/{m}' for m in (VIDEO, AUDIO, TEXT)}
OUTPUT_TOPIC = 'affect/valence_arousal'
# Inputs are published reliable (a best-effort subscriber still matches); outputs are read with
# deep queues so a burst of released frames is never cut.
INPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.VOLATILE)
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)
# While waiting, /clock is re-sent this often (it is best effort: one lost sample must not stall).
CLOCK_REPEAT_S = 0.05
# Extra simulated time past the last frame + max_wait at the end, so every frame is due.
END_MARGIN_S = 0.2
# Without a way to read the nodes' clocks (``node_clocks``), the nodes get this long to take a new
# /clock before a message they stamp on arrival (speech; headerless audio), and the audio node this
# long to take the latched audio_info before the first audio message.
SETTLE_S = 0.02
# Real time: once the bag is published, the video encoder counts as finished when no embedding
# has come for this long.
IDLE_AFTER_S = 1.0
# ... and encoded frames without an estimate count as shed by the fusion after this long quiet.
UNANSWERED_AFTER_S = 5.0
# A frame whose embedding has not come back after this many times the median encode time (and
# at least MIN_RETRY_S) is published again: best-effort camera QoS may lose a large image. The
# aligner drops a duplicate stamp, so a frame that was only slow is not fused twice.
RETRY_FACTOR = 20.0
MIN_RETRY_S = 2.0
RETRY_HISTORY = 50  # recent encode times the median is taken over


class ReplayError(RuntimeError):
    """The nodes did not answer within the timeout; the message says what was awaited."""


@dataclass(frozen=True)
class ReplayInput:
    """One raw message to publish: role, log time (ns) and serialized bytes."""

    role: str
    log_time_ns: int
    data: bytes


@dataclass
class ReplayRecord:
    """What came back from one replay."""

    mode: str
    outputs: list = field(default_factory=list)       # (stamp_ns, stream, v, a, conf, bits, wall_s)
    frame_publish_wall: dict = field(default_factory=dict)   # frame stamp ns -> wall time published
    embedding_wall: dict = field(default_factory=dict)       # frame stamp ns -> video embedding arrival
    embeddings: list = field(default_factory=list)    # (modality, stamp_ns, valid, data, encoder)
    encoders: dict = field(default_factory=dict)      # modality -> identity seen on the topic
    frames_published: int = 0
    republished_frames: int = 0
    messages_published: int = 0
    wall_s: float = 0.0
    memory_mb: list = field(default_factory=list)     # (frames published, RSS MB)
    frame_id: str = ''                                # header.frame_id of the estimates (the camera's)


def header_stamp_ns(data: bytes) -> int:
    """Stamp of a serialized message that starts with std_msgs/Header (CDR: 4-byte encapsulation,
    then int32 sec and uint32 nanosec)."""
    if len(data) < 12:
        raise ValueError('serialized message too short to hold a header')
    order = '<' if data[1] & 1 else '>'
    sec, nanosec = struct.unpack_from(f'{order}iI', data, 4)
    return sec * 1_000_000_000 + nanosec


def _message_class(type_name: str):
    package, _, name = type_name.split('/')
    return getattr(importlib.import_module(f'{package}.msg'), name)


class ReplayDriver(Node):
    """Publishes replay inputs and records embeddings and estimates (see the module docstring).

    ``inputs``: role -> (topic, message type name) for the roles present in the bag.
    ``audio_params``: the audio node's window_s, hop_s, stamp_tolerance_s, max_lag_s and the
    stream format parameters (to count the windows each audio message completes).
    ``node_clocks``: the clocks of the nodes under test when they run in this process. Before each
    message (as fast as possible) the driver then waits until every clock reads the message's log
    time, so what the nodes stamp on arrival (speech, headerless audio, the fusion's arrival times)
    never depends on thread timing; without them it waits SETTLE_S before the messages stamped on
    arrival.
    """

    def __init__(self, inputs: dict, *, max_wait_s: float, audio_params: Optional[dict] = None,
                 expect: Iterable[str] = (VIDEO, AUDIO, TEXT), record_embeddings: bool = False,
                 timeout_s: float = 120.0, memory_probe: Optional[Callable[[], float]] = None,
                 node_clocks: Iterable = (), **node_kwargs) -> None:
        super().__init__('replay_driver', **node_kwargs)
        self._expect = set(expect)
        self._max_wait_ns = int(round(max_wait_s * 1e9))
        self._timeout_s = float(timeout_s)
        self._record_embeddings = record_embeddings
        self._memory_probe = memory_probe
        self._node_clocks = list(node_clocks)
        # Set whenever a node's clock takes a new /clock: waiting for the nodes' clocks wakes on it
        # instead of polling (one poll period per message would dominate a replay's wall time).
        self._clock_moved = threading.Event()
        any_change = JumpThreshold(min_forward=Duration(nanoseconds=1), min_backward=Duration(nanoseconds=-1),
                                   on_clock_change=True)
        self._clock_jump_handles = [clock.create_jump_callback(any_change,
                                                               post_callback=self._on_node_clock_jump)
                                    for clock in self._node_clocks]
        self._clock_pub = self.create_publisher(Clock, '/clock', 10)
        self._input_pubs = {}
        for role, (topic, type_name) in inputs.items():
            qos = LATCHED_QOS if role == ROLE_AUDIO_INFO else INPUT_QOS
            self._input_pubs[role] = self.create_publisher(_message_class(type_name), topic, qos)
        self._input_types = {role: type_name for role, (_, type_name) in inputs.items()}
        audio_params = dict(audio_params or {})
        self._audio_format = audio_core.AudioFormat(int(audio_params.get('sample_rate', 16000)),
                                                    int(audio_params.get('channels', 1)),
                                                    str(audio_params.get('sample_format', 'S16LE')).upper())
        self._windows = audio_core.AudioStreamProcessor(
            int(audio_params.get('sample_rate_out', audio_core.DEFAULT_SAMPLE_RATE_OUT)),
            float(audio_params.get('window_s', audio_core.DEFAULT_WINDOW_S)),
            float(audio_params.get('hop_s', audio_core.DEFAULT_HOP_S)),
            float(audio_params.get('stamp_tolerance_s', audio_core.DEFAULT_STAMP_TOLERANCE_S)),
            float(audio_params.get('max_lag_s', audio_core.DEFAULT_MAX_LAG_S)))
        self._cond = threading.Condition()
        self._video_seen: set = set()
        self._counts = {AUDIO: 0, TEXT: 0}
        # With several faces a frame has one video embedding and one estimate per stream: a frame
        # is answered when every stream the driver saw a video embedding of has its estimate.
        self._video_streams: dict = collections.defaultdict(set)   # stamp -> stream ids (video)
        self._answered: dict = collections.defaultdict(set)        # stamp -> stream ids (estimates)
        self._output_stamps: set = set()
        self._expected_audio = 0
        self._expected_text = 0
        self.record = ReplayRecord(mode='')
        for modality, topic in EMBEDDING_TOPICS.items():
            if modality in self._expect:
                self.create_subscription(ModalityEmbedding, topic,
                                         lambda msg, m=modality: self._on_embedding(msg, m), OUTPUT_QOS)
        self.create_subscription(ValenceArousal, OUTPUT_TOPIC, self._on_output, OUTPUT_QOS)

    # ------------------------------------------------------------ callbacks

    def _on_embedding(self, msg: ModalityEmbedding, modality: str) -> None:
        stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        now = time.perf_counter()
        with self._cond:
            self.record.encoders.setdefault(modality, msg.encoder)
            if modality == VIDEO:
                if msg.stream_id in self._video_streams[stamp_ns]:
                    return  # the answer to a republished frame
                self._video_streams[stamp_ns].add(msg.stream_id)
                if msg.stream_id not in self._answered[stamp_ns]:
                    self._output_stamps.discard(stamp_ns)
                self._video_seen.add(stamp_ns)
                self.record.embedding_wall.setdefault(stamp_ns, now)
            else:
                self._counts[modality] += 1
            if self._record_embeddings:
                data = np.array(msg.data, dtype=np.float32) if msg.valid else None
                self.record.embeddings.append((modality, stamp_ns, bool(msg.valid), data, msg.encoder))
            self._cond.notify_all()

    def _on_output(self, msg: ValenceArousal) -> None:
        stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        now = time.perf_counter()
        with self._cond:
            self.record.outputs.append((stamp_ns, msg.stream_id, float(msg.valence), float(msg.arousal),
                                        float(msg.confidence), int(msg.modalities), now))
            self.record.frame_id = self.record.frame_id or msg.header.frame_id
            self._answered[stamp_ns].add(msg.stream_id)
            if self._video_streams[stamp_ns] <= self._answered[stamp_ns]:
                self._output_stamps.add(stamp_ns)
            self._cond.notify_all()

    # ------------------------------------------------------------ graph

    def wait_for_nodes(self, timeout_s: float = 30.0) -> None:
        """Block until every input has a subscriber, every expected output a publisher and the
        nodes listen to /clock."""
        deadline = time.monotonic() + timeout_s
        while True:
            missing = [f'a subscriber of {self._input_pubs[role].topic_name}'
                       for role in self._input_pubs if self._input_pubs[role].get_subscription_count() < 1]
            missing += [f'a publisher of {EMBEDDING_TOPICS[m]}' for m in sorted(self._expect)
                        if self.count_publishers(EMBEDDING_TOPICS[m]) < 1]
            if self.count_publishers(OUTPUT_TOPIC) < 1:
                missing.append(f'a publisher of {OUTPUT_TOPIC}')
            if self._clock_pub.get_subscription_count() < 1:
                missing.append('a subscriber of /clock (use_sim_time)')
            if not missing:
                return
            if time.monotonic() > deadline:
                raise ReplayError(f'the nodes did not come up within {timeout_s:.0f} s: '
                                  f"no {', '.join(missing)}")
            time.sleep(0.05)

    # ------------------------------------------------------------ publishing

    def _on_node_clock_jump(self, _jump) -> None:
        self._clock_moved.set()  # an Event, not self._cond: this runs under the clock's own lock

    def destroy_node(self) -> None:
        for handle in self._clock_jump_handles:
            handle.unregister()
        self._clock_jump_handles = []
        super().destroy_node()

    def _publish_clock(self, stamp_ns: int) -> None:
        msg = Clock()
        msg.clock.sec, msg.clock.nanosec = divmod(int(stamp_ns), 1_000_000_000)
        self._clock_pub.publish(msg)

    def _wait(self, done: Callable[[], bool], what: str, clock_ns: int,
              retry: Optional[Callable[[], None]] = None, retry_after_s: float = math.inf,
              missing: Optional[Callable[[], str]] = None) -> None:
        """Wait (re-sending /clock) until ``done()``; ``retry()`` once per ``retry_after_s``."""
        started = time.monotonic()
        last_retry = started
        with self._cond:
            while not done():
                now = time.monotonic()
                if now - started > self._timeout_s:
                    detail = f' ({missing()})' if missing is not None else ''
                    raise ReplayError(f'no {what} within {self._timeout_s:.0f} s{detail}')
                if retry is not None and now - last_retry > retry_after_s:
                    retry()
                    last_retry = now
                self._cond.wait(CLOCK_REPEAT_S)
                if not done():
                    self._publish_clock(clock_ns)

    def play(self, inputs: Iterable[ReplayInput], *, realtime: bool = False, rate: float = 1.0,
             progress: Optional[Callable[[int], None]] = None) -> ReplayRecord:
        """Publish ``inputs`` (log-time order) and return what came back."""
        record = self.record
        record.mode = f'realtime x{rate:g}' if realtime else 'as fast as possible'
        started = time.perf_counter()
        clock_ns = None
        first_log = None
        frames: list = []
        encode_times: collections.deque = collections.deque(maxlen=RETRY_HISTORY)
        if self._memory_probe:
            record.memory_mb.append((0, self._memory_probe()))
        for item in inputs:
            clock_ns = item.log_time_ns if clock_ns is None else max(clock_ns, item.log_time_ns)
            if realtime:
                first_log = item.log_time_ns if first_log is None else first_log
                delay = started + (item.log_time_ns - first_log) / 1e9 / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            self._publish_clock(clock_ns)
            if not realtime:
                # The fusion releases a frame at the latest max_wait after its video embedding
                # arrived on the node's clock (not after its stamp: a camera clock may be ahead or
                # behind). The fusion takes the embedding at the clock the frame was published at
                # or, when its executor is a little behind the driver's, at the clock of the next
                # message: that later one bounds the deadline, so the driver never holds the clock
                # for a frame the fusion may rightly still keep.
                # Frames with several faces are waited for only at the end: the driver waits for a
                # frame's first face embedding, and the fusion may take the others after later clocks
                # than the driver can know, so their deadlines cannot be bounded here.
                frames = [(f, clock_ns if at is None else at) for f, at in frames]
                due_ns = clock_ns - self._max_wait_ns
                def unanswered(pending=frames, due=due_ns) -> list:
                    return self._unanswered(pending, due)

                self._wait(lambda: not unanswered(),
                           'ValenceArousal for the frames due by the fusion policy (is the fusion node '
                           'running?)', clock_ns, missing=lambda: self._describe(unanswered()))
                frames = [(f, at) for f, at in frames if f not in self._output_stamps]
                # Every node takes this /clock before the message: arrival times on the nodes'
                # clocks, hence text stamps and the fusion's release rounds, never depend on
                # thread timing.
                self._settle_clocks(clock_ns, item.role)
            publisher = self._input_pubs[item.role]
            publisher.publish(item.data)
            record.messages_published += 1
            if item.role in (ROLE_IMAGE, ROLE_COMPRESSED):
                stamp_ns = header_stamp_ns(item.data)
                record.frame_publish_wall[stamp_ns] = time.perf_counter()
                record.frames_published += 1
                frames.append((stamp_ns, None))   # its arrival bound: the next message's clock
                if progress:
                    progress(1)
                if self._memory_probe and record.frames_published % 300 == 0:
                    record.memory_mb.append((record.frames_published, self._memory_probe()))
                if not realtime and VIDEO in self._expect:
                    retry_after = max(MIN_RETRY_S, RETRY_FACTOR * float(np.median(encode_times))
                                      if encode_times else self._timeout_s / 4)

                    def republish(data=item.data, pub=publisher):
                        record.republished_frames += 1
                        pub.publish(data)

                    self._wait(lambda s=stamp_ns: s in self._video_seen,
                               f'video embedding for the frame stamped {stamp_ns / 1e9:.3f} s (is the '
                               f'video encoder running?)', clock_ns, republish, retry_after)
                    encode_times.append(record.embedding_wall[stamp_ns] - record.frame_publish_wall[stamp_ns])
            elif item.role == ROLE_AUDIO and not realtime and AUDIO in self._expect:
                expected = self._counts_after_audio(item, clock_ns)
                self._wait(lambda n=expected: self._counts[AUDIO] >= n,
                           f'audio embedding #{expected} (is the audio encoder running?)', clock_ns)
            elif item.role == ROLE_SPEECH and not realtime and TEXT in self._expect:
                self._expected_text += 1
                self._wait(lambda n=self._expected_text: self._counts[TEXT] >= n,
                           f'text embedding #{self._expected_text} (is the text encoder running?)', clock_ns)
            elif item.role == ROLE_AUDIO_INFO:
                self._take_audio_info(item)
        if clock_ns is not None:
            self._finish(clock_ns, realtime)
        record.wall_s = time.perf_counter() - started
        if self._memory_probe:
            record.memory_mb.append((record.frames_published, self._memory_probe()))
        return record

    def _unanswered(self, pending: list, due_ns: int) -> list:
        """The one-face frames of ``pending`` due by ``due_ns`` still without their estimate."""
        return [f for f, at in pending
                if at <= due_ns and f not in self._output_stamps and len(self._video_streams[f]) <= 1]

    def _describe(self, frames: list) -> str:
        """The frames with the faces seen and answered (for errors)."""
        return '; '.join(f'frame {f / 1e9:.3f} s: faces {sorted(self._video_streams[f])}, answered '
                         f'{sorted(self._answered[f])}' for f in frames)[:2000]

    def _settle_clocks(self, clock_ns: int, role: str) -> None:
        """Wait until the nodes' clocks read ``clock_ns`` (see ``node_clocks``)."""
        if not self._node_clocks:
            headerless_audio = role == ROLE_AUDIO and self._input_types[ROLE_AUDIO] == AUDIO_DATA_TYPE
            if role == ROLE_SPEECH or headerless_audio:
                time.sleep(SETTLE_S)   # stamped on arrival by the node clock
            return
        started = time.monotonic()
        while True:
            self._clock_moved.clear()
            if all(clock.now().nanoseconds >= clock_ns for clock in self._node_clocks):
                return
            if time.monotonic() - started > self._timeout_s:
                raise ReplayError(f'no nodes taking /clock = {clock_ns / 1e9:.3f} s within '
                                  f'{self._timeout_s:.0f} s (use_sim_time)')
            if not self._clock_moved.wait(CLOCK_REPEAT_S):
                self._publish_clock(clock_ns)  # best effort: re-send in case one was lost

    def _finish(self, clock_ns: int, realtime: bool) -> None:
        """Advance the clock so every frame is due, then wait for the estimates."""
        end_ns = clock_ns + self._max_wait_ns + int(END_MARGIN_S * 1e9)
        self._publish_clock(end_ns)
        if realtime:
            # Frames dropped on the way (the video node keeps the newest frame; an overloaded fusion
            # sheds) never get an estimate: wait until every frame has one, or until the video
            # node and the fusion have both gone quiet.
            all_frames = set(self.record.frame_publish_wall)

            def settled() -> bool:
                if all_frames and not self._video_seen:
                    return False  # the video node keeps the newest frame: it has not answered yet
                if all_frames <= self._output_stamps:
                    return True
                last_outputs = [output[6] for output in self.record.outputs[-1:]]
                quiet_s = time.perf_counter() - max([*self.record.embedding_wall.values(), *last_outputs],
                                                    default=0.0)
                if self._video_seen <= self._output_stamps:
                    return quiet_s > IDLE_AFTER_S
                return quiet_s > UNANSWERED_AFTER_S   # encoded frames the fusion shed

            self._wait(settled, 'ValenceArousal for every encoded frame', end_ns)
            return
        frames = set(self.record.frame_publish_wall)
        self._wait(lambda: frames <= self._output_stamps,
                   f'ValenceArousal for the last frames ({len(frames - self._output_stamps)} missing)',
                   end_ns)

    def _counts_after_audio(self, item: ReplayInput, clock_ns: int) -> int:
        """Audio embeddings the audio node will have published once it has this message."""
        from rclpy.serialization import deserialize_message

        msg = deserialize_message(item.data, _message_class(self._input_types[ROLE_AUDIO]))
        try:
            if hasattr(msg, 'header'):
                windows = self._windows.process(msg.audio.data, self._audio_format,
                                                msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9)
            else:
                windows = self._windows.process_headerless(msg.data, self._audio_format, clock_ns * 1e-9)
        except audio_core.AudioDecodeError:
            windows = []  # the node refuses it too
        self._expected_audio += len(windows)
        return self._expected_audio

    def _take_audio_info(self, item: ReplayInput) -> None:
        from rclpy.serialization import deserialize_message

        info = deserialize_message(item.data, _message_class(self._input_types[ROLE_AUDIO_INFO]))
        self._audio_format = audio_core.AudioFormat.from_info(info)
        time.sleep(SETTLE_S)
