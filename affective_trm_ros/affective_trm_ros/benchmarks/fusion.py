"""`affective-trm benchmark fusion`: the fusion runtime's cost at a 30 FPS input, and its scaling with people.

Default mode: feeds synthetic embeddings at camera rate -- video every frame for every person,
shared audio every ``audio_hop_s``, shared text every few seconds (empty stream id, as the audio
and text nodes publish them) -- through exactly what the fusion node's inference thread runs: a
:class:`~affective_trm_ros.core.streams.StreamTable` over a
:class:`~affective_trm_ros.core.predictor.FusionPredictor`, all due frames of all streams in one
serving call, paced in real time unless ``--no-pace``. The clock is the frame clock.

Reported (milliseconds): ``step`` = one serving call (``FusionPredictor.step``: NumPy in, NumPy
out, every due frame of every stream); ``frame`` = table plus model work per output frame;
``tick`` = all work in one camera period; ``keeps_up`` = share of ticks done within the camera
period. No rclpy: message (de)serialisation and DDS are not included.

``--people 1,2,4,8``: the serving cost of one step with that many people in one batch, and its
ratio to one person (what several tracked faces cost).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

# Defaults: the seed's camera rate and the audio encoder's default hop.
DEFAULT_FPS = 30.0
DEFAULT_AUDIO_HOP_S = 0.5
DEFAULT_TEXT_EVERY_S = 5.0
DEFAULT_SECONDS = 20.0
# Untimed frames first: the first steps pay for allocations.
WARMUP_FRAMES = 30
# Threads for CPU timing: one, as each node process runs (tools/env.sh sets OMP_NUM_THREADS=1).
DEFAULT_THREADS = 1
# --people mode: timed and untimed serving steps per batch size.
PEOPLE_STEPS = 200
PEOPLE_WARMUP = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--checkpoint', help='fusion checkpoint to time (default: a randomly initialised '
                                             'stateful TRM at the default configuration and encoder dims)')
    parser.add_argument('--device', default='cpu', help="'cpu' (default), 'auto', 'cuda' or 'cuda:N'")
    parser.add_argument('--threads', type=int, default=DEFAULT_THREADS,
                        help=f'torch CPU threads (default {DEFAULT_THREADS})')
    parser.add_argument('--streams', type=int, default=1, help='people tracked at once (default 1)')
    parser.add_argument('--people', help='comma-separated batch sizes, e.g. 1,2,4,8: time one serving '
                                         'step per batch size (ratio to the first) instead of the stream')
    parser.add_argument('--audio-policy', default='nearest', choices=('nearest', 'causal'),
                        help='alignment audio policy (default nearest)')
    parser.add_argument('--fps', type=float, default=DEFAULT_FPS,
                        help=f'camera rate (default {DEFAULT_FPS:g})')
    parser.add_argument('--seconds', type=float, default=DEFAULT_SECONDS,
                        help=f'timed stream length (default {DEFAULT_SECONDS:g} s)')
    parser.add_argument('--steps', type=int, default=PEOPLE_STEPS,
                        help=f'--people: timed steps per batch size (default {PEOPLE_STEPS})')
    parser.add_argument('--no-pace', action='store_true', help='do not sleep between frames (throughput)')
    parser.add_argument('--json', type=Path, help='write the results as JSON to this file')


def _percentiles(values) -> dict:
    values = np.asarray(values, dtype=np.float64) * 1e3
    if values.size == 0:
        return {'p50': float('nan'), 'p99': float('nan'), 'mean': float('nan'), 'n': 0}
    return {'p50': float(np.percentile(values, 50)), 'p99': float(np.percentile(values, 99)),
            'mean': float(values.mean()), 'n': int(values.size)}


def _predictor(args, capacity: int = 16):
    from affective_trm_ros.core.predictor import FusionPredictor
    if args.checkpoint:
        return FusionPredictor(args.checkpoint, device=args.device, capacity=capacity)
    import torch

    from affective_trm_ros.core.modalities import DEFAULT_ENCODERS, FEATURE_ORDER
    from affective_trm_ros.core.trm import TRMConfig, build_model
    torch.manual_seed(0)
    config = TRMConfig()
    spec = [{'modality': m, 'encoder': DEFAULT_ENCODERS[m], 'dim': config.modality_dims[m]}
            for m in FEATURE_ORDER]
    return FusionPredictor.from_model(build_model(config), spec, device=args.device, capacity=capacity)


class _TimedRunner:
    """Wraps a predictor and records the duration of every serving call (seconds)."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        self.times: list = []

    def step(self, items, resets=None):
        start = time.perf_counter()
        result = self.predictor.step(items, resets)
        self.times.append(time.perf_counter() - start)
        return result

    def reset(self, stream_id=None):
        return self.predictor.reset(stream_id)


