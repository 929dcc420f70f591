"""Draw each tracked face's box with its valence and arousal (pure NumPy/OpenCV, no rclpy).

A box is drawn in the colour of its valence (red unpleasant, grey neutral, green pleasant), with
the stream id and ``v +0.42 a -0.10`` on a dark strip above it (inside the box when the face
touches the top edge). A stale estimate is drawn grey.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

BOX_THICKNESS_PX = 2
LABEL_RGB = (240, 240, 240)
LABEL_BACKGROUND_RGB = (20, 20, 28)
STALE_BOX_RGB = (150, 150, 150)
NEGATIVE_RGB = (230, 60, 60)     # valence -1
NEUTRAL_RGB = (200, 200, 200)    # valence 0
POSITIVE_RGB = (60, 210, 90)     # valence +1
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.4


@dataclass(frozen=True)
class FaceBox:
    """One face: its box in image pixels (x, y, width, height), its stream id and estimate."""

    x: int
    y: int
    width: int
    height: int
    label: str
    valence: float
    arousal: float
    stale: bool = False


def valence_colour(valence: float) -> tuple:
    """RGB between NEGATIVE (-1), NEUTRAL (0) and POSITIVE (+1); NEUTRAL for NaN."""
    if not math.isfinite(valence):
        return NEUTRAL_RGB
    v = max(-1.0, min(1.0, valence))
    end = POSITIVE_RGB if v >= 0 else NEGATIVE_RGB
    return tuple(int(round(n + abs(v) * (e - n))) for n, e in zip(NEUTRAL_RGB, end))


def box_label(face: FaceBox) -> str:
    def num(value):
        return 'n/a' if not math.isfinite(value) else f'{value:+.2f}'
    return f'{face.label} v {num(face.valence)} a {num(face.arousal)}'.strip()


def draw_face_boxes(rgb: np.ndarray, faces: Sequence[FaceBox]) -> np.ndarray:
    """A copy of ``rgb`` (H, W, 3 uint8) with every face's box and label drawn on it."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f'expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}')
    out = rgb.copy()
    height, width = out.shape[:2]
    for face in faces:
        x0, y0 = max(0, int(face.x)), max(0, int(face.y))
        x1, y1 = min(width - 1, int(face.x + face.width) - 1), min(height - 1, int(face.y + face.height) - 1)
        if x1 <= x0 or y1 <= y0:
            continue  # empty or outside the image
        colour = STALE_BOX_RGB if face.stale else valence_colour(face.valence)
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, BOX_THICKNESS_PX)
        text = box_label(face)
        (text_w, text_h), baseline = cv2.getTextSize(text, FONT, FONT_SCALE, 1)
        strip_h = text_h + baseline + 4
        top = y0 - strip_h if y0 - strip_h >= 0 else y0 + BOX_THICKNESS_PX
        cv2.rectangle(out, (x0, top), (min(width - 1, x0 + text_w + 4), top + strip_h), LABEL_BACKGROUND_RGB,
                      cv2.FILLED)
        cv2.putText(out, text, (x0 + 2, top + text_h + 2), FONT, FONT_SCALE, LABEL_RGB, 1, cv2.LINE_AA)
    return out
