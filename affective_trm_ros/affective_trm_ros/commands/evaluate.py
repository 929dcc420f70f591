"""`affective-trm evaluate`: metrics, plots and a report for a checkpoint on a feature-store split.

    affective-trm evaluate --checkpoint runs/trm/best.pt --store features/crema_d --split test
    affective-trm evaluate --checkpoint runs/trm/best.pt --store features/mine --split all --out eval_mine

A split name uses the checkpoint's own train/val/test split when the store is the one it was
trained on, otherwise the same seeded speaker-independent split computed on this store.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from affective_trm_ros.core.device import DEVICE_CHOICES_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--checkpoint', required=True, type=Path, help='checkpoint file (.pt)')
    parser.add_argument('--store', required=True, type=Path, help='feature store directory')
    parser.add_argument('--split', default='test', help="'train', 'val', 'test' (default) or 'all'")
    parser.add_argument('--sessions', nargs='+', help='evaluate these session ids instead of a split')
    parser.add_argument(
        '--out', type=Path, default=None, help='report directory (default: <checkpoint folder>/eval_<split>)'
    )
    parser.add_argument('--device', default='cpu', help=DEVICE_CHOICES_HELP + ' (default: cpu)')
    parser.add_argument(
        '--max-timeseries', type=int, default=4, help='sessions plotted over time (default: 4)'
    )


def run(args) -> int:
    from affective_trm_ros.core.encoders.loading import untrained_line
    from affective_trm_ros.offline.evaluation.evaluate import evaluate_checkpoint, metrics_table
    from affective_trm_ros.offline.io.feature_store import FeatureStore

    split = list(args.sessions) if args.sessions else args.split
    name = 'custom' if args.sessions else args.split
    out = args.out or args.checkpoint.parent / f'eval_{name}'
    try:
        store = FeatureStore(args.store)
        print(untrained_line(store.encoder_identities))
        report = evaluate_checkpoint(
            args.checkpoint, store, split, device=args.device, out_dir=out, max_timeseries=args.max_timeseries
        )
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f'evaluate: {error}', file=sys.stderr)
        return 1
    print(
        f'{report["model_kind"]} on {report["split_origin"]}: {report["sessions"]} sessions, '
        f'{report["labelled_frames"]} labelled frames'
    )
    print(metrics_table(report['metrics']))
    print(f'report: {out / "report.md"}')
    return 0
