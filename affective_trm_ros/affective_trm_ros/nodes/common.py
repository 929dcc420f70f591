"""Shared rclpy glue: the one main() shape, declared parameters, QoS profiles and diagnostics.

Everything here is thin; algorithms live in ``affective_trm_ros.core`` (the rate, latency and
bounded-worker helpers in :mod:`affective_trm_ros.core.runtime_stats`, re-exported here).
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Optional

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data

from affective_trm_ros.core.runtime_stats import BoundedWorker, LatencyWindow, RateMeter

__all__ = ['LATCHED_QOS', 'RELIABLE_QOS', 'SENSOR_QOS', 'BoundedWorker', 'Diagnostics', 'LatencyWindow',
           'ParameterView', 'RateMeter', 'ThrottledWarning', 'add_validator', 'declare', 'run_node',
           'spin_nodes', 'NodeThreads', 'startup_logger_name']

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
    """Validate parameter updates with a pure function, apply the accepted ones afterwards.

    The node's ROS parameters stay the only copy of the values. ``validate(proposed)`` gets
    {name: value} of the whole update merged over the current values and returns an error string
    or None; an invalid update is refused whole. ``apply(changed)`` runs after rclpy has stored an
    accepted update (a post-set callback where rclpy has them, Jazzy and later; on Humble, right
    after validation, the only hook it offers).
    """
    def on_set(params) -> SetParametersResult:
        changed = {p.name: p.value for p in params}
        proposed = {name: p.value for name, p in node.get_parameters_by_prefix('').items()}
        proposed.update(changed)
        error = validate(proposed)
        if error:
            return SetParametersResult(successful=False, reason=error)
        if apply is not None and not post_set:
            apply(changed)
        return SetParametersResult(successful=True)

    post_set = apply is not None and hasattr(node, 'add_post_set_parameters_callback')
    node.add_on_set_parameters_callback(on_set)
    if post_set:
        node.add_post_set_parameters_callback(lambda params: apply({p.name: p.value for p in params}))


class ParameterView(collections.abc.MutableMapping):
    """The node's declared ROS parameters as a read-through mapping: ``view['rate']`` is
    ``node.get_parameter('rate').value``, so the parameters stay the only copy of the values.

    Assignment exists for the ``p['x'] = declare(node, 'x', ...)`` idiom and for post-set
    callbacks: it is accepted only when it names a declared parameter and equals its value, and
    refused otherwise (a value kept beside the parameter would drift from it).
    """

    def __init__(self, node: Node) -> None:
        self._node = node

    def __getitem__(self, name: str):
        if not self._node.has_parameter(name):
            raise KeyError(f"'{name}' is not a parameter of {self._node.get_name()}")
        return self._node.get_parameter(name).value

    def __setitem__(self, name: str, value) -> None:
        if self[name] != value:
            raise TypeError(f"parameters change through set_parameters, not by assignment: '{name}' is "
                            f'{self[name]!r}, not {value!r}')

    def __delitem__(self, name: str) -> None:
        raise TypeError('parameters cannot be deleted through the view')

    def __iter__(self):
        return iter(self._node.get_parameters_by_prefix(''))

    def __len__(self) -> int:
        return len(self._node.get_parameters_by_prefix(''))


# ---------------------------------------------------------------- diagnostics

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

def spin_nodes(nodes: Iterable[Node], num_threads: Optional[int] = None,
               executor_factory: Optional[Callable[[], object]] = None) -> None:
    """Spin nodes on one executor until shutdown (multi-threaded unless ``executor_factory`` makes
    another, e.g. a single-threaded one for a node whose callbacks only hand over); always clean up."""
    nodes = list(nodes)
    executor = executor_factory() if executor_factory else MultiThreadedExecutor(num_threads=num_threads)
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


class NodeThreads:
    """Each node on its own single-threaded executor in its own thread (several nodes in one
    process: an encoder's callbacks never wait behind another node's, and no multi-threaded
    executor re-submits queued callbacks). :meth:`stop` shuts the executors down and joins the
    threads: afterwards none of the nodes' callbacks is still running."""

    def __init__(self, nodes: Iterable[Node], context=None) -> None:
        self._executors, self._threads = [], []
        for node in nodes:
            executor = SingleThreadedExecutor(context=context)
            executor.add_node(node)
            thread = threading.Thread(target=self._spin, args=(executor,), name=f'spin_{node.get_name()}',
                                      daemon=True)
            self._executors.append(executor)
            self._threads.append(thread)
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _spin(executor) -> None:
        with contextlib.suppress(ExternalShutdownException):  # the context was shut down (Ctrl-C)
            executor.spin()

    def stop(self, timeout_s: float = 10.0) -> None:
        for executor in self._executors:
            executor.shutdown()
        for thread in self._threads:
            thread.join(timeout=timeout_s)


def startup_logger_name(argv: Sequence[str], default: str) -> str:
    """The logger name of the node that ``argv`` starts: ``[namespace.]name``, honouring the
    ``-r __node:=NAME`` and ``-r __ns:=/NS`` rules ``ros2 launch`` and ``ros2 run`` pass."""
    name, namespace, in_ros_args = default, '', False
    for index, arg in enumerate(argv):
        if arg == '--ros-args':
            in_ros_args = True
        elif arg == '--':
            in_ros_args = False
        elif in_ros_args and arg in ('-r', '--remap') and index + 1 < len(argv):
            target, _, value = argv[index + 1].partition(':=')
            key = target.rsplit(':', 1)[-1]   # 'fusion:__node' is a rule for one node
            if key == '__node' and value:
                name = value
            elif key == '__ns':
                namespace = value
    return '.'.join([part for part in namespace.split('/') if part] + [name])


def run_node(node_factory: Callable[[], Node], args=None, name: Optional[str] = None,
             executor_factory: Optional[Callable[[], object]] = None) -> int:
    """The one main() shape: init, build the node, spin an executor (multi-threaded unless
    ``executor_factory`` makes another), shut down.

    A node that fails to start (bad parameter, missing weights) logs why under the node's own
    name (``name``, default the executable's name, as the suite names its nodes, or the name a
    ``__node:=`` remapping gives) and exits with 1.
    """
    rclpy.init(args=args)
    try:
        node = node_factory()
    except (KeyboardInterrupt, ExternalShutdownException):
        rclpy.try_shutdown()
        return 0
    except Exception as error:  # start-up failure: say why, exit non-zero
        argv = list(sys.argv if args is None else args)
        default = name or (os.path.basename(argv[0]) if argv else 'affective_trm_ros')
        rclpy.logging.get_logger(startup_logger_name(argv, default)).fatal(f'failed to start: {error}')
        rclpy.try_shutdown()
        return 1
    spin_nodes([node], executor_factory=executor_factory)
    return 0
