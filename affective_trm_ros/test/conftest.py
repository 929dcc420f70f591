"""Test-wide settings: DDS stays on loopback, each test session gets its own ROS domain."""

import os
import random

import pytest

# Discovery must never leave this machine; parallel runs must not cross-talk.
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
if 'AFFECTIVE_TEST_DOMAIN_ID' not in os.environ:
    os.environ['AFFECTIVE_TEST_DOMAIN_ID'] = str(random.SystemRandom().randint(1, 100))
os.environ['ROS_DOMAIN_ID'] = os.environ['AFFECTIVE_TEST_DOMAIN_ID']
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')


@pytest.fixture(scope='session')
def ros_domain_id() -> int:
    """The ROS_DOMAIN_ID of this test session (child processes inherit it through os.environ)."""
    return int(os.environ['ROS_DOMAIN_ID'])


@pytest.fixture
def rclpy_context():
    """A fresh rclpy context for one test, shut down afterwards."""
    import rclpy
    context = rclpy.Context()
    rclpy.init(context=context)
    yield context
    context.try_shutdown()
