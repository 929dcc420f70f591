"""Video encoder node: camera frames -> face embeddings (``affect/embedding/video``).

Subscribes to ``sensor_msgs/Image`` on ``image_raw`` and ``sensor_msgs/CompressedImage`` on
``image_raw/compressed`` (sensor-data QoS, overridable). The subscription callback only keeps the
newest frame; the worker thread converts it (``core.image``), runs the encoder plugin (which finds
the face) at most ``max_rate`` times per second and publishes one embedding per processed frame,
stamped with the image stamp. Frames replaced before the worker took them are dropped and counted.
"""

from __future__ import annotations

from typing import Optional

from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CompressedImage, Image

from affective_trm_ros.core import image as image_conversion
from affective_trm_ros.core.encoders.face import DEFAULT_MIN_CONFIDENCE, DEFAULT_MIN_FACE_SIZE, DETECTORS
from affective_trm_ros.core.modalities import VIDEO
from affective_trm_ros.nodes.common import SENSOR_QOS, add_validator, declare, run_node
from affective_trm_ros.nodes.encoder_node_base import EncoderNode, validate_common

# Default processing cap: the fusion is clocked by video and the seed data are 30 FPS.
DEFAULT_MAX_RATE_HZ = 30.0


def validate_parameters(params: dict) -> Optional[str]:
    """Pure check of the video encoder parameters; an error message or None."""
    error = validate_common(params)
    if error:
        return error
    if not params.get('image_topic') and not params.get('compressed_topic'):
        return 'at least one of image_topic and compressed_topic must be set'
    if params.get('detector') not in DETECTORS:
        return f"detector must be one of {', '.join(DETECTORS)}, got '{params.get('detector')}'"
    if not params.get('max_rate', 0.0) >= 0.0:
        return f"max_rate must be >= 0 (0 = unlimited), got {params.get('max_rate')}"
    if not params.get('face_margin', 0.0) >= 0.0:
        return f"face_margin must be >= 0, got {params.get('face_margin')}"
    return None


class VideoEncoderNode(EncoderNode):
    """Newest-frame-only face encoder; see the module docstring."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__('video_encoder', VIDEO, **node_kwargs)
        p = self.params
        p['image_topic'] = declare(self, 'image_topic', 'image_raw',
                                   'sensor_msgs/Image input topic; empty = do not subscribe.', read_only=True)
        p['compressed_topic'] = declare(self, 'compressed_topic', 'image_raw/compressed',
                                        'sensor_msgs/CompressedImage (JPEG/PNG) input topic; empty = do not '
                                        'subscribe.', read_only=True)
        p['max_rate'] = declare(self, 'max_rate', DEFAULT_MAX_RATE_HZ,
                                'Most frames processed per second (Hz); 0 = as fast as the encoder runs. '
                                'Frames beyond it are dropped (newest kept).',
                                min_value=0.0, max_value=1000.0)
        p['detector'] = declare(self, 'detector', 'mtcnn', 'Face detector of the built-in video encoders.',
                                choices=DETECTORS, read_only=True)
        p['face_margin'] = declare(self, 'face_margin', 0.0,
                                   'Fraction of the face box added on each side before cropping.',
                                   min_value=0.0, max_value=2.0, read_only=True)
        p['min_face_size'] = declare(self, 'min_face_size', DEFAULT_MIN_FACE_SIZE,
                                     'Smallest face the detector reports (pixels).',
                                     min_value=8, max_value=4096, read_only=True)
        p['min_face_confidence'] = declare(self, 'min_face_confidence', DEFAULT_MIN_CONFIDENCE,
                                           'MTCNN face probability below which a frame counts as no face.',
                                           min_value=0.0, max_value=1.0, read_only=True)
        error = validate_parameters(p)
        if error:
            raise ValueError(f'invalid parameters: {error}')
        add_validator(self, validate_parameters, self._apply)
        self.load_plugin({name: p[name] for name in
                          ('detector', 'face_margin', 'min_face_size', 'min_face_confidence')})
        # Capacity 1: the worker always takes the newest frame; a newer one replaces a waiting one.
        self.start(capacity=1, min_interval_s=self._min_interval)
        overrides = QoSOverridingOptions.with_default_policies()
        if p['image_topic']:
            self.create_subscription(Image, p['image_topic'], self.submit, SENSOR_QOS,
                                     qos_overriding_options=overrides)
        if p['compressed_topic']:
            self.create_subscription(CompressedImage, p['compressed_topic'], self.submit, SENSOR_QOS,
                                     qos_overriding_options=overrides)
        bridge = 'cv_bridge' if image_conversion.cv_bridge_available() else 'the NumPy converter'
        self.get_logger().info(f"encoding frames from '{p['image_topic']}' / '{p['compressed_topic']}' "
                               f'(raw images via {bridge}) at most {p["max_rate"] or "unlimited"} Hz')

    def _apply(self, changed: dict) -> None:
        self.apply_common(changed)
        if 'max_rate' in changed:
            self.params['max_rate'] = changed['max_rate']

    def _min_interval(self) -> float:
        rate = self.params['max_rate']
        return 1.0 / rate if rate > 0 else 0.0

    def process(self, msg) -> None:
        try:
            rgb = image_conversion.frame_to_rgb(msg)
        except image_conversion.ImageDecodeError as error:
            self.warn('bad_image', f'cannot use a frame on {type(msg).__name__}: {error}')
            self.publish_embedding(msg.header.stamp, msg.header.frame_id, None)
            return
        vector, valid = self.encoder.encode(rgb)
        self.publish_embedding(msg.header.stamp, msg.header.frame_id, vector if valid else None)

    def extra_diagnostics(self) -> dict:
        return {'max_rate_hz': self.params['max_rate'],
                'image_converter': 'cv_bridge' if image_conversion.cv_bridge_available() else 'numpy'}


def main(args=None) -> int:
    return run_node(VideoEncoderNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
