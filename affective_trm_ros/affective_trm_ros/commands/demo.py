"""`affective-trm demo`: the main job, end to end on this machine (no GPU, no network needed).

Parses the options and runs :mod:`affective_trm_ros.main_job` (sample sessions, features, training,
replay through the nodes, report); ``--live`` runs the nodes with the trained checkpoint on live
topics instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from affective_trm_ros.core.encoders.sets import ENCODER_SETS
from affective_trm_ros.main_job import DEFAULT_OUT, LATEST, SIZES, DemoSize, run_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--out', type=Path, default=DEFAULT_OUT, help=f'working directory (default: {DEFAULT_OUT})'
    )
    parser.add_argument(
        '--quick', action='store_true', help='tiny sizes (seconds, not minutes): a smoke test'
    )
    parser.add_argument(
        '--encoders',
        choices=('auto', *ENCODER_SETS),
        default='auto',
        help="encoder set: 'default' (HSEmotion, Dasheng, EmbeddingGemma: weights from "
        "`affective-trm weights fetch`), 'offline' (FER2013 mini-Xception, eGeMAPS, "
        "MiniLM: weights install with pip); 'auto' (default): 'default' when its "
        "weights are present, else 'offline'",
    )
    parser.add_argument(
        '--allow-untrained',
        action='store_true',
        help='run encoders whose weights are absent with random weights (never by default)',
    )
    parser.add_argument(
        '--people',
        type=int,
        default=1,
        help='faces side by side in the held-out sessions, each with its own script (default: 1)',
    )
    parser.add_argument('--train-sessions', type=int, default=None, help='training sessions to generate')
    parser.add_argument(
        '--val-sessions', type=int, default=None, help='validation sessions (model selection)'
    )
    parser.add_argument('--heldout-sessions', type=int, default=None, help='held-out test sessions')
    parser.add_argument(
        '--session-duration', type=float, default=None, help='seconds per training/validation session'
    )
    parser.add_argument('--heldout-duration', type=float, default=None, help='seconds per held-out session')
    parser.add_argument('--fps', type=float, default=None, help='camera frame rate of the sessions')
    parser.add_argument('--steps', type=int, default=None, help='optimiser steps per model')
    parser.add_argument('--seeds', type=int, default=None, help='training seeds (mean +- sd over them)')
    parser.add_argument('--node-seeds', type=int, default=None,
                        help='seeds whose TRM is replayed through the ROS 2 nodes (default: all); the '
                             "other seeds' TRMs run offline on the embeddings the nodes published (the "
                             'report shows the two agree for the replayed seeds)')
    parser.add_argument(
        '--detector',
        choices=('haar', 'mtcnn'),
        default='haar',
        help='face detector of the video encoder (default: haar, faster on CPU)',
    )
    parser.add_argument(
        '--device', default='cpu', help='device for encoders, training and fusion (default: cpu)'
    )
    parser.add_argument('--seed', type=int, default=0, help='first seed of the sessions and of training')
    parser.add_argument(
        '--deterministic',
        action='store_true',
        help="PyTorch's deterministic algorithms in training (CUDA included)",
    )
    parser.add_argument(
        '--fresh', action='store_true', help='recompute every stage instead of reusing the cache'
    )
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    live = parser.add_argument_group('live mode')
    live.add_argument(
        '--live',
        action='store_true',
        help='run the nodes with the trained checkpoint on live topics (no replay, no report)',
    )
    for name, default in (('image-topic', 'image_raw'), ('audio-topic', 'audio'), ('speech-topic', 'speech')):
        live.add_argument(f'--{name}', default='', help=f'--live: input topic (default: {default})')
    live.add_argument('--visualizer', action='store_true', help='--live: also run the visualizer node')


def _size(args: argparse.Namespace) -> DemoSize:
    size = SIZES['quick' if args.quick else 'default']
    given = (
        ('train_sessions', args.train_sessions),
        ('val_sessions', args.val_sessions),
        ('heldout_sessions', args.heldout_sessions),
        ('session_s', args.session_duration),
        ('heldout_s', args.heldout_duration),
        ('fps', args.fps),
        ('steps', args.steps),
        ('seeds', args.seeds),
    )
    changes = {name: value for name, value in given if value is not None}
    size = dataclasses.replace(size, **changes)
    for name in ('train_sessions', 'val_sessions', 'heldout_sessions', 'steps', 'seeds'):
        if getattr(size, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1')
    if not 1 <= args.people <= 4:
        raise ValueError('--people must be in [1, 4]')
    return size


def run(args: argparse.Namespace) -> int:
    try:
        size = _size(args)
    except ValueError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    if args.live:
        return run_live(args)
    try:
        return run_demo(args, size)
    except RuntimeError as error:  # missing espeak-ng or weights, a node that failed, ...
        print(f'\nerror: {error}', file=sys.stderr)
        return 1


# ---------------------------------------------------------------- the main job




# ---------------------------------------------------------------- live


def run_live(args: argparse.Namespace) -> int:
    """The nodes with the demo's trained checkpoint on live topics (what `affective-trm run` does)."""
    from affective_trm_ros.nodes.in_process import run_system
    from affective_trm_ros.system import TOPIC_ARGUMENTS

    latest = Path(args.out) / LATEST
    if not latest.is_file():
        print(
            f'error: no trained checkpoint yet ({latest} is missing); run `affective-trm demo` first',
            file=sys.stderr,
        )
        return 2
    saved = json.loads(latest.read_text())
    print(
        f'live: the nodes with {saved["checkpoint"]} on the camera/microphone/speech topics (Ctrl-C to stop)'
    )
    return run_system(
        checkpoint=saved['checkpoint'],
        device=args.device or saved.get('device', 'cpu'),
        visualizer=bool(args.visualizer),
        topics={name: getattr(args, name, '') or '' for name in TOPIC_ARGUMENTS},
        parameters=saved['parameters'],
    )
