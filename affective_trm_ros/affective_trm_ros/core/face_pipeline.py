"""The video path from a camera frame to one embedding per face, cheap enough for a robot's CPU.

Two paths share one output shape (:class:`FrameFaces`):

* :class:`TrackedFaces` (the default): faces are detected on a downscaled copy of the frame
  (``detection_scale``) and the boxes are mapped back; between detections each face is followed
  by normalised cross-correlation of its last appearance (a few hundred microseconds per face);
  detection runs again every ``detection_interval`` frames, or at once when a face cannot be
  followed. :class:`~affective_trm_ros.core.face_tracking.FaceTracker` gives every face a stable id.
  All visible faces are cropped from the full-resolution frame and encoded in one batched call
  (``encode_faces``, see :class:`~affective_trm_ros.core.encoders.face.FaceCropEncoder`).
* :class:`FullFrameFaces`: the encoder gets the whole frame, as before the tracked path existed
  (the built-in encoders detect the largest face at full resolution on every frame); one face.

No ROS here: the video node converts messages, calls ``process(rgb, t)`` and publishes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from affective_trm_ros.core.encoders.face import (
    FaceBox,
    FaceCropEncoder,
    check_frame,
    crop_face,
    make_detector,
)
from affective_trm_ros.core.face_tracking import FaceTracker

FACE_PIPELINES = ('tracked', 'full_frame')
DEFAULT_DETECTION_SCALE = 0.5      # 640x480 -> 320x240: faces of 40 px stay above MTCNN's 12 px floor
DEFAULT_DETECTION_INTERVAL = 5     # frames; at 30 FPS a new face is found within ~170 ms
DEFAULT_TRACK_TIMEOUT_S = 1.0      # an unseen face keeps its id this long (blinks, turns, misses)
DEFAULT_FOLLOW_MIN_SCORE = 0.6     # correlation below this means the face was lost: detect again
FOLLOW_TEMPLATE_SIDE = 48          # px; faces are followed at this width, whatever their size
FOLLOW_SEARCH_MARGIN = 0.5         # search this fraction of the face size around the last box
MIN_DETECTOR_FACE_SIZE = 12        # px in the downscaled frame: MTCNN's smallest window


@dataclass
class FaceResult:
    """One face of one frame: its track id, box, whether it was seen, and its encoding."""

    track_id: int
    box: Optional[FaceBox]          # last known box (also for a face not seen in this frame)
    visible: bool
    embedding: Optional[np.ndarray] = None   # (dim,) float32 when visible and valid
    valid: bool = False
    expression_probabilities: Optional[np.ndarray] = None   # (K,) when the encoder has classes


@dataclass
class FrameFaces:
    """The faces of one frame (live tracks, id order), the ids retired now, and what ran."""

    faces: list = field(default_factory=list)
    retired: list = field(default_factory=list)
    detected: bool = False
    expression_classes: tuple = ()


def _expressions(extras: Optional[dict], n: int) -> tuple:
    """(class names, (n, K) probabilities) from an EncodeResult's extras, or ((), None)."""
    if not extras or 'expression_classes' not in extras or 'expression_probabilities' not in extras:
        return (), None
    probabilities = np.asarray(extras['expression_probabilities'], np.float32).reshape(n, -1)
    return tuple(str(c) for c in extras['expression_classes']), probabilities


