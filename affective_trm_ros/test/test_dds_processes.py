"""Two OS processes exchange affective_msgs over real DDS on loopback."""

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from affective_msgs.msg import ModalityEmbedding, ValenceArousal

QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
TIMEOUT_S = 30.0

PUBLISHER_SCRIPT = textwrap.dedent('''
    import sys, time
    import numpy as np
    import rclpy
    from affective_msgs.msg import ModalityEmbedding, ValenceArousal
    from rclpy.qos import QoSProfile, ReliabilityPolicy, DurabilityPolicy
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
    rclpy.init()
    node = rclpy.create_node('dds_test_publisher')
    va_pub = node.create_publisher(ValenceArousal, 'affect/valence_arousal', qos)
    emb_pub = node.create_publisher(ModalityEmbedding, 'affect/embedding/audio', qos)
    data = np.arange(2816, dtype=np.float32) / 7.0
    deadline = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < deadline:
        va = ValenceArousal(stream_id='default', valence=0.5, arousal=-0.5, confidence=0.9, modalities=3)
        va.header.stamp.sec, va.header.stamp.nanosec = 1234, 5678
        emb = ModalityEmbedding(stream_id='default', modality='audio', encoder='test@1', valid=True,
                                data=data.tolist())
        emb.header.stamp.sec, emb.header.stamp.nanosec = 1234, 5679
        va_pub.publish(va)
        emb_pub.publish(emb)
        time.sleep(0.05)
    node.destroy_node()
    rclpy.shutdown()
''')


def test_two_processes_exchange_messages(rclpy_context, ros_domain_id):
    env = dict(os.environ, ROS_DOMAIN_ID=str(ros_domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    publisher = subprocess.Popen([sys.executable, '-c', PUBLISHER_SCRIPT, str(TIMEOUT_S)], env=env)
    node = rclpy.create_node('dds_test_subscriber', context=rclpy_context)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(node)
    received = {}
    node.create_subscription(ValenceArousal, 'affect/valence_arousal',
                             lambda m: received.setdefault('va', m), QOS)
    node.create_subscription(ModalityEmbedding, 'affect/embedding/audio',
                             lambda m: received.setdefault('emb', m), QOS)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while len(received) < 2 and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
    finally:
        publisher.kill()
        publisher.wait()
        executor.shutdown()
        node.destroy_node()
    assert set(received) == {'va', 'emb'}, f'received only {sorted(received)}'
    va, emb = received['va'], received['emb']
    assert (va.header.stamp.sec, va.header.stamp.nanosec) == (1234, 5678)
    assert (va.valence, va.arousal, va.modalities) == (0.5, -0.5, 3)
    assert (emb.header.stamp.sec, emb.header.stamp.nanosec) == (1234, 5679)
    np.testing.assert_array_equal(np.asarray(emb.data, np.float32), np.arange(2816, dtype=np.float32) / 7.0)
