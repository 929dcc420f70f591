"""Video encoder node: camera frames -> one face embedding per tracked face (``affect/embedding/video``).

Camera input (``input_mode: camera``): ``sensor_msgs/Image`` on ``image_raw`` and
``sensor_msgs/CompressedImage`` on ``image_raw/compressed`` (sensor-data QoS, overridable; rename
them by remapping). The
subscription callback only keeps the newest frame; the worker thread converts it (``core.image``)
and runs the face path of ``core.face_pipeline`` at most ``max_rate`` times per second:

* ``face_pipeline: tracked`` (default): detection on a downscaled frame every
  ``detection_interval`` frames, faces followed in between, stable ids from a tracker, every face
  encoded in one batched call.
* ``face_pipeline: full_frame``: the plugin gets the whole frame (the built-in encoders detect the
  largest face at full resolution on every frame); one face.

Stream ids: with ``max_faces: 1`` (single-person mode, the default) every frame gives exactly one
embedding with ``stream_id`` = the ``stream_id`` parameter (``valid=false`` without a face). With
``max_faces`` > 1 each tracked face is its own stream, ``<track_id_prefix><n>`` (``face_0``,
``face_1``, ... in order of appearance, never reused): every frame gives one embedding per live
track, ``valid=false`` while the face is not seen, until ``track_timeout_s`` without it retires the
id (no more messages for it). All embeddings of a frame carry the frame's stamp and their face box
in ``roi``; encoders with a categorical expression head fill ``expression_classes`` and
``expression_probabilities``.

ROS4HRI input (``input_mode: hri``): instead of detecting faces, the node takes ``hri_face_detect``'s
aligned face crops: ``/humans/faces/tracked`` (``hri_msgs/IdsList``) lists the faces, and
``/humans/faces/<id>/aligned`` (``sensor_msgs/Image``) carries each one; the face id is the
``stream_id``. Each ``IdsList`` encodes the newest not-yet-encoded crop of each listed face (up to
``max_faces``) in one batched call, stamped with the crop's stamp. ``hri_msgs`` comes with a ROS
distro (``ros-<distro>-hri-msgs``); without it this mode fails at start with that message.

Frames replaced before the worker took them are dropped and counted.
"""

from __future__ import annotations

import threading
from typing import Optional

import numpy as np
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CompressedImage, Image, RegionOfInterest

from affective_trm_ros import topics
from affective_trm_ros.core import image as image_conversion
from affective_trm_ros.core.encoders.face import (
    DEFAULT_MIN_CONFIDENCE,
    DEFAULT_MIN_FACE_SIZE,
    DETECTORS,
    FaceCropEncoder,
)
from affective_trm_ros.core.encoders.loading import (
    DEFAULT_TRACK_ID_PREFIX,
    video_faces_from_parameters,
    video_stream_id,
)
from affective_trm_ros.core.face_pipeline import (
    DEFAULT_DETECTION_INTERVAL,
    DEFAULT_DETECTION_SCALE,
    DEFAULT_TRACK_TIMEOUT_S,
    FACE_PIPELINES,
)
from affective_trm_ros.core.modalities import VIDEO
from affective_trm_ros.core.stamps import stamp_to_seconds
from affective_trm_ros.nodes.common import SENSOR_QOS, add_validator, declare, run_node
from affective_trm_ros.nodes.encoder_node_base import EncoderNode, validate_common

# Default processing cap: the fusion is clocked by video and the seed data are 30 FPS.
DEFAULT_MAX_RATE_HZ = 30.0
INPUT_MODES = ('camera', 'hri')
MAX_FACES_LIMIT = 32                 # one batched encoder call per frame must stay affordable


def hri_aligned_topic(face_id: str) -> str:
    """REP-155: hri_face_detect's aligned crop of one face (absolute, as the REP names it)."""
    return f'/humans/faces/{face_id}/aligned'


def hri_messages():
    """``hri_msgs.msg`` or a RuntimeError saying how to get it."""
    try:
        from hri_msgs import msg
        return msg
    except ImportError as error:
        raise RuntimeError("input_mode 'hri' needs the ROS4HRI message package hri_msgs "
                           "(apt: ros-<distro>-hri-msgs; it is not on PyPI); it is not importable here "
                           f"({error}). Use input_mode 'camera' to detect faces in camera images.") from error


