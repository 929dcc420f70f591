"""`affective-trm run`: the nodes of affective_trm.launch.py in one process, without `ros2 launch`.

The same node set, parameter files and overrides as the launch file (both come from
:mod:`affective_trm_ros.system`), spun by one multi-threaded executor::

    affective-trm run --checkpoint fusion.pt
    affective-trm run --config my_system.yaml --only fusion,video --set video_encoder.allow_untrained=true
    affective-trm run --dry-run        # print the nodes, parameter files and overrides, start nothing

:func:`create_nodes` is the reusable part (e.g. for replaying a bag through the real nodes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import yaml

from affective_trm_ros.system import (
    NODES_BY_NAME,
    SYSTEM_CONFIG,
    TOPIC_ARGUMENTS,
    config_dir,
    parameter_files,
    parameter_overrides,
    parse_modalities,
    select_nodes,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--config', type=Path, default=None,
                        help=f'system parameter file applied over config/<node>.yaml '
                             f'(default: {config_dir() / SYSTEM_CONFIG})')
    parser.add_argument('--checkpoint', default='', help='fusion checkpoint (default: from the config)')
    parser.add_argument('--device', default='', help='device of the encoders and fusion: auto, cpu, cuda, '
                                                     'cuda:N (default: from the config)')
    parser.add_argument('--modalities', default='video,audio,text',
                        help='modalities to run and fuse (default: video,audio,text; video required)')
    parser.add_argument('--visualizer', action='store_true', help='also run the visualizer node')
    parser.add_argument('--only', default='',
                        help='run only these nodes, comma-separated: video_encoder (or video), audio_encoder '
                             '(audio), text_encoder (text), fusion, visualizer')
    parser.add_argument('--namespace', default='', help='namespace of every node')
    parser.add_argument('--use-sim-time', action='store_true', help='use /clock (bag replay)')
    for name, (default, help_text) in TOPIC_ARGUMENTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default='',
                            help=f'{help_text} (default: from the config, normally {default})')
    parser.add_argument('--set', dest='assignments', action='append', default=[], metavar='NODE.PARAM=VALUE',
                        help='set one parameter (VALUE is YAML: true, 2.5, [a, b]; a float needs '
                             'its decimal point, 0.0 not 0); repeatable')
    parser.add_argument('--config-dir', type=Path, default=None,
                        help='directory of the per-node files <node>.yaml (default: the installed config/)')
    parser.add_argument('--threads', type=int, default=None, help='executor threads (default: CPU count)')
    parser.add_argument('--dry-run', action='store_true', help='print what would run and exit')


def parse_assignments(assignments) -> dict:
    """['fusion.max_wait_s=1.0', ...] -> {'fusion': {'max_wait_s': 1.0}} (values parsed as YAML)."""
    result: dict = {}
    for item in assignments:
        target, sep, text = item.partition('=')
        node, dot, name = target.strip().partition('.')
        if not sep or not dot or not name:
            raise ValueError(f"--set {item!r}: expected NODE.PARAM=VALUE, e.g. fusion.max_wait_s=1.0")
        if node not in NODES_BY_NAME:
            raise ValueError(f"--set {item!r}: unknown node '{node}'; nodes: {list(NODES_BY_NAME)}")
        result.setdefault(node, {})[name] = yaml.safe_load(text) if text.strip() else ''
    return result


def plan(config=None, *, only=None, modalities='video,audio,text', visualizer: bool = False,
         checkpoint: str = '', device: str = '', use_sim_time: Optional[bool] = None,
         topics: Optional[dict] = None, parameters: Optional[dict] = None,
         config_directory: Optional[Path] = None) -> list:
    """[(NodeSpec, parameter files, overrides)] for the nodes to start, without starting them."""
    config = Path(config) if config else (Path(config_directory or config_dir()) / SYSTEM_CONFIG)
    modalities = parse_modalities(modalities)
    parameters = parameters or {}
    unknown = sorted(set(parameters) - set(NODES_BY_NAME))
    if unknown:
        raise ValueError(f'parameters given for unknown nodes {unknown}; nodes: {list(NODES_BY_NAME)}')
    result = []
    for spec in select_nodes(modalities, visualizer=visualizer, only=only):
        files = parameter_files(spec, config, config_directory)
        overrides = parameter_overrides(spec, modalities=modalities, checkpoint=checkpoint, device=device,
                                        use_sim_time=use_sim_time, topics=topics)
        overrides.update(parameters.get(spec.name, {}))
        result.append((spec, files, overrides))
    return result


def create_nodes(config=None, *, namespace: str = '', context=None, **plan_kwargs) -> list:
    """Build the nodes of :func:`plan` (same keyword arguments) in this process.

    Each node reads its parameter files exactly as under ``ros2 launch`` (``--params-file``); the
    overrides win over the files. On a start-up failure the nodes already built are destroyed and
    the error propagates (its message says what to fix).
    """
    from rclpy.parameter import Parameter

    steps = plan(config, **plan_kwargs)
    # The fusion node first: it starts in a second, and a missing checkpoint should not wait for the
    # encoders to load their weights.
    order = sorted(range(len(steps)), key=lambda i: steps[i][0].name != 'fusion')
    built = {}
    try:
        for index in order:
            spec, files, overrides = steps[index]
            cli_args = ['--ros-args']
            for path in files:
                cli_args += ['--params-file', str(path)]
            values = [Parameter(name, value=value) for name, value in overrides.items()]
            built[index] = spec.node_class()(context=context, namespace=namespace or None, cli_args=cli_args,
                                             parameter_overrides=values)
    except BaseException:
        for node in built.values():
            node.destroy_node()
        raise
    return [built[index] for index in range(len(steps))]


def run(args: argparse.Namespace) -> int:
    try:
        kwargs = dict(only=args.only or None, modalities=args.modalities, visualizer=args.visualizer,
                      checkpoint=args.checkpoint, device=args.device,
                      use_sim_time=True if args.use_sim_time else None,
                      topics={name: getattr(args, name) for name in TOPIC_ARGUMENTS},
                      parameters=parse_assignments(args.assignments), config_directory=args.config_dir)
        steps = plan(args.config, **kwargs)
    except (ValueError, FileNotFoundError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    for spec, files, overrides in steps:
        print(f"{spec.name}: {' + '.join(str(f) for f in files) or 'node defaults'}"
              + (f'; overrides {overrides}' if overrides else ''))
    if args.dry_run:
        return 0
    if args.threads is not None and args.threads < 1:
        print('error: --threads must be >= 1', file=sys.stderr)
        return 2

    import rclpy

    from affective_trm_ros.nodes.common import spin_nodes

    rclpy.init()
    try:
        nodes = create_nodes(args.config, namespace=args.namespace, **kwargs)
    except KeyboardInterrupt:
        rclpy.try_shutdown()
        return 130
    except Exception as error:  # a node failed to start: say which and why
        print(f'error: failed to start: {error}', file=sys.stderr)
        rclpy.try_shutdown()
        return 1
    print(f"running {', '.join(node.get_fully_qualified_name() for node in nodes)} (Ctrl-C to stop)",
          flush=True)
    spin_nodes(nodes, num_threads=args.threads)
    return 0
