"""Shared rclpy glue: the one main() shape, declared parameters, QoS profiles and diagnostics.

Everything here is thin; algorithms live in ``affective_trm_ros.core``.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Optional

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

# ---------------------------------------------------------------- QoS

#: Camera and microphone input: best effort, keep the newest few (drivers publish this way).
SENSOR_QOS = qos_profile_sensor_data
#: Embeddings and estimates: reliable, bounded queue.
RELIABLE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50,
                          reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
#: State a late joiner needs (AudioInfo, the current text context): transient local, depth 1.
LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)


# ---------------------------------------------------------------- parameters

def declare(node: Node, name: str, default, description: str, *, min_value=None, max_value=None,
            choices: Optional[Sequence[str]] = None, read_only: bool = False):
    """Declare one parameter with a descriptor (description, range, read-only) and return its value."""
    extra = ''
    descriptor = ParameterDescriptor(description=description, read_only=read_only)
    if min_value is not None or max_value is not None:
        if isinstance(default, bool):
            raise TypeError(f'{name}: ranges do not apply to booleans')
        if isinstance(default, int):
            descriptor.integer_range = [IntegerRange(
                from_value=int(min_value if min_value is not None else -2**31),
                to_value=int(max_value if max_value is not None else 2**31 - 1), step=0)]
        else:
            descriptor.floating_point_range = [FloatingPointRange(
                from_value=float(min_value if min_value is not None else -math.inf),
                to_value=float(max_value if max_value is not None else math.inf), step=0.0)]
    if choices:
        extra = f" One of: {', '.join(choices)}."
        descriptor.additional_constraints = extra.strip()
    descriptor.description = description + extra
    return node.declare_parameter(name, default, descriptor).value


def add_validator(node: Node, validate: Callable[[dict], Optional[str]],
                  apply: Optional[Callable[[dict], None]] = None) -> None:
    """Validate runtime parameter updates with a pure function; never half-apply an invalid update.

    ``validate(proposed)`` gets {name: value} of the whole update merged over the current values
    and returns an error string or None. ``apply(changed)`` runs only for accepted updates.
    """
    def on_set(params) -> SetParametersResult:
        changed = {p.name: p.value for p in params}
        proposed = {name: node.get_parameter(name).value for name in node._parameters}  # noqa: SLF001
        proposed.update(changed)
        error = validate(proposed)
        if error:
            return SetParametersResult(successful=False, reason=error)
        if apply is not None:
            apply(changed)
        return SetParametersResult(successful=True)

    node.add_on_set_parameters_callback(on_set)


# ---------------------------------------------------------------- diagnostics

class RateMeter:
    """Events per second over a sliding window of recent event times (thread-safe, bounded)."""

    def __init__(self, window_s: float = 5.0, max_events: int = 2000) -> None:
        self._times = collections.deque(maxlen=max_events)
        self._window_s = window_s
        self._lock = threading.Lock()

    def tick(self, now: Optional[float] = None) -> None:
        with self._lock:
            self._times.append(time.monotonic() if now is None else now)

    def rate(self, now: Optional[float] = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = [t for t in self._times if now - t <= self._window_s]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0], 1e-9)
        return (len(recent) - 1) / span if span > 0 else 0.0


class LatencyWindow:
    """Percentiles of the last N durations (seconds)."""

    def __init__(self, size: int = 500) -> None:
        self._values = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(seconds)

    def percentile(self, q: float) -> float:
        with self._lock:
            values = sorted(self._values)
        if not values:
            return float('nan')
        index = min(len(values) - 1, max(0, int(round(q / 100.0 * (len(values) - 1)))))
        return values[index]


class Diagnostics:
    """Publishes one DiagnosticStatus for a node on /diagnostics at a fixed period.

    ``collect()`` returns (level, message, {key: value}); level is DiagnosticStatus.OK/WARN/ERROR.
    """

    def __init__(self, node: Node, collect: Callable[[], tuple], period_s: float = 1.0,
                 hardware_id: str = '') -> None:
        self._node = node
        self._collect = collect
        self._hardware_id = hardware_id
        self._pub = node.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._timer = node.create_timer(period_s, self.publish)

    def publish(self) -> None:
        level, message, values = self._collect()
        status = DiagnosticStatus(level=level, name=f'{self._node.get_fully_qualified_name()}',
                                  message=message, hardware_id=self._hardware_id)
        status.values = [KeyValue(key=str(k), value=_format_value(v)) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self._node.get_clock().now().to_msg()
        self._pub.publish(array)


def _format_value(value) -> str:
    if isinstance(value, float):
        return 'nan' if math.isnan(value) else f'{value:.4g}'
    return str(value)


class ThrottledWarning:
    """Log a warning at most once per period per key, counting every occurrence."""

    def __init__(self, node: Node, period_s: float = 5.0) -> None:
        self._node = node
        self._period_s = period_s
        self._last = {}
        self.counts = collections.Counter()

    def __call__(self, key: str, message: str) -> None:
        self.counts[key] += 1
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) >= self._period_s:
            self._last[key] = now
            self._node.get_logger().warning(f'{message} (seen {self.counts[key]} times)')


# ---------------------------------------------------------------- main()

def spin_nodes(nodes: Iterable[Node], num_threads: Optional[int] = None) -> None:
    """Spin nodes on one multi-threaded executor until shutdown; always clean up."""
    nodes = list(nodes)
    executor = MultiThreadedExecutor(num_threads=num_threads)
    for node in nodes:
        executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        for node in nodes:
            node.destroy_node()
        if rclpy.ok():
            rclpy.try_shutdown()


def run_node(node_factory: Callable[[], Node], args=None) -> int:
    """The one main() shape: init, build the node, spin a multi-threaded executor, shut down.

    A node that fails to start (bad parameter, missing weights) logs why and exits with 1.
    """
    rclpy.init(args=args)
    try:
        node = node_factory()
    except (KeyboardInterrupt, ExternalShutdownException):
        rclpy.try_shutdown()
        return 0
    except Exception as error:  # start-up failure: say why, exit non-zero
        rclpy.logging.get_logger('affective_trm_ros').fatal(f'failed to start: {error}')
        rclpy.try_shutdown()
        return 1
    spin_nodes([node])
    return 0
