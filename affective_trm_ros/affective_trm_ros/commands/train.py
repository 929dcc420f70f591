"""`affective-trm train`: train the stateful TRM (or a baseline) on a feature store.

    affective-trm train --store features/crema_d --out runs/trm
    affective-trm train --store features/crema_d --model gru --out runs/gru --epochs 30
    affective-trm train --store features/crema_d --model-config '{"hidden_size": 256, "h_cycles": 2}'

Writes ``best.pt`` (the checkpoint the fusion node loads), ``history.csv``, ``curves.png``,
``va_plane_val.png`` and ``summary.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from affective_trm_ros.core.checkpoint import KINDS
from affective_trm_ros.core.device import DEVICE_CHOICES_HELP


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from affective_trm_ros.offline.learning.train import TrainConfig

    defaults = TrainConfig()
    parser.add_argument(
        '--store', required=True, type=Path, help='feature store directory (affective-trm prepare)'
    )
    parser.add_argument(
        '--out',
        type=Path,
        default=Path(defaults.out_dir),
        help=f'output directory (default: {defaults.out_dir})',
    )
    parser.add_argument(
        '--model',
        choices=KINDS,
        default=defaults.model,
        help='model kind: trm (stateful TRM), seed_trm (prototype-compatible), mlp, gru',
    )
    parser.add_argument(
        '--model-config',
        default='{}',
        help='JSON object of model config overrides, e.g. \'{"hidden_size": 256}\'',
    )
    group = parser.add_argument_group('optimisation')
    group.add_argument('--steps', type=int, default=None,
                       help='optimiser steps, one per batch (default: --epochs x batches per epoch)')
    group.add_argument('--eval-every', type=int, default=None,
                       help='steps between validations (default: once per epoch)')
    group.add_argument('--reset-after-s', type=float, default=None,
                       help="a gap longer than this resets the state, as in the fusion node (default: the "
                            "store's alignment setting)")
    group.add_argument('--deterministic', action='store_true',
                       help="PyTorch's deterministic algorithms (CUDA included)")
    for name, kind, text in (
        ('epochs', int, 'maximum epochs (passes over the training sessions) when --steps is not given'),
        ('batch_size', int, 'sessions per batch (one optimiser step; CCC over all of their frames)'),
        ('window', int, 'frames per truncated-BPTT window'),
        ('crop_frames', int, 'train on random crops of at most this many frames per session'),
        ('lr', float, 'peak learning rate (AdamW)'),
        ('weight_decay', float, 'AdamW weight decay'),
        ('warmup_fraction', float, 'fraction of steps for the linear warm-up'),
        ('grad_clip', float, 'gradient norm clip (0 = off)'),
        ('ema_decay', float, 'EMA decay of the weights (0 = off)'),
        ('patience', int, 'early stopping: validations without a gain of the smoothed validation CCC'),
        ('smoothing', int, 'early stopping watches the mean of the last this many validation CCCs'),
        ('ccc_weight', float, 'loss weight of (1 - CCC) over whole sequences'),
        ('mse_weight', float, 'loss weight of MSE'),
        ('nll_weight', float, 'loss weight of the Gaussian NLL that trains the confidence'),
        ('modality_dropout', float, 'probability of hiding a modality for a window'),
        ('seed', int, 'random seed'),
    ):
        group.add_argument(
            f'--{name.replace("_", "-")}',
            dest=name,
            type=kind,
            default=getattr(defaults, name),
            help=f'{text} (default: {getattr(defaults, name)})',
        )
    split = parser.add_argument_group('splits')
    split.add_argument(
        '--split-by',
        choices=('speaker', 'session'),
        default=defaults.split_by,
        help='speaker: no speaker in two splits (default); session: sessions shuffled freely',
    )
    split.add_argument(
        '--split-fractions',
        type=float,
        nargs=3,
        default=list(defaults.split_fractions),
        metavar=('TRAIN', 'VAL', 'TEST'),
        help='default: 0.8 0.1 0.1',
    )
    split.add_argument('--split-seed', type=int, default=defaults.split_seed)
    split.add_argument(
        '--splits-file',
        type=Path,
        help='JSON {"train": [...], "val": [...], "test": [...]} of session ids (overrides the above)',
    )
    parser.add_argument('--device', default='auto', help=DEVICE_CHOICES_HELP)
    parser.add_argument('--no-bf16', action='store_true', help='no bfloat16 autocast on CUDA')
    parser.add_argument('--no-plots', action='store_true', help='skip the PNG plots')
    parser.add_argument('--quiet', action='store_true', help='no progress output')


def config_from_args(args):
    from affective_trm_ros.offline.learning.train import TrainConfig

    try:
        model_config = json.loads(args.model_config)
    except json.JSONDecodeError as error:
        raise ValueError(f'--model-config is not valid JSON: {error}') from error
    if not isinstance(model_config, dict):
        raise ValueError('--model-config must be a JSON object')
    splits = read_splits_file(args.splits_file) if args.splits_file else None
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    values.update(
        model=args.model,
        model_config=model_config,
        out_dir=str(args.out),
        splits=splits,
        split_fractions=tuple(args.split_fractions),
        bf16=not args.no_bf16,
        plots=not args.no_plots,
        progress=not args.quiet,
    )
    return TrainConfig(**values)


def read_splits_file(path: Path) -> dict:
    """The --splits-file JSON object; ValueError naming the file when it cannot be read or parsed."""
    try:
        splits = json.loads(Path(path).read_text())
    except OSError as error:
        raise ValueError(f'--splits-file {path}: {error.strerror or error}') from None
    except json.JSONDecodeError as error:
        raise ValueError(f'--splits-file {path} is not valid JSON (line {error.lineno}, '
                         f'column {error.colno}: {error.msg})') from None
    if not isinstance(splits, dict):
        raise ValueError(f'--splits-file {path} must hold a JSON object '
                         f'{{"train": [...], "val": [...], "test": [...]}} of session ids')
    return splits


def run(args) -> int:
    from affective_trm_ros.core.encoders.loading import untrained_line
    from affective_trm_ros.offline.io.feature_store import FeatureStore
    from affective_trm_ros.offline.learning.data import stale_store_message
    from affective_trm_ros.offline.learning.train import train

    try:
        config = config_from_args(args)
        store = FeatureStore(args.store)
        print(untrained_line(store.encoder_identities))
        stale = stale_store_message(store)
        if stale:
            print(f'WARNING: {stale}', file=sys.stderr)
        result = train(store, config)
    except (FileNotFoundError, ValueError) as error:
        print(f'train: {error}', file=sys.stderr)
        return 1
    _print_splits(result.splits, store.speakers())
    report = result.val_report
    ccc = {name: report[name]['ccc'] for name in ('valence', 'arousal', 'mean')}
    print(
        f'best: step {result.best_step} (validation {result.best_epoch} of {len(result.history)}): '
        f'validation CCC valence '
        f"{ccc['valence']:.3f}, arousal {ccc['arousal']:.3f}, mean {ccc['mean']:.3f}"
    )
    print(f'checkpoint: {result.checkpoint_path}')
    if result.splits.get('test'):
        print(f'evaluate with: affective-trm evaluate --checkpoint {result.checkpoint_path} '
              f'--store {args.store} --split test')
    else:
        print('no test session was held out, so there is nothing to evaluate on in this store: prepare more '
              'speakers, or evaluate on another store (affective-trm evaluate --store OTHER --split all)')
    return 0


def _print_splits(splits: dict, speakers: dict) -> None:
    """Which sessions and speakers went where; a missing validation split is said loudly."""
    from affective_trm_ros.offline.learning.splits import split_speakers

    people = split_speakers(splits, speakers)
    for name, ids in splits.items():
        print(f'{name}: {len(ids)} sessions, speakers {", ".join(people[name]) or "none"}')
    if not splits.get('val'):
        print('WARNING: NO VALIDATION SESSION. Early stopping and the validation CCC below were computed '
              'on the TRAINING sessions, so they say nothing about unseen people. Get a validation split '
              'from more speakers in the store, or with --split-by session (sessions, not speakers, are '
              'split: a speaker may then be in training and validation).')