def measure(predictor, streams: int = 1, fps: float = DEFAULT_FPS, seconds: float = DEFAULT_SECONDS,
            pace: bool = True, audio_hop_s: float = DEFAULT_AUDIO_HOP_S,
            text_every_s: float = DEFAULT_TEXT_EVERY_S, alignment=None) -> dict:
    """Run the runtime over ``seconds`` of synthetic input; timing lists in seconds and counters."""
    from affective_trm_ros.core.alignment import AlignmentConfig
    from affective_trm_ros.core.modalities import AUDIO, TEXT, VIDEO
    from affective_trm_ros.core.streams import StreamPolicy, StreamTable

    rng = np.random.default_rng(0)
    dims = predictor.dims
    runner = _TimedRunner(predictor)
    table = StreamTable(runner, alignment or AlignmentConfig(), StreamPolicy(max_streams=max(16, streams)))
    people = [f'person{i}' for i in range(streams)]
    audio_every = max(1, int(round(audio_hop_s * fps)))
    text_every = max(1, int(round(text_every_s * fps)))
    total = WARMUP_FRAMES + int(round(seconds * fps))
    period = 1.0 / fps
    steps, frames, ticks, on_time = [], [], [], 0
    outputs = 0
    started = time.perf_counter()
    for index in range(total):
        stamp = index * period
        if AUDIO in dims and index % audio_every == 0:
            table.add(AUDIO, '', stamp, rng.standard_normal(dims[AUDIO]).astype(np.float32), stamp)
        if TEXT in dims and index % text_every == 0:
            table.add(TEXT, '', stamp, rng.standard_normal(dims[TEXT]).astype(np.float32), stamp)
        for person in people:
            table.add(VIDEO, person, stamp, rng.standard_normal(dims[VIDEO]).astype(np.float32), stamp)
        calls = len(runner.times)
        tick_start = time.perf_counter()
        released = len(table.run(stamp))
        tick_time = time.perf_counter() - tick_start
        if index >= WARMUP_FRAMES:
            steps.extend(runner.times[calls:])
            ticks.append(tick_time)
            on_time += tick_time <= period
            if released:
                frames.extend([tick_time / released] * released)
                outputs += released
        if pace:
            time.sleep(max(0.0, started + (index + 1) * period - time.perf_counter()))
    return {'steps': steps, 'frames': frames, 'ticks': ticks, 'on_time': on_time, 'outputs': outputs,
            'wall_s': time.perf_counter() - started}


def time_serving(predictor, people: int, steps: int = PEOPLE_STEPS, warmup: int = PEOPLE_WARMUP) -> dict:
    """Latency statistics (ms) of one ``FusionPredictor.step`` for ``people`` streams in one batch,
    NumPy in (all modalities present) to NumPy out, state carried across steps."""
    rng = np.random.default_rng(0)
    items = [(f'person{i}', {m: rng.standard_normal(d).astype(np.float32) for m, d in predictor.dims.items()})
             for i in range(people)]
    times = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        predictor.step(items)
        if index >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    predictor.reset()
    times = np.asarray(times)
    return {'people': people, 'median_ms': float(np.median(times)), 'p99_ms': float(np.percentile(times, 99)),
            'mean_ms': float(times.mean()), 'steps': steps}


def time_model_serving(model, people: int, steps: int = PEOPLE_STEPS, warmup: int = PEOPLE_WARMUP,
                       device: str = 'cpu') -> dict:
    """:func:`time_serving` for an in-memory model (``affective-trm benchmark model``'s serving column):
    what a user of the node pays per step, input conversion and output copy included."""
    from affective_trm_ros.core.modalities import DEFAULT_ENCODERS
    from affective_trm_ros.core.predictor import FusionPredictor
    spec = [{'modality': m, 'encoder': DEFAULT_ENCODERS[m], 'dim': d} for m, d in model.modality_dims.items()]
    predictor = FusionPredictor.from_model(model, spec, device=str(device), capacity=max(16, people))
    return time_serving(predictor, people, steps, warmup)


