"""core.image: sensor_msgs/Image fields and CompressedImage payloads to RGB arrays."""

import array

import cv2
import numpy as np
import pytest

from affective_trm_ros.core.image import (
    SUPPORTED_ENCODINGS,
    ImageDecodeError,
    compressed_to_rgb,
    frame_to_rgb,
    image_msg_to_rgb,
    image_to_rgb,
)

HEIGHT, WIDTH = 6, 10


@pytest.fixture(scope='module')
def rgb():
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)


def pack(pixels: np.ndarray, step: int) -> bytes:
    """Rows of `pixels` (H, W, C) as bytes, each padded with 0xAB bytes to `step`."""
    rows = pixels.reshape(pixels.shape[0], -1).view(np.uint8)
    padded = np.full((rows.shape[0], step), 0xAB, np.uint8)
    padded[:, :rows.shape[1]] = rows
    return padded.tobytes()


def encode_as(rgb: np.ndarray, encoding: str) -> np.ndarray:
    """The (H, W, C) pixels of an RGB image in a sensor_msgs encoding (8-bit encodings)."""
    alpha = np.full(rgb.shape[:2] + (1,), 77, np.uint8)
    return {
        'rgb8': rgb,
        'bgr8': rgb[:, :, ::-1],
        'rgba8': np.concatenate([rgb, alpha], axis=2),
        'bgra8': np.concatenate([rgb[:, :, ::-1], alpha], axis=2),
    }[encoding]


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8', 'rgba8', 'bgra8'])
@pytest.mark.parametrize('extra_bytes', [0, 1, 7, 64])
def test_colour_encodings_with_any_row_padding(rgb, encoding, extra_bytes):
    pixels = np.ascontiguousarray(encode_as(rgb, encoding))
    step = WIDTH * pixels.shape[2] + extra_bytes
    out = image_to_rgb(encoding, HEIGHT, WIDTH, step, False, pack(pixels, step))
    assert out.dtype == np.uint8 and out.shape == (HEIGHT, WIDTH, 3) and out.flags['C_CONTIGUOUS']
    np.testing.assert_array_equal(out, rgb)


def test_mono8_is_replicated_to_three_channels(rgb):
    grey = rgb[:, :, 0].copy()
    out = image_to_rgb('mono8', HEIGHT, WIDTH, WIDTH + 3, False, pack(grey[:, :, None], WIDTH + 3))
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], grey)


@pytest.mark.parametrize('is_bigendian', [False, True])
def test_mono16_honours_byte_order_and_scales_like_cv_bridge(is_bigendian):
    values = np.array([[0, 128, 129, 257, 32768, 65535]], dtype=np.uint16)
    data = values.astype('>u2' if is_bigendian else '<u2').tobytes()
    out = image_to_rgb('mono16', 1, values.shape[1], values.shape[1] * 2, is_bigendian, data)
    # round(v * 255 / 65535): 128/257 = 0.498 -> 0, 129/257 = 0.502 -> 1
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 1, 128, 255])
    np.testing.assert_array_equal(out[0, :, 0], out[0, :, 2])


def test_mono16_reading_with_the_wrong_byte_order_differs():
    data = np.array([[256, 512]], dtype='<u2').tobytes()
    little = image_to_rgb('mono16', 1, 2, 4, False, data)
    big = image_to_rgb('mono16', 1, 2, 4, True, data)
    assert not np.array_equal(little, big)