class FullFrameFaces:
    """The whole frame goes to the encoder (``encode_batch``); at most one face, track id 0."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder

    def process(self, rgb: np.ndarray, t: float) -> FrameFaces:
        result = self.encoder.encode_batch([check_frame(rgb)])
        valid = bool(result.valid[0])
        box = None
        face_box = (result.extras or {}).get('face_box')
        if face_box is not None and np.all(np.isfinite(face_box[0])):
            box = FaceBox(*map(float, face_box[0]))
        classes, probabilities = _expressions(result.extras, 1)
        face = FaceResult(0, box, visible=valid, embedding=result.embeddings[0] if valid else None,
                          valid=valid,
                          expression_probabilities=probabilities[0] if probabilities is not None and valid
                          else None)
        return FrameFaces([face], detected=True, expression_classes=classes)


class _Template:
    """A face's last appearance, grey and resized to FOLLOW_TEMPLATE_SIDE wide."""

    def __init__(self, grey: np.ndarray, box: FaceBox) -> None:
        import cv2

        width = box.x2 - box.x1
        self.scale = FOLLOW_TEMPLATE_SIDE / max(width, 1.0)
        x1, y1, x2, y2 = _pixel_box(box, grey.shape)
        size = (max(1, round((x2 - x1) * self.scale)), max(1, round((y2 - y1) * self.scale)))
        self.patch = cv2.resize(grey[y1:y2, x1:x2], size, interpolation=cv2.INTER_AREA)


def _pixel_box(box: FaceBox, shape: tuple) -> tuple:
    height, width = shape[:2]
    x1 = int(np.clip(math.floor(box.x1), 0, width - 1))
    y1 = int(np.clip(math.floor(box.y1), 0, height - 1))
    x2 = int(np.clip(math.ceil(box.x2), x1 + 1, width))
    return x1, y1, x2, int(np.clip(math.ceil(box.y2), y1 + 1, height))


def follow(grey: np.ndarray, box: FaceBox, template: _Template, min_score: float) -> Optional[FaceBox]:
    """The box of ``template`` near ``box`` in ``grey`` (same size), or None when it is not there."""
    import cv2

    width, height = box.x2 - box.x1, box.y2 - box.y1
    search = FaceBox(box.x1 - FOLLOW_SEARCH_MARGIN * width, box.y1 - FOLLOW_SEARCH_MARGIN * height,
                     box.x2 + FOLLOW_SEARCH_MARGIN * width, box.y2 + FOLLOW_SEARCH_MARGIN * height)
    x1, y1, x2, y2 = _pixel_box(search, grey.shape)
    size = (round((x2 - x1) * template.scale), round((y2 - y1) * template.scale))
    th, tw = template.patch.shape
    if size[0] < tw or size[1] < th:
        return None   # the face left the frame
    window = cv2.resize(grey[y1:y2, x1:x2], size, interpolation=cv2.INTER_AREA)
    scores = cv2.matchTemplate(window, template.patch, cv2.TM_CCOEFF_NORMED)
    _, score, _, (dx, dy) = cv2.minMaxLoc(scores)
    if not math.isfinite(score) or score < min_score:
        return None
    left, top = x1 + dx / template.scale, y1 + dy / template.scale
    return FaceBox(left, top, left + width, top + height, score=float(score))


