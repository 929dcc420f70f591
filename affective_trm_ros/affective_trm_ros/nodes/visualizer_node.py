"""`visualizer` node: draws the current affect estimates onto the camera image.

Subscribes to the camera (``image_raw``, or its ``/compressed`` topic) and to
``affect/valence_arousal``; publishes ``affect/visualization`` (sensor_msgs/Image, rgb8, the input
image's header) with the valence-arousal panel of :mod:`affective_trm_ros.core.va_overlay` for one
stream and, for every stream whose estimate has a face box (``ValenceArousal.roi``), the box with
its valence and arousal (:mod:`affective_trm_ros.core.face_overlay`) -- for ``rqt_image_view`` or
RViz. Topics are renamed by remapping. Drawing happens in the image callback and is rate-limited.
"""

from __future__ import annotations

import array
import collections
import math
import threading
import time
from typing import Optional

from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from affective_msgs.msg import ValenceArousal
from affective_trm_ros.core import image as image_conversion
from affective_trm_ros.core.face_overlay import FaceBox, draw_face_boxes
from affective_trm_ros.core.stamps import stamp_to_seconds
from affective_trm_ros.core.va_overlay import Estimate, draw_va_overlay
from affective_trm_ros.nodes.common import (
    RELIABLE_QOS,
    SENSOR_QOS,
    Diagnostics,
    RateMeter,
    ThrottledWarning,
    declare,
    run_node,
)
from affective_trm_ros.topics import ESTIMATES, IMAGE, IMAGE_COMPRESSED, VISUALIZATION

NODE_NAME = 'visualizer'
TRANSPORTS = ('raw', 'compressed')
#: Output images: reliable (what rqt_image_view and RViz ask for by default), shallow (images are big).
IMAGE_OUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2, reliability=ReliabilityPolicy.RELIABLE)


