"""ROS4HRI output: estimates as hri_msgs/Expression per tracked face (pure mapping, and the node over DDS)."""

import sys
import threading
import time

import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor

from affective_msgs.msg import ModalityEmbedding, TrackedStreams, ValenceArousal
from affective_trm_ros.core.encoders.fer import FER_CLASSES
from affective_trm_ros.core.encoders.video import EMOTIONS
from affective_trm_ros.core.hri_expression import HRI_EXPRESSIONS, expression_class, expression_fields
from affective_trm_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS

hri_msgs = pytest.importorskip('hri_msgs.msg', reason='hri_msgs (ROS4HRI interfaces) is not installed')


def test_expression_classes_map_to_the_message_constants():
    constants = {getattr(hri_msgs.Expression, name) for name in dir(hri_msgs.Expression)
                 if name.isupper() and isinstance(getattr(hri_msgs.Expression, name), str)}
    assert set(HRI_EXPRESSIONS.values()) <= constants
    # Every class of the built-in heads maps, except HSEmotion's 'contempt', which hri_msgs lacks.
    assert {c for c in EMOTIONS + FER_CLASSES if c not in HRI_EXPRESSIONS} == {'contempt'}
    assert expression_class(['anger', 'happiness', 'contempt'], [0.1, 0.7, 0.2]) == 'happy'
    assert expression_class(['anger', 'contempt'], [0.1, 0.9]) == ''          # no counterpart
    assert expression_class(['sad', 'happy'], [0.4, 0.35], min_probability=0.5) == ''
    assert expression_class([], []) == '' and expression_class(['sad'], [0.1, 0.2]) == ''
    fields = expression_fields(1.7, -0.2, float('nan'), ['fear'], [1.0])
    assert (fields.expression, fields.valence, fields.arousal) == ('scared', 1.0, -0.2)
    assert fields.confidence == 0.0


def test_node_fails_at_start_without_hri_msgs(monkeypatch, rclpy_context):
    from affective_trm_ros.nodes.hri_expression_node import HriExpressionNode

    monkeypatch.setitem(sys.modules, 'hri_msgs.msg', None)   # import hri_msgs.msg -> ImportError
    with pytest.raises(RuntimeError, match=r'hri_msgs\) are not installed: on a ROS 2 distro run `rosdep'):
        HriExpressionNode(context=rclpy_context)


def embedding(face, sec, classes=(), probabilities=()):
    msg = ModalityEmbedding(stream_id=face, modality='video', encoder='x@untrained', valid=True,
                            expression_classes=list(classes), expression_probabilities=list(probabilities))
    msg.header.stamp.sec = sec
    return msg


def estimate(face, sec, valence, arousal):
    msg = ValenceArousal(stream_id=face, valence=valence, arousal=arousal, confidence=0.8, modalities=1)
    msg.header.stamp.sec, msg.header.frame_id = sec, 'camera'
    return msg


def test_node_publishes_one_expression_topic_per_tracked_face(rclpy_context):
    from affective_trm_ros.nodes.hri_expression_node import HriExpressionNode

    node = HriExpressionNode(context=rclpy_context)
    client = rclpy.create_node('hri_expression_client', context=rclpy_context)
    tracked = client.create_publisher(TrackedStreams, 'affect/tracked_streams', LATCHED_QOS)
    videos = client.create_publisher(ModalityEmbedding, 'affect/embedding/video', RELIABLE_QOS)
    estimates = client.create_publisher(ValenceArousal, 'affect/valence_arousal', RELIABLE_QOS)
    received = {'face_0': [], 'face_1': []}
    for face, box in received.items():
        client.create_subscription(hri_msgs.Expression, f'/humans/faces/{face}/expression', box.append,
                                   RELIABLE_QOS)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(node)
    executor.add_node(client)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()

    def wait(predicate, what, timeout=15.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f'timed out waiting for {what}'
            time.sleep(0.02)
    try:
        wait(lambda: videos.get_subscription_count() and estimates.get_subscription_count()
             and tracked.get_subscription_count(), 'discovery')
        tracked.publish(TrackedStreams(stream_ids=['face_0', 'face_1']))
        wait(lambda: node._tracked == {'face_0', 'face_1'}, 'the tracked faces')
        videos.publish(embedding('face_0', 5, ['neutral', 'happiness'], [0.2, 0.8]))
        videos.publish(embedding('face_0', 4, ['neutral', 'happiness'], [0.9, 0.1]))   # another frame
        wait(lambda: len(node._classes.get('face_0', ())) == 2, 'the video embeddings')
        estimates.publish(estimate('face_0', 5, 0.6, 0.3))
        estimates.publish(estimate('face_1', 5, -0.4, 0.1))    # no categorical output: empty expression
        estimates.publish(estimate('face_9', 5, 0.0, 0.0))     # not tracked: nothing
        wait(lambda: received['face_0'] and received['face_1'], 'the expressions')
        first, second = received['face_0'][0], received['face_1'][0]
        assert (first.expression, first.header.stamp.sec, first.header.frame_id) == ('happy', 5, 'camera')
        assert (first.valence, first.arousal, first.confidence) == pytest.approx((0.6, 0.3, 0.8))
        assert second.expression == '' and second.valence == pytest.approx(-0.4)
        assert node.count_publishers('/humans/faces/face_9/expression') == 0
        tracked.publish(TrackedStreams(stream_ids=['face_1']))          # face_0 leaves
        wait(lambda: node.count_publishers('/humans/faces/face_0/expression') == 0, 'face_0 retired')
        assert node.count_publishers('/humans/faces/face_1/expression') == 1
    finally:
        executor.shutdown()
        thread.join(5.0)
        node.destroy_node()
        client.destroy_node()