class TrackedFaces:
    """Detect on a downscaled frame every few frames, follow faces in between, encode in one batch."""

    def __init__(self, encoder, detector, *, max_faces: int = 1,
                 track_timeout_s: float = DEFAULT_TRACK_TIMEOUT_S,
                 detection_interval: int = DEFAULT_DETECTION_INTERVAL,
                 detection_scale: float = DEFAULT_DETECTION_SCALE,
                 face_margin: float = 0.0, follow_min_score: float = DEFAULT_FOLLOW_MIN_SCORE) -> None:
        if not isinstance(encoder, FaceCropEncoder):
            raise TypeError(f'{getattr(encoder, "identity", type(encoder).__name__)} cannot encode face '
                            f"crops (it has no encode_faces); use the full-frame path (face_pipeline: "
                            f'full_frame) with it')
        if detection_interval < 1:
            raise ValueError(f'detection_interval must be >= 1, got {detection_interval}')
        if not 0 < detection_scale <= 1:
            raise ValueError(f'detection_scale must be in (0, 1], got {detection_scale}')
        if face_margin < 0:
            raise ValueError(f'face_margin must be >= 0, got {face_margin}')
        self.encoder = encoder
        self.detector = detector
        self.tracker = FaceTracker(max_faces=max_faces, timeout_s=track_timeout_s)
        self.detection_interval = int(detection_interval)
        self.detection_scale = float(detection_scale)
        self.face_margin = float(face_margin)
        self.follow_min_score = float(follow_min_score)
        self._templates: dict = {}
        self._since_detection = self.detection_interval   # detect on the first frame
        self.detections = 0
        self.follow_failures = 0

    def detect(self, rgb: np.ndarray) -> list:
        """Every face in the frame (full-resolution boxes), found on the downscaled copy."""
        import cv2

        scale = self.detection_scale
        if scale == 1.0:
            return self.detector.detect_all(rgb)
        small = cv2.resize(rgb, (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
        sx, sy = rgb.shape[1] / small.shape[1], rgb.shape[0] / small.shape[0]
        return [FaceBox(b.x1 * sx, b.y1 * sy, b.x2 * sx, b.y2 * sy, b.score)
                for b in self.detector.detect_all(small)]

    def process(self, rgb: np.ndarray, t: float) -> FrameFaces:
        import cv2

        check_frame(rgb)
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        self._since_detection += 1
        detected = False
        update = None
        if self._since_detection < self.detection_interval:
            followed = {}
            for track in self.tracker.tracks:
                template = self._templates.get(track.track_id)
                if track.visible and template is not None:
                    box = follow(grey, FaceBox(*track.box), template, self.follow_min_score)
                    if box is not None:
                        followed[track.track_id] = (box.x1, box.y1, box.x2, box.y2)
            lost_now = any(tr.visible and tr.track_id not in followed for tr in self.tracker.tracks)
            if not lost_now:
                update = self.tracker.follow(followed, t)
            else:
                self.follow_failures += 1
        if update is None:
            boxes = self.detect(rgb)
            update = self.tracker.update([(b.x1, b.y1, b.x2, b.y2) for b in boxes], t)
            self._since_detection = 0
            self.detections += 1
            detected = True
        for track_id in update.retired:
            self._templates.pop(track_id, None)
        for track in update.visible:
            self._templates[track.track_id] = _Template(grey, FaceBox(*track.box))
        return self._encode(rgb, update, detected)

    def _encode(self, rgb: np.ndarray, update, detected: bool) -> FrameFaces:
        visible = update.visible
        faces = {tr.track_id: FaceResult(tr.track_id, FaceBox(*tr.box), visible=False) for tr in update.lost}
        classes = ()
        if visible:
            crops = [np.ascontiguousarray(crop_face(rgb, FaceBox(*tr.box), self.face_margin))
                     for tr in visible]
            result = self.encoder.encode_faces(crops)   # one batched call for every face of the frame
            classes, probabilities = _expressions(result.extras, len(visible))
            for row, track in enumerate(visible):
                valid = bool(result.valid[row])
                expression = probabilities[row] if probabilities is not None and valid else None
                faces[track.track_id] = FaceResult(
                    track.track_id, FaceBox(*track.box), visible=True,
                    embedding=result.embeddings[row] if valid else None, valid=valid,
                    expression_probabilities=expression)
        return FrameFaces([faces[k] for k in sorted(faces)], retired=list(update.retired), detected=detected,
                          expression_classes=classes)


def make_tracked_faces(encoder, detector: str, device, *, min_face_size: int, min_face_confidence: float,
                       detection_scale: float = DEFAULT_DETECTION_SCALE, **options) -> TrackedFaces:
    """A :class:`TrackedFaces` whose detector runs on the downscaled frame.

    ``min_face_size`` is in full-resolution pixels; the detector gets it scaled (not below
    MIN_DETECTOR_FACE_SIZE), so the same faces are found as at full resolution.
    """
    scaled = max(MIN_DETECTOR_FACE_SIZE, math.ceil(min_face_size * detection_scale))
    face_detector = make_detector(detector, device, min_face_size=scaled, min_confidence=min_face_confidence)
    return TrackedFaces(encoder, face_detector, detection_scale=detection_scale, **options)