def validate_parameters(params: dict) -> Optional[str]:
    """Pure check of the video encoder parameters; an error message or None."""
    error = validate_common(params)
    if error:
        return error
    if params.get('input_mode') not in INPUT_MODES:
        return f"input_mode must be one of {', '.join(INPUT_MODES)}, got '{params.get('input_mode')}'"
    camera = params.get('input_mode') == 'camera'
    if params.get('detector') not in DETECTORS:
        return f"detector must be one of {', '.join(DETECTORS)}, got '{params.get('detector')}'"
    if params.get('face_pipeline') not in FACE_PIPELINES:
        return (f"face_pipeline must be one of {', '.join(FACE_PIPELINES)}, "
                f"got '{params.get('face_pipeline')}'")
    if not 1 <= params.get('max_faces', 1) <= MAX_FACES_LIMIT:
        return f"max_faces must be in [1, {MAX_FACES_LIMIT}], got {params.get('max_faces')}"
    if camera and params.get('face_pipeline') == 'full_frame' and params.get('max_faces', 1) > 1:
        return 'face_pipeline full_frame encodes one face per frame: it needs max_faces 1'
    if params.get('max_faces', 1) > 1 and not str(params.get('track_id_prefix', '')).strip():
        return 'track_id_prefix must not be empty when max_faces > 1'
    if not params.get('max_rate', 0.0) >= 0.0:
        return f"max_rate must be >= 0 (0 = unlimited), got {params.get('max_rate')}"
    if not params.get('face_margin', 0.0) >= 0.0:
        return f"face_margin must be >= 0, got {params.get('face_margin')}"
    if not params.get('track_timeout_s', 0.0) >= 0.0:
        return f"track_timeout_s must be >= 0, got {params.get('track_timeout_s')}"
    if not params.get('detection_interval', 1) >= 1:
        return f"detection_interval must be >= 1, got {params.get('detection_interval')}"
    if not 0.0 < params.get('detection_scale', 1.0) <= 1.0:
        return f"detection_scale must be in (0, 1], got {params.get('detection_scale')}"
    return None


def roi_of(box) -> RegionOfInterest:
    """A face box (pixels, x2/y2 exclusive) as a RegionOfInterest clipped at zero; zeros for None."""
    if box is None:
        return RegionOfInterest()
    x1, y1 = max(0, int(round(box.x1))), max(0, int(round(box.y1)))
    return RegionOfInterest(x_offset=x1, y_offset=y1, width=max(0, int(round(box.x2)) - x1),
                            height=max(0, int(round(box.y2)) - y1))


