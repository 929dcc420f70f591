"""Camera frames with real faces for the video benchmarks and tests.

The faces are crops of a real photograph (scikit-image's ``astronaut``, public domain), so real
detectors (MTCNN, Haar) find them. A frame is a grey canvas with one or more heads pasted at given
places; the second head of a pair is mirrored so the two faces look different to a follower.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# The astronaut's head (rows, columns) in the 512x512 photograph, with some hair and neck.
HEAD_ROWS = (20, 230)
HEAD_COLUMNS = (140, 320)
CANVAS_GREY = 90


def astronaut_head(height: int | None = None, mirror: bool = False) -> np.ndarray:
    """The head crop (RGB uint8), resized to ``height`` rows (aspect kept) and mirrored if asked."""
    import cv2
    from skimage import data

    head = data.astronaut()[HEAD_ROWS[0]:HEAD_ROWS[1], HEAD_COLUMNS[0]:HEAD_COLUMNS[1]]
    if height is not None and height != head.shape[0]:
        width = round(head.shape[1] * height / head.shape[0])
        head = cv2.resize(head, (width, height), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(head[:, ::-1] if mirror else head)


def face_canvas(width: int = 640, height: int = 480, heads: Sequence = ((320, 240),),
                head_height: int = 210) -> np.ndarray:
    """A (height, width, 3) frame with a head centred at each (x, y) of ``heads``.

    Heads after the first are mirrored. A head may reach past the border (it is clipped).
    """
    canvas = np.full((height, width, 3), CANVAS_GREY, np.uint8)
    for index, (cx, cy) in enumerate(heads):
        head = astronaut_head(head_height, mirror=index % 2 == 1)
        h, w = head.shape[:2]
        top, left = int(round(cy - h / 2)), int(round(cx - w / 2))
        y1, x1 = max(top, 0), max(left, 0)
        y2, x2 = min(top + h, height), min(left + w, width)
        if y2 > y1 and x2 > x1:
            canvas[y1:y2, x1:x2] = head[y1 - top:y2 - top, x1 - left:x2 - left]
    return canvas


def moving_faces(frames: int, width: int = 640, height: int = 480, faces: int = 1,
                 step_px: float = 3.0, head_height: int = 210) -> list:
    """``frames`` frames of ``faces`` heads side by side, drifting ``step_px`` per frame and back.

    The drift (a slow sway, as a person in front of a robot) is what a follower must keep up with.
    """
    xs = [width * (i + 1) / (faces + 1) for i in range(faces)]
    period = 20
    out = []
    for k in range(frames):
        phase = k % period
        offset = step_px * (phase if phase < period / 2 else period - phase)
        out.append(face_canvas(width, height, [(x + (offset if i % 2 == 0 else -offset), height / 2)
                                               for i, x in enumerate(xs)], head_height))
    return out
