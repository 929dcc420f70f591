"""`affective-trm run`: the nodes of affective_trm.launch.py in one process, without `ros2 launch`.

The same node set, parameter files and overrides as the launch file (both come from
:mod:`affective_trm_ros.system`), spun by one multi-threaded executor::

    affective-trm run --checkpoint fusion.pt
    affective-trm run --config my_system.yaml --only fusion,video --set video_encoder.allow_untrained=true
    affective-trm run --dry-run        # print the nodes, parameter files and overrides, start nothing
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from affective_trm_ros.system import (
    SYSTEM_CONFIG,
    TOPIC_ARGUMENTS,
    config_dir,
    parse_assignments,
    plan,
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
    parser.add_argument('--encoders', default='',
                        help="encoder set (default, offline) and/or plugins, e.g. "
                             "'offline,text=embeddinggemma' (default: from the config); the checkpoint must "
                             'have been trained with them')
    parser.add_argument('--visualizer', action='store_true', help='also run the visualizer node')
    parser.add_argument('--hri-expression', action='store_true',
                        help='also publish ROS4HRI hri_msgs/Expression per face (needs hri_msgs)')
    parser.add_argument('--only', default='',
                        help='run only these nodes, comma-separated: video_encoder (or video), audio_encoder '
                             '(audio), text_encoder (text), fusion, visualizer, hri_expression')
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
    parser.add_argument('--dry-run', action='store_true', help='print what would run and exit')


def run(args: argparse.Namespace) -> int:
    try:
        kwargs = dict(only=args.only or None, modalities=args.modalities, visualizer=args.visualizer,
                      hri_expression=args.hri_expression,
                      checkpoint=args.checkpoint, device=args.device,
                      use_sim_time=True if args.use_sim_time else None,
                      topics={name: getattr(args, name) for name in TOPIC_ARGUMENTS},
                      parameters=parse_assignments(args.assignments), config_directory=args.config_dir,
                      encoders=args.encoders)
        steps = plan(args.config, **kwargs)
    except (ValueError, FileNotFoundError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    for step in steps:
        print(f"{step.spec.name}: {' + '.join(str(f) for f in step.files) or 'node defaults'}"
              + (f'; overrides {step.overrides}' if step.overrides else '')
              + (f"; remappings {', '.join(f'{a}:={b}' for a, b in step.remappings)}" if step.remappings
                 else ''))
    if args.dry_run:
        return 0

    from affective_trm_ros.nodes.in_process import run_system

    return run_system(args.config, namespace=args.namespace, **kwargs)
