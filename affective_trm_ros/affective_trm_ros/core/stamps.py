"""Message stamps as seconds: the one conversion the nodes and offline extraction share.

Offline features must carry exactly the stamps the nodes compute from a ``builtin_interfaces/Time``
(``sec + nanosec * 1e-9``), so both paths use these functions.
"""

NS_PER_S = 1_000_000_000


def stamp_to_seconds(stamp) -> float:
    """A ``builtin_interfaces/Time`` (rclpy or rosbags message: ``sec``, ``nanosec``) in seconds."""
    return int(stamp.sec) + int(stamp.nanosec) * 1e-9


def ns_to_seconds(stamp_ns: int) -> float:
    """Nanoseconds in seconds, computed as :func:`stamp_to_seconds` computes it from ``sec``/``nanosec``."""
    return int(stamp_ns // NS_PER_S) + int(stamp_ns % NS_PER_S) * 1e-9
