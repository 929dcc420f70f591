"""Seeded sample sessions: rosbag2 (MCAP) recordings of a scripted affect trajectory.

Each session holds, at realistic rates and stamps:

* ``/image_raw`` (sensor_msgs/Image rgb8, 640x480, ``fps``): the face photograph that scikit-image
  ships (``skimage.data.astronaut()``), its photographed smile painted out, with an expression
  drawn and warped from the script so that a real expression model can read it — mouth corners
  up or down and teeth with valence, mouth opening, eye opening and raised brows with arousal,
  inner brows lowered (anger) or raised (sadness) with negative valence — plus per-session scale,
  mirroring and tint, head sway, lighting drift, partial occlusions (a hand over the mouth or
  the eyes) and stretches where the face leaves the frame. With ``people`` > 1, that many faces
  stand side by side, left to right, each with its own script;
* ``/audio`` (audio_common_msgs/AudioDataStamped, 16 kHz S16LE mono, 1024-sample chunks) and a
  latched ``/audio_info``: speech synthesised by ``espeak-ng`` in the session's voice and speaking
  style, whose rate, pitch and loudness follow arousal, with silences between utterances and a
  faint room tone (the speaker is the first face);
* ``/speech`` (std_msgs/String): each spoken sentence, published when the utterance ends (as a
  speech recogniser would), chosen from the session's sentence set (training or held-out: no
  sentence in both) in the quadrant of the speaker's affect;
* ``/affect/ground_truth`` (affective_msgs/ValenceArousal, one per video frame and person,
  ``stream_id`` ``default`` for one person, else ``face_0``, ``face_1``... left to right): the
  script, a smooth trajectory that visits all four quadrants of the valence-arousal plane.

Only the rendered image, the audio and the words carry the labels. The same seed gives
byte-identical bags (espeak-ng output is deterministic for fixed parameters). Everything is drawn
from one ``numpy`` generator seeded by the session seed.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
from scipy.signal import resample_poly

from affective_trm_ros.offline.io.bags import (
    AUDIO_DATA_STAMPED,
    AUDIO_INFO,
    IMAGE,
    STRING,
    VALENCE_AROUSAL,
    BagWriter,
    affective_typestore,
    make_header,
)

GENERATOR_VERSION = 2  # bump when the output of the same seed changes
CUSTOM_DATA_KEY = 'affective_trm.generator'  # metadata.yaml custom_data entry: how the bag was made

# Default topic names, as `ros2 bag record` stores them (absolute).
IMAGE_TOPIC = '/image_raw'
AUDIO_TOPIC = '/audio'
AUDIO_INFO_TOPIC = '/audio_info'
SPEECH_TOPIC = '/speech'
GROUND_TRUTH_TOPIC = '/affect/ground_truth'
CAMERA_FRAME = 'camera_optical_frame'
MICROPHONE_FRAME = 'microphone'

# Stamps start at 2025-01-01T00:00:00Z plus one hour per seed: realistic, distinct, reproducible.
EPOCH_NS = 1_735_689_600 * 1_000_000_000

# --- the photograph: skimage.data.astronaut() is 512x512; these are its pixel coordinates ---
FACE_CROP = (130, 0, 320, 232)        # x0, y0, x1, y1 of the head-and-shoulders crop
HEAD_ELLIPSE = ((225, 114), (82, 116))  # centre and semi-axes of the visible head (crop alpha)
MOUTH = (225.0, 146.5, 17.0, 11.0)   # centre x, y, half-width, painted-out half-height
EYES = ((201.0, 101.0), (246.0, 102.0))
EYE_RADII = (13.0, 7.0)
BROWS_Y = 88.0
FACE_SCALE = 1.45                     # photo pixels -> camera pixels (head about 260 px wide)

# --- how strongly the drawn expression follows affect (photo pixels / factors); strong enough
# that the FER2013 mini-Xception reads happy / angry / sad-fear / surprise from it ---
MOUTH_CORNER_PX = 8.0     # corner lift at valence +1 (drop at -1)
MOUTH_WIDEN_PX = 5.0      # extra half-width of a smile at valence +1
MOUTH_OPEN_PX = 10.0      # opening at arousal +1 (closed, pressed lips when valence is negative)
SMILE_OPEN_PX = 4.0       # a smile shows teeth
EYE_OPEN = 0.6            # vertical eye stretch per unit arousal (squint below 0)
ANGER_SQUINT = 0.25       # eyes narrow with negative valence
BROW_RAISE_PX = 5.0       # brow lift at arousal +1 (non-negative valence)
INNER_BROW_PX = 9.0       # inner brow shift: down with anger, up with sadness
HEAD_DROOP_PX = 14.0      # head lowers by this at valence -1 (camera pixels)
LIP_RGB = (160, 85, 85)
MOUTH_RGB = (70, 25, 30)
TEETH_RGB = (235, 230, 220)

# --- speech ---
ESPEAK = 'espeak-ng'
ESPEAK_VOICE = 'en-us'
# espeak-ng voices (language + variant). Training sessions use the first set, validation sessions
# the second and held-out sessions the third: model selection and the final score both hear
# voices that training never heard, and never each other's.
TRAINING_VOICES = ('en-us', 'en-gb+f2', 'en-029+m3', 'en-us-nyc+f3', 'en-gb-x-rp+m5')
VALIDATION_VOICES = ('en-gb-x-gbcwmd+f1', 'en-gb-x-gbcwmd+m4')
HELDOUT_VOICES = ('en-gb-scotland+f4', 'en-gb-x-gbclan+m2')
CHUNK_SAMPLES = 1024      # audio message size, as audio_capture publishes by default
ASR_LATENCY_S = 0.3       # a recogniser publishes the sentence shortly after it ends
ROOM_TONE_RMS = 0.0003    # faint room noise (-70 dBFS): not digital zero, yet below silence gates
SENTENCES = {
    # (valence sign, arousal sign) -> sentences whose sentiment matches the quadrant
    (1, 1): ["This is amazing, I can't believe we actually won!",
             'Wow, that is fantastic news, I am thrilled!',
             'Yes! We did it, this is the best day ever!',
             'I love this, it is so exciting!',
             'That was brilliant, let us do it again right now!',
             'What a wonderful surprise, I am so happy!'],
    (1, -1): ['It is a calm evening and I feel content.',
              'That was a lovely, relaxing walk.',
              'I am comfortable and at peace here.',
              'Thank you, this tea is warm and pleasant.',
              'Everything is fine, I feel rested and happy.',
              'What a gentle, quiet and pleasant afternoon.'],
    (-1, 1): ['Stop it right now, this is outrageous!',
              'I am furious, you broke it again!',
              'Watch out, something is terribly wrong!',
              'This is a disaster, I am so angry!',
              'Get away from me, I hate this!',
              'No, no, no, this is awful and I am scared!'],
    (-1, -1): ['I feel tired and a little sad today.',
               'Nothing seems to matter much anymore.',
               'I miss them, and I feel lonely.',
               'It is grey outside and I am bored.',
               'I am disappointed, it did not work out.',
               'I just want to sleep, I feel so down.'],
}
# Held-out sentences: none of them appears in SENTENCES.
HELDOUT_SENTENCES = {
    (1, 1): ['Incredible, we got the tickets, I am over the moon!',
             'Hooray, the whole team made it, this rocks!',
             'I just heard the best news of my life!',
             'Come on, let us celebrate, this is awesome!'],
    (1, -1): ['The garden is peaceful and I feel relaxed.',
              'I am cosy on the sofa with a good book.',
              'It was a soft, easy and satisfying day.',
              'I feel calm, warm and grateful tonight.'],
    (-1, 1): ['How dare you, this is completely unacceptable!',
              'Help, the kitchen is on fire, hurry!',
              'I am livid, they lied to us again!',
              'Leave me alone, I cannot stand this!'],
    (-1, -1): ['I am exhausted and nothing went right.',
               'It feels empty here since they left.',
               'I lost again, and I feel hopeless.',
               'Another dull, gloomy and lonely evening.'],
}
# Validation sentences: in neither of the sets above.
VALIDATION_SENTENCES = {
    (1, 1): ['Fantastic, the results are in and we are the winners!',
             'I am bursting with joy, what a party!',
             'Brilliant, you made it, I am so excited to see you!',
             'This concert is incredible, I love every second!'],
    (1, -1): ['A quiet morning with coffee, how nice.',
              'I feel safe and relaxed by the fire.',
              'The lake is still and I am at ease.',
              'We had a slow, pleasant lunch together.'],
    (-1, 1): ['This is ridiculous, I have had enough!',
              'Run, the dog is loose and it is coming!',
              'You ruined everything, I am so mad!',
              'Make it stop, this noise is unbearable!'],
    (-1, -1): ['I feel heavy and sad this morning.',
               'There is nothing left to look forward to.',
               'The rain will not stop and I feel low.',
               'I failed the test and I feel miserable.'],
}
SENTENCE_SETS = {'train': SENTENCES, 'val': VALIDATION_SENTENCES, 'heldout': HELDOUT_SENTENCES}


class SpeechSynthesisError(RuntimeError):
    """espeak-ng is missing or failed."""


@dataclass
class SessionConfig:
    """What one generated session looks like. Defaults: three minutes at camera/microphone rates."""

    duration_s: float = 180.0
    seed: int = 0
    fps: float = 30.0
    width: int = 640
    height: int = 480
    sample_rate: int = 16000
    chunk_samples: int = CHUNK_SAMPLES
    segment_s: float = 25.0          # about one quadrant visit per segment
    face_absent_fraction: float = 0.06  # share of the time the face is out of the frame
    occlusion_fraction: float = 0.0  # share of the time a hand covers the mouth or the eyes
    speech_fraction: float = 0.55    # share of the time someone speaks
    voice: str = ESPEAK_VOICE        # espeak-ng voice (e.g. 'en-gb+f2')
    sentence_set: str = 'train'      # 'train' | 'val' | 'heldout'
    people: int = 1                  # faces side by side, each with its own script
    variety: bool = False            # per-session scale, mirroring, tint and speaking style
    storage: str = 'mcap'

    def __post_init__(self) -> None:
        for name in ('duration_s', 'fps', 'segment_s', 'face_absent_fraction', 'speech_fraction',
                     'occlusion_fraction'):
            setattr(self, name, float(getattr(self, name)))  # 30 and 30.0 describe the same session
        if self.duration_s < 4.0:
            raise ValueError(f'duration_s must be at least 4 s (got {self.duration_s})')
        if not 1.0 <= self.fps <= 120.0:
            raise ValueError(f'fps must be in [1, 120] (got {self.fps})')
        if self.width < 64 or self.height < 64:
            raise ValueError(f'frame size must be at least 64x64 (got {self.width}x{self.height})')
        if not 0.0 <= self.face_absent_fraction < 0.5:
            raise ValueError('face_absent_fraction must be in [0, 0.5)')
        if not 0.0 <= self.occlusion_fraction < 0.5:
            raise ValueError('occlusion_fraction must be in [0, 0.5)')
        if not 0.0 < self.speech_fraction < 1.0:
            raise ValueError('speech_fraction must be in (0, 1)')
        if self.sentence_set not in SENTENCE_SETS:
            raise ValueError(f'sentence_set must be one of {sorted(SENTENCE_SETS)}, '
                             f'got {self.sentence_set!r}')
        if not 1 <= int(self.people) <= 4:
            raise ValueError(f'people must be in [1, 4] (got {self.people})')
        self.people = int(self.people)
        if not self.voice or any(c.isspace() for c in self.voice):
            raise ValueError(f'voice must be an espeak-ng voice name, got {self.voice!r}')


def stream_ids(people: int) -> list:
    """Ground-truth stream ids, left to right: 'default' for one person, else face_0, face_1, ..."""
    return ['default'] if people == 1 else [f'face_{k}' for k in range(people)]


@dataclass
class SessionSummary:
    path: str
    config: dict
    frames: int
    audio_chunks: int
    utterances: int
    face_absent_frames: int
    quadrant_share: dict = field(default_factory=dict)  # 'v+a+' ... -> share of frames


# ---------------------------------------------------------------- the affect script

def _min_jerk(s: np.ndarray) -> np.ndarray:
    """Smooth 0->1 ramp with zero velocity and acceleration at both ends."""
    s = np.clip(s, 0.0, 1.0)
    return s ** 3 * (10 - 15 * s + 6 * s * s)


def affect_trajectory(times: np.ndarray, duration_s: float, rng: np.random.Generator,
                      segment_s: float = 25.0) -> np.ndarray:
    """Valence/arousal (N, 2) at ``times``: smooth, bounded in [-0.95, 0.95], all four quadrants.

    The script is a sequence of targets, one per segment, cycling through the quadrants in random
    orders (the first four segments always cover all four); each segment moves to its target with
    a minimum-jerk transition and then dwells, with a slow, small wander on top.
    """
    n_segments = max(4, int(round(duration_s / segment_s)))
    quadrants = [(1, 1), (1, -1), (-1, -1), (-1, 1)]
    order = []
    while len(order) < n_segments:
        order.extend(quadrants[i] for i in rng.permutation(4))
    targets = [np.zeros(2)]
    for sv, sa in order[:n_segments]:
        radius = rng.uniform(0.5, 0.9)
        angle = rng.uniform(0.45, math.pi / 2 - 0.45)  # well inside the quadrant on both axes
        targets.append(np.array([sv * radius * math.cos(angle), sa * radius * math.sin(angle)]))
    length = duration_s / n_segments
    seg = np.minimum((times / length).astype(int), n_segments - 1)
    within = times / length - seg
    ramp = _min_jerk(within / 0.45)  # move during the first 45 % of the segment, then dwell
    start = np.array(targets)[seg]
    end = np.array(targets)[seg + 1]
    va = start + (end - start) * ramp[:, None]
    # slow wander: a few low-frequency sinusoids per dimension (periods 8-30 s)
    for dim in range(2):
        for _ in range(3):
            period = rng.uniform(8.0, 30.0)
            va[:, dim] += rng.uniform(0.02, 0.05) * np.sin(2 * math.pi * times / period
                                                           + rng.uniform(0, 2 * math.pi))
    return np.clip(va, -0.95, 0.95)


def _occlusion_track(times: np.ndarray, duration_s: float, fraction: float,
                     rng: np.random.Generator) -> np.ndarray:
    """(N,) int: 0 visible, 1 a hand over the mouth, 2 a hand over the eyes; stretches of ~1.5 s."""
    track = np.zeros(times.shape[0], np.int64)
    if fraction <= 0:
        return track
    count = max(1, int(round(duration_s * fraction / 1.5)))
    for _ in range(count):
        start = rng.uniform(0.0, max(0.0, duration_s - 1.5))
        track[(times >= start) & (times < start + 1.5)] = int(rng.integers(1, 3))
    return track


def _absence_offsets(times: np.ndarray, duration_s: float, fraction: float,
                     rng: np.random.Generator) -> np.ndarray:
    """Horizontal head offset in frame widths (0 = centred, |x| >= 1 = out of frame) per time."""
    offset = np.zeros_like(times)
    if fraction <= 0:
        return offset
    ramp = 0.6  # seconds to slide out / back in
    absent_s = duration_s * fraction
    count = max(1, int(round(absent_s / 3.0)))  # stretches of about 3 s
    hold = max(0.2, absent_s / count - ramp)
    spacing = duration_s / count
    for k in range(count):
        start = k * spacing + rng.uniform(0.15, 0.85) * max(0.0, spacing - hold - 2 * ramp)
        side = rng.choice([-1.0, 1.0])
        t_in = np.clip((times - start) / ramp, 0, 1)
        t_out = np.clip((times - (start + ramp + hold)) / ramp, 0, 1)
        offset += side * 1.3 * (_min_jerk(t_in) - _min_jerk(t_out))
    return offset


# ---------------------------------------------------------------- video

class FaceAnimator:
    """Renders RGB frames of the photographed face(s) with given affects, poses and occlusions.

    The photo's own smile is painted out once (inpainting); every frame then draws a mouth from
    the affect (corners, width, opening, teeth) and warps eyes and brows, so the expression that a
    face-expression model sees is the scripted one, not the photograph's.
    """

    def __init__(self, width: int, height: int, rng: np.random.Generator) -> None:
        from skimage import data as skdata  # the photograph ships with scikit-image

        self.width, self.height = width, height
        x0, y0, x1, y1 = FACE_CROP
        photo = np.ascontiguousarray(skdata.astronaut()[y0:y1, x0:x1])
        h, w = photo.shape[:2]
        mx, my, mw, mh = MOUTH
        self.mouth_centre = (mx - x0, my - y0)
        hole = np.zeros((h, w), np.uint8)
        centre = (int(round(mx - x0)), int(round(my - y0)))
        cv2.ellipse(hole, centre, (int(mw + 8), int(mh)), 0, 0, 360, 255, -1)
        self.face = cv2.GaussianBlur(cv2.inpaint(photo, hole, 7, cv2.INPAINT_TELEA), (0, 0), 0.6)
        grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        self.grid_x, self.grid_y = grid_x, grid_y
        eye_field = np.zeros_like(grid_x)
        brow_field = np.zeros_like(grid_x)
        inner_field = np.zeros_like(grid_x)
        for side, (ex, ey) in zip((1.0, -1.0), EYES):
            ex, ey = ex - x0, ey - y0
            env = np.exp(-(((grid_x - ex) / (EYE_RADII[0] * 1.3)) ** 2
                           + ((grid_y - ey) / (EYE_RADII[1] * 1.8)) ** 2))
            eye_field += (grid_y - ey) * env
            brow_env = np.exp(-(((grid_x - ex) / 18.0) ** 2 + ((grid_y - (BROWS_Y - y0)) / 7.0) ** 2))
            brow_field += brow_env
            # +1 at the inner end of each brow (towards the nose), -1 at the outer end
            inner_field += brow_env * np.clip(side * (grid_x - ex) / 14.0, -1.0, 1.0)
        self.eye_open = eye_field.astype(np.float32)
        self.brow = brow_field.astype(np.float32)
        self.inner_brow = inner_field.astype(np.float32)
        (cx, cy), (ax, ay) = HEAD_ELLIPSE
        alpha = np.zeros((h, w), np.float32)
        cv2.ellipse(alpha, (int(cx - x0), int(cy - y0)), (int(ax), int(ay)), 0, 0, 360, 1.0, -1)
        self.alpha = cv2.GaussianBlur(alpha, (0, 0), 5.0)
        self.skin = tuple(float(c) for c in photo[int(my - y0) - 22, int(mx - x0) + 20])
        self.background = np.clip(self._background(rng), 0, 255).astype(np.uint8)
        self._levels = np.arange(256, dtype=np.float32)

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """A plain room: graded wall, a door, a shelf and a picture, in seeded colours."""
        h, w = self.height, self.width
        wall = np.array(rng.uniform(150, 210, 3))
        shade = np.linspace(1.08, 0.85, h)[:, None, None]
        image = np.broadcast_to(wall * shade, (h, w, 3)).copy()
        door_x = int(rng.uniform(0.05, 0.2) * w)
        cv2.rectangle(image, (door_x, int(0.15 * h)), (door_x + int(0.18 * w), h),
                      tuple(float(c) for c in rng.uniform(60, 130, 3)), -1)
        shelf_y = int(rng.uniform(0.25, 0.4) * h)
        cv2.rectangle(image, (int(0.65 * w), shelf_y), (w, shelf_y + 10),
                      tuple(float(c) for c in rng.uniform(40, 90, 3)), -1)
        cv2.rectangle(image, (int(0.7 * w), int(0.1 * h)), (int(0.85 * w), int(0.22 * h)),
                      tuple(float(c) for c in rng.uniform(30, 230, 3)), -1)
        return cv2.GaussianBlur(image, (0, 0), 1.5)

    def expression(self, valence: float, arousal: float, occlusion: int = 0) -> np.ndarray:
        """The face crop (h, w, 3) float32 showing the affect; ``occlusion`` 1 = hand over the mouth,
        2 = hand over the eyes."""
        image = self.face.copy()
        valence, arousal = float(valence), float(arousal)
        negative, positive = max(-valence, 0.0), max(valence, 0.0)
        mx, my = self.mouth_centre
        half = MOUTH[2] + MOUTH_WIDEN_PX * positive
        lift = MOUTH_CORNER_PX * valence
        opening = (MOUTH_OPEN_PX * max(arousal, 0.0) * (1.0 - negative)
                   + SMILE_OPEN_PX * positive * float(arousal > -0.3))
        xs = np.linspace(-1.0, 1.0, 41)
        bulge = 1.0 - xs ** 2
        px = mx + half * xs
        upper = my - lift * xs ** 2 - 0.35 * opening * bulge
        lower = my - lift * xs ** 2 + 0.65 * opening * bulge

        def points(ys):  # 2 fractional bits: sub-pixel, anti-aliased drawing
            return np.round(np.stack([px, ys], 1) * 4).astype(np.int32)

        if opening > 1.5:
            cv2.fillPoly(image, [np.concatenate([points(upper), points(lower)[::-1]])], MOUTH_RGB,
                         cv2.LINE_AA, shift=2)
            if positive > 0.2:
                teeth = upper + 0.45 * opening * bulge
                cv2.fillPoly(image, [np.concatenate([points(upper), points(teeth)[::-1]])], TEETH_RGB,
                             cv2.LINE_AA, shift=2)
        cv2.polylines(image, [points(upper)], False, LIP_RGB, 3, cv2.LINE_AA, shift=2)
        cv2.polylines(image, [points(lower + 1.5)], False, LIP_RGB, 4, cv2.LINE_AA, shift=2)
        if occlusion:
            centre = (mx, my + 4) if occlusion == 1 else (mx, (EYES[0][1] + EYES[1][1]) / 2 - FACE_CROP[1])
            cv2.ellipse(image, (int(centre[0]), int(centre[1])), (int(half + 14), 15), -8, 0, 360,
                        tuple(c * 0.92 for c in self.skin), -1, cv2.LINE_AA)
        eye = 1.0 + EYE_OPEN * arousal * (1.0 - negative) - ANGER_SQUINT * negative * abs(arousal)
        inner = -INNER_BROW_PX * negative * arousal  # anger lowers the inner brows, sadness raises them
        raise_ = BROW_RAISE_PX * max(arousal, 0.0) * (1.0 - negative)
        map_y = (self.grid_y + (1.0 / max(eye, 0.3) - 1.0) * self.eye_open + raise_ * self.brow
                 + inner * self.inner_brow)
        return cv2.remap(image.astype(np.float32), self.grid_x, map_y.astype(np.float32), cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)

    def render(self, valence: float, arousal: float, pose: tuple, light: tuple,
               occlusion: int = 0) -> np.ndarray:
        """One frame (height, width, 3) uint8 of one person. ``pose`` = (dx, dy, angle_deg, scale) in
        camera pixels about the frame centre; ``light`` = (gain, red/blue warmth)."""
        return self.render_people([Appearance(valence, arousal, tuple(pose), occlusion)], light)

    def render_people(self, people: list, light: tuple) -> np.ndarray:
        """One frame with every :class:`Appearance` in ``people``, in slots left to right."""
        frame = self.background.copy()
        count = len(people)
        slot_scale = 1.0 if count == 1 else min(1.0, 1.25 / count)
        for index, person in enumerate(people):
            face = self.expression(person.valence, person.arousal, person.occlusion)
            face = face * np.asarray(person.tint, np.float32)
            alpha = self.alpha
            if person.mirror:
                face, alpha = face[:, ::-1], alpha[:, ::-1]
            premultiplied = face * alpha[..., None]
            centre_x = self.width * (index + 0.5) / count
            self._composite(frame, premultiplied, alpha, centre_x, person.pose, slot_scale)
        gain, warmth = light  # lighting: global gain and colour warmth, as one per-channel table
        gains = np.array([gain * (1 + warmth), gain, gain * (1 - warmth)], np.float32)
        table = np.clip(self._levels[:, None] * gains[None, :] + 0.5, 0, 255).astype(np.uint8)
        return cv2.LUT(frame, table.reshape(256, 1, 3))

    def _composite(self, frame: np.ndarray, face: np.ndarray, alpha: np.ndarray, centre_x: float,
                   pose: tuple, slot_scale: float) -> None:
        """Draw a premultiplied face crop into ``frame`` (a similarity transform, blended in float
        on the head's bounding box only)."""
        dx, dy, angle, scale = pose
        h, w = face.shape[:2]
        centre = (w / 2.0, h / 2.0)
        matrix = cv2.getRotationMatrix2D(centre, angle, FACE_SCALE * scale * slot_scale)
        matrix[0, 2] += centre_x + dx * slot_scale - centre[0]
        matrix[1, 2] += self.height / 2.0 + dy - centre[1] + 30.0
        corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], np.float32) @ matrix.T
        x0 = int(max(0, math.floor(corners[:, 0].min())))
        y0 = int(max(0, math.floor(corners[:, 1].min())))
        x1 = int(min(self.width, math.ceil(corners[:, 0].max()) + 1))
        y1 = int(min(self.height, math.ceil(corners[:, 1].max()) + 1))
        if x1 <= x0 or y1 <= y0:
            return
        matrix[0, 2] -= x0
        matrix[1, 2] -= y0
        size = (x1 - x0, y1 - y0)
        face_roi = cv2.warpAffine(np.ascontiguousarray(face), matrix, size, flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        alpha_roi = cv2.warpAffine(np.ascontiguousarray(alpha), matrix, size, flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)[..., None]
        roi = frame[y0:y1, x0:x1].astype(np.float32)
        roi *= 1.0 - alpha_roi
        roi += face_roi
        frame[y0:y1, x0:x1] = np.clip(roi + 0.5, 0, 255).astype(np.uint8)


@dataclass
class Appearance:
    """One person in one frame: affect, pose (dx, dy, angle, scale), occlusion, identity look."""

    valence: float
    arousal: float
    pose: tuple
    occlusion: int = 0  # 0 none, 1 hand over the mouth, 2 hand over the eyes
    mirror: bool = False
    tint: tuple = (1.0, 1.0, 1.0)  # per-channel gain of the face (skin and hair tone)


def _pose_track(times: np.ndarray, va: np.ndarray, absence: np.ndarray, width: int,
                rng: np.random.Generator) -> np.ndarray:
    """(N, 4) dx, dy, angle, scale: sway whose amplitude grows with arousal, droop with low valence."""
    def wander(amplitude_periods):
        total = np.zeros_like(times)
        for amplitude, period in amplitude_periods:
            total += amplitude * np.sin(2 * math.pi * times / period + rng.uniform(0, 2 * math.pi))
        return total

    energy = 0.4 + 0.6 * (va[:, 1] + 1.0) / 2.0  # 0.4 (calm) .. 1.0 (excited)
    dx = energy * wander([(18, 7.3), (8, 2.9), (3, 1.1)]) + absence * width
    dy = energy * wander([(8, 5.1), (4, 2.3), (2, 0.9)]) + HEAD_DROOP_PX * np.clip(-va[:, 0], 0, None)
    angle = energy * wander([(4, 6.1), (2, 2.7)])
    scale = 1.0 + wander([(0.05, 13.0)])
    return np.stack([dx, dy, angle, scale], axis=1)


# ---------------------------------------------------------------- audio

def espeak_available() -> bool:
    return shutil.which(ESPEAK) is not None


def synthesize(text: str, rate_wpm: int, pitch: int, amplitude: int, sample_rate: int,
               voice: str = ESPEAK_VOICE, word_gap: int = 0) -> np.ndarray:
    """Speak ``text`` with espeak-ng in ``voice``; float32 mono in [-1, 1] at ``sample_rate``.
    ``word_gap``: extra pause between words in units of 10 ms (a slower, halting style)."""
    if not espeak_available():
        raise SpeechSynthesisError(
            "espeak-ng is not installed; it synthesises the sample sessions' speech. "
            "Install it with: sudo apt-get install -y espeak-ng  (Debian/Ubuntu)")
    with tempfile.TemporaryDirectory() as tmp:
        wav_path = Path(tmp) / 'utterance.wav'
        command = [ESPEAK, '-v', voice, '-s', str(rate_wpm), '-p', str(pitch),
                   '-a', str(amplitude), '-g', str(int(word_gap)), '-w', str(wav_path), text]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0 or not wav_path.is_file():
            raise SpeechSynthesisError(f"espeak-ng failed ({result.returncode}): {result.stderr.strip()}")
        with wave.open(str(wav_path), 'rb') as wav:
            if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
                raise SpeechSynthesisError('espeak-ng produced an unexpected WAV format')
            source_rate = wav.getframerate()
            samples = np.frombuffer(wav.readframes(wav.getnframes()), '<i2').astype(np.float32) / 32768.0
    if source_rate != sample_rate:
        divisor = math.gcd(source_rate, sample_rate)
        samples = resample_poly(samples, sample_rate // divisor, source_rate // divisor)
    return np.clip(samples, -1.0, 1.0).astype(np.float32)


def prosody(arousal: float) -> tuple[int, int, int]:
    """espeak-ng (rate wpm, pitch 0-99, amplitude 0-200) for an arousal in [-1, 1]."""
    level = (float(np.clip(arousal, -1, 1)) + 1.0) / 2.0
    return int(round(115 + 115 * level)), int(round(25 + 50 * level)), int(round(55 + 110 * level))


def _quadrant(va: np.ndarray) -> tuple[int, int]:
    return (1 if va[0] >= 0 else -1, 1 if va[1] >= 0 else -1)


@dataclass(frozen=True)
class SpeakingStyle:
    """How one session's speaker talks, on top of the arousal-driven prosody."""

    rate_scale: float = 1.0
    pitch_offset: int = 0
    word_gap: int = 0

    @classmethod
    def draw(cls, rng: np.random.Generator) -> SpeakingStyle:
        return cls(float(rng.uniform(0.85, 1.15)), int(rng.integers(-12, 13)), int(rng.integers(0, 4)))

    def apply(self, rate: int, pitch: int, amplitude: int) -> tuple:
        return (int(round(rate * self.rate_scale)), int(np.clip(pitch + self.pitch_offset, 0, 99)), amplitude)


@dataclass
class Utterance:
    start_s: float
    end_s: float
    text: str


def _speech_track(duration_s: float, va_at: Callable[[float], np.ndarray], config: SessionConfig,
                  rng: np.random.Generator,
                  style: SpeakingStyle = SpeakingStyle()) -> tuple[np.ndarray, list]:
    """The session's waveform (float32 at config.sample_rate) and its utterances."""
    rate = config.sample_rate
    total = int(round(duration_s * rate))
    audio = (rng.standard_normal(total) * ROOM_TONE_RMS).astype(np.float32)
    utterances = []
    cache = {}
    # mean gap so that speech takes about speech_fraction of the time (utterances last ~2.5 s)
    mean_gap = 2.5 * (1.0 - config.speech_fraction) / config.speech_fraction
    t = rng.uniform(0.3, 1.0)
    while t < duration_s - 1.0:
        va = va_at(t)
        bank = SENTENCE_SETS[config.sentence_set][_quadrant(va)]
        text = bank[int(rng.integers(len(bank)))]
        params = style.apply(*prosody(float(va[1])))
        key = (text, params)
        if key not in cache:
            cache[key] = synthesize(text, *params, sample_rate=rate, voice=config.voice,
                                    word_gap=style.word_gap)
        wave_ = cache[key]
        start = int(round(t * rate))
        stop = min(total, start + len(wave_))
        if stop - start < len(wave_) * 0.8:
            break  # the session ends mid-sentence: leave it out
        audio[start:stop] += wave_[:stop - start]
        utterances.append(Utterance(t, stop / rate, text))
        # calmer speakers leave longer pauses
        gap = mean_gap * rng.uniform(0.5, 1.5) * (1.3 - 0.6 * (float(va[1]) + 1.0) / 2.0)
        t = stop / rate + gap
    return np.clip(audio, -1.0, 1.0), utterances


# ---------------------------------------------------------------- writing

def generate_session(path: str | Path, config: Optional[SessionConfig] = None, *,
                     overwrite: bool = False, progress: bool = False) -> SessionSummary:
    """Write one session as a rosbag2 directory at ``path`` and return what it holds."""
    config = config or SessionConfig()
    path = Path(path)
    rng = np.random.default_rng([config.seed, GENERATOR_VERSION])
    store = affective_typestore()
    types = store.types
    n_frames = int(math.floor(config.duration_s * config.fps))
    frame_times = np.arange(n_frames) / config.fps
    scripts, poses, occlusions, looks = [], [], [], []
    for person in range(config.people):
        va_person = affect_trajectory(frame_times, config.duration_s, rng, config.segment_s)
        absence = _absence_offsets(frame_times, config.duration_s, config.face_absent_fraction, rng)
        pose = _pose_track(frame_times, va_person, absence, config.width, rng)
        if config.variety:
            pose[:, 3] *= rng.uniform(0.8, 1.1)  # distance to the camera
            looks.append((bool(rng.integers(2)), tuple(float(g) for g in rng.uniform(0.92, 1.08, 3))))
        else:
            looks.append((person % 2 == 1, (1.0, 1.0, 1.0)))
        scripts.append(va_person)
        poses.append(pose)
        occlusions.append(_occlusion_track(frame_times, config.duration_s, config.occlusion_fraction, rng))
        if person == 0:
            absent = np.abs(absence) >= 1.0
    va = scripts[0]  # the speaker
    light_gain = 1.0 + 0.12 * np.sin(2 * math.pi * frame_times / rng.uniform(20, 40) + rng.uniform(0, 6.3))
    warmth = 0.06 * np.sin(2 * math.pi * frame_times / rng.uniform(15, 35) + rng.uniform(0, 6.3))
    if config.variety:
        light_gain = light_gain * rng.uniform(0.8, 1.15)
    style = SpeakingStyle.draw(rng) if config.variety else SpeakingStyle()

    def va_at(t: float) -> np.ndarray:
        return va[min(n_frames - 1, max(0, int(t * config.fps)))]

    animator = FaceAnimator(config.width, config.height, rng)
    audio, utterances = _speech_track(config.duration_s, va_at, config, rng, style)
    audio_i16 = np.round(audio * 32767.0).astype('<i2')

    start_ns = EPOCH_NS + config.seed * 3_600_000_000_000
    frame_ns = start_ns + np.round(frame_times * 1e9).astype(np.int64)
    chunk = config.chunk_samples
    n_chunks = len(audio_i16) // chunk
    # each chunk is stamped with its first sample and logged when its last sample is captured
    chunk_edges_s = np.arange(n_chunks + 1) * chunk / config.sample_rate
    chunk_edges_ns = start_ns + np.round(chunk_edges_s * 1e9).astype(np.int64)
    chunk_start_ns, chunk_log_ns = chunk_edges_ns[:-1], chunk_edges_ns[1:]
    speech_ns = [start_ns + int(round((u.end_s + ASR_LATENCY_S) * 1e9)) for u in utterances]

    # merge the streams by log time; ties keep this order: info, audio, speech, image, truth
    events = [(start_ns, 0, 'info', 0)]
    events += [(int(t), 1, 'audio', i) for i, t in enumerate(chunk_log_ns)]
    events += [(t, 2, 'speech', i) for i, t in enumerate(speech_ns) if t <= frame_ns[-1]]
    events += [(int(t), 3, 'image', i) for i, t in enumerate(frame_ns)]
    events += [(int(t), 4, 'truth', i) for i, t in enumerate(frame_ns)]
    events.sort()

    bar = _progress(n_frames, f'session {path.name}', progress)
    writer = BagWriter(path, storage=config.storage, overwrite=overwrite)
    writer.set_custom_data(CUSTOM_DATA_KEY, _config_json(config))
    absent_frames = 0
    ids = stream_ids(config.people)
    no_roi = types['sensor_msgs/msg/RegionOfInterest'](x_offset=0, y_offset=0, height=0, width=0,
                                                        do_rectify=False)
    try:
        with writer:
            writer.add_topic(IMAGE_TOPIC, IMAGE)
            writer.add_topic(AUDIO_TOPIC, AUDIO_DATA_STAMPED)
            writer.add_topic(AUDIO_INFO_TOPIC, AUDIO_INFO, latched=True)
            writer.add_topic(SPEECH_TOPIC, STRING)
            writer.add_topic(GROUND_TRUTH_TOPIC, VALENCE_AROUSAL)
            for log_ns, _, kind, i in events:
                if kind == 'image':
                    people = [Appearance(float(scripts[k][i, 0]), float(scripts[k][i, 1]), tuple(poses[k][i]),
                                         int(occlusions[k][i]), looks[k][0], looks[k][1])
                              for k in range(config.people)]
                    frame = animator.render_people(people, (float(light_gain[i]), float(warmth[i])))
                    absent_frames += int(absent[i])
                    writer.write(IMAGE_TOPIC, log_ns, types[IMAGE](
                        header=make_header(int(frame_ns[i]), CAMERA_FRAME, store), height=config.height,
                        width=config.width, encoding='rgb8', is_bigendian=0, step=config.width * 3,
                        data=frame.reshape(-1)))
                    bar.update(1)
                elif kind == 'truth':
                    for k, stream_id in enumerate(ids):
                        writer.write(GROUND_TRUTH_TOPIC, log_ns, types[VALENCE_AROUSAL](
                            header=make_header(int(frame_ns[i]), CAMERA_FRAME, store), stream_id=stream_id,
                            roi=no_roi, valence=float(scripts[k][i, 0]), arousal=float(scripts[k][i, 1]),
                            confidence=1.0, modalities=0))
                elif kind == 'audio':
                    data = audio_i16[i * chunk:(i + 1) * chunk].view(np.uint8)
                    writer.write(AUDIO_TOPIC, log_ns, types[AUDIO_DATA_STAMPED](
                        header=make_header(int(chunk_start_ns[i]), MICROPHONE_FRAME, store),
                        audio=types['audio_common_msgs/msg/AudioData'](data=data)))
                elif kind == 'speech':
                    writer.write(SPEECH_TOPIC, log_ns, types[STRING](data=utterances[i].text))
                else:
                    writer.write(AUDIO_INFO_TOPIC, log_ns, types[AUDIO_INFO](
                        channels=1, sample_rate=config.sample_rate, sample_format='S16LE',
                        bitrate=config.sample_rate * 16, coding_format='WAVE'))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # never leave a bag that looks complete
        raise
    bar.close()
    signs = np.sign(va)
    share = {f"v{'+' if sv > 0 else '-'}a{'+' if sa > 0 else '-'}":
             float(np.mean((signs[:, 0] == sv) & (signs[:, 1] == sa)))
             for sv in (1, -1) for sa in (1, -1)}
    return SessionSummary(path=str(path), config=asdict(config), frames=n_frames, audio_chunks=n_chunks,
                          utterances=sum(1 for t in speech_ns if t <= frame_ns[-1]),
                          face_absent_frames=absent_frames, quadrant_share=share)


def session_is_current(path: str | Path, config: SessionConfig) -> bool:
    """True when ``path`` holds a complete bag generated by this generator version with ``config``."""
    import yaml

    metadata = Path(path) / 'metadata.yaml'  # written last: its presence means the bag is complete
    if not metadata.is_file():
        return False
    info = yaml.safe_load(metadata.read_text()).get('rosbag2_bagfile_information', {})
    stored = (info.get('custom_data') or {}).get(CUSTOM_DATA_KEY)
    return stored == _config_json(config)


def _config_json(config: SessionConfig) -> str:
    return json.dumps({'version': GENERATOR_VERSION, **asdict(config)}, sort_keys=True)


def generate_sessions(out_dir: str | Path, count: int, config: Optional[SessionConfig] = None, *,
                      first_seed: int = 0, prefix: str = 'session', overwrite: bool = False,
                      progress: bool = False) -> list:
    """Write ``count`` sessions ``<prefix>_<seed>`` with seeds first_seed.. into ``out_dir``."""
    config = config or SessionConfig()
    summaries = []
    for seed in range(first_seed, first_seed + count):
        session_config = SessionConfig(**{**asdict(config), 'seed': seed})
        summaries.append(generate_session(Path(out_dir) / f'{prefix}_{seed:03d}', session_config,
                                          overwrite=overwrite, progress=progress))
    return summaries


def _progress(total: int, description: str, enabled: bool):
    if enabled:
        from tqdm import tqdm
        return tqdm(total=total, desc=description, unit='frame', leave=False)

    class _Silent:
        def update(self, n: int) -> None:
            pass

        def close(self) -> None:
            pass

    return _Silent()