def test_rgb16_and_bgr16(rgb):
    wide = rgb.astype(np.uint16) * 257          # exact 8 -> 16 bit expansion
    out = image_to_rgb('rgb16', HEIGHT, WIDTH, WIDTH * 6 + 4, True,
                       pack(wide.astype('>u2').view(np.uint8).reshape(HEIGHT, WIDTH, 6), WIDTH * 6 + 4))
    np.testing.assert_array_equal(out, rgb)
    out = image_to_rgb('bgr16', HEIGHT, WIDTH, WIDTH * 6, False,
                       np.ascontiguousarray(wide[:, :, ::-1]).astype('<u2').tobytes())
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('encoding,order', [('yuv422', 'UYVY'), ('yuv422_yuy2', 'YUYV')])
def test_packed_yuv422(encoding, order):
    # Neutral chroma (U = V = 128): the output is grey with the luma of each pixel.
    luma = [40, 200]
    samples = {'Y0': luma[0], 'Y1': luma[1], 'U': 128, 'V': 128}
    pair = [samples[k] for k in ({'UYVY': ('U', 'Y0', 'V', 'Y1'), 'YUYV': ('Y0', 'U', 'Y1', 'V')}[order])]
    out = image_to_rgb(encoding, 1, 2, 4, False, bytes(pair))
    assert out.shape == (1, 2, 3)
    assert np.all(out[0, 0] == out[0, 0, 0]) and np.all(out[0, 1] == out[0, 1, 0])
    assert abs(int(out[0, 0, 0]) - 40) <= 25 and abs(int(out[0, 1, 0]) - 200) <= 25


def test_last_row_may_omit_its_padding(rgb):
    step = WIDTH * 3 + 5
    data = pack(rgb, step)[:-5]
    np.testing.assert_array_equal(image_to_rgb('rgb8', HEIGHT, WIDTH, step, False, data), rgb)


@pytest.mark.parametrize('container', [bytes, bytearray, lambda b: array.array('B', b), list,
                                       lambda b: np.frombuffer(b, np.uint8)])
def test_data_containers_of_rclpy_and_rosbags_messages(rgb, container):
    data = container(rgb.tobytes())
    np.testing.assert_array_equal(image_to_rgb('rgb8', HEIGHT, WIDTH, WIDTH * 3, False, data), rgb)


def test_encoding_names_are_case_insensitive(rgb):
    np.testing.assert_array_equal(image_to_rgb('RGB8', HEIGHT, WIDTH, WIDTH * 3, False, rgb.tobytes()), rgb)


@pytest.mark.parametrize('kwargs,match', [
    (dict(encoding='32FC1'), 'unsupported image encoding'),
    (dict(encoding='bayer_rggb8'), 'unsupported image encoding'),
    (dict(height=0), 'zero-size'),
    (dict(width=0), 'zero-size'),
    (dict(step=WIDTH * 3 - 1), 'shorter than one row'),
    (dict(data=b'\x00' * (HEIGHT * WIDTH * 3 - 1)), 'truncated'),
    (dict(data=b''), 'truncated'),
    (dict(height=20_000, width=20_000, step=60_000), 'pixel limit'),
])
def test_bad_images_raise_clear_errors(kwargs, match):
    args = dict(encoding='rgb8', height=HEIGHT, width=WIDTH, step=WIDTH * 3, is_bigendian=False,
                data=b'\x00' * (HEIGHT * WIDTH * 3))
    args.update(kwargs)
    with pytest.raises(ImageDecodeError, match=match):
        image_to_rgb(**args)


def test_yuv_needs_an_even_width():
    with pytest.raises(ImageDecodeError, match='even width'):
        image_to_rgb('yuv422', 1, 3, 6, False, bytes(6))


