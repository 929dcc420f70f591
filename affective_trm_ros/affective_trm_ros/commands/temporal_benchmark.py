"""`affective-trm temporal-benchmark`: stateful TRM vs memoryless MLP, GRU and seed TRM on synthetic streams.

    affective-trm temporal-benchmark                 # 16/32/16-dim features (minutes on a 2-core CPU)
    affective-trm temporal-benchmark --full-dims     # the real encoders' 768/1280/768 dims, slower
    affective-trm temporal-benchmark --models trm mlp --epochs 5 --out runs/tb

Streams follow a smooth latent valence/arousal process; video shows it only in stretches, audio
carries only its rate of change and text a stale valence, so recovering the present needs the
past (see :mod:`affective_trm_ros.benchmarks.temporal`). Every model is trained by the
same harness as ``affective-trm train``; the table reports held-out streams. Seeded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from affective_trm_ros.benchmarks.temporal import DEFAULT_MODEL_CONFIGS, MODEL_ORDER, TemporalBenchmarkConfig

# Torch threads: tiny per-frame matrix products gain nothing from more on a shared 2-core machine.
DEFAULT_THREADS = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TemporalBenchmarkConfig()
    parser.add_argument('--full-dims', action='store_true',
                        help="the real encoders' feature sizes 768/1280/768 instead of 16/32/16 (slower)")
    parser.add_argument(
        '--models',
        nargs='+',
        choices=MODEL_ORDER,
        default=list(MODEL_ORDER),
        help='models to train (default: all four)',
    )
    parser.add_argument(
        '--out',
        type=Path,
        default=Path(defaults.out_dir),
        help=f'output directory (default: {defaults.out_dir})',
    )
    for name, kind, text in (
        ('seed', int, 'random seed of the streams and of the first training run'),
        ('seeds', int, 'training seeds per model (the table gives mean ± sd)'),
        ('epochs', int, 'training epochs per model'),
        ('batch_size', int, 'streams per batch'),
        ('train_streams', int, 'training streams'),
        ('test_streams', int, 'held-out streams'),
        ('frames', int, 'frames per stream'),
        ('lr', float, 'peak learning rate'),
    ):
        parser.add_argument(
            f'--{name.replace("_", "-")}',
            dest=name,
            type=kind,
            default=getattr(defaults, name),
            help=f'{text} (default: {getattr(defaults, name)})',
        )
    parser.add_argument(
        '--trm-config',
        default='{}',
        help='JSON overrides of the stateful TRM config used here, e.g. \'{"hidden_size": 64}\'',
    )
    parser.add_argument('--device', default='cpu', help="'cpu' (default) or 'cuda'")
    parser.add_argument(
        '--threads', type=int, default=DEFAULT_THREADS, help=f'torch CPU threads (default: {DEFAULT_THREADS})'
    )
    parser.add_argument('--quiet', action='store_true', help='print only the table')


def run(args) -> int:
    import torch

    from affective_trm_ros.benchmarks.temporal import results_markdown, run_temporal_benchmark

    torch.set_num_threads(max(1, args.threads))
    try:
        trm_overrides = json.loads(args.trm_config)
    except json.JSONDecodeError as error:
        print(f'temporal-benchmark: --trm-config is not valid JSON: {error}', file=sys.stderr)
        return 2
    model_configs = {kind: dict(values) for kind, values in DEFAULT_MODEL_CONFIGS.items()}
    model_configs['trm'].update(trm_overrides)
    config = TemporalBenchmarkConfig(
        seed=args.seed,
        seeds=args.seeds,
        small=not args.full_dims,
        epochs=args.epochs,
        batch_size=args.batch_size,
        train_streams=args.train_streams,
        test_streams=args.test_streams,
        frames=args.frames,
        lr=args.lr,
        models=tuple(args.models),
        model_configs=model_configs,
        device=args.device,
        out_dir=str(args.out),
        progress=not args.quiet,
    )
    try:
        results = run_temporal_benchmark(config)
    except ValueError as error:
        print(f'temporal-benchmark: {error}', file=sys.stderr)
        return 1
    presence = ', '.join(f'{m} {v * 100:.0f} %' for m, v in results['presence_test'].items())
    print(f'held-out streams: {config.test_streams} x {config.frames} frames; modality presence: {presence}')
    print(results_markdown(results))
    print(f'{results["seconds"]:.0f} s; results in {args.out / "results.md"} and {args.out / "results.json"}')
    return 0