def measure_people(predictor, counts, steps: int = PEOPLE_STEPS, warmup: int = PEOPLE_WARMUP) -> list:
    """time_serving for each batch size, interleaved over three passes (a shared machine's load
    drifts; each size keeps the median of its passes' medians), with the ratio to the first size."""
    passes = [[time_serving(predictor, n, steps, warmup) for n in counts] for _ in range(3)]
    rows = []
    for column, people in enumerate(counts):
        runs = [p[column] for p in passes]
        rows.append({'people': people, 'median_ms': float(np.median([r['median_ms'] for r in runs])),
                     'p99_ms': float(np.median([r['p99_ms'] for r in runs])), 'steps': steps * len(runs)})
    base = rows[0]['median_ms']
    for row in rows:
        row['ratio'] = row['median_ms'] / base
        row['per_person_ms'] = row['median_ms'] / row['people']
    return rows


def _parse_people(text: str) -> list:
    try:
        counts = [int(part) for part in text.split(',') if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(f"--people {text!r}: expected comma-separated counts >= 1, e.g. 1,2,4,8")
    return counts


def run(args: argparse.Namespace) -> int:
    if args.threads < 1 or args.streams < 1 or args.fps <= 0 or args.seconds <= 0 or args.steps < 1:
        print('error: --threads, --streams and --steps must be >= 1, --fps and --seconds > 0',
              file=sys.stderr)
        return 2
    counts = None
    if args.people:
        try:
            counts = _parse_people(args.people)
        except ValueError as error:
            print(f'error: {error}', file=sys.stderr)
            return 2
    import torch

    from affective_trm_ros.core.alignment import AlignmentConfig
    torch.set_num_threads(args.threads)
    predictor = _predictor(args, capacity=max(16, args.streams, *(counts or [1])))
    device = predictor.device
    cpu = platform.processor() or platform.machine()
    where = (torch.cuda.get_device_name(device) if device.type == 'cuda'
             else f'{cpu}, {os.cpu_count()} cores, {args.threads} threads')
    load = f', load average {os.getloadavg()[0]:.2f}' if hasattr(os, 'getloadavg') else ''
    parameters = sum(p.numel() for p in predictor.model.parameters())
    if counts:
        print(f'fusion serving step (FusionPredictor.step, NumPy in -> NumPy out) by people per batch; '
              f'{predictor.kind} model ({parameters:,} parameters) on {device} ({where}{load})')
        rows = measure_people(predictor, counts, steps=args.steps)
        print(f"{'people':>6} {'median ms':>10} {'p99 ms':>8} {'ratio to ' + str(counts[0]):>12} "
              f"{'per person ms':>14}")
        for row in rows:
            print(f"{row['people']:>6} {row['median_ms']:>10.3f} {row['p99_ms']:>8.3f} {row['ratio']:>12.2f} "
                  f"{row['per_person_ms']:>14.3f}")
        payload = {'people': rows, 'device': str(device), 'threads': args.threads, 'model': predictor.kind,
                   'machine': where}
    else:
        print(f'fusion runtime at {args.fps:g} FPS, {args.streams} stream(s), {args.seconds:g} s '
              f"{'paced in real time' if not args.no_pace else 'unpaced'}, audio policy {args.audio_policy}; "
              f'{predictor.kind} model ({parameters:,} parameters) on {device} ({where}{load})')
        result = measure(predictor, streams=args.streams, fps=args.fps, seconds=args.seconds,
                         pace=not args.no_pace, alignment=AlignmentConfig(audio_policy=args.audio_policy))
        rows = {'step': _percentiles(result['steps']), 'frame': _percentiles(result['frames']),
                'tick': _percentiles(result['ticks'])}
        keeps_up = result['on_time'] / max(1, len(result['ticks']))
        print(f"{'':<8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'count':>7}")
        for name, stats in rows.items():
            print(f"{name:<8} {stats['p50']:>8.2f} {stats['p99']:>8.2f} {stats['mean']:>8.2f} "
                  f"{stats['n']:>7}")
        print(f'ticks within the {1e3 / args.fps:.1f} ms camera period: {keeps_up * 100:.1f} %; '
              f"{result['outputs']} outputs")
        payload = {**rows, 'keeps_up': keeps_up, 'outputs': result['outputs'], 'fps': args.fps,
                   'streams': args.streams, 'seconds': args.seconds, 'paced': not args.no_pace,
                   'audio_policy': args.audio_policy, 'device': str(device), 'threads': args.threads,
                   'model': predictor.kind, 'machine': where}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f'wrote {args.json}')
    return 0
