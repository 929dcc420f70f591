"""`affective-trm benchmark fusion`: cost of the fusion pipeline at a 30 FPS input, per frame and per tick.

Feeds synthetic embeddings at camera rate -- video every frame, audio every ``audio_hop_s``, a text
embedding every few seconds -- through the same pieces the fusion node runs (one
:class:`~affective_trm_ros.core.alignment.StreamAligner` per stream, due frames of all streams
batched into one :meth:`~affective_trm_ros.core.predictor.FusionPredictor.step`), paced in real time
unless ``--no-pace``. The clock handed to the aligner is the frame clock, as under simulated time.

Reported (milliseconds): ``step`` = one batched model step; ``frame`` = alignment plus model work
per output frame; ``tick`` = all work in one camera period (audio arrivals release bursts of
frames); ``keeps_up`` = share of ticks done within the camera period. No rclpy: message
(de)serialisation and DDS are not included.
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
# Threads for CPU timing: the robot-side budget is stated for a 2-core CPU.
DEFAULT_THREADS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--checkpoint', help='fusion checkpoint to time (default: a randomly initialised '
                                             'stateful TRM at the default configuration and encoder dims)')
    parser.add_argument('--device', default='cpu', help="'cpu' (default), 'auto', 'cuda' or 'cuda:N'")
    parser.add_argument('--threads', type=int, default=DEFAULT_THREADS,
                        help=f'torch CPU threads (default {DEFAULT_THREADS})')
    parser.add_argument('--streams', type=int, default=1, help='people tracked at once (default 1)')
    parser.add_argument('--fps', type=float, default=DEFAULT_FPS,
                        help=f'camera rate (default {DEFAULT_FPS:g})')
    parser.add_argument('--seconds', type=float, default=DEFAULT_SECONDS,
                        help=f'timed stream length (default {DEFAULT_SECONDS:g} s)')
    parser.add_argument('--no-pace', action='store_true', help='do not sleep between frames (throughput)')
    parser.add_argument('--json', type=Path, help='write the results as JSON to this file')


def _percentiles(values) -> dict:
    values = np.asarray(values, dtype=np.float64) * 1e3
    if values.size == 0:
        return {'p50': float('nan'), 'p99': float('nan'), 'mean': float('nan'), 'n': 0}
    return {'p50': float(np.percentile(values, 50)), 'p99': float(np.percentile(values, 99)),
            'mean': float(values.mean()), 'n': int(values.size)}


def _predictor(args):
    from affective_trm_ros.core.predictor import FusionPredictor
    if args.checkpoint:
        return FusionPredictor(args.checkpoint, device=args.device)
    import torch

    from affective_trm_ros.core.modalities import DEFAULT_ENCODERS, FEATURE_ORDER
    from affective_trm_ros.core.trm import TRMConfig, build_model
    torch.manual_seed(0)
    config = TRMConfig()
    spec = [{'modality': m, 'encoder': DEFAULT_ENCODERS[m], 'dim': config.modality_dims[m]}
            for m in FEATURE_ORDER]
    return FusionPredictor.from_model(build_model(config), spec, device=args.device)


def measure(predictor, streams: int = 1, fps: float = DEFAULT_FPS, seconds: float = DEFAULT_SECONDS,
            pace: bool = True, audio_hop_s: float = DEFAULT_AUDIO_HOP_S,
            text_every_s: float = DEFAULT_TEXT_EVERY_S, alignment=None) -> dict:
    """Run the pipeline over ``seconds`` of synthetic input; timing lists in seconds and counters."""
    from affective_trm_ros.core.alignment import AlignmentConfig, StreamAligner
    from affective_trm_ros.core.modalities import AUDIO, TEXT, VIDEO

    rng = np.random.default_rng(0)
    dims = predictor.dims
    aligners = {f'person{i}': StreamAligner(alignment or AlignmentConfig()) for i in range(streams)}
    audio_every = max(1, int(round(audio_hop_s * fps)))
    text_every = max(1, int(round(text_every_s * fps)))
    total = WARMUP_FRAMES + int(round(seconds * fps))
    period = 1.0 / fps
    steps, frames, ticks, on_time = [], [], [], 0
    outputs = 0
    started = time.perf_counter()
    for index in range(total):
        stamp = index * period
        for aligner in aligners.values():
            if VIDEO in dims:
                aligner.add_video(stamp, rng.standard_normal(dims[VIDEO]).astype(np.float32))
            if AUDIO in dims and index % audio_every == 0:
                aligner.add(AUDIO, stamp, rng.standard_normal(dims[AUDIO]).astype(np.float32))
            if TEXT in dims and index % text_every == 0:
                aligner.add(TEXT, stamp, rng.standard_normal(dims[TEXT]).astype(np.float32))
        tick_start = time.perf_counter()
        due = {stream: aligner.ready(stamp) for stream, aligner in aligners.items()}
        released = sum(len(v) for v in due.values())
        for round_index in range(max((len(v) for v in due.values()), default=0)):
            batch = [(stream, items[round_index]) for stream, items in due.items()
                     if round_index < len(items)]
            for stream, step in batch:
                if step.reset:
                    predictor.reset(stream)
            step_start = time.perf_counter()
            predictor.step([(stream, step.features) for stream, step in batch])
            if index >= WARMUP_FRAMES:
                steps.append(time.perf_counter() - step_start)
        tick_time = time.perf_counter() - tick_start
        if index >= WARMUP_FRAMES:
            ticks.append(tick_time)
            on_time += tick_time <= period
            if released:
                frames.extend([tick_time / released] * released)
                outputs += released
        if pace:
            time.sleep(max(0.0, started + (index + 1) * period - time.perf_counter()))
    return {'steps': steps, 'frames': frames, 'ticks': ticks, 'on_time': on_time, 'outputs': outputs,
            'wall_s': time.perf_counter() - started}


def run(args: argparse.Namespace) -> int:
    if args.threads < 1 or args.streams < 1 or args.fps <= 0 or args.seconds <= 0:
        print('error: --threads and --streams must be >= 1, --fps and --seconds > 0', file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(args.threads)
    predictor = _predictor(args)
    device = predictor.device
    cpu = platform.processor() or platform.machine()
    where = (torch.cuda.get_device_name(device) if device.type == 'cuda'
             else f'{cpu}, {os.cpu_count()} cores, {args.threads} threads')
    print(f'fusion pipeline at {args.fps:g} FPS, {args.streams} stream(s), {args.seconds:g} s '
          f"{'paced in real time' if not args.no_pace else 'unpaced'}; {predictor.kind} model "
          f'({sum(p.numel() for p in predictor.model.parameters()):,} parameters) on {device} ({where})')
    result = measure(predictor, streams=args.streams, fps=args.fps, seconds=args.seconds,
                     pace=not args.no_pace)
    rows = {'step': _percentiles(result['steps']), 'frame': _percentiles(result['frames']),
            'tick': _percentiles(result['ticks'])}
    keeps_up = result['on_time'] / max(1, len(result['ticks']))
    print(f"{'':<8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'count':>7}")
    for name, stats in rows.items():
        print(f"{name:<8} {stats['p50']:>8.2f} {stats['p99']:>8.2f} {stats['mean']:>8.2f} {stats['n']:>7}")
    print(f'ticks within the {1e3 / args.fps:.1f} ms camera period: {keeps_up * 100:.1f} %; '
          f"{result['outputs']} outputs")
    if args.json:
        payload = {**rows, 'keeps_up': keeps_up, 'outputs': result['outputs'], 'fps': args.fps,
                   'streams': args.streams, 'seconds': args.seconds, 'paced': not args.no_pace,
                   'device': str(device), 'threads': args.threads, 'model': predictor.kind, 'machine': where}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f'wrote {args.json}')
    return 0
