"""`hri_expression` node: the suite's estimates as ROS4HRI expressions (REP-155).

For every tracked face (the fusion node's ``affect/tracked_streams``; a face's stream id is its
ROS4HRI face id), each ``affect/valence_arousal`` estimate is republished as ``hri_msgs/Expression``
on ``/humans/faces/<id>/expression``: valence, arousal and confidence from the estimate, the
header (stamp and camera frame) of the estimate, and ``expression`` from the video encoder's
categorical output for the same frame (``affect/embedding/video``'s ``expression_classes`` and
``expression_probabilities``) mapped to the message's constants, empty when the encoder has none.
A face that leaves the tracked set loses its publisher.

Needs the ROS4HRI interfaces ``hri_msgs`` (``ros-<distro>-hri-msgs``); fails at start with a clear
message without them. Pure logic: :mod:`affective_trm_ros.core.hri_expression`.
"""

from __future__ import annotations

import collections
import re
import threading
from typing import Optional

from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.node import Node

from affective_msgs.msg import ModalityEmbedding, TrackedStreams, ValenceArousal
from affective_trm_ros.core.hri_expression import expression_fields
from affective_trm_ros.core.modalities import VIDEO
from affective_trm_ros.nodes.common import (
    LATCHED_QOS,
    RELIABLE_QOS,
    Diagnostics,
    ThrottledWarning,
    declare,
    run_node,
)
from affective_trm_ros.topics import EMBEDDINGS, ESTIMATES, TRACKED_STREAMS, hri_expression_topic

NODE_NAME = 'hri_expression'
#: A face id must be one topic-name token to become part of /humans/faces/<id>/expression.
FACE_ID = re.compile(r'^[A-Za-z][A-Za-z0-9_]*$')
#: Video embeddings kept per face to find the one of an estimate's frame (estimates follow the
#: frames by up to the fusion's max_wait).
EMBEDDINGS_KEPT = 64


def hri_expression_class():
    """hri_msgs.msg.Expression, or a clear error when the ROS4HRI interfaces are not installed."""
    try:
        from hri_msgs.msg import Expression
    except ImportError as error:
        raise RuntimeError(
            'the hri_expression node publishes hri_msgs/Expression, but the ROS4HRI interfaces '
            '(hri_msgs) are not installed: on a ROS 2 distro run `rosdep install --from-paths src -y` '
            '(or apt install ros-$ROS_DISTRO-hri-msgs); without a distro, run tools/bootstrap.sh, '
            'which builds a test copy') from error
    return Expression


def stamp_ns(stamp) -> int:
    return stamp.sec * 1_000_000_000 + stamp.nanosec


class HriExpressionNode(Node):
    """The hri_expression node (see the module docstring). ``kwargs`` go to rclpy's Node."""

    def __init__(self, **kwargs) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._expression_type = hri_expression_class()
        declare(self, 'min_expression_probability', 0.0,
                "Below this probability of its most likely class, 'expression' is left empty.",
                min_value=0.0, max_value=1.0)
        declare(self, 'diagnostics_period_s', 1.0, 'Period of /diagnostics.', min_value=0.1, max_value=60.0,
                read_only=True)
        self._lock = threading.Lock()
        self._tracked: set = set()
        self._face_publishers: dict = {}                       # face id -> Expression publisher
        self._classes: dict = {}                          # face id -> deque of (stamp_ns, classes, probs)
        self._counts: collections.Counter = collections.Counter()
        self._warn = ThrottledWarning(self)
        self.create_subscription(TrackedStreams, TRACKED_STREAMS, self._on_tracked, LATCHED_QOS)
        self.create_subscription(ModalityEmbedding, EMBEDDINGS[VIDEO], self._on_video, RELIABLE_QOS)
        self.create_subscription(ValenceArousal, ESTIMATES, self._on_estimate, RELIABLE_QOS)
        self._diagnostics = Diagnostics(self, self._collect_diagnostics,
                                        float(self.get_parameter('diagnostics_period_s').value))

    def _on_tracked(self, msg: TrackedStreams) -> None:
        with self._lock:
            self._tracked = set(msg.stream_ids)
            gone = [face for face in self._face_publishers if face not in self._tracked]
            publishers = [self._face_publishers.pop(face) for face in gone]
            for face in gone:
                self._classes.pop(face, None)
        for publisher in publishers:
            self.destroy_publisher(publisher)

    def _on_video(self, msg: ModalityEmbedding) -> None:
        if not msg.expression_classes:
            return
        with self._lock:
            kept = self._classes.setdefault(msg.stream_id, collections.deque(maxlen=EMBEDDINGS_KEPT))
            kept.append((stamp_ns(msg.header.stamp), list(msg.expression_classes),
                         list(msg.expression_probabilities)))

    def _frame_classes(self, face: str, stamp: int) -> tuple:
        """(classes, probabilities) of the video embedding of this face's frame, or empty."""
        for frame_stamp, classes, probabilities in reversed(self._classes.get(face, ())):
            if frame_stamp == stamp:
                return classes, probabilities
        return (), ()

    def _publisher_for(self, face: str):
        """This face's Expression publisher (created on its first estimate); None when not tracked."""
        with self._lock:
            if face not in self._tracked:
                return None
            publisher = self._face_publishers.get(face)
        if publisher is None:
            if not FACE_ID.match(face):
                self._warn(f'bad_id:{face}', f"stream id '{face}' is not a valid topic token: no "
                                              'ROS4HRI expression for it')
                return None
            publisher = self.create_publisher(self._expression_type, hri_expression_topic(face), RELIABLE_QOS)
            with self._lock:
                self._face_publishers[face] = publisher
        return publisher

    def _on_estimate(self, msg: ValenceArousal) -> None:
        publisher = self._publisher_for(msg.stream_id)
        if publisher is None:
            self._counts['untracked'] += 1
            return
        with self._lock:
            classes, probabilities = self._frame_classes(msg.stream_id, stamp_ns(msg.header.stamp))
        fields = expression_fields(msg.valence, msg.arousal, msg.confidence, classes, probabilities,
                                   float(self.get_parameter('min_expression_probability').value))
        out = self._expression_type(header=msg.header, expression=fields.expression, valence=fields.valence,
                                    arousal=fields.arousal, confidence=fields.confidence)
        publisher.publish(out)
        self._counts['published'] += 1

    def _collect_diagnostics(self) -> tuple:
        with self._lock:
            faces = sorted(self._face_publishers)
        values = {'faces': ', '.join(faces), 'published': self._counts['published'],
                  'estimates_of_untracked_streams': self._counts['untracked']}
        return DiagnosticStatus.OK, f'{len(faces)} face(s)', values


def main(args=None) -> Optional[int]:
    return run_node(HriExpressionNode, args=args)


if __name__ == '__main__':
    raise SystemExit(main())
