"""Stable ids for the faces of one camera: associate each frame's face boxes with live tracks.

Pure Python: boxes in, ids out; no image access, no ROS. The video pipeline
(:mod:`affective_trm_ros.core.face_pipeline`) feeds it detections and, between detections, the
boxes a cheap follower found; the video node turns the tracks into one stream per face.

Association, per update at time ``t`` (seconds on the camera's clock):

1. Every live track predicts its box at ``t`` from its last box and a smoothed centre velocity.
2. Boxes and predictions are paired greedily by the highest intersection-over-union above
   ``iou_threshold``.
3. Tracks still unpaired (e.g. a face that moved while hidden) are paired with the nearest
   remaining box whose centre lies within ``reacquire_distance`` face sizes of the prediction and
   whose size is within a factor of two.
4. Boxes left over start new tracks, largest first, while fewer than ``max_faces`` faces are
   visible; faces that appear together get ids from left to right. Ids are never reused.

A track that is not seen is kept (``visible`` false) until ``timeout_s`` has passed since it was
last seen, then retired, so an id survives a short occlusion or a missed detection. When a new
face needs a slot and ``max_faces`` tracks are live, the longest-unseen lost track is retired
first. Time going backwards (a bag loop) retires every track.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

Box = tuple   # (x1, y1, x2, y2) in pixels, x2/y2 exclusive

DEFAULT_IOU_THRESHOLD = 0.3       # below this overlap a box is not the same face as a prediction
DEFAULT_REACQUIRE_DISTANCE = 1.0  # lost track regained within this many face sizes of its prediction
VELOCITY_SMOOTHING = 0.5          # weight of the newest centre-velocity estimate
MAX_PREDICTION_S = 0.5            # predictions further ahead than this extrapolate noise
MAX_SIZE_RATIO = 2.0              # a box more than twice as large/small is another face


def box_area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when they do not overlap)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / (box_area(a) + box_area(b) - inter)


def _centre(box: Box) -> tuple:
    return (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0


def _size(box: Box) -> float:
    return math.sqrt(max(box_area(box), 1e-9))


def _check_box(box: Sequence) -> Box:
    if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
        raise ValueError(f'a face box is (x1, y1, x2, y2) of finite numbers, got {box!r}')
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f'a face box needs x2 > x1 and y2 > y1, got {box!r}')
    return (x1, y1, x2, y2)


@dataclass
class Track:
    """One face: its id, last box, when it was first and last seen, and its centre velocity (px/s)."""

    track_id: int
    box: Box
    first_seen: float
    last_seen: float
    visible: bool = True
    velocity: tuple = (0.0, 0.0)
    hits: int = 1

    def predict(self, t: float) -> Box:
        """The box moved along the smoothed velocity to time ``t`` (at most MAX_PREDICTION_S ahead)."""
        dt = min(max(t - self.last_seen, 0.0), MAX_PREDICTION_S)
        dx, dy = self.velocity[0] * dt, self.velocity[1] * dt
        return (self.box[0] + dx, self.box[1] + dy, self.box[2] + dx, self.box[3] + dy)

    def observe(self, box: Box, t: float) -> None:
        dt = t - self.last_seen
        if dt > 0:
            (cx0, cy0), (cx1, cy1) = _centre(self.box), _centre(box)
            a = VELOCITY_SMOOTHING
            self.velocity = ((1 - a) * self.velocity[0] + a * (cx1 - cx0) / dt,
                             (1 - a) * self.velocity[1] + a * (cy1 - cy0) / dt)
        self.box = box
        self.last_seen = t
        self.visible = True
        self.hits += 1


@dataclass
class TrackerUpdate:
    """What one update did: the tracks seen now, the ones lost (kept), the ids started and retired."""

    visible: list = field(default_factory=list)
    lost: list = field(default_factory=list)
    started: list = field(default_factory=list)
    retired: list = field(default_factory=list)


class FaceTracker:
    """Assigns stable integer ids to face boxes over time; see the module docstring."""

    def __init__(self, max_faces: int = 1, timeout_s: float = 1.0,
                 iou_threshold: float = DEFAULT_IOU_THRESHOLD,
                 reacquire_distance: float = DEFAULT_REACQUIRE_DISTANCE) -> None:
        if max_faces < 1:
            raise ValueError(f'max_faces must be >= 1, got {max_faces}')
        if not timeout_s >= 0:
            raise ValueError(f'timeout_s must be >= 0, got {timeout_s}')
        if not 0 < iou_threshold <= 1:
            raise ValueError(f'iou_threshold must be in (0, 1], got {iou_threshold}')
        if not reacquire_distance >= 0:
            raise ValueError(f'reacquire_distance must be >= 0, got {reacquire_distance}')
        self.max_faces = int(max_faces)
        self.timeout_s = float(timeout_s)
        self.iou_threshold = float(iou_threshold)
        self.reacquire_distance = float(reacquire_distance)
        self._tracks: dict = {}      # id -> Track, in creation order
        self._next_id = 0
        self._last_t: Optional[float] = None

    @property
    def tracks(self) -> list:
        """Live tracks (visible or lost but not yet retired), oldest id first."""
        return list(self._tracks.values())

    def track(self, track_id: int) -> Optional[Track]:
        return self._tracks.get(track_id)

    def reset(self) -> list:
        """Retire every track; returns their ids. New tracks get fresh ids."""
        retired = list(self._tracks)
        self._tracks.clear()
        self._last_t = None
        return retired

    # ------------------------------------------------------------------ updates

    def update(self, boxes: Sequence, t: float) -> TrackerUpdate:
        """Associate the face ``boxes`` detected at time ``t`` with the tracks (a detection round)."""
        result = self._begin(t)
        boxes = [_check_box(b) for b in boxes]
        tracks = list(self._tracks.values())
        predicted = {track.track_id: track.predict(t) for track in tracks}
        pairs = self._pair_by_overlap(tracks, boxes, predicted)
        pairs.update(self._pair_by_distance([tr for tr in tracks if tr.track_id not in pairs],
                                            [i for i in range(len(boxes)) if i not in pairs.values()],
                                            boxes, predicted))
        for track in tracks:
            if track.track_id in pairs:
                track.observe(boxes[pairs[track.track_id]], t)
            else:
                track.visible = False
        leftovers = [i for i in range(len(boxes)) if i not in pairs.values()]
        self._start_tracks([boxes[i] for i in leftovers], t, result)
        return self._finish(t, result)

    def follow(self, observed: dict, t: float) -> TrackerUpdate:
        """Between detections: ``observed`` maps track id -> the box a follower found at ``t``.

        Tracks not in ``observed`` count as not seen at ``t``. Unknown ids raise KeyError.
        """
        result = self._begin(t)
        for track_id in observed:
            if track_id not in self._tracks:
                raise KeyError(f'no live face track {track_id}')
        for track in self._tracks.values():
            if track.track_id in observed:
                track.observe(_check_box(observed[track.track_id]), t)
            else:
                track.visible = False
        return self._finish(t, result)

    # ------------------------------------------------------------------ helpers

    def _begin(self, t: float) -> TrackerUpdate:
        if not math.isfinite(t):
            raise ValueError(f'track time must be finite, got {t}')
        result = TrackerUpdate()
        if self._last_t is not None and t < self._last_t:
            result.retired.extend(self.reset())   # time went backwards: a new recording
        self._last_t = t
        return result

    def _finish(self, t: float, result: TrackerUpdate) -> TrackerUpdate:
        for track in list(self._tracks.values()):
            if not track.visible and t - track.last_seen > self.timeout_s:
                del self._tracks[track.track_id]
                result.retired.append(track.track_id)
        result.visible = [tr for tr in self._tracks.values() if tr.visible]
        result.lost = [tr for tr in self._tracks.values() if not tr.visible]
        return result

    def _pair_by_overlap(self, tracks: list, boxes: list, predicted: dict) -> dict:
        candidates = sorted(((iou(predicted[tr.track_id], box), tr.track_id, i)
                             for tr in tracks for i, box in enumerate(boxes)), reverse=True)
        pairs: dict = {}
        for overlap, track_id, index in candidates:
            if overlap < self.iou_threshold:
                break
            if track_id not in pairs and index not in pairs.values():
                pairs[track_id] = index
        return pairs

    def _pair_by_distance(self, tracks: list, indices: list, boxes: list, predicted: dict) -> dict:
        candidates = []
        for track in tracks:
            guess = predicted[track.track_id]
            (gx, gy), size = _centre(guess), _size(guess)
            for i in indices:
                (bx, by), other = _centre(boxes[i]), _size(boxes[i])
                distance = math.hypot(bx - gx, by - gy) / size
                similar_size = 1 / MAX_SIZE_RATIO <= other / size <= MAX_SIZE_RATIO
                if distance <= self.reacquire_distance and similar_size:
                    candidates.append((distance, track.track_id, i))
        pairs: dict = {}
        for _, track_id, index in sorted(candidates):
            if track_id not in pairs and index not in pairs.values():
                pairs[track_id] = index
        return pairs

    def _start_tracks(self, boxes: list, t: float, result: TrackerUpdate) -> None:
        free = self.max_faces - sum(1 for tr in self._tracks.values() if tr.visible)
        chosen = sorted(boxes, key=box_area, reverse=True)[:max(free, 0)]
        for box in sorted(chosen, key=lambda b: (b[0], b[1])):   # left to right
            lost = [tr for tr in self._tracks.values() if not tr.visible]
            if len(self._tracks) >= self.max_faces and lost:
                oldest = min(lost, key=lambda tr: tr.last_seen)
                del self._tracks[oldest.track_id]
                result.retired.append(oldest.track_id)
            track = Track(self._next_id, box, first_seen=t, last_seen=t)
            self._next_id += 1
            self._tracks[track.track_id] = track
            result.started.append(track.track_id)
