"""Draw the current affect estimate onto a camera image (pure NumPy/OpenCV, no rclpy).

The panel sits in the top-right corner: the valence-arousal plane (valence to the right, arousal
up, the unit circle), the recent trail, the current point (brighter = more confident), the
numbers, and one chip per modality that is lit when it contributed to the estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from affective_trm_ros.core.modalities import MODALITY_BITS

# Chip labels in display order (the order people read: face, voice, words).
CHIPS = (('video', 'VID'), ('audio', 'AUD'), ('text', 'TXT'))

# Colours (RGB).
PANEL_RGB = (20, 20, 28)
AXIS_RGB = (110, 110, 130)
LABEL_RGB = (200, 200, 210)
POINT_RGB = (255, 200, 0)          # confident estimate
UNSURE_RGB = (120, 110, 90)        # confidence 0
TRAIL_RGB = (80, 170, 255)
CHIP_ON_RGB = (40, 190, 90)
CHIP_OFF_RGB = (70, 70, 80)
STALE_RGB = (150, 150, 150)

#: Panel side never smaller than this (pixels) unless the image itself is smaller: text stays legible.
MIN_PANEL_PX = 120
#: Nor larger than this: on big frames the face matters more than the plot.
MAX_PANEL_PX = 420
#: Height of the text strip (numbers, modality chips) under the plane, relative to the plane's side.
STRIP_FRACTION = 0.34
#: Opacity of the panel background over the image.
PANEL_OPACITY = 0.8


@dataclass(frozen=True)
class Estimate:
    """What the panel shows: one ValenceArousal, reduced to plain numbers."""

    valence: float
    arousal: float
    confidence: float
    modalities: int  # ValenceArousal.modalities bits


@dataclass(frozen=True)
class PanelLayout:
    """Where the panel and its parts are, in image pixels."""

    x0: int
    y0: int
    side: int
    center: tuple
    radius: float
    text_y: int
    chip_y: int
    height: int


def panel_layout(image_shape: Sequence[int], panel_fraction: float = 0.35, margin: int = 8) -> PanelLayout:
    """Panel geometry for an image of ``image_shape`` (H, W[, C])."""
    height, width = int(image_shape[0]), int(image_shape[1])
    side = max(MIN_PANEL_PX, min(MAX_PANEL_PX, int(round(panel_fraction * min(height, width)))))
    # Small images: the panel (plane + text strip) must still fit inside the frame.
    side = max(16, min(side, width - 2 * margin, int((height - 2 * margin) / (1 + STRIP_FRACTION))))
    strip = int(round(side * STRIP_FRACTION))
    x0 = max(0, width - side - margin)
    y0 = min(margin, max(0, height - side - strip))
    radius = side * 0.42
    center = (x0 + side / 2.0, y0 + side / 2.0)
    return PanelLayout(x0=x0, y0=y0, side=side, center=center, radius=radius,
                       text_y=y0 + side + int(strip * 0.38), chip_y=y0 + side + int(strip * 0.55),
                       height=side + strip)


def va_to_pixel(valence: float, arousal: float, center: Sequence[float], radius: float) -> tuple:
    """(valence, arousal) -> integer pixel (x, y): valence right, arousal up, both clipped to [-1, 1]."""
    v = float(np.clip(valence, -1.0, 1.0))
    a = float(np.clip(arousal, -1.0, 1.0))
    return int(round(center[0] + v * radius)), int(round(center[1] - a * radius))


def draw_va_overlay(rgb: np.ndarray, estimate: Optional[Estimate], trail: Sequence[tuple] = (), *,
                    stale: bool = False, label: str = '', panel_fraction: float = 0.35) -> np.ndarray:
    """Return a copy of ``rgb`` (H, W, 3) uint8 with the valence-arousal panel drawn on it.

    ``estimate`` None (or non-finite) shows "no estimate"; ``trail`` is the recent (valence,
    arousal) points, oldest first; ``stale`` greys the point out (the estimate is old);
    ``label`` (e.g. the stream id) is written in the panel's corner.
    """
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
        raise ValueError(f'expected an (H, W, 3) uint8 RGB image, got '
                         f'{getattr(rgb, "dtype", type(rgb).__name__)} {getattr(rgb, "shape", "")}')
    out = np.ascontiguousarray(rgb).copy()
    layout = panel_layout(out.shape, panel_fraction)
    _shade(out, layout)
    scale = layout.side / 260.0
    thin = max(1, int(round(scale)))
    cx, cy = (int(round(c)) for c in layout.center)
    r = int(round(layout.radius))
    cv2.circle(out, (cx, cy), r, AXIS_RGB, thin, cv2.LINE_AA)
    cv2.line(out, (cx - r, cy), (cx + r, cy), AXIS_RGB, thin, cv2.LINE_AA)
    cv2.line(out, (cx, cy - r), (cx, cy + r), AXIS_RGB, thin, cv2.LINE_AA)
    font, small = cv2.FONT_HERSHEY_SIMPLEX, 0.38 * scale
    _text(out, 'V+', (cx + r - int(22 * scale), cy - int(5 * scale)), small, LABEL_RGB)
    _text(out, 'A+', (cx + int(5 * scale), cy - r + int(12 * scale)), small, LABEL_RGB)
    if label:
        _text(out, label[:18], (layout.x0 + int(6 * scale), layout.y0 + int(16 * scale)), small, LABEL_RGB)

    points = [va_to_pixel(v, a, layout.center, layout.radius) for v, a in trail
              if math.isfinite(v) and math.isfinite(a)]
    for index in range(1, len(points)):
        fade = index / max(1, len(points) - 1)          # older segments fainter
        color = tuple(int(c * (0.25 + 0.75 * fade)) for c in TRAIL_RGB)
        cv2.line(out, points[index - 1], points[index], color, thin, cv2.LINE_AA)

    valid = estimate is not None and all(math.isfinite(x) for x in
                                         (estimate.valence, estimate.arousal, estimate.confidence))
    if valid:
        point = va_to_pixel(estimate.valence, estimate.arousal, layout.center, layout.radius)
        dot = max(3, int(round(7 * scale)))
        if stale:
            cv2.circle(out, point, dot, STALE_RGB, thin, cv2.LINE_AA)
        else:
            confidence = float(np.clip(estimate.confidence, 0.0, 1.0))
            color = tuple(int(u + (p - u) * confidence) for u, p in zip(UNSURE_RGB, POINT_RGB))
            cv2.circle(out, point, dot, color, -1, cv2.LINE_AA)
        numbers = (f'V {estimate.valence:+.2f}  A {estimate.arousal:+.2f}  '
                   f'c {float(np.clip(estimate.confidence, 0, 1)):.2f}')
        bits = int(estimate.modalities)
    else:
        numbers, bits = 'no estimate', 0
    if stale and valid:
        numbers += ' (old)'
    _text(out, numbers, (layout.x0 + int(6 * scale), layout.text_y), 0.42 * scale,
          STALE_RGB if stale or not valid else LABEL_RGB)

    for modality, text, (x0, y0, x1, y1) in _chip_boxes(layout):
        on = bool(bits & MODALITY_BITS[modality]) and not stale
        cv2.rectangle(out, (x0, y0), (x1, y1), CHIP_ON_RGB if on else CHIP_OFF_RGB, -1)
        (tw, th), _ = cv2.getTextSize(text, font, 0.38 * scale, 1)
        _text(out, text, ((x0 + x1 - tw) // 2, (y0 + y1 + th) // 2), 0.38 * scale,
              (255, 255, 255) if on else (150, 150, 160))
    return out


def chip_centers(image_shape: Sequence[int], panel_fraction: float = 0.35) -> dict:
    """modality -> (x, y) pixel inside its chip, left of the label (for tests and annotations)."""
    layout = panel_layout(image_shape, panel_fraction)
    return {modality: (x0 + 2, (y0 + y1) // 2) for modality, _, (x0, y0, x1, y1) in _chip_boxes(layout)}


def _chip_boxes(layout: PanelLayout) -> list:
    """[(modality, label, (x0, y0, x1, y1))] of the modality chips under the numbers."""
    scale = layout.side / 260.0
    pad = int(6 * scale)
    width = (layout.side - 2 * pad) // len(CHIPS)
    bottom = layout.y0 + layout.height - max(2, pad)
    top = min(layout.chip_y, bottom - 8)
    left = layout.x0 + pad
    return [(modality, label, (left + i * width + 2, top, left + (i + 1) * width - 3, bottom))
            for i, (modality, label) in enumerate(CHIPS)]


def _shade(out: np.ndarray, layout: PanelLayout) -> None:
    """Darken the panel area (PANEL_OPACITY of the panel colour) so the plot reads on any background."""
    y1 = min(out.shape[0], layout.y0 + layout.height)
    x1 = min(out.shape[1], layout.x0 + layout.side)
    region = out[layout.y0:y1, layout.x0:x1].astype(np.float32)
    region = (1 - PANEL_OPACITY) * region + PANEL_OPACITY * np.asarray(PANEL_RGB, dtype=np.float32)
    out[layout.y0:y1, layout.x0:x1] = region.astype(np.uint8)


def _text(out: np.ndarray, text: str, origin: tuple, scale: float, color: tuple) -> None:
    cv2.putText(out, text, (int(origin[0]), int(origin[1])), cv2.FONT_HERSHEY_SIMPLEX, max(0.25, scale),
                color, 1, cv2.LINE_AA)
