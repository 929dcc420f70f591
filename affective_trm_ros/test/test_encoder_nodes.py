"""Encoder nodes over real DDS: inputs in, ModalityEmbedding out, with the right stamps and validity.

Nodes run in this process on a private rclpy context (a multi-threaded executor in a thread);
one test starts a node through its console script as a separate OS process. The video and audio
nodes use small test plugins (fixtures/encoder_node_plugins) whose outputs reveal what the node
handed them; the text node uses the real MiniLM encoder; one test each runs the built-in HSEmotion
and Dasheng encoders with untrained weights.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from affective_msgs.msg import ModalityEmbedding
from affective_trm_ros.benchmarks import face_frames
from affective_trm_ros.nodes import audio_encoder_node, text_encoder_node, video_encoder_node
from affective_trm_ros.nodes.encoder_node_base import BoundedWorker, plugin_kwargs

PLUGINS = Path(__file__).parent / 'fixtures' / 'encoder_node_plugins'
CONFIG = Path(__file__).parent.parent / 'config'
# Deadlines only end a wait that is not going to succeed; generous, so a loaded machine passes.
TIMEOUT_S = 60.0
PROCESS_START_TIMEOUT_S = 180.0   # a separate process imports torch and the models first
RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
STAMP = (1_700_000_123, 456_000_000)   # an image/audio capture time far from "now"
RGB = (200, 100, 50)                    # the test frame's colour: channel order is visible in outputs


@pytest.fixture(scope='module', autouse=True)
def test_plugins():
    """Install the test plugin distribution (sys.path, as pip would) for this module."""
    sys.path.insert(0, str(PLUGINS))
    yield
    sys.path.remove(str(PLUGINS))
    sys.modules.pop('affect_node_test_plugins', None)


class Harness:
    """A probe node plus the nodes under test, spun by one executor in a background thread."""

    def __init__(self, context, namespace: str):
        self.context = context
        self.namespace = namespace
        self.probe = rclpy.create_node('encoder_test_probe', namespace=namespace, context=context)
        self.executor = MultiThreadedExecutor(num_threads=4, context=context)
        self.executor.add_node(self.probe)
        self.nodes = []
        self.received = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def start(self, node_class, **params):
        overrides = [Parameter(name, value=value) for name, value in params.items()]
        node = node_class(context=self.context, namespace=self.namespace, parameter_overrides=overrides)
        self.nodes.append(node)
        self.executor.add_node(node)
        return node

    def collect(self, msg_type, topic, qos=RELIABLE):
        box = []
        self.received[topic] = box
        self.probe.create_subscription(msg_type, topic, lambda m: self._append(box, m), qos)
        return box

    def _append(self, box, msg):
        with self._lock:
            box.append(msg)

    def publisher(self, msg_type, topic, qos=RELIABLE, timeout_s=TIMEOUT_S):
        pub = self.probe.create_publisher(msg_type, topic, qos)
        wait_for(lambda: pub.get_subscription_count() > 0, 'the node to subscribe to ' + topic, timeout_s)
        return pub

    def close(self):
        self.executor.shutdown()
        for node in self.nodes:
            node.destroy_node()
        self.probe.destroy_node()


def wait_for(predicate, what: str, timeout_s: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out waiting for {what}')
        time.sleep(0.02)


@pytest.fixture
def harness(rclpy_context, request):
    h = Harness(rclpy_context, '/' + re.sub(r'\W', '_', request.node.name))   # one namespace per test
    yield h
    h.close()


def stamp_of(msg):
    return (msg.header.stamp.sec, msg.header.stamp.nanosec)


def diagnostics_of(harness, node, box, key):
    """The latest value of `key` in `node`'s /diagnostics status."""
    name = node.get_fully_qualified_name()
    for array in reversed(list(box)):
        for status in array.status:
            if status.name == name:
                values = {kv.key: kv.value for kv in status.values}
                if key in values:
                    return values[key]
    return None


def input_qos_overrides(namespace, topic='audio'):
    """Reliable, deep input queue: the tests send inputs faster than a sensor would."""
    prefix = f'qos_overrides.{namespace}/{topic}.subscription.'
    return {prefix + 'reliability': 'reliable', prefix + 'depth': 500}


# ---------------------------------------------------------------- images

def frame(rgb=RGB, height=24, width=32) -> np.ndarray:
    return np.tile(np.array(rgb, np.uint8), (height, width, 1))


def image_msg(encoding: str, pixels: np.ndarray, pad: int = 0, stamp=STAMP, frame_id='camera_optical'):
    msg = Image(encoding=encoding, height=pixels.shape[0], width=pixels.shape[1], is_bigendian=False)
    rows = pixels.reshape(pixels.shape[0], -1)
    msg.step = rows.shape[1] + pad
    padded = np.zeros((rows.shape[0], msg.step), np.uint8)
    padded[:, :rows.shape[1]] = rows
    msg.data = padded.tobytes()
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    msg.header.frame_id = frame_id
    return msg


def encoded_as(encoding, rgb):
    r, g, b = np.moveaxis(rgb, 2, 0)
    alpha = np.full_like(r, 9)
    grey = r
    return {'rgb8': rgb, 'bgr8': np.dstack([b, g, r]), 'rgba8': np.dstack([r, g, b, alpha]),
            'bgra8': np.dstack([b, g, r, alpha]), 'mono8': grey[:, :, None]}[encoding]


