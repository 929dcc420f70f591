"""The nodes of the suite built and spun in this process (``affective-trm run``, replay).

Each node reads its parameter files exactly as under ``ros2 launch`` (``--params-file``); what
:func:`affective_trm_ros.system.plan` decides (nodes, files, overrides) is the same for both.
"""

from __future__ import annotations

from affective_trm_ros.system import plan


class NodeStartError(RuntimeError):
    """A node of the suite failed to start; ``node`` names it, the message says why."""

    def __init__(self, node: str, error: BaseException) -> None:
        super().__init__(f'{node}: {error}')
        self.node = node


def create_nodes(config=None, *, namespace: str = '', context=None, **plan_kwargs) -> list:
    """Build the nodes of :func:`~affective_trm_ros.system.plan` (same keyword arguments) in this process.

    Each node reads its parameter files exactly as under ``ros2 launch`` (``--params-file``) and
    its topic remappings as ``--remap`` rules; the overrides win over the files. On a start-up
    failure the nodes already built are destroyed and :class:`NodeStartError` names the node that
    failed (the message says what to fix; the original error is its ``__cause__``).
    """
    from rclpy.parameter import Parameter

    steps = plan(config, **plan_kwargs)
    # The fusion node first: it starts in a second, and a missing checkpoint should not wait for the
    # encoders to load their weights.
    order = sorted(range(len(steps)), key=lambda i: steps[i].spec.name != 'fusion')
    built = {}
    for index in order:
        step = steps[index]
        cli_args = ['--ros-args']
        for path in step.files:
            cli_args += ['--params-file', str(path)]
        for name, new_name in step.remappings:
            cli_args += ['--remap', f'{name}:={new_name}']
        values = [Parameter(name, value=value) for name, value in step.overrides.items()]
        try:
            built[index] = step.spec.node_class()(context=context, namespace=namespace or None,
                                                  cli_args=cli_args, parameter_overrides=values)
        except Exception as error:
            for node in built.values():
                node.destroy_node()
            raise NodeStartError(step.spec.name, error) from error
        except BaseException:
            for node in built.values():
                node.destroy_node()
            raise
    return [built[index] for index in range(len(steps))]


def run_system(config=None, *, namespace: str = '', **plan_kwargs) -> int:
    """Start the nodes of :func:`~affective_trm_ros.system.plan` in this process, each on its own
    single-threaded executor thread, until Ctrl-C; returns the exit status (0, 1 when a node failed
    to start, 130 on Ctrl-C during start-up)."""
    import sys
    import threading

    import rclpy

    from affective_trm_ros.nodes.common import NodeThreads

    rclpy.init()
    try:
        nodes = create_nodes(config, namespace=namespace, **plan_kwargs)
    except KeyboardInterrupt:
        rclpy.try_shutdown()
        return 130
    except NodeStartError as error:  # say which node and why
        print(f'error: failed to start {error}', file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    print(f"running {', '.join(node.get_fully_qualified_name() for node in nodes)} (Ctrl-C to stop)",
          flush=True)
    spinning = NodeThreads(nodes)
    stopped = threading.Event()
    rclpy.get_default_context().on_shutdown(stopped.set)
    try:
        while rclpy.ok() and not stopped.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        spinning.stop()
        for node in nodes:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
