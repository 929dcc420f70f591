"""From an estimate (and the video encoder's categorical output) to the fields of a ROS4HRI
``hri_msgs/Expression`` (REP-155). No rclpy here.

``expression`` is the most probable class of the video encoder's categorical head, named as
hri_msgs names it; classes without an hri_msgs counterpart (HSEmotion's 'contempt') and
encoders without a categorical head give an empty ``expression``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

#: Class names of the built-in encoders (HSEmotion: AffectNet's eight; FER: FER2013's seven) ->
#: the hri_msgs/Expression constant with the same meaning.
HRI_EXPRESSIONS = {
    'anger': 'angry', 'angry': 'angry',
    'disgust': 'disgusted',
    'fear': 'scared',
    'happiness': 'happy', 'happy': 'happy',
    'neutral': 'neutral',
    'sadness': 'sad', 'sad': 'sad',
    'surprise': 'surprised',
}


@dataclass(frozen=True)
class ExpressionFields:
    """The values of one hri_msgs/Expression (besides its header)."""

    expression: str
    valence: float
    arousal: float
    confidence: float


def expression_class(classes: Sequence[str], probabilities: Sequence[float],
                     min_probability: float = 0.0) -> str:
    """The hri_msgs name of the most probable class, or '' (no head, no counterpart, too unsure)."""
    if not classes or len(classes) != len(probabilities):
        return ''
    finite = [(p, c) for c, p in zip(classes, probabilities) if math.isfinite(p)]
    if not finite:
        return ''
    probability, name = max(finite)
    if probability < min_probability:
        return ''
    return HRI_EXPRESSIONS.get(str(name).strip().lower(), '')


def expression_fields(valence: float, arousal: float, confidence: float,
                      classes: Optional[Sequence[str]] = None,
                      probabilities: Optional[Sequence[float]] = None,
                      min_probability: float = 0.0) -> ExpressionFields:
    """Valence and arousal clipped to [-1, 1], confidence to [0, 1], and the expression class."""
    def clip(value, low, high):
        return float(min(high, max(low, value))) if math.isfinite(value) else 0.0
    return ExpressionFields(expression_class(classes or (), probabilities or (), min_probability),
                            clip(valence, -1.0, 1.0), clip(arousal, -1.0, 1.0), clip(confidence, 0.0, 1.0))
