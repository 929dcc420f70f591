"""The valence-arousal overlay (pure drawing) and the visualizer node over real DDS."""

import threading
import time

import cv2
import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from sensor_msgs.msg import CompressedImage, Image

from affective_msgs.msg import ValenceArousal
from affective_trm_ros.core.face_overlay import (
    LABEL_BACKGROUND_RGB,
    NEGATIVE_RGB,
    POSITIVE_RGB,
    STALE_BOX_RGB,
    FaceBox,
    draw_face_boxes,
    valence_colour,
)
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
        # Single-threaded: once it is shut down and its thread joined, no callback is in flight.
        self.executor = SingleThreadedExecutor(context=self.context)
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


def publish_until_output(h, publish, what='an annotated image', timeout=20.0):
    """Sensor QoS is best effort: publish until one image comes back, within a deadline."""
    deadline = time.monotonic() + timeout
    while not h.outputs:
        assert time.monotonic() < deadline, f'timed out waiting for {what}'
        publish()
        time.sleep(0.05)
    return np.frombuffer(bytes(h.outputs[0].data), np.uint8).reshape(H, W, 3)


def test_node_draws_the_newest_estimate_on_the_camera_image(visualizer):
    h = visualizer()
    h.estimates.publish(estimate_msg(0.5, 0.5))
    h.wait(lambda: h.node._latest, 'estimate')
    rgb = background()
    image = Image(height=H, width=W, encoding='bgr8', step=W * 3, is_bigendian=0,
                  data=rgb[:, :, ::-1].tobytes())
    image.header.stamp.sec, image.header.stamp.nanosec = 10, 500
    image.header.frame_id = 'camera'
    pixels = publish_until_output(h, lambda: h.images.publish(image))
    out = h.outputs[0]
    assert (out.height, out.width, out.encoding, out.step) == (H, W, 'rgb8', W * 3)
    assert (out.header.stamp.sec, out.header.stamp.nanosec, out.header.frame_id) == (10, 500, 'camera')
    layout = panel_layout((H, W))
    x, y = va_to_pixel(0.5, 0.5, layout.center, layout.radius)
    assert tuple(pixels[y, x]) == POINT_RGB                          # the point, where (0.5, 0.5) goes
    assert layout.x0 > 0
    np.testing.assert_array_equal(pixels[:, :layout.x0 - 1], rgb[:, :layout.x0 - 1])   # left of the panel:
    # the camera image, its colours (BGR in) turned to RGB (out)


def test_node_draws_each_face_box_with_its_estimate(visualizer):
    h = visualizer()
    left, right = estimate_msg(0.9, 0.1, stream='face_0'), estimate_msg(-0.9, 0.1, stream='face_1')
    left.roi.x_offset, left.roi.y_offset, left.roi.width, left.roi.height = 20, 100, 60, 80
    right.roi.x_offset, right.roi.y_offset, right.roi.width, right.roi.height = 100, 120, 50, 60
    h.estimates.publish(left)
    h.estimates.publish(right)
    h.wait(lambda: len(h.node._boxes) == 2, 'both faces')
    image = Image(height=H, width=W, encoding='rgb8', step=W * 3, is_bigendian=0, data=background().tobytes())
    image.header.stamp.sec = 10
    pixels = publish_until_output(h, lambda: h.images.publish(image))
    # The left edge of each box, half-way down, in the colour of its valence.
    assert tuple(pixels[140, 20]) == valence_colour(0.9)
    assert tuple(pixels[150, 100]) == valence_colour(-0.9)
    assert tuple(pixels[100 - 3, 22]) == LABEL_BACKGROUND_RGB            # the label strip above the box
    assert tuple(pixels[140, 50]) == tuple(background()[140, 50])         # inside a box: the face itself


def test_face_boxes_pure_drawing():
    image = background()
    out = draw_face_boxes(image, [FaceBox(10, 40, 50, 60, 'a', 1.0, 0.0),
                                  FaceBox(100, 40, 50, 60, 'b', -1.0, 0.0, stale=True),
                                  FaceBox(400, 40, 50, 60, 'off the image', 0.0, 0.0)])
    assert tuple(out[70, 10]) == POSITIVE_RGB and tuple(out[70, 100]) == STALE_BOX_RGB
    assert valence_colour(-1.0) == NEGATIVE_RGB and valence_colour(float('nan')) == valence_colour(0.0)
    np.testing.assert_array_equal(out[:, 280:], image[:, 280:])            # the face off the image: nothing
    np.testing.assert_array_equal(image, background())                      # the input is not modified
    with pytest.raises(ValueError, match='uint8 RGB'):
        draw_face_boxes(np.zeros((4, 4), np.uint8), [])


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

    def publish():
        h.compressed.publish(bad)
        h.compressed.publish(good)
    pixels = publish_until_output(h, publish)
    layout = panel_layout((H, W))
    x, y = va_to_pixel(0.7, -0.7, layout.center, layout.radius)   # bob's estimate, not alice's
    assert tuple(pixels[y, x]) == POINT_RGB
    assert h.node._counts['bad_images'] >= 1
