"""The valence-arousal overlay (pure drawing) and the visualizer node over real DDS."""

import threading
import time

import cv2
import numpy as np
import pytest
import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.parameter import Parameter
from sensor_msgs.msg import CompressedImage, Image

from affective_msgs.msg import ValenceArousal
from affective_trm_ros.core.va_overlay import (
    POINT_RGB,
    Estimate,
    chip_centers,
    draw_va_overlay,
    panel_layout,
    va_to_pixel,
)
from affective_trm_ros.nodes.common import RELIABLE_QOS, SENSOR_QOS
from affective_trm_ros.nodes.visualizer_node import IMAGE_OUT_QOS, VisualizerNode

H, W = 240, 320


def background() -> np.ndarray:
    """A textured image (so 'unchanged' means something)."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([(x * 255 // W), (y * 255 // H), ((x + y) % 256)], axis=-1).astype(np.uint8)


# ---------------------------------------------------------------- pure drawing

def test_point_is_drawn_where_valence_and_arousal_say():
    image = background()
    original = image.copy()
    out = draw_va_overlay(image, Estimate(0.6, -0.4, 1.0, 3), trail=[(0.0, 0.0), (0.3, -0.2)])
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(image, original)           # the input is not modified
    layout = panel_layout(image.shape)
    x, y = va_to_pixel(0.6, -0.4, layout.center, layout.radius)
    assert x > layout.center[0] and y > layout.center[1]     # pleasant (right), calm (down)
    assert tuple(out[y, x]) == POINT_RGB
    # Outside the panel the image is untouched.
    outside = np.ones((H, W), bool)
    outside[layout.y0:layout.y0 + layout.height, layout.x0:layout.x0 + layout.side] = False
    np.testing.assert_array_equal(out[outside], image[outside])


def test_modality_chips_follow_the_bits():
    image = background()
    centers = chip_centers(image.shape)
    lit = draw_va_overlay(image, Estimate(0.0, 0.0, 0.5, 1 | 4), [])
    green = lambda px: px[1] > 150 and px[0] < 100 and px[2] < 150  # noqa: E731
    assert green(lit[centers['video'][::-1]]) and green(lit[centers['text'][::-1]])
    assert not green(lit[centers['audio'][::-1]])
    stale = draw_va_overlay(image, Estimate(0.0, 0.0, 0.5, 7), [], stale=True)
    assert not any(green(stale[c[::-1]]) for c in centers.values())


def test_confidence_dims_the_point_and_missing_estimates_draw_no_point():
    image = background()
    layout = panel_layout(image.shape)
    x, y = va_to_pixel(-0.5, 0.5, layout.center, layout.radius)
    sure = draw_va_overlay(image, Estimate(-0.5, 0.5, 1.0, 1), [])
    unsure = draw_va_overlay(image, Estimate(-0.5, 0.5, 0.0, 1), [])
    assert int(sure[y, x].sum()) > int(unsure[y, x].sum())
    for estimate in (None, Estimate(float('nan'), 0.0, 1.0, 1)):
        empty = draw_va_overlay(image, estimate, [])
        assert tuple(empty[y, x]) != POINT_RGB


def test_out_of_range_values_are_clipped_and_small_images_work():
    layout = panel_layout((H, W))
    assert va_to_pixel(5.0, -5.0, layout.center, layout.radius) == va_to_pixel(1.0, -1.0, layout.center,
                                                                                layout.radius)
    for shape in ((48, 64, 3), (480, 640, 3), (1080, 1920, 3)):
        image = np.zeros(shape, np.uint8)
        out = draw_va_overlay(image, Estimate(0.2, 0.1, 0.7, 7), [(0.1, 0.1)] * 5)
        panel = panel_layout(shape)
        assert panel.x0 >= 0 and panel.x0 + panel.side <= shape[1]
        assert panel.y0 + panel.height <= shape[0]
        assert out.any()


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match=r'expected an \(H, W, 3\) uint8 RGB image'):
        draw_va_overlay(np.zeros((10, 10), np.uint8), None)
    with pytest.raises(ValueError, match='float32'):
        draw_va_overlay(np.zeros((10, 10, 3), np.float32), None)


# ---------------------------------------------------------------- node over DDS

class VisualizerHarness:
    def __init__(self, **params) -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        overrides = [Parameter('max_rate', value=0.0)] + [Parameter(k, value=v) for k, v in params.items()]
        self.node = VisualizerNode(context=self.context, parameter_overrides=overrides)
        self.client = rclpy.create_node('visualizer_test_client', context=self.context)
        self.estimates = self.client.create_publisher(ValenceArousal, 'affect/valence_arousal', RELIABLE_QOS)
        self.images = self.client.create_publisher(Image, 'image_raw', SENSOR_QOS)
        self.compressed = self.client.create_publisher(CompressedImage, 'image_raw/compressed', SENSOR_QOS)
        self.outputs = []
        self.client.create_subscription(Image, 'affect/visualization', self.outputs.append, IMAGE_OUT_QOS)
        self.executor = MultiThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.client)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        image_pub = self.compressed if params.get('input_transport') == 'compressed' else self.images
        self.wait(lambda: self.estimates.get_subscription_count() and image_pub.get_subscription_count()
                  and self.node.count_subscribers('affect/visualization'), 'discovery')

    def wait(self, predicate, what, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f'timed out waiting for {what}'
            time.sleep(0.01)

    def close(self):
        self.executor.shutdown()
        self.thread.join(5.0)
        self.node.destroy_node()
        self.client.destroy_node()
        self.context.try_shutdown()


@pytest.fixture
def visualizer():
    made = []

    def make(**params):
        made.append(VisualizerHarness(**params))
        return made[-1]
    yield make
    for harness in made:
        harness.close()


def estimate_msg(valence, arousal, stream='default', sec=10):
    msg = ValenceArousal(stream_id=stream, valence=valence, arousal=arousal, confidence=1.0, modalities=3)
    msg.header.stamp.sec = sec
    return msg


def test_node_draws_the_newest_estimate_on_the_camera_image(visualizer):
    h = visualizer()
    h.estimates.publish(estimate_msg(0.5, 0.5))
    h.wait(lambda: h.node._latest, 'estimate')
    rgb = background()
    image = Image(height=H, width=W, encoding='bgr8', step=W * 3, is_bigendian=0,
                  data=rgb[:, :, ::-1].tobytes())
    image.header.stamp.sec, image.header.stamp.nanosec = 10, 500
    image.header.frame_id = 'camera'
    while not h.outputs:   # sensor QoS is best effort: publish until one gets through
        h.images.publish(image)
        time.sleep(0.05)
    out = h.outputs[0]
    assert (out.height, out.width, out.encoding, out.step) == (H, W, 'rgb8', W * 3)
    assert (out.header.stamp.sec, out.header.stamp.nanosec, out.header.frame_id) == (10, 500, 'camera')
    pixels = np.frombuffer(bytes(out.data), np.uint8).reshape(H, W, 3)
    expected = draw_va_overlay(rgb, Estimate(0.5, 0.5, 1.0, 3), [(0.5, 0.5)], label='default')
    np.testing.assert_array_equal(pixels, expected)


def test_node_takes_compressed_input_and_skips_bad_images(visualizer):
    h = visualizer(input_transport='compressed', stream_id='bob')
    h.estimates.publish(estimate_msg(-0.5, 0.2, stream='alice'))
    h.estimates.publish(estimate_msg(0.7, -0.7, stream='bob'))
    h.wait(lambda: len(h.node._latest) == 2, 'estimates')
    ok, png = cv2.imencode('.png', background()[:, :, ::-1])
    assert ok
    good = CompressedImage(format='png', data=png.tobytes())
    good.header.stamp.sec = 10
    bad = CompressedImage(format='jpeg', data=b'not an image')
    while not h.outputs:
        h.compressed.publish(bad)
        h.compressed.publish(good)
        time.sleep(0.05)
    pixels = np.frombuffer(bytes(h.outputs[0].data), np.uint8).reshape(H, W, 3)
    layout = panel_layout((H, W))
    x, y = va_to_pixel(0.7, -0.7, layout.center, layout.radius)   # bob's estimate, not alice's
    assert tuple(pixels[y, x]) == POINT_RGB
    assert h.node._counts['bad_images'] >= 1
