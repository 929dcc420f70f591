"""`affective-trm evaluate`: metrics, plots and a report for checkpoints on a feature-store split.

    affective-trm evaluate --checkpoint runs/trm/best.pt --store features/crema_d --split test
    affective-trm evaluate --checkpoint runs/trm_s0/best.pt runs/trm_s1/best.pt runs/trm_s2/best.pt \\
        --store features/crema_d --split test --out eval_trm
    affective-trm evaluate --checkpoint runs/trm/best.pt --store features/mine --split all --out eval_mine

Give one checkpoint per training seed: the report gives each metric's mean ± sd over them, every
session's mean CCC and a bootstrap 95 % confidence interval of the mean CCC over sessions (one
checkpoint: no sd, the interval still resamples sessions). A split name uses the checkpoint's own
train/val/test split when the store is the one it was trained on, otherwise the same seeded
speaker-independent split computed on this store.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from affective_trm_ros.core.device import DEVICE_CHOICES_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--checkpoint', required=True, type=Path, nargs='+',
                        help='checkpoint file(s) (.pt): one per training seed of the same model')
    parser.add_argument('--store', required=True, type=Path, help='feature store directory')
    parser.add_argument('--split', default='test', help="'train', 'val', 'test' (default) or 'all'")
    parser.add_argument('--sessions', nargs='+', help='evaluate these session ids instead of a split')
    parser.add_argument(
        '--out', type=Path, default=None,
        help='report directory (default: eval_<split> in the checkpoint\'s folder; several checkpoints: '
             'in the folder that holds all of theirs)',
    )
    parser.add_argument('--device', default='cpu', help=DEVICE_CHOICES_HELP + ' (default: cpu)')
    parser.add_argument(
        '--max-timeseries', type=int, default=4, help='sessions plotted over time (default: 4)'
    )


def default_out(checkpoints: list, name: str) -> Path:
    """eval_<name> beside the checkpoint, or in the deepest folder holding every checkpoint."""
    folders = [str(Path(c).resolve().parent) for c in checkpoints]
    common = Path(os.path.commonpath(folders)) if len(folders) > 1 else Path(checkpoints[0]).parent
    return common / f'eval_{name}'


def run(args) -> int:
    from affective_trm_ros.core.encoders.loading import untrained_line
    from affective_trm_ros.offline.evaluation.evaluate import (
        MAX_PRINTED_SESSIONS,
        evaluate_checkpoints,
        seed_summary_markdown,
    )
    from affective_trm_ros.offline.io.feature_store import FeatureStore

    split = list(args.sessions) if args.sessions else args.split
    name = 'custom' if args.sessions else args.split
    checkpoints = list(args.checkpoint)
    out = args.out or default_out(checkpoints, name)
    try:
        store = FeatureStore(args.store)
        print(untrained_line(store.encoder_identities))
        report = evaluate_checkpoints(
            checkpoints, store, split, device=args.device, out_dir=out, max_timeseries=args.max_timeseries
        )
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f'evaluate: {error}', file=sys.stderr)
        return 1
    print(
        f'{report["model_kind"]} ({len(checkpoints)} checkpoint(s)) on {report["split_origin"]}: '
        f'{report["sessions"]} sessions, {report["labelled_frames"]} labelled frames'
    )
    if len(checkpoints) > 1:
        for index, entry in enumerate(report['per_checkpoint'], 1):
            ccc = {dim: entry['metrics'][dim]['ccc'] for dim in ('valence', 'arousal', 'mean')}
            print(f'checkpoint {index} (training seed {entry["training_seed"]}): CCC valence '
                  f'{ccc["valence"]:.3f}, arousal {ccc["arousal"]:.3f}, mean {ccc["mean"]:.3f}; RMSE mean '
                  f'{entry["metrics"]["mean"]["rmse"]:.3f}  {entry["checkpoint"]}')
    print()
    print(seed_summary_markdown(report, limit=MAX_PRINTED_SESSIONS))
    print(f'report: {out / "report.md"}')
    return 0
