"""Camera images to RGB arrays: ``sensor_msgs/Image`` fields and ``CompressedImage`` payloads.

The video encoder node and offline bag feature extraction both call these functions, so a frame
gives the same (H, W, 3) uint8 RGB array live and offline. Nothing here imports ROS: the functions
take the message fields, so rclpy messages and messages deserialised by ``rosbags`` both work.

``image_msg_to_rgb`` uses ``cv_bridge`` when it is importable (ROS distros) and the NumPy converter
``image_to_rgb`` otherwise; the two give identical arrays for the encodings listed below (tested
where cv_bridge exists). 16-bit images are scaled to 8 bits the way cv_bridge does
(``round(v * 255 / 65535)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import cv2
import numpy as np


class ImageDecodeError(ValueError):
    """An image message cannot be turned into an RGB array; the message says why."""


@dataclass(frozen=True)
class _Layout:
    channels: int            # interleaved channels per pixel in the message
    dtype: str               # 'u1' or 'u2'
    to_rgb: Optional[int]    # cv2.cvtColor code to RGB; None when the channels already are R, G, B


# sensor_msgs/image_encodings names this converter understands, and how each maps to RGB.
_LAYOUTS = {
    'rgb8': _Layout(3, 'u1', None),
    'bgr8': _Layout(3, 'u1', cv2.COLOR_BGR2RGB),
    'rgba8': _Layout(4, 'u1', cv2.COLOR_RGBA2RGB),
    'bgra8': _Layout(4, 'u1', cv2.COLOR_BGRA2RGB),
    'mono8': _Layout(1, 'u1', cv2.COLOR_GRAY2RGB),
    'rgb16': _Layout(3, 'u2', None),
    'bgr16': _Layout(3, 'u2', cv2.COLOR_BGR2RGB),
    'rgba16': _Layout(4, 'u2', cv2.COLOR_RGBA2RGB),
    'bgra16': _Layout(4, 'u2', cv2.COLOR_BGRA2RGB),
    'mono16': _Layout(1, 'u2', cv2.COLOR_GRAY2RGB),
    # Packed 4:2:2 YUV, 2 bytes per pixel (USB webcams): 'yuv422' is UYVY, 'yuv422_yuy2' is YUYV.
    'yuv422': _Layout(2, 'u1', cv2.COLOR_YUV2RGB_UYVY),
    'uyvy': _Layout(2, 'u1', cv2.COLOR_YUV2RGB_UYVY),
    'yuv422_yuy2': _Layout(2, 'u1', cv2.COLOR_YUV2RGB_YUYV),
    'yuyv': _Layout(2, 'u1', cv2.COLOR_YUV2RGB_YUYV),
}
SUPPORTED_ENCODINGS = tuple(_LAYOUTS)

# A frame larger than this is rejected rather than decoded (a corrupt header, not a camera).
MAX_PIXELS = 100_000_000


def _as_bytes_view(data: Any) -> np.ndarray:
    """The message's ``data`` (bytes, bytearray, array.array, list, NumPy array) as a flat uint8 view."""
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.dtype.itemsize == 1 else \
            np.frombuffer(data.tobytes(), np.uint8)
    if isinstance(data, (list, tuple)):
        return np.asarray(data, dtype=np.uint8)
    return np.frombuffer(memoryview(data).cast('B'), np.uint8)


def image_to_rgb(encoding: str, height: int, width: int, step: int, is_bigendian: bool,
                 data: Any) -> np.ndarray:
    """Convert the fields of a ``sensor_msgs/Image`` to a contiguous (H, W, 3) uint8 RGB array.

    ``step`` (bytes per row) may include any row padding; only the first ``width`` pixels of each
    row are used, and the last row may end right after its pixels. ``is_bigendian`` is honoured
    for 16-bit encodings. Raises :class:`ImageDecodeError` for an unknown encoding, a zero-size
    image, a ``step`` shorter than a row, or ``data`` shorter than the header promises.
    """
    layout = _LAYOUTS.get(encoding.strip().lower()) if isinstance(encoding, str) else None
    if layout is None:
        raise ImageDecodeError(f"unsupported image encoding '{encoding}'; supported: "
                               f"{', '.join(SUPPORTED_ENCODINGS)}")
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f'zero-size image ({width}x{height})')
    if height * width > MAX_PIXELS:
        raise ImageDecodeError(f'image of {width}x{height} pixels exceeds the {MAX_PIXELS} pixel limit')
    itemsize = np.dtype(layout.dtype).itemsize
    row_bytes = width * layout.channels * itemsize
    if layout.channels == 2 and width % 2:
        raise ImageDecodeError(f"'{encoding}' needs an even width, got {width}")
    if step < row_bytes:
        raise ImageDecodeError(f"step {step} is shorter than one row of {width} '{encoding}' pixels "
                               f'({row_bytes} bytes)')
    buffer = _as_bytes_view(data)
    needed = (height - 1) * step + row_bytes
    if buffer.size < needed:
        raise ImageDecodeError(f'truncated image data: {buffer.size} bytes, expected at least {needed} '
                               f'for {width}x{height} {encoding} with step {step}')

    # Rows of `step` bytes, padding cut off; the padded last row may be absent, so pad the view.
    if buffer.size < height * step:
        buffer = np.concatenate([buffer[:needed], np.zeros(height * step - needed, np.uint8)])
    rows = buffer[:height * step].reshape(height, step)[:, :row_bytes]
    byte_order = '>' if is_bigendian else '<'
    pixels = np.ascontiguousarray(rows).view(np.dtype(layout.dtype).newbyteorder(byte_order))
    pixels = pixels.reshape(height, width, layout.channels)
    if itemsize == 2:
        pixels = _scale_16_to_8(pixels)
    if layout.to_rgb is None:
        return np.ascontiguousarray(pixels)
    source = pixels[:, :, 0] if layout.channels == 1 else pixels
    return np.ascontiguousarray(cv2.cvtColor(np.ascontiguousarray(source), layout.to_rgb))