def compressed_msg(fmt: str, rgb: np.ndarray, stamp=STAMP):
    ok, payload = cv2.imencode('.' + fmt, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    msg = CompressedImage(format=fmt)
    msg.data = payload.tobytes()
    msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
    msg.header.frame_id = 'camera_optical'
    return msg


def test_video_node_encodes_every_image_kind_with_the_image_stamp(harness):
    node = harness.start(video_encoder_node.VideoEncoderNode, plugin='tiny_video', max_rate=0.0,
                         face_pipeline='full_frame')
    out = harness.collect(ModalityEmbedding, 'affect/embedding/video')
    raw = harness.publisher(Image, 'image_raw')
    compressed = harness.publisher(CompressedImage, 'image_raw/compressed')
    rgb = frame()
    cases = [(raw, image_msg(enc, encoded_as(enc, rgb), pad=pad, stamp=(STAMP[0] + i, STAMP[1])))
             for i, (enc, pad) in enumerate([('rgb8', 0), ('bgr8', 13), ('rgba8', 4), ('bgra8', 7),
                                            ('mono8', 3)])]
    cases += [(compressed, compressed_msg('png', rgb, stamp=(STAMP[0] + 10, 0))),
              (compressed, compressed_msg('jpg', rgb, stamp=(STAMP[0] + 11, 0)))]
    for index, (pub, msg) in enumerate(cases):
        pub.publish(msg)   # one at a time: the node keeps only the newest frame
        wait_for(lambda n=index: len(out) > n, f'the embedding of frame {index}')
    assert [stamp_of(m) for m in out] == [stamp_of(msg) for _, msg in cases]
    for (_, msg), emb in zip(cases, out):
        assert emb.modality == 'video' and emb.valid and emb.encoder == 'tiny_video@none'
        assert emb.stream_id == 'default' and emb.header.frame_id == 'camera_optical'
        data = np.asarray(emb.data)
        assert data.shape == (8,)
        expected = [RGB[0]] * 3 if getattr(msg, 'encoding', '') == 'mono8' else RGB
        np.testing.assert_allclose(data[:3] * 255, expected, atol=2.5)   # JPEG is lossy
        np.testing.assert_array_equal(data[3:5], [24, 32])
    assert node.worker.dropped == 0


def test_video_node_publishes_invalid_for_a_black_frame_and_honours_frame_id_and_stream(harness):
    harness.start(video_encoder_node.VideoEncoderNode, plugin='tiny_video', frame_id='head_camera',
                  stream_id='person_1', face_pipeline='full_frame')
    out = harness.collect(ModalityEmbedding, 'affect/embedding/video')
    harness.publisher(Image, 'image_raw').publish(image_msg('rgb8', frame((0, 0, 0))))
    wait_for(lambda: out, 'an embedding')
    emb = out[0]
    assert not emb.valid and len(emb.data) == 0 and stamp_of(emb) == STAMP
    assert emb.header.frame_id == 'head_camera' and emb.stream_id == 'person_1'


def test_video_node_survives_bad_frames_and_counts_them(harness):
    node = harness.start(video_encoder_node.VideoEncoderNode, plugin='tiny_video', diagnostics_period_s=0.2,
                         max_rate=0.0, face_pipeline='full_frame')
    out = harness.collect(ModalityEmbedding, 'affect/embedding/video')
    diagnostics = harness.collect(DiagnosticArray, '/diagnostics')
    raw = harness.publisher(Image, 'image_raw')
    compressed = harness.publisher(CompressedImage, 'image_raw/compressed')
    good = image_msg('rgb8', frame())
    unknown = image_msg('rgb8', frame())
    unknown.encoding = '32FC1'
    truncated = image_msg('rgb8', frame())
    truncated.data = bytes(truncated.data)[:100]
    zero = Image(encoding='rgb8', height=0, width=0, step=0)
    garbage = CompressedImage(format='jpeg', data=b'\xff\xd8 definitely not a jpeg')
    bad = [(raw, unknown), (raw, truncated), (raw, zero), (compressed, garbage)]
    for index, (pub, msg) in enumerate(bad):
        msg.header.stamp.sec = 100 + index
        pub.publish(msg)
        wait_for(lambda n=index: len(out) > n, f'the answer to bad frame {index}')
    raw.publish(good)
    wait_for(lambda: len(out) == len(bad) + 1, 'the embedding of a good frame after the bad ones')
    assert [m.valid for m in out] == [False] * len(bad) + [True]
    assert [m.header.stamp.sec for m in out[:len(bad)]] == [100, 101, 102, 103]
    assert sum(node.warn.counts.values()) == len(bad)
    wait_for(lambda: diagnostics_of(harness, node, diagnostics, 'bad_inputs') == str(len(bad)),
             'diagnostics to report the bad inputs')
    assert diagnostics_of(harness, node, diagnostics, 'invalid_outputs') == str(len(bad))
    assert diagnostics_of(harness, node, diagnostics, 'encoder') == 'tiny_video@none'
    assert diagnostics_of(harness, node, diagnostics, 'untrained') == 'False'


def test_video_node_keeps_only_the_newest_frame_when_inference_is_slow(harness):
    node = harness.start(video_encoder_node.VideoEncoderNode, plugin='tiny_video', max_rate=0.0,
                         face_pipeline='full_frame', **input_qos_overrides(harness.namespace, 'image_raw'))
    gate = node.encoder.gate = threading.Event()     # the encoder is busy until the gate opens
    out = harness.collect(ModalityEmbedding, 'affect/embedding/video')
    raw = harness.publisher(Image, 'image_raw')
    count = 12
    raw.publish(image_msg('rgb8', frame(), stamp=(STAMP[0], 0)))
    wait_for(lambda: node.encoder.started == 1, 'the encoder to start on frame 0')
    for i in range(1, count):
        raw.publish(image_msg('rgb8', frame(), stamp=(STAMP[0], i)))
    wait_for(lambda: node.counts['inputs'] == count, 'every frame to reach the node')
    gate.set()
    wait_for(lambda: len(out) == 2, 'frame 0 and the newest frame')
    wait_for(lambda: node.worker.pending() == 0 and node.encoder.finished == 2, 'the worker to go idle')
    # While frame 0 was encoded, frames 1..10 were each replaced by the next one: only 11 waited.
    assert [m.header.stamp.nanosec for m in out] == [0, count - 1]
    assert node.worker.dropped == count - 2


def test_video_max_rate_limits_processing(harness):
    rate = 4.0
    node = harness.start(video_encoder_node.VideoEncoderNode, plugin='tiny_video', max_rate=rate,
                         face_pipeline='full_frame', **input_qos_overrides(harness.namespace, 'image_raw'))
    out = harness.collect(ModalityEmbedding, 'affect/embedding/video')
    raw = harness.publisher(Image, 'image_raw')
    raw.publish(image_msg('rgb8', frame()))
    wait_for(lambda: len(out) == 1, 'the first frame')
    for _ in range(3):       # bursts: the rate limit holds each burst's newest frame, drops the rest
        sent = node.counts['inputs']
        for _ in range(5):
            raw.publish(image_msg('rgb8', frame()))
        wait_for(lambda n=sent: node.counts['inputs'] == n + 5, 'the burst to reach the node')
    wait_for(lambda: node.worker.pending() == 0 and node.encoder.finished == len(out) == node.encoder.started,
             'the worker to go idle')
    assert node.worker.dropped == node.counts['inputs'] - len(out) > 0
    # Start times of the encoder calls: never closer than the rate allows (delays only widen them;
    # the half-period margin absorbs per-frame work before the encoder call).
    assert len(node.encoder.start_times) >= 2
    assert min(np.diff(node.encoder.start_times)) >= 0.5 / rate


def test_video_parameters_are_validated(harness):
    node = harness.start(video_encoder_node.VideoEncoderNode, plugin='tiny_video', detector='haar')
    assert node.set_parameters([Parameter('max_rate', value=5.0)])[0].successful
    assert node.params['max_rate'] == 5.0
    assert not node.set_parameters([Parameter('max_rate', value=-1.0)])[0].successful
    assert not node.set_parameters([Parameter('stream_id', value='')])[0].successful
    assert not node.set_parameters([Parameter('detector', value='mtcnn')])[0].successful   # read-only
    assert not node.set_parameters([Parameter('max_faces', value=3)])[0].successful        # read-only
    assert node.params['max_rate'] == 5.0 and node.params['stream_id'] == 'default'
    # The tracker's settings change at run time; an invalid update changes nothing.
    assert node.set_parameters_atomically([Parameter('track_timeout_s', value=2.5),
                                           Parameter('detection_interval', value=7)]).successful
    assert node.faces.tracker.timeout_s == 2.5 and node.faces.detection_interval == 7
    assert not node.set_parameters_atomically([Parameter('track_timeout_s', value=0.5),
                                               Parameter('detection_interval', value=0)]).successful
    assert node.faces.tracker.timeout_s == 2.5 and node.params['track_timeout_s'] == 2.5
    with pytest.raises(ValueError, match='max_faces 1'):
        harness.start(video_encoder_node.VideoEncoderNode, plugin='tiny_video', face_pipeline='full_frame',
                      max_faces=2)
    with pytest.raises(ValueError, match='input_mode'):
        harness.start(video_encoder_node.VideoEncoderNode, plugin='tiny_video', input_mode='kinect')
    with pytest.raises(ValueError, match='track_id_prefix'):
        harness.start(video_encoder_node.VideoEncoderNode, plugin='tiny_video', max_faces=2,
                      track_id_prefix=' ')
    with pytest.raises(ValueError, match='detector'):
        harness.start(video_encoder_node.VideoEncoderNode, plugin='tiny_video', detector='dlib')
    with pytest.raises(ValueError, match='encodes text'):
        harness.start(video_encoder_node.VideoEncoderNode, plugin='tiny_text')
    with pytest.raises(KeyError, match='unknown encoder plugin'):
        harness.start(video_encoder_node.VideoEncoderNode, plugin='no_such_plugin')


def test_video_node_with_the_built_in_encoder_untrained(harness, tmp_path, monkeypatch):
    skimage_data = pytest.importorskip('skimage.data')
    monkeypatch.setenv('AFFECTIVE_TRM_WEIGHTS', str(tmp_path))   # an empty weights cache
    with pytest.raises(FileNotFoundError, match='enet_b0_8_best_afew'):
        harness.start(video_encoder_node.VideoEncoderNode, detector='haar')
    # The default tracked pipeline: the node detects, the encoder gets the face crop.
    node = harness.start(video_encoder_node.VideoEncoderNode, detector='haar', allow_untrained=True,
                         device='cpu')
    out = harness.collect(ModalityEmbedding, 'affect/embedding/video')
    raw = harness.publisher(Image, 'image_raw')
    raw.publish(image_msg('rgb8', np.ascontiguousarray(skimage_data.astronaut())))   # a face
    wait_for(lambda: out, 'the face embedding')
    raw.publish(image_msg('rgb8', frame(), stamp=(STAMP[0] + 1, 0)))                  # no face
    wait_for(lambda: len(out) == 2, 'the no-face embedding')
    assert node.encoder.identity == 'hsemotion_enet_b0@untrained'
    assert [m.valid for m in out] == [True, False]
    assert all(m.encoder == 'hsemotion_enet_b0@untrained' for m in out)
    assert len(out[0].data) == 1280 and np.all(np.isfinite(out[0].data))
    assert out[0].roi.width > 50 and out[0].roi.height > 50 and out[1].roi.width == 0
    # HSEmotion's own 8-class head, as probabilities; nothing without a face.
    assert len(out[0].expression_classes) == 8 == len(out[0].expression_probabilities)
    assert sum(out[0].expression_probabilities) == pytest.approx(1.0, abs=1e-4)
    assert len(out[1].expression_classes) == 0 == len(out[1].expression_probabilities)


# ---------------------------------------------------------------- several faces (real photographs, MTCNN)

def frame_stamp(k: int) -> tuple:
    """The stamp of frame k of a 30 FPS camera that started at STAMP."""
    return STAMP[0] + k // 30, round((k % 30) * 1e9 / 30)


def two_heads(width=320, height=240, left=True, right=True):
    """A frame with the astronaut's head on the left and its mirror image on the right (or not)."""
    heads = [(width / 3 if left else -width, height / 2), (2 * width / 3 if right else -width, height / 2)]
    return face_frames.face_canvas(width, height, heads, head_height=105)   # off-canvas heads vanish


def play(harness, node, frames) -> list:
    """Publish frames one at a time (stamps 1/30 s apart); the embeddings of each frame."""
    out = harness.received.get('affect/embedding/video') or harness.collect(ModalityEmbedding,
                                                                            'affect/embedding/video')
    raw = harness.publisher(Image, 'image_raw')
    per_frame = []
    for k, pixels in enumerate(frames):
        before = len(out)
        raw.publish(image_msg('rgb8', pixels, stamp=frame_stamp(k)))
        wait_for(lambda n=k: node.counts['frames_processed'] == n + 1, f'frame {k} to be processed')
        wait_for(lambda: len(out) == node.counts['published'], f'the embeddings of frame {k}')
        per_frame.append(list(out[before:]))
        assert all(stamp_of(m) == frame_stamp(k) for m in per_frame[-1])
    return per_frame


def multi_face_node(harness, **params):
    return harness.start(video_encoder_node.VideoEncoderNode, plugin='tiny_video', max_rate=0.0, device='cpu',
                         **{'max_faces': 4, **params}, **input_qos_overrides(harness.namespace, 'image_raw'))


def test_two_faces_in_one_camera_stream_are_two_streams_encoded_in_one_batch(harness):
    node = multi_face_node(harness)
    frames = face_frames.moving_faces(6, width=320, height=240, faces=2, head_height=105)
    for k, msgs in enumerate(play(harness, node, frames)):
        assert [m.stream_id for m in msgs] == ['face_0', 'face_1'], f'frame {k}'
        assert all(m.valid and m.modality == 'video' and len(m.data) == 8 for m in msgs)
        left, right = (m.roi for m in msgs)
        assert left.width > 30 and right.width > 30
        assert left.x_offset + left.width <= right.x_offset      # face_0 is the left face
        for m in msgs:
            assert list(m.expression_classes) == ['bright', 'dark']
            brightness = np.mean(m.data[:3])
            np.testing.assert_allclose(m.expression_probabilities, [brightness, 1 - brightness], atol=1e-6)
            # The crop the encoder got is the face box (the tiny encoder reports its size).
            assert tuple(m.data[3:5]) == pytest.approx((m.roi.height, m.roi.width), abs=2)
    assert node.encoder.face_calls == [2] * len(frames)   # one batched encoder call per frame
    assert 1 <= node.faces.detections < len(frames)        # faces were followed between detections


def test_face_ids_survive_a_short_occlusion(harness):
    node = multi_face_node(harness, track_timeout_s=1.0, detection_interval=2)
    both, left_only = two_heads(), two_heads(right=False)
    frames = [both] * 4 + [left_only] * 4 + [both] * 4
    per_frame = play(harness, node, frames)
    assert all([m.stream_id for m in msgs] == ['face_0', 'face_1'] for msgs in per_frame)
    right = [msgs[1] for msgs in per_frame]
    assert [m.valid for m in right[:4]] == [True] * 4
    assert [m.valid for m in right[4:8]] == [False] * 4          # hidden: kept, published invalid
    assert all(m.roi.width == 0 for m in right[4:8])
    assert right[-1].valid and right[-1].roi.x_offset > per_frame[-1][0].roi.x_offset   # back, same id
    assert node.counts['retired_faces'] == 0


def test_a_face_that_leaves_is_retired_after_the_timeout(harness):
    node = multi_face_node(harness, track_timeout_s=0.25, detection_interval=3)
    frames = [two_heads()] * 3 + [two_heads(right=False)] * 12    # the right face leaves after frame 2
    per_frame = play(harness, node, frames)
    ids = [[m.stream_id for m in msgs] for msgs in per_frame]
    for k, frame_ids in enumerate(ids):
        gone = k >= 10     # last seen in frame 2; frame 10 is the first more than 0.25 s later
        assert frame_ids == (['face_0'] if gone else ['face_0', 'face_1']), f'frame {k}'
    assert all(msgs[0].valid for msgs in per_frame)
    assert not any(m.valid for msgs in per_frame[3:] for m in msgs if m.stream_id == 'face_1')
    assert node.counts['retired_faces'] == 1


def test_single_person_mode_keeps_the_stream_id_parameter(harness):
    node = harness.start(video_encoder_node.VideoEncoderNode, plugin='tiny_video', max_rate=0.0,
                         stream_id='visitor', **input_qos_overrides(harness.namespace, 'image_raw'))
    per_frame = play(harness, node, [two_heads(), frame(height=240, width=320)])
    (with_faces,), (without,) = per_frame
    assert with_faces.stream_id == 'visitor' and with_faces.valid and with_faces.roi.width > 30
    assert without.stream_id == 'visitor' and not without.valid and without.roi.width == 0


def publish_until(publish, done, what: str):
    """Publish (best-effort input may be lost) until ``done()``; a deadline as wait_for."""
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out waiting for {what}')
        publish()
        time.sleep(0.05)


def test_hri_input_mode_encodes_each_aligned_face_as_its_own_stream(harness):
    hri = pytest.importorskip('hri_msgs.msg', reason='hri_msgs (ROS4HRI messages) is not installed')
    node = harness.start(video_encoder_node.VideoEncoderNode, plugin='tiny_video', input_mode='hri',
                         max_rate=0.0, max_faces=4)
    out = harness.collect(ModalityEmbedding, 'affect/embedding/video')
    tracked = harness.publisher(hri.IdsList, '/humans/faces/tracked')
    subscriptions = node._crop_subscriptions   # noqa: SLF001
    publish_until(lambda: tracked.publish(hri.IdsList(ids=['abc', 'xyz'])), lambda: len(subscriptions) == 2,
                  'the node to subscribe to both faces')
    wait_for(lambda: node.counts['frames_processed'] == node.counts['inputs'], 'the worker to go idle')
    aligned = {face_id: harness.publisher(Image, f'/humans/faces/{face_id}/aligned')
               for face_id in ('abc', 'xyz')}
    colours = {'abc': (200, 10, 10), 'xyz': (10, 10, 200)}
    crops = node._crops   # noqa: SLF001
    for k, face_id in enumerate(('abc', 'xyz')):
        msg = image_msg('rgb8', frame(colours[face_id], 64, 64), stamp=(STAMP[0], k))
        publish_until(lambda m=msg, f=face_id: aligned[f].publish(m), lambda f=face_id: f in crops,
                      f'the crop of face {face_id}')
    publish_until(lambda: tracked.publish(hri.IdsList(ids=['abc', 'xyz'])), lambda: len(out) >= 2,
                  'one embedding per face')
    by_id = {m.stream_id: m for m in out}
    assert len(out) == 2 and set(by_id) == {'abc', 'xyz'} and all(m.valid for m in out)
    for k, face_id in enumerate(('abc', 'xyz')):
        np.testing.assert_allclose(np.asarray(by_id[face_id].data[:3]) * 255, colours[face_id], atol=0.5)
        assert stamp_of(by_id[face_id]) == (STAMP[0], k)
    assert node.encoder.face_calls == [2]                      # both faces in one batched call
    publish_until(lambda: tracked.publish(hri.IdsList(ids=['xyz'])),   # face abc is gone
                  lambda: node.counts['retired_faces'] == 1, 'face abc to be retired')
    assert list(subscriptions) == ['xyz']


def test_hri_input_mode_without_hri_msgs_fails_at_start_with_the_reason(harness, monkeypatch):
    monkeypatch.setitem(sys.modules, 'hri_msgs', None)         # as if not installed
    monkeypatch.setitem(sys.modules, 'hri_msgs.msg', None)
    with pytest.raises(RuntimeError, match='hri_msgs.*not on PyPI'):
        harness.start(video_encoder_node.VideoEncoderNode, plugin='tiny_video', input_mode='hri')


# ---------------------------------------------------------------- audio

def s16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype('<i2').tobytes()


def tone(rate, seconds, amplitude=0.3):
    t = np.arange(int(round(rate * seconds))) / rate
    return (amplitude * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


def seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def test_audio_node_stamped_with_audio_info_windows_stamped_at_their_end(harness):
    from audio_common_msgs.msg import AudioDataStamped, AudioInfo

    info_pub = harness.probe.create_publisher(AudioInfo, 'audio_info', LATCHED)
    info_pub.publish(AudioInfo(channels=2, sample_rate=44100, sample_format='S16LE', coding_format='wave'))
    node = harness.start(audio_encoder_node.AudioEncoderNode, plugin='tiny_audio', diagnostics_period_s=0.2,
                         **input_qos_overrides(harness.namespace))
    out = harness.collect(ModalityEmbedding, 'affect/embedding/audio')
    wait_for(lambda: node._format.sample_rate == 44100, 'the latched AudioInfo')   # noqa: SLF001
    audio = harness.publisher(AudioDataStamped, 'audio')
    t0 = STAMP[0] + STAMP[1] * 1e-9
    mono = np.concatenate([tone(44100, 2.0), np.zeros(int(44100 * 1.2), np.float32)])   # speech, then silence
    stereo = np.repeat(mono[:, None], 2, axis=1).reshape(-1)
    chunk = 1024
    for start in range(0, mono.size, chunk):
        msg = AudioDataStamped()
        stamp = t0 + start / 44100
        msg.header.stamp.sec, msg.header.stamp.nanosec = int(stamp), int(round((stamp % 1) * 1e9))
        msg.header.frame_id = 'mic'
        msg.audio.data = s16(stereo[2 * start:2 * (start + chunk)])
        audio.publish(msg)
    # Windows end every 0.5 s from 1.0 s; the one at 3.2 s would need audio past the end.
    wait_for(lambda: len(out) == 5, 'five window embeddings')
    ends = [round(seconds(m.header.stamp) - t0, 4) for m in out]
    assert ends == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert [m.valid for m in out] == [True, True, True, True, False]   # the last second is silent
    for emb in out[:3]:
        assert emb.modality == 'audio' and emb.header.frame_id == 'mic' and emb.encoder == 'tiny_audio@none'
        rms, peak, size, _ = emb.data
        assert size == 16000 and rms == pytest.approx(0.3 / math.sqrt(2), rel=0.01)
    assert len(out[4].data) == 0
    wait_for(lambda: diagnostics_of(harness, node, diagnostics_box(harness), 'silent_windows') == '1',
             'diagnostics to count the silent window')
    assert diagnostics_of(harness, node, harness.received['/diagnostics'], 'stream_resets') == '0'


def diagnostics_box(harness):
    if '/diagnostics' not in harness.received:
        harness.collect(DiagnosticArray, '/diagnostics')
    return harness.received['/diagnostics']


def test_audio_node_unstamped_uses_parameters_and_arrival_clock(harness):
    from audio_common_msgs.msg import AudioData

    harness.start(audio_encoder_node.AudioEncoderNode, plugin='tiny_audio', input_type='unstamped',
                  sample_rate=16000, channels=1, sample_format='F32LE', audio_info_topic='',
                  hop_s=0.25, frame_id='mic_frame', **input_qos_overrides(harness.namespace))
    out = harness.collect(ModalityEmbedding, 'affect/embedding/audio')
    audio = harness.publisher(AudioData, 'audio')
    before = time.time()
    samples = tone(16000, 1.6)
    for start in range(0, samples.size, 1600):
        audio.publish(AudioData(data=samples[start:start + 1600].astype('<f4').tobytes()))
    wait_for(lambda: len(out) == 3, 'three window embeddings')
    after = time.time()
    ends = [seconds(m.header.stamp) for m in out]
    np.testing.assert_allclose(np.diff(ends), 0.25, atol=1e-6)   # the sample clock, not arrival jitter
    # The clock started at the first arrival (between `before` and `after`) minus its 0.1 s.
    assert before - 0.1 - 1e-3 <= ends[0] - 1.0 <= after
    assert all(m.valid and m.header.frame_id == 'mic_frame' for m in out)


def test_audio_node_survives_bad_audio_and_counts_it(harness):
    from audio_common_msgs.msg import AudioDataStamped, AudioInfo

    node = harness.start(audio_encoder_node.AudioEncoderNode, plugin='tiny_audio', sample_format='F32LE',
                         diagnostics_period_s=0.2, **input_qos_overrides(harness.namespace))
    out = harness.collect(ModalityEmbedding, 'affect/embedding/audio')
    diagnostics = diagnostics_box(harness)
    audio = harness.publisher(AudioDataStamped, 'audio')

    def send(data: bytes, stamp_s: float):
        msg = AudioDataStamped()
        msg.header.stamp.sec, msg.header.stamp.nanosec = int(stamp_s), int(round((stamp_s % 1) * 1e9))
        msg.audio.data = data
        audio.publish(msg)

    send(b'\x00\x01\x02', 50.0)                                              # truncated frame
    send(np.array([0.1, np.nan] * 800, '<f4').tobytes(), 50.0)               # NaN
    send(np.array([np.inf] * 1600, '<f4').tobytes(), 50.0)                   # Inf
    wait_for(lambda: node.warn.counts['bad_audio'] == 3, 'the three bad messages')
    # A stream described as an unknown sample format: refused per message, not misread.
    info_pub = harness.publisher(AudioInfo, 'audio_info', LATCHED)
    info_pub.publish(AudioInfo(channels=1, sample_rate=16000, sample_format='S7LE'))
    wait_for(lambda: node.warn.counts['bad_audio_info'] == 1, 'the bad AudioInfo')
    send(np.zeros(1600, '<f4').tobytes(), 50.0)
    wait_for(lambda: node.warn.counts['bad_audio'] == 4, 'the message in the unknown format')
    info_pub.publish(AudioInfo(channels=1, sample_rate=16000, sample_format='F32LE'))
    wait_for(lambda: node._format.sample_format == 'F32LE', 'the good AudioInfo')   # noqa: SLF001
    samples = tone(16000, 1.2)
    for start in range(0, samples.size, 1600):
        send(samples[start:start + 1600].astype('<f4').tobytes(), 60.0 + start / 16000)
    wait_for(lambda: out, 'a window after the bad input')
    assert out[0].valid and seconds(out[0].header.stamp) == pytest.approx(61.0)
    wait_for(lambda: diagnostics_of(harness, node, diagnostics, 'bad_inputs') == '5', 'diagnostics')
    assert diagnostics_of(harness, node, diagnostics, 'bad_inputs.bad_audio') == '4'


def test_audio_node_parameters_and_missing_messages_package(harness, monkeypatch):
    assert audio_encoder_node.validate_parameters(
        {'plugin': 'x', 'output_topic': 'o', 'stream_id': 's', 'input_type': 'stamped', 'sample_rate': 16000,
         'channels': 1, 'sample_format': 'S16LE', 'window_s': 1.0, 'hop_s': 0.5, 'stamp_tolerance_s': 0.1,
         'max_lag_s': 1.0}) is None
    with pytest.raises(ValueError, match='input_type'):
        harness.start(audio_encoder_node.AudioEncoderNode, plugin='tiny_audio', input_type='raw')
    with pytest.raises(ValueError, match='sample_format'):
        harness.start(audio_encoder_node.AudioEncoderNode, plugin='tiny_audio', sample_format='S7LE')
    monkeypatch.setitem(sys.modules, 'audio_common_msgs.msg', None)    # as if not installed
    with pytest.raises(RuntimeError, match='audio_common_msgs'):
        audio_encoder_node.audio_messages()


def test_audio_node_with_the_built_in_encoder_untrained(harness, tmp_path, monkeypatch):
    from audio_common_msgs.msg import AudioDataStamped

    monkeypatch.setenv('AFFECTIVE_TRM_WEIGHTS', str(tmp_path))
    node = harness.start(audio_encoder_node.AudioEncoderNode, allow_untrained=True, device='cpu',
                         sample_rate=48000, **input_qos_overrides(harness.namespace))
    out = harness.collect(ModalityEmbedding, 'affect/embedding/audio')
    audio = harness.publisher(AudioDataStamped, 'audio')
    samples = tone(48000, 1.1)
    for start in range(0, samples.size, 4800):
        msg = AudioDataStamped()
        msg.header.stamp.sec = 10 + start // 48000
        msg.header.stamp.nanosec = int(round((start % 48000) / 48000 * 1e9))
        msg.audio.data = s16(samples[start:start + 4800])
        audio.publish(msg)
    wait_for(lambda: out, 'the Dasheng embedding')
    assert node.encoder.identity == 'dasheng_base@untrained' and out[0].encoder == 'dasheng_base@untrained'
    assert out[0].valid and len(out[0].data) == 768 and seconds(out[0].header.stamp) == pytest.approx(11.0)


# ---------------------------------------------------------------- text

def test_text_node_embeds_utterances_stamped_on_arrival(harness):
    node = harness.start(text_encoder_node.TextEncoderNode, plugin='minilm', device='cpu', max_text_chars=500,
                         diagnostics_period_s=0.2)
    out = harness.collect(ModalityEmbedding, 'affect/embedding/text', LATCHED)
    diagnostics = diagnostics_box(harness)
    speech = harness.publisher(String, 'speech')
    sent = []
    for text in ['I am really happy to see you!', '   ', 'x' * 100_000]:
        before = node.get_clock().now().nanoseconds * 1e-9
        speech.publish(String(data=text))
        wait_for(lambda: len(out) > len(sent), f'the embedding of {text[:20]!r}')
        sent.append((before, node.get_clock().now().nanoseconds * 1e-9))
    for emb, (before, after) in zip(out, sent):
        assert emb.modality == 'text' and emb.encoder.startswith('minilm@')
        assert before <= seconds(emb.header.stamp) <= after   # arrival time, on the node clock
    assert [m.valid for m in out] == [True, False, True]
    assert len(out[0].data) == 384 and np.linalg.norm(out[0].data) == pytest.approx(1.0, abs=1e-3)
    assert len(out[1].data) == 0
    assert node.warn.counts['giant_text'] == 1
    wait_for(lambda: diagnostics_of(harness, node, diagnostics, 'bad_inputs.giant_text') == '1',
             'diagnostics')
    # A subscriber that joins later still gets the latest utterance's embedding (transient local).
    late = harness.collect(ModalityEmbedding, 'affect/embedding/text', LATCHED)
    wait_for(lambda: late, 'the latched embedding')
    assert stamp_of(late[0]) == stamp_of(out[-1])


# ---------------------------------------------------------------- parameter files

@pytest.mark.parametrize('node_class,config,plugin', [
    (video_encoder_node.VideoEncoderNode, 'video_encoder.yaml', 'tiny_video'),
    (audio_encoder_node.AudioEncoderNode, 'audio_encoder.yaml', 'tiny_audio'),
    (text_encoder_node.TextEncoderNode, 'text_encoder.yaml', 'tiny_text'),
])
def test_config_files_mirror_every_parameter_and_load(harness, node_class, config, plugin):
    yaml = pytest.importorskip('yaml')
    values = yaml.safe_load((CONFIG / config).read_text())['/**']['ros__parameters']
    node = harness.start(node_class, **{**values, 'plugin': plugin})   # types must match the declarations
    declared = {name for name in node._parameters                      # noqa: SLF001
                if name not in ('use_sim_time', 'start_type_description_service')
                and not name.startswith('qos_overrides.')}
    assert set(values) == declared
    assert all(node.get_parameter(name).value == value for name, value in values.items() if name != 'plugin')


# ---------------------------------------------------------------- pure pieces

def test_bounded_worker_drops_the_oldest_and_rate_limits():
    done, errors = [], []
    release, busy = threading.Event(), threading.Event()

    def process(item):
        busy.set()
        assert release.wait(TIMEOUT_S)
        done.append((item, time.monotonic()))

    worker = BoundedWorker(process, 2, 'test_worker', errors.append)
    worker.submit(0)
    assert busy.wait(TIMEOUT_S)    # the worker holds item 0 ...
    for item in range(1, 5):       # ... so items 1, 2 queue and are dropped for 3, 4
        worker.submit(item)
    release.set()
    wait_for(lambda: len(done) == 3, 'the queued items')
    assert [item for item, _ in done] == [0, 3, 4] and worker.dropped == 2
    worker.stop()

    done.clear()
    limited = BoundedWorker(lambda item: done.append((item, time.monotonic())), 10, 'limited',
                            errors.append, min_interval_s=lambda: 0.1)
    for item in range(4):
        limited.submit(item)
    wait_for(lambda: len(done) == 4, 'rate-limited items')
    gaps = np.diff([t for _, t in done])
    assert np.all(gaps >= 0.09) and not errors
    limited.stop()

    failing = BoundedWorker(lambda item: 1 / item, 4, 'failing', errors.append)
    failing.submit(0)
    failing.submit(1)
    wait_for(lambda: errors, 'the error callback')
    assert isinstance(errors[0], ZeroDivisionError) and failing._thread.is_alive()   # noqa: SLF001
    failing.stop()


def test_plugin_kwargs_offers_node_settings_only_to_plugins_that_take_them():
    class Strict:
        def __init__(self, device='auto', weights=None, allow_untrained=False, detector='mtcnn'):
            pass

    class Open:
        def __init__(self, device='auto', **options):
            pass

    defaults = {'detector': 'haar', 'face_margin': 0.1}
    assert plugin_kwargs(Strict, defaults, {}) == ({'detector': 'haar'}, ['face_margin'])
    assert plugin_kwargs(Open, defaults, {}) == (defaults, [])
    assert plugin_kwargs(Strict, defaults, {'extra': 1}) == ({'detector': 'haar', 'extra': 1},
                                                             ['face_margin'])


# ---------------------------------------------------------------- a separate OS process

def test_console_script_runs_the_video_node_as_its_own_process(rclpy_context, ros_domain_id):
    script = shutil.which('video_encoder') or str(Path(sys.executable).parent / 'video_encoder')
    assert os.path.exists(script), 'video_encoder console script is not installed'
    env = dict(os.environ, ROS_DOMAIN_ID=str(ros_domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
               PYTHONPATH=os.pathsep.join([str(PLUGINS), os.environ.get('PYTHONPATH', '')]))
    process = subprocess.Popen([script, '--ros-args', '-r', '__ns:=/separate_process',
                                '-p', 'plugin:=tiny_video', '-p', 'stream_id:=visitor',
                                '-p', 'face_pipeline:=full_frame'], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    h = Harness(rclpy_context, '/separate_process')
    try:
        out = h.collect(ModalityEmbedding, 'affect/embedding/video')
        raw = h.publisher(Image, 'image_raw', timeout_s=PROCESS_START_TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        while not out and time.monotonic() < deadline:   # best effort input: repeat until answered
            raw.publish(image_msg('rgb8', frame()))
            time.sleep(0.1)
        assert out, 'no embedding from the video_encoder process'
        assert out[0].stream_id == 'visitor' and out[0].valid and stamp_of(out[0]) == STAMP
    finally:
        h.close()
        process.terminate()
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode in (0, -15), output


def test_video_node_benchmark_reports_the_achieved_rate(tmp_path, capsys):
    pytest.importorskip('skimage')
    from affective_trm_ros.benchmarks import video_node as video_node_bench

    out = tmp_path / 'bench.json'
    assert video_node_bench.main(['--plugin', 'tiny_video', '--fps', '20', '--seconds', '1.0',
                                  '--warmup', '0.5', '--width', '160', '--height', '120',
                                  '--face-pipeline', 'full_frame', '--json', str(out)]) == 0
    results = json.loads(out.read_text())
    # The camera paces itself (a loaded machine only publishes fewer); tiny_video on the full
    # frame answers every frame it gets with a valid embedding (the frame is not black).
    assert results['plugin'] == 'tiny_video@none'
    assert 1 <= results['frames_published'] <= 20 * 1.0 + 1
    assert 0 < results['embeddings'] == results['valid_embeddings'] <= results['frames_published']
    assert results['processing_p50_ms'] > 0 and results['latency_p50_ms'] > 0
