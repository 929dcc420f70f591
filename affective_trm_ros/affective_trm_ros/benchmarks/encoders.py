"""`affective-trm benchmark encoders`: median time per item of each built-in encoder.

Rows: face detection + EfficientNet-B0 per 640x480 frame (MTCNN and Haar, and detection alone),
Dasheng base per 1 s window, MiniLM and EmbeddingGemma per sentence. Each encoder uses its real
weights when present and otherwise the same architecture randomly initialised (the row says
which: the cost of a forward pass does not depend on the weight values).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from affective_trm_ros.core.device import DEVICE_CHOICES_HELP
from affective_trm_ros.core.encoders.base import load_encoder

DEFAULT_REPEATS = 20
DEFAULT_WARMUP = 3            # first calls pay for allocations and kernel selection
DEFAULT_THREADS = 2           # the robot-side budget is stated for a 2-core CPU
FRAME_SHAPE = (480, 640)      # VGA, a common robot camera mode
SENTENCE = 'I really did not expect that, but honestly it made my whole day much better.'
GROUPS = ('video', 'audio', 'text')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--device', default='cpu', help=DEVICE_CHOICES_HELP + " (default 'cpu')")
    parser.add_argument('--threads', type=int, default=DEFAULT_THREADS,
                        help=f'torch CPU threads (default {DEFAULT_THREADS})')
    parser.add_argument('--repeats', type=int, default=DEFAULT_REPEATS, help='timed calls per row')
    parser.add_argument('--warmup', type=int, default=DEFAULT_WARMUP, help='untimed calls per row')
    parser.add_argument('--only', choices=GROUPS, action='append',
                        help='time only these modalities (repeatable; default all)')
    parser.add_argument('--skip-gemma', action='store_true',
                        help='leave out EmbeddingGemma (slowest to load)')
    parser.add_argument('--json', type=Path, help='also write the rows as JSON to this file')


def test_frame() -> np.ndarray:
    """A 640x480 RGB frame with one real face (scikit-image's astronaut photograph) on grey."""
    import skimage.data

    frame = np.full((*FRAME_SHAPE, 3), 96, np.uint8)
    face = skimage.data.astronaut()[:FRAME_SHAPE[0], :]
    frame[:face.shape[0], 64:64 + face.shape[1]] = face
    return frame


def test_window(seconds: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
            + rng.normal(0, 0.02, t.size)).astype(np.float32)


def median_ms(call: Callable[[], object], repeats: int, warmup: int,
              sync: Callable[[], None]) -> tuple:
    """(median wall-clock ms, median process CPU ms) per call.

    CPU time counts only this process's threads, so on a machine shared with other work it stays
    close to the uncontended cost while the wall-clock time grows with the contention.
    """
    for _ in range(warmup):
        call()
    wall, cpu = [], []
    for _ in range(repeats):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        sync()
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def _load(plugin_id: str, device: str, **options):
    return load_encoder(plugin_id, device=device, allow_untrained=True, **options)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    groups = args.only or list(GROUPS)
    device = args.device
    sync = torch.cuda.synchronize if device.startswith('cuda') or (
        device == 'auto' and torch.cuda.is_available()) else (lambda: None)
    rows = []

    def add(name: str, identity: str, item: str, call: Callable[[], object]) -> None:
        wall, cpu = median_ms(call, args.repeats, args.warmup, sync)
        rows.append({'row': name, 'encoder': identity, 'per': item, 'median_ms': round(wall, 2),
                     'median_cpu_ms': round(cpu, 2)})
        print(f'{name:<30} {wall:9.2f} ms wall {cpu:9.2f} ms CPU  per {item:<14} [{identity}]', flush=True)

    # Other processes competing for the CPU inflate every row; the load average makes that visible.
    load_before = os.getloadavg()[0]
    print(f'device {device}, torch threads {args.threads}, {os.cpu_count()} CPUs, load average '
          f'{load_before:.2f}; median of {args.repeats} (after {args.warmup} warm-up calls)')
    if 'video' in groups:
        frame = test_frame()
        for detector in ('mtcnn', 'haar'):
            encoder = _load('hsemotion_enet_b0', device, detector=detector)
            if not encoder.encode(frame)[1]:
                raise RuntimeError(f'{detector} found no face in the benchmark frame')
            add(f'{detector} detection only', detector, '640x480 frame',
                lambda e=encoder: e.detector.detect(frame))
            add(f'{detector} + EfficientNet-B0', encoder.identity, '640x480 frame',
                lambda e=encoder: e.encode(frame))
    if 'audio' in groups:
        encoder = _load('dasheng_base', device)
        window = test_window()
        add('Dasheng base', encoder.identity, '1 s window', lambda: encoder.encode(window))
    if 'text' in groups:
        plugins = ['minilm'] + ([] if args.skip_gemma else ['embeddinggemma'])
        for plugin_id in plugins:
            encoder = _load(plugin_id, device)
            add(plugin_id, encoder.identity, 'sentence', lambda e=encoder: e.encode(SENTENCE))
    load_after = os.getloadavg()[0]
    print(f'load average at the end: {load_after:.2f}')
    if args.json:
        args.json.write_text(json.dumps({'device': device, 'threads': args.threads, 'cpus': os.cpu_count(),
                                         'load_average': [load_before, load_after], 'rows': rows}, indent=2))
    return 0