def _scale_16_to_8(pixels: np.ndarray) -> np.ndarray:
    """16-bit values to 8 bits exactly as cv_bridge does: round(v * 255 / 65535) == (v + 128) // 257."""
    wide = pixels.astype(np.uint32)
    return ((wide + 128) // 257).astype(np.uint8)


def compressed_to_rgb(format: str, data: Any) -> np.ndarray:  # noqa: A002 - the message field name
    """Decode a ``sensor_msgs/CompressedImage`` payload (JPEG or PNG) to (H, W, 3) uint8 RGB.

    ``format`` is the message's field (e.g. 'jpeg', 'png', 'rgb8; jpeg compressed bgr8'); the
    payload itself decides the codec. Depth images ('compressedDepth') are refused.
    """
    fmt = (format or '').lower()
    if 'compresseddepth' in fmt:
        raise ImageDecodeError(f"compressed depth images ('{format}') are not camera frames")
    buffer = _as_bytes_view(data)
    if buffer.size == 0:
        raise ImageDecodeError(f"empty compressed image ('{format}')")
    decoded = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if decoded is None or decoded.size == 0:
        raise ImageDecodeError(f"cannot decode compressed image ('{format}', {buffer.size} bytes): "
                               f'not a complete JPEG/PNG payload')
    return np.ascontiguousarray(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB))


def _cv_bridge():
    """A CvBridge instance, or None when cv_bridge is not installed (no ROS distro)."""
    try:
        from cv_bridge import CvBridge
    except ImportError:
        return None
    return CvBridge()


_BRIDGE = None
_BRIDGE_CHECKED = False


def cv_bridge_available() -> bool:
    """True when ``image_msg_to_rgb`` converts through cv_bridge."""
    global _BRIDGE, _BRIDGE_CHECKED
    if not _BRIDGE_CHECKED:
        _BRIDGE, _BRIDGE_CHECKED = _cv_bridge(), True
    return _BRIDGE is not None


def image_msg_to_rgb(msg: Any, use_cv_bridge: bool = True) -> np.ndarray:
    """A ``sensor_msgs/Image`` (any object with its fields) to (H, W, 3) uint8 RGB.

    Uses cv_bridge when importable and ``use_cv_bridge``, else :func:`image_to_rgb`. Input is
    validated by the NumPy path's rules either way, so both paths reject the same messages.
    cv_bridge cannot slice rows whose padding is not a whole number of pixels; those go through
    the NumPy converter.
    """
    layout = _LAYOUTS.get(str(msg.encoding).strip().lower())
    if not (use_cv_bridge and cv_bridge_available() and layout is not None and layout.channels != 2
            and msg.step % (layout.channels * np.dtype(layout.dtype).itemsize) == 0
            and len(msg.data) >= msg.height * msg.step > 0 and msg.width > 0):
        return image_to_rgb(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data)
    try:
        rgb = _BRIDGE.imgmsg_to_cv2(msg, desired_encoding='rgb8')
    except Exception as error:  # CvBridgeError and OpenCV errors: report them uniformly
        raise ImageDecodeError(f'cv_bridge could not convert {msg.encoding} image: {error}') from error
    return np.ascontiguousarray(rgb)


def frame_to_rgb(msg: Any, use_cv_bridge: bool = True) -> np.ndarray:
    """An ``Image`` or ``CompressedImage`` message (rclpy or rosbags) to (H, W, 3) uint8 RGB.

    The one entry point for camera frames: the video node and offline extraction both call it.
    """
    if hasattr(msg, 'encoding'):
        return image_msg_to_rgb(msg, use_cv_bridge)
    if hasattr(msg, 'format'):
        return compressed_to_rgb(msg.format, msg.data)
    raise ImageDecodeError(f'{type(msg).__name__} is neither a sensor_msgs/Image nor a CompressedImage')