class VisualizerNode(Node):
    """The visualizer node (see the module docstring). ``kwargs`` go to rclpy's Node."""

    def __init__(self, **kwargs) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._transport = declare(self, 'input_transport', 'raw', "Camera input: raw Image on 'image_raw' "
                                  "or CompressedImage (JPEG/PNG) on 'image_raw/compressed'.",
                                  choices=TRANSPORTS, read_only=True)
        declare(self, 'stream_id', '', "Stream to show; empty = the stream of the newest estimate.")
        self._trail_length = declare(self, 'trail_length', 30, 'Estimates kept in the trail (30 = 1 s at '
                                     '30 FPS).', min_value=0, max_value=1000, read_only=True)
        declare(self, 'stale_after_s', 1.0, 'An estimate whose stamp is older than the image stamp by more '
                'than this is drawn greyed out.', min_value=0.0, max_value=3600.0)
        declare(self, 'max_rate', 15.0, 'Most annotated images per second (Hz); 0 = every camera frame.',
                min_value=0.0, max_value=1000.0)
        declare(self, 'panel_fraction', 0.35, 'Panel side relative to the shorter image side.',
                min_value=0.1, max_value=1.0)
        declare(self, 'face_boxes', True, "Draw every stream's face box (ValenceArousal.roi) with its "
                'valence and arousal.')
        declare(self, 'diagnostics_period_s', 1.0, 'Period of /diagnostics.', min_value=0.1, max_value=60.0,
                read_only=True)
        if self._transport not in TRANSPORTS:
            raise ValueError(f"parameter input_transport='{self._transport}': expected one of {TRANSPORTS}")

        self._lock = threading.Lock()
        self._latest: dict = {}          # stream -> (stamp_s, Estimate)
        self._boxes: dict = {}           # stream -> (x, y, width, height) of its newest estimate's face
        self._trails: dict = {}          # stream -> deque of (valence, arousal)
        self._newest_stream: Optional[str] = None
        self._last_output = -math.inf
        self._in_rate, self._out_rate = RateMeter(), RateMeter()
        self._counts: collections.Counter = collections.Counter()
        self._warn = ThrottledWarning(self)

        self.create_subscription(ValenceArousal, ESTIMATES, self._on_estimate, RELIABLE_QOS)
        if self._transport == 'raw':
            self.create_subscription(Image, IMAGE, self._on_image, SENSOR_QOS)
        else:
            self.create_subscription(CompressedImage, IMAGE_COMPRESSED, self._on_image, SENSOR_QOS)
        self._publisher = self.create_publisher(Image, VISUALIZATION, IMAGE_OUT_QOS)
        self._diagnostics = Diagnostics(self, self._collect_diagnostics,
                                        float(self.get_parameter('diagnostics_period_s').value))

    def _on_estimate(self, msg: ValenceArousal) -> None:
        estimate = Estimate(float(msg.valence), float(msg.arousal), float(msg.confidence),
                            int(msg.modalities))
        with self._lock:
            self._latest[msg.stream_id] = (stamp_to_seconds(msg.header.stamp), estimate)
            trail = self._trails.setdefault(msg.stream_id, collections.deque(maxlen=self._trail_length))
            trail.append((estimate.valence, estimate.arousal))
            self._newest_stream = msg.stream_id
            roi = msg.roi
            if roi.width and roi.height:
                self._boxes[msg.stream_id] = (roi.x_offset, roi.y_offset, roi.width, roi.height)
            else:
                self._boxes.pop(msg.stream_id, None)

    def _on_image(self, msg) -> None:
        self._in_rate.tick()
        self._counts['images'] += 1
        max_rate = float(self.get_parameter('max_rate').value)
        now = time.monotonic()
        if max_rate > 0 and now - self._last_output < 1.0 / max_rate:
            self._counts['skipped_rate'] += 1
            return
        try:
            if isinstance(msg, Image):
                rgb = image_conversion.image_msg_to_rgb(msg)
            else:
                rgb = image_conversion.compressed_to_rgb(msg.format, msg.data)
        except image_conversion.ImageDecodeError as error:
            self._counts['bad_images'] += 1
            self._warn('decode', f'cannot draw on this image: {error}')
            return
        wanted = self.get_parameter('stream_id').value
        image_s = stamp_to_seconds(msg.header.stamp)
        stale_after_s = float(self.get_parameter('stale_after_s').value)
        with self._lock:
            stream = wanted or self._newest_stream
            stamp_s, estimate = self._latest.get(stream, (None, None))
            trail = list(self._trails.get(stream, ()))
            faces = [FaceBox(*box, label=name, valence=self._latest[name][1].valence,
                             arousal=self._latest[name][1].arousal,
                             stale=image_s - self._latest[name][0] > stale_after_s)
                     for name, box in sorted(self._boxes.items())]
        stale = stamp_s is not None and image_s - stamp_s > stale_after_s
        if faces and self.get_parameter('face_boxes').value:
            rgb = draw_face_boxes(rgb, faces)
        drawn = draw_va_overlay(rgb, estimate, trail, stale=stale, label=stream or '',
                                panel_fraction=float(self.get_parameter('panel_fraction').value))
        out = Image(header=msg.header, height=drawn.shape[0], width=drawn.shape[1], encoding='rgb8',
                    is_bigendian=0, step=drawn.shape[1] * 3)
        out.data = array.array('B', drawn.tobytes())
        self._publisher.publish(out)
        self._last_output = now
        self._out_rate.tick()
        self._counts['published'] += 1

    def _collect_diagnostics(self) -> tuple:
        counts = self._counts
        values = {'input_rate_hz': self._in_rate.rate(), 'output_rate_hz': self._out_rate.rate(),
                  'images': counts['images'], 'published': counts['published'],
                  'skipped_rate_limit': counts['skipped_rate'], 'bad_images': counts['bad_images'],
                  'streams': len(self._latest)}
        if self._counts['images'] and not self._latest:
            return DiagnosticStatus.WARN, 'no estimates received', values
        return DiagnosticStatus.OK, f"{values['output_rate_hz']:.1f} Hz", values


def main(args=None) -> int:
    return run_node(VisualizerNode, args=args)


if __name__ == '__main__':
    raise SystemExit(main())