class VideoEncoderNode(EncoderNode):
    """Newest-frame-only face encoder, one stream per tracked face; see the module docstring."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__('video_encoder', VIDEO, **node_kwargs)
        self._declare_parameters()
        p = self.params
        error = validate_parameters(p)
        if error:
            raise ValueError(f'invalid parameters: {error}')
        add_validator(self, validate_parameters, self._apply)
        hri = hri_messages() if p['input_mode'] == 'hri' else None   # fail before loading any model
        self.load_plugin()
        self.faces = None
        crops_needed = p['input_mode'] == 'hri' or p['face_pipeline'] == 'tracked'
        if crops_needed and not isinstance(self.encoder, FaceCropEncoder):
            raise ValueError(f"plugin '{p['plugin']}' cannot encode face crops (no encode_faces): "
                             f"use it with input_mode 'camera' and face_pipeline 'full_frame'")
        if p['input_mode'] == 'camera':   # the face path offline preparation builds from the same parameters
            self.faces = video_faces_from_parameters(self.encoder, p)
        # Capacity 1: the worker always takes the newest frame; a newer one replaces a waiting one.
        self.start(capacity=1, min_interval_s=self._min_interval)
        if hri is not None:
            self._start_hri(hri)
        else:
            self._start_camera()

    def _declare_parameters(self) -> None:
        p = self.params
        p['input_mode'] = declare(self, 'input_mode', 'camera',
                                  "Where faces come from: 'camera' (detect them in image_raw) or 'hri' "
                                  "(hri_face_detect's /humans/faces/<id>/aligned crops; needs hri_msgs).",
                                  choices=INPUT_MODES, read_only=True)
        p['max_rate'] = declare(self, 'max_rate', DEFAULT_MAX_RATE_HZ,
                                'Most frames processed per second (Hz); 0 = as fast as the encoder runs. '
                                'Frames beyond it are dropped (newest kept).',
                                min_value=0.0, max_value=1000.0)
        p['face_pipeline'] = declare(
            self, 'face_pipeline', 'tracked',
            "'tracked': detect on a downscaled frame every detection_interval frames, follow faces in "
            "between, encode all faces in one batch; 'full_frame': the plugin gets the whole frame and "
            'finds the largest face itself (one face).', choices=FACE_PIPELINES, read_only=True)
        p['max_faces'] = declare(self, 'max_faces', 1,
                                 'Most faces tracked and encoded per frame. 1 = single-person mode '
                                 '(stream_id parameter); more = one stream per face, <track_id_prefix><n>.',
                                 min_value=1, max_value=MAX_FACES_LIMIT, read_only=True)
        p['track_id_prefix'] = declare(self, 'track_id_prefix', DEFAULT_TRACK_ID_PREFIX,
                                       'Stream id prefix of tracked faces when max_faces > 1 '
                                       '(face_0, face_1, ...).',
                                       read_only=True)
        p['track_timeout_s'] = declare(self, 'track_timeout_s', DEFAULT_TRACK_TIMEOUT_S,
                                       'Seconds (image stamps) a face may go unseen before its id is '
                                       'retired; shorter gaps (occlusions, missed detections) keep the id.',
                                       min_value=0.0, max_value=60.0)
        p['detection_interval'] = declare(self, 'detection_interval', DEFAULT_DETECTION_INTERVAL,
                                          'Tracked pipeline: run the face detector every this many frames '
                                          '(and at once when a face is lost); faces are followed in between.',
                                          min_value=1, max_value=1000)
        p['detection_scale'] = declare(self, 'detection_scale', DEFAULT_DETECTION_SCALE,
                                       'Tracked pipeline: the detector sees the frame scaled by this factor '
                                       '(boxes are mapped back; min_face_size stays in full-frame pixels).',
                                       min_value=0.05, max_value=1.0, read_only=True)
        p['detector'] = declare(self, 'detector', 'mtcnn', 'Face detector (tracked pipeline and the built-in '
                                'video encoders).', choices=DETECTORS, read_only=True)
        p['face_margin'] = declare(self, 'face_margin', 0.0,
                                   'Fraction of the face box added on each side before cropping.',
                                   min_value=0.0, max_value=2.0, read_only=True)
        p['min_face_size'] = declare(self, 'min_face_size', DEFAULT_MIN_FACE_SIZE,
                                     'Smallest face the detector reports (full-frame pixels).',
                                     min_value=8, max_value=4096, read_only=True)
        p['min_face_confidence'] = declare(self, 'min_face_confidence', DEFAULT_MIN_CONFIDENCE,
                                           'MTCNN face probability below which a box is not a face.',
                                           min_value=0.0, max_value=1.0, read_only=True)

    def _start_camera(self) -> None:
        p = self.params
        overrides = QoSOverridingOptions.with_default_policies()
        self.create_subscription(Image, topics.IMAGE, self.submit, SENSOR_QOS,
                                 qos_overriding_options=overrides)
        self.create_subscription(CompressedImage, topics.IMAGE_COMPRESSED, self.submit, SENSOR_QOS,
                                 qos_overriding_options=overrides)
        bridge = 'cv_bridge' if image_conversion.cv_bridge_available() else 'the NumPy converter'
        mode = ('single-person' if p['max_faces'] == 1 else f"up to {p['max_faces']} faces")
        self.get_logger().info(f"encoding frames from '{self.resolve_topic_name(topics.IMAGE)}' and its "
                               f"compressed topic (raw images via {bridge}; {p['face_pipeline']} faces, "
                               f"{mode}) at most "
                               f'{p["max_rate"] or "unlimited"} Hz')

    def _start_hri(self, hri) -> None:
        self._crops: dict = {}        # face id -> newest aligned crop not yet encoded
        self._crop_subscriptions: dict = {}
        self._crops_lock = threading.Lock()
        self.create_subscription(hri.IdsList, topics.HRI_TRACKED_FACES, self._on_tracked_faces, SENSOR_QOS)
        self.get_logger().info(f'encoding the aligned face crops of {topics.HRI_TRACKED_FACES} (ROS4HRI)')

    # ------------------------------------------------------------ parameters

    def _apply(self, changed: dict) -> None:
        """Accepted run-time updates: the tracker settings (max_rate and the rest are read when used)."""
        self.apply_common(changed)
        tracked = getattr(self.faces, 'tracker', None)
        if tracked is not None and 'track_timeout_s' in changed:
            tracked.timeout_s = float(changed['track_timeout_s'])
        if tracked is not None and 'detection_interval' in changed:
            self.faces.detection_interval = int(changed['detection_interval'])

    def _min_interval(self) -> float:
        rate = self.params['max_rate']
        return 1.0 / rate if rate > 0 else 0.0

    @property
    def single_person(self) -> bool:
        return self.params['input_mode'] == 'camera' and self.params['max_faces'] == 1

    # ------------------------------------------------------------ camera input

    def process(self, item) -> None:
        try:
            if self.params['input_mode'] == 'hri':
                self._process_hri(item)
            else:
                self._process_frame(item)
        finally:
            self.count('frames_processed')

    def _process_frame(self, msg) -> None:
        try:
            rgb = image_conversion.frame_to_rgb(msg)
        except image_conversion.ImageDecodeError as error:
            self.warn('bad_image', f'cannot use a frame on {type(msg).__name__}: {error}')
            if self.single_person:
                self.publish_embedding(msg.header.stamp, msg.header.frame_id, None)
            return
        frame = self.faces.process(rgb, stamp_to_seconds(msg.header.stamp))
        if frame.retired:
            self.count('retired_faces', len(frame.retired))
        if self.single_person:
            face = frame.faces[0] if frame.faces else None
            self._publish_face(msg.header, face, video_stream_id(self.params, 0), frame.expression_classes)
            return
        for face in frame.faces:
            self._publish_face(msg.header, face, video_stream_id(self.params, face.track_id),
                               frame.expression_classes)

    def _publish_face(self, header, face, stream_id: str, classes: tuple) -> None:
        fields = {}
        if face is not None and face.visible:
            fields['roi'] = roi_of(face.box)
        if face is not None and face.valid and face.expression_probabilities is not None:
            fields['expression_classes'] = list(classes)
            probabilities = np.asarray(face.expression_probabilities, np.float32)
            fields['expression_probabilities'] = probabilities.tolist()
        vector = face.embedding if face is not None and face.valid else None
        self.publish_embedding(header.stamp, header.frame_id, vector, stream_id=stream_id, **fields)

    # ------------------------------------------------------------ ROS4HRI input

    def _on_tracked_faces(self, ids_msg) -> None:
        """Follow the tracked face ids: subscribe to new faces' crops, drop vanished ones; wake the worker."""
        ids = list(ids_msg.ids)
        for face_id in [i for i in self._crop_subscriptions if i not in ids]:
            self.destroy_subscription(self._crop_subscriptions.pop(face_id))
            with self._crops_lock:
                self._crops.pop(face_id, None)
            self.count('retired_faces')
        for face_id in ids:
            if face_id not in self._crop_subscriptions:
                self._crop_subscriptions[face_id] = self.create_subscription(
                    Image, hri_aligned_topic(face_id),
                    lambda msg, face_id=face_id: self._on_aligned_face(face_id, msg), SENSOR_QOS)
        self.submit(ids)

    def _on_aligned_face(self, face_id: str, msg: Image) -> None:
        with self._crops_lock:
            if face_id in self._crops:
                self.count('dropped_crops')   # replaced before it was encoded
            self._crops[face_id] = msg

    def _process_hri(self, ids: list) -> None:
        with self._crops_lock:
            taken = [(face_id, self._crops.pop(face_id)) for face_id in ids if face_id in self._crops]
        crops, faces = [], []
        for face_id, msg in taken[:self.params['max_faces']]:
            try:
                crops.append(image_conversion.frame_to_rgb(msg))
                faces.append((face_id, msg))
            except image_conversion.ImageDecodeError as error:
                self.warn('bad_image', f'cannot use the aligned crop of face {face_id}: {error}')
                self.publish_embedding(msg.header.stamp, msg.header.frame_id, None, stream_id=face_id)
        if not crops:
            return
        result = self.encoder.encode_faces(crops)   # one batched call for every face
        classes = (result.extras or {}).get('expression_classes')
        probabilities = (result.extras or {}).get('expression_probabilities')
        for row, (face_id, msg) in enumerate(faces):
            fields = {}
            if classes is not None and probabilities is not None and result.valid[row]:
                fields['expression_classes'] = [str(c) for c in classes]
                fields['expression_probabilities'] = np.asarray(probabilities[row], np.float32).tolist()
            self.publish_embedding(msg.header.stamp, msg.header.frame_id,
                                   result.embeddings[row] if result.valid[row] else None,
                                   stream_id=face_id, **fields)

    # ------------------------------------------------------------ diagnostics

    def extra_diagnostics(self) -> dict:
        values = {'max_rate_hz': self.params['max_rate'], 'input_mode': self.params['input_mode'],
                  'image_converter': 'cv_bridge' if image_conversion.cv_bridge_available() else 'numpy',
                  'retired_faces': self.counts.get('retired_faces', 0)}
        tracked = getattr(self.faces, 'tracker', None)
        if self.params['input_mode'] == 'hri':
            values['tracked_faces'] = len(self._crop_subscriptions)
            values['dropped_crops'] = self.counts.get('dropped_crops', 0)
        else:
            values['face_pipeline'] = self.params['face_pipeline']
        if tracked is not None:
            values.update(tracked_faces=len(tracked.tracks), detections=self.faces.detections,
                          follow_failures=self.faces.follow_failures)
        return values


def main(args=None) -> int:
    return run_node(VideoEncoderNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
