"""`affective-trm replay`: play a rosbag through the real nodes and write the evaluation report.

    affective-trm replay session_100 --checkpoint trm.pt --out replay_out
    affective-trm replay robot_bag --checkpoint trm.pt --realtime --labels-csv labels.csv

The replay itself lives in :mod:`affective_trm_ros.replay.session`; this command parses the
arguments, calls :func:`~affective_trm_ros.replay.session.replay_bag` and prints the summary.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from affective_trm_ros.offline.extraction.bag import BagTopics
from affective_trm_ros.offline.io.bags import BagError
from affective_trm_ros.replay.report import report_notices
from affective_trm_ros.replay.session import TOPIC_ROLES, ReplayOptions, ReplayOutcome, replay_bag
from affective_trm_ros.system import parse_assignments

__all__ = ['ReplayOptions', 'ReplayOutcome', 'add_arguments', 'print_summary', 'replay_bag', 'run']


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bag', type=Path, help='rosbag2 directory (MCAP or sqlite3)')
    parser.add_argument('--checkpoint', required=True, type=Path, help='fusion checkpoint (.pt)')
    parser.add_argument('--out', type=Path, default=None,
                        help='report directory (default: outputs/replay_<bag name>)')
    parser.add_argument('--realtime', action='store_true',
                        help='publish on the recording\'s schedule instead of as fast as the nodes allow')
    parser.add_argument('--rate', type=float, default=1.0, help='--realtime speed factor (default: 1.0)')
    parser.add_argument('--device', default='cpu', help="encoders' and fusion's device (default: cpu)")
    parser.add_argument('--allow-untrained', action='store_true',
                        help='let encoders without weight files run with random weights (explicit opt-in)')
    parser.add_argument('--config', type=Path, default=None,
                        help='system parameter file (default: config/affective_trm.yaml)')
    parser.add_argument('--set', dest='assignments', action='append', default=[], metavar='NODE.PARAM=VALUE',
                        help='set one node parameter, e.g. video_encoder.detector=haar (repeatable)')
    defaults = BagTopics()
    for name in TOPIC_ROLES:
        parser.add_argument(f"--{name.replace('_', '-')}-topic", dest=f'topic_{name}',
                            default=getattr(defaults, name), metavar='TOPIC',
                            help=f"bag topic of the {name.replace('_', ' ')}")
    parser.add_argument('--labels-csv', type=Path, default=None,
                        help='labels instead of the ground-truth topic: columns valence, arousal and '
                             'stamp (ROS time), frame (index), time (s since the first frame) or none '
                             '(one row per frame)')
    parser.add_argument('--timeout', type=float, default=120.0,
                        help='seconds to wait for any one answer of the nodes (default: 120)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> int:
    try:
        options = ReplayOptions(
            realtime=args.realtime, rate=args.rate, device=args.device, allow_untrained=args.allow_untrained,
            config=args.config, parameters=parse_assignments(args.assignments),
            topics=BagTopics(**{name: getattr(args, f'topic_{name}') for name in TOPIC_ROLES}),
            labels_csv=args.labels_csv, timeout_s=args.timeout, progress=not args.quiet)
        if options.rate <= 0:
            raise ValueError('--rate must be > 0')
        out_dir = args.out or Path('outputs') / f'replay_{args.bag.resolve().name}'
        outcome = replay_bag(args.bag, args.checkpoint, out_dir, options)
    except (ValueError, BagError, FileNotFoundError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    except RuntimeError as error:  # a node failed to start or stopped answering
        print(f'error: {error}', file=sys.stderr)
        return 1
    print_summary(outcome)
    return 0


def print_summary(outcome: ReplayOutcome) -> None:
    report = outcome.report
    for notice in report_notices(report):
        print(notice)
    metrics = report['metrics']
    print(f"replay ({report['mode']}): {report['frames']} frames, coverage {report['coverage'] * 100:.2f} %, "
          f"{report['throughput_fps']:.1f} frames/s, latency p50 {report['latency_ms']['p50']:.0f} ms "
          f"p95 {report['latency_ms']['p95']:.0f} ms")
    pooled = ' (pooled over everyone)' if report.get('people') else ''
    for name in ('valence', 'arousal'):
        m = metrics[name]
        print(f"  {name:8s} CCC {m['ccc']:.3f}  RMSE {m['rmse']:.3f}  Pearson {m['pearson']:.3f}  "
              f"(n={m['n']}){pooled}")
    for stream, person in (report.get('people') or {}).items():
        m = person['metrics']
        print(f"  person {stream}: coverage {person['coverage'] * 100:.1f} %, CCC valence "
              f"{m['valence']['ccc']:.3f} arousal {m['arousal']['ccc']:.3f} (n={m['valence']['n']})")
    print(f"report: {outcome.files['markdown']}")


