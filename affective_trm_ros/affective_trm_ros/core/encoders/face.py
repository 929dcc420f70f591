"""Face detectors for the video encoders: find the faces in an RGB frame and crop them.

Two detectors share one small interface: ``detect_all(rgb) -> list[FaceBox]`` (every face, largest
first) and ``detect(rgb) -> FaceBox | None`` (the largest):

* ``mtcnn`` — MTCNN from ``facenet-pytorch`` (its weights ship inside the package); accurate, and
  what the HSEmotion demos use.
* ``haar`` — OpenCV's frontal-face Haar cascade (the XML ships with OpenCV 4); much lighter, fewer
  detections on rotated or poorly lit faces.

``detect`` returns the largest face, because a robot usually attends to the nearest person.

Face-crop encoders: a video encoder that can also encode face crops cut by someone else (the
tracked video pipeline, or ROS4HRI's aligned faces) implements :class:`FaceCropEncoder`'s
``encode_faces``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np
import torch

DETECTORS = ('mtcnn', 'haar')
DEFAULT_MIN_FACE_SIZE = 40        # px; smaller faces carry too little expression detail at 224 px
DEFAULT_MIN_CONFIDENCE = 0.9      # MTCNN face probability below this is treated as no face
HAAR_CASCADE = 'haarcascade_frontalface_default.xml'
HAAR_SCALE_FACTOR = 1.1           # image pyramid step of the cascade (OpenCV's usual value)
HAAR_MIN_NEIGHBORS = 5            # overlapping hits needed to accept a face; fewer = more false faces


@dataclass(frozen=True)
class FaceBox:
    """A face rectangle in pixel coordinates (x2, y2 exclusive) and the detector's confidence."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float = 1.0

    @property
    def area(self) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)


def check_rgb(array: Any, what: str = 'frame', shape: str = '(H, W, 3)') -> np.ndarray:
    """Validate an RGB image input: a ``shape`` uint8 array with at least one pixel."""
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        desc = (f'{array.dtype} array of shape {array.shape}' if isinstance(array, np.ndarray)
                else type(array).__name__)
        raise ValueError(f'expected an {shape} uint8 RGB {what}, got {desc}')
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f'empty {what} of shape {array.shape}')
    return array


def check_frame(rgb: np.ndarray) -> np.ndarray:
    """Validate a video encoder input: an (H, W, 3) uint8 RGB frame."""
    return check_rgb(rgb)


def largest(boxes: list) -> Optional[FaceBox]:
    return max(boxes, key=lambda box: box.area) if boxes else None


def by_size(boxes: list) -> list:
    """Faces largest first."""
    return sorted(boxes, key=lambda box: box.area, reverse=True)


@runtime_checkable
class FaceCropEncoder(Protocol):
    """A video encoder that also encodes face crops (the contract of the tracked video pipeline).

    ``encode_faces(crops)`` takes a list of (h, w, 3) uint8 RGB face crops, already cut from their
    frames (with the margin the caller chose), and returns an ``EncodeResult`` with one row per crop,
    equal to what ``encode_batch`` computes for a frame whose detected face is that crop. Every crop
    is a face, so rows are valid unless the encoder's output is unusable.
    """

    def encode_faces(self, crops: list):
        ...


def crop_face(rgb: np.ndarray, box: FaceBox, margin: float = 0.0) -> np.ndarray:
    """Crop ``box`` grown by ``margin`` x its width/height on each side, clipped to the frame."""
    if margin < 0:
        raise ValueError(f'face margin must be >= 0, got {margin}')
    height, width = rgb.shape[:2]
    grow_x = (box.x2 - box.x1) * margin
    grow_y = (box.y2 - box.y1) * margin
    x1 = int(np.clip(np.floor(box.x1 - grow_x), 0, width - 1))
    y1 = int(np.clip(np.floor(box.y1 - grow_y), 0, height - 1))
    x2 = int(np.clip(np.ceil(box.x2 + grow_x), x1 + 1, width))
    y2 = int(np.clip(np.ceil(box.y2 + grow_y), y1 + 1, height))
    return rgb[y1:y2, x1:x2]


class MTCNNDetector:
    """MTCNN (facenet-pytorch); keeps every face above ``min_confidence``."""

    name = 'mtcnn'

    def __init__(self, device: torch.device, min_face_size: int = DEFAULT_MIN_FACE_SIZE,
                 min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> None:
        from facenet_pytorch import MTCNN

        self.min_confidence = float(min_confidence)
        self.min_face_size = int(min_face_size)
        self._mtcnn = MTCNN(keep_all=True, device=device, min_face_size=int(min_face_size))
        self._mtcnn.eval()

    def detect(self, rgb: np.ndarray) -> Optional[FaceBox]:
        return largest(self.detect_all(rgb))

    def detect_all(self, rgb: np.ndarray) -> list:
        if min(rgb.shape[:2]) < self.min_face_size:
            return []  # no face of the minimum size fits (and MTCNN's image pyramid would be empty)
        with torch.inference_mode():
            boxes, probs = self._mtcnn.detect(np.ascontiguousarray(rgb))
        if boxes is None:
            return []
        return by_size([FaceBox(*map(float, box), score=float(prob)) for box, prob in zip(boxes, probs)
                        if prob is not None and prob >= self.min_confidence])


class HaarDetector:
    """OpenCV's frontal-face Haar cascade on the grey image."""

    name = 'haar'

    def __init__(self, min_face_size: int = DEFAULT_MIN_FACE_SIZE, scale_factor: float = HAAR_SCALE_FACTOR,
                 min_neighbors: int = HAAR_MIN_NEIGHBORS) -> None:
        import cv2

        if not hasattr(cv2, 'CascadeClassifier') or not hasattr(cv2, 'data'):
            raise RuntimeError(f'the Haar face detector needs OpenCV 4 (installed: {cv2.__version__}, '
                               f"which has no Haar cascades); install 'opencv-python-headless<5' "
                               f"or use detector='mtcnn'")
        path = Path(cv2.data.haarcascades) / HAAR_CASCADE
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise RuntimeError(f'could not load the Haar cascade {path} (OpenCV {cv2.__version__})')
        self._cv2 = cv2
        self.min_face_size = int(min_face_size)
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)

    def detect(self, rgb: np.ndarray) -> Optional[FaceBox]:
        return largest(self.detect_all(rgb))

    def detect_all(self, rgb: np.ndarray) -> list:
        grey = self._cv2.cvtColor(np.ascontiguousarray(rgb), self._cv2.COLOR_RGB2GRAY)
        found = self._cascade.detectMultiScale(grey, scaleFactor=self.scale_factor,
                                               minNeighbors=self.min_neighbors,
                                               minSize=(self.min_face_size, self.min_face_size))
        return by_size([FaceBox(float(x), float(y), float(x + w), float(y + h)) for x, y, w, h in found])


def make_detector(name: str, device: torch.device, min_face_size: int = DEFAULT_MIN_FACE_SIZE,
                  min_confidence: float = DEFAULT_MIN_CONFIDENCE):
    """Build the detector called ``name`` ('mtcnn' or 'haar')."""
    if name == 'mtcnn':
        return MTCNNDetector(device, min_face_size=min_face_size, min_confidence=min_confidence)
    if name == 'haar':
        return HaarDetector(min_face_size=min_face_size)
    raise ValueError(f"unknown face detector '{name}'; expected one of {DETECTORS}")
