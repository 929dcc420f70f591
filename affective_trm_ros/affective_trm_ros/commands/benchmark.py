"""`affective-trm benchmark {model,encoders,fusion}`: timing benchmarks.

``model`` times one fusion-model ``step`` (median and p99 latency) for one stream and for a batch
of streams, at the default stateful-TRM configuration and at the seed configuration (plus the
baselines with ``--all``), on tensors already on the device and through the serving path
(``FusionPredictor.step``: NumPy in, NumPy out, the number the node pays). ``encoders`` and
``fusion`` hand over to the encoder and fusion benchmark modules.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

# Sub-benchmarks implemented elsewhere: name -> (module, help).
EXTERNAL = {
    'encoders': ('affective_trm_ros.benchmarks.encoders', 'time the encoder plugins'),
    'fusion': ('affective_trm_ros.benchmarks.fusion', 'time the fusion pipeline'),
    'video-node': ('affective_trm_ros.benchmarks.video_node',
                   'achieved rate of the video encoder node on a simulated camera'),
}
# Warm-up steps before timing: first calls pay for allocations and kernel selection.
DEFAULT_WARMUP = 50
DEFAULT_STEPS = 500
# Threads for CPU timing: one, the setting tools/env.sh gives every process (on a small shared CPU
# two threads made the tail several times slower; see the README's measurements).
DEFAULT_THREADS = 1
DEFAULT_BATCH = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest='benchmark', metavar='WHAT', required=True)
    model = subparsers.add_parser('model', help='latency of one fusion-model step (default and seed '
                                                'configurations, one stream and a batch)')
    model.add_argument('--device', default='cpu', help="'cpu' (default), 'auto', 'cuda' or 'cuda:N'")
    model.add_argument('--threads', type=int, default=DEFAULT_THREADS,
                       help=f'torch CPU threads (default {DEFAULT_THREADS})')
    model.add_argument('--steps', type=int, default=DEFAULT_STEPS, help='timed steps per row')
    model.add_argument('--warmup', type=int, default=DEFAULT_WARMUP, help='untimed steps per row')
    model.add_argument('--batch', type=int, default=DEFAULT_BATCH, help='streams in the batched rows')
    model.add_argument('--checkpoint', help='also time this checkpoint')
    model.add_argument('--all', action='store_true', help='also time the MLP and GRU baselines')
    model.add_argument('--json', type=Path, help='write the results as JSON to this file')
    model.set_defaults(_run=run_model)
    for name, (module_name, help_text) in EXTERNAL.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module = _import_optional(module_name)
        if module is not None and hasattr(module, 'add_arguments'):
            module.add_arguments(sub)
        sub.set_defaults(_run=_external_runner(name, module_name))


def run(args: argparse.Namespace) -> int:
    return int(args._run(args) or 0)


def _import_optional(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise


def _external_runner(name: str, module_name: str):
    def runner(args):
        module = _import_optional(module_name)
        if module is None or not hasattr(module, 'run'):
            print(f'error: the {name} benchmark is not available in this installation '
                  f'({module_name}.run not found)', file=sys.stderr)
            return 2
        return module.run(args)
    return runner


# ----------------------------------------------------------------------------------------------


def time_steps(model, batch_size: int, steps: int, warmup: int, device) -> dict:
    """Latency statistics (ms) of ``model.step`` on random inputs for ``batch_size`` streams."""
    import numpy as np
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, model.input_dim, generator=generator).to(device)
    mask = torch.ones(batch_size, model.num_modalities, dtype=torch.bool, device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    times = []
    with torch.inference_mode():
        state = model.initial_state(batch_size, device)
        for i in range(warmup + steps):
            sync()
            start = time.perf_counter()
            _, _, state = model.step(x, mask, state)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    times = np.asarray(times)
    return {'batch': batch_size, 'median_ms': float(np.median(times)),
            'p99_ms': float(np.percentile(times, 99)), 'mean_ms': float(times.mean()), 'steps': steps}


def _models(args):
    from affective_trm_ros.core.baselines import GRUBaseline, GRUConfig, MemorylessMLP, MLPConfig
    from affective_trm_ros.core.trm import SeedTRM, StatefulTRM, TRMConfig

    models = [('stateful TRM (default)', lambda: StatefulTRM(TRMConfig())),
              ('seed TRM', lambda: SeedTRM(TRMConfig.seed()))]
    if args.all:
        models += [('memoryless MLP', lambda: MemorylessMLP(MLPConfig())),
                   ('GRU', lambda: GRUBaseline(GRUConfig()))]
    if args.checkpoint:
        from affective_trm_ros.core.checkpoint import load_checkpoint
        models.append((f'checkpoint {Path(args.checkpoint).name}',
                       lambda: load_checkpoint(args.checkpoint).model))
    return models


def run_model(args: argparse.Namespace) -> int:
    import torch

    from affective_trm_ros.benchmarks.fusion import time_model_serving
    from affective_trm_ros.core.device import resolve_device

    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.threads < 1:
        print('error: --steps, --batch and --threads must be >= 1 and --warmup >= 0', file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {args.threads} threads'
    load = f', load average {os.getloadavg()[0]:.2f}' if hasattr(os, 'getloadavg') else ''
    print(f'model step latency on {device} ({where}{load}); {args.steps} timed steps after '
          f'{args.warmup} warm-up')
    rows = []
    for name, factory in _models(args):
        model = factory().to(device).eval()
        for batch in sorted({1, args.batch}):
            stats = time_steps(model, batch, args.steps, args.warmup, device)
            serving = time_model_serving(model, batch, args.steps, args.warmup, device)
            stats.update(serving_median_ms=serving['median_ms'], serving_p99_ms=serving['p99_ms'])
            stats.update(model=name, params=model.num_parameters(), device=str(device), threads=args.threads,
                         load_average=os.getloadavg()[0] if hasattr(os, 'getloadavg') else None)
            rows.append(stats)
    header = (f"{'model':<28} {'params':>10} {'streams':>7} {'median ms':>10} {'p99 ms':>8} "
              f"{'per stream ms':>14} {'serving ms':>11} {'serving p99':>11}")
    print(header)
    print('-' * len(header))
    for r in rows:
        print(f"{r['model']:<28} {r['params']:>10,} {r['batch']:>7} {r['median_ms']:>10.2f} "
              f"{r['p99_ms']:>8.2f} {r['median_ms'] / r['batch']:>14.2f} {r['serving_median_ms']:>11.2f} "
              f"{r['serving_p99_ms']:>11.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
        print(f'wrote {args.json}')
    return 0