def test_png_round_trip_is_exact_and_jpeg_close(rgb):
    big = cv2.resize(rgb, (64, 48), interpolation=cv2.INTER_NEAREST)
    ok, png = cv2.imencode('.png', cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
    assert ok
    np.testing.assert_array_equal(compressed_to_rgb('png', png.tobytes()), big)
    smooth = np.zeros((48, 64, 3), np.uint8)
    smooth[:, :, 0] = 200                        # a red frame survives JPEG almost unchanged
    ok, jpeg = cv2.imencode('.jpg', cv2.cvtColor(smooth, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    out = compressed_to_rgb('rgb8; jpeg compressed bgr8', array.array('B', jpeg.tobytes()))
    assert out.shape == (48, 64, 3)
    assert np.abs(out.astype(int) - smooth).max() <= 3


@pytest.mark.parametrize('fmt,data,match', [
    ('jpeg', b'', 'empty'),
    ('jpeg', b'not an image at all', 'cannot decode'),
    ('16UC1; compressedDepth', b'\x00' * 16, 'depth'),
])
def test_bad_compressed_images(fmt, data, match):
    with pytest.raises(ImageDecodeError, match=match):
        compressed_to_rgb(fmt, data)


@pytest.mark.parametrize('codec', ['png', 'jpg'])
def test_truncated_payloads_are_refused(rgb, codec):
    ok, payload = cv2.imencode('.' + codec, cv2.resize(rgb, (160, 120)))
    with pytest.raises(ImageDecodeError, match='cannot decode'):
        compressed_to_rgb(codec, payload.tobytes()[: int(len(payload) * 0.9)])


def _image_msg(encoding, pixels, step, is_bigendian=False):
    from sensor_msgs.msg import Image

    msg = Image(encoding=encoding, height=pixels.shape[0], width=pixels.shape[1], step=step,
                is_bigendian=is_bigendian)
    msg.data = pack(pixels, step)
    return msg


def test_image_msg_to_rgb_on_a_ros_message(rgb):
    msg = _image_msg('bgr8', np.ascontiguousarray(rgb[:, :, ::-1]), WIDTH * 3 + 2)
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)
    np.testing.assert_array_equal(image_msg_to_rgb(msg, use_cv_bridge=False), rgb)


def test_every_supported_encoding_is_accepted():
    for encoding in SUPPORTED_ENCODINGS:
        out = image_to_rgb(encoding, 2, 2, 64, False, bytes(128))
        assert out.shape == (2, 2, 3), encoding


def test_cv_bridge_and_numpy_converters_agree(rgb):
    pytest.importorskip('cv_bridge')
    grey = rgb[:, :, :1].copy()
    wide = (rgb.astype(np.uint16) * 251 + 3).astype(np.uint16)
    cases = [(enc, np.ascontiguousarray(encode_as(rgb, enc)), False)
             for enc in ('rgb8', 'bgr8', 'rgba8', 'bgra8')]
    cases += [('mono8', grey, False),
              ('mono16', wide[:, :, :1].astype('<u2').view(np.uint8).reshape(HEIGHT, WIDTH, 2), False),
              ('mono16', wide[:, :, :1].astype('>u2').view(np.uint8).reshape(HEIGHT, WIDTH, 2), True),
              ('rgb16', wide.astype('<u2').view(np.uint8).reshape(HEIGHT, WIDTH, 6), False)]
    for encoding, pixels, big in cases:
        pixel_bytes = pixels.shape[2]
        for step in (WIDTH * pixel_bytes, WIDTH * pixel_bytes + 4 * pixel_bytes):
            msg = _image_msg(encoding, pixels, step, big)
            bridged = image_msg_to_rgb(msg, use_cv_bridge=True)
            plain = image_msg_to_rgb(msg, use_cv_bridge=False)
            np.testing.assert_array_equal(bridged, plain, err_msg=f'{encoding} step {step}')


def test_frame_to_rgb_dispatches_raw_and_compressed_messages_of_any_origin(rgb):
    from types import SimpleNamespace

    # Messages as rosbags deserialises them: plain objects whose data is a NumPy array.
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    raw = SimpleNamespace(encoding='bgr8', height=HEIGHT, width=WIDTH, step=WIDTH * 3 + 1, is_bigendian=0,
                          data=np.frombuffer(pack(bgr, WIDTH * 3 + 1), np.uint8))
    np.testing.assert_array_equal(frame_to_rgb(raw), rgb)
    ok, png = cv2.imencode('.png', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(frame_to_rgb(SimpleNamespace(format='png', data=png.reshape(-1))), rgb)
    with pytest.raises(ImageDecodeError, match='neither'):
        frame_to_rgb(SimpleNamespace(data=b''))
