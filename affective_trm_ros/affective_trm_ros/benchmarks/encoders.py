"""`affective-trm benchmark encoders`: median time per item of each built-in encoder.

Video rows, per 640x480 frame with one real face (scikit-image's astronaut, swaying a few pixels per
frame), for MTCNN and Haar side by side in one run:

* ``full frame``: the path of earlier versions (``face_pipeline: full_frame``): the detector at full
  resolution on every frame, then EfficientNet-B0 on the face.
* ``tracked``: the default path (``face_pipeline: tracked``): detection on the half-size frame every
  ``detection_interval`` frames, the face followed in between, EfficientNet-B0 on the face. Its row
  is the time of ``detection_interval`` consecutive frames divided by their number (so every timed
  call holds exactly one detection): the mean cost per frame a camera stream pays.
* the parts: detection alone (full and half size), following one face, the network on one crop.

Then the offline video plugin (``fer_mini_xception``) where installed, Dasheng base (and ``egemaps``
where installed) per 1 s window, MiniLM and EmbeddingGemma per sentence. Each encoder uses its real
weights when present and otherwise the same architecture randomly initialised (the row says which:
the cost of a forward pass does not depend on the weight values).
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
from affective_trm_ros.core.encoders.base import available_encoders, load_encoder
from affective_trm_ros.core.encoders.face import (
    DEFAULT_MIN_CONFIDENCE,
    DEFAULT_MIN_FACE_SIZE,
    FaceCropEncoder,
)
from affective_trm_ros.core.face_pipeline import (
    DEFAULT_DETECTION_INTERVAL,
    DEFAULT_DETECTION_SCALE,
    FullFrameFaces,
    _Template,
    follow,
    make_tracked_faces,
)

DEFAULT_REPEATS = 20
DEFAULT_WARMUP = 3            # first calls pay for allocations and kernel selection
DEFAULT_THREADS = 1           # a robot runs several nodes, each with one torch thread (tools/env.sh)
FRAME_SHAPE = (480, 640)      # VGA, a common robot camera mode
FRAME_PERIOD_S = 1 / 30       # stamps of the benchmark video: a 30 FPS camera
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


def test_frames(count: int) -> list:
    """``count`` 640x480 RGB frames with one real face swaying a few pixels per frame."""
    from affective_trm_ros.benchmarks.face_frames import moving_faces

    return moving_faces(count, width=FRAME_SHAPE[1], height=FRAME_SHAPE[0])


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


class _Clip:
    """Plays ``frames`` in a loop through a face pipeline with 30 FPS stamps."""

    def __init__(self, faces, frames: list) -> None:
        self.faces, self.frames, self.index = faces, frames, 0

    def play(self, count: int) -> None:
        for _ in range(count):
            frame = self.frames[self.index % len(self.frames)]
            result = self.faces.process(frame, self.index * FRAME_PERIOD_S)
            if not any(face.valid for face in result.faces):
                raise RuntimeError(f'the face was lost in benchmark frame {self.index}')
            self.index += 1


def video_rows(add: Callable, device: str, plugins: dict) -> None:
    """Full-frame and tracked paths side by side, and their parts (see the module docstring)."""
    interval = DEFAULT_DETECTION_INTERVAL
    frames = test_frames(4 * interval)
    frame = frames[0]
    # (plugin, network name, detector, runtimes): HSEmotion in both runtimes with MTCNN, so the
    # runtime's share and the tracked path's share of the saving are both visible.
    cases = [('hsemotion_enet_b0', 'EfficientNet-B0', 'mtcnn', ('torch', 'onnxruntime')),
             ('hsemotion_enet_b0', 'EfficientNet-B0', 'haar', ('torch', 'onnxruntime'))]
    if 'fer_mini_xception' in plugins:
        cases.append(('fer_mini_xception', 'mini-Xception', 'mtcnn', (None,)))
    crop_encoders = {}
    for plugin_id, network, detector, runtimes in cases:
        for runtime in runtimes:
            options = {'detector': detector, **({'runtime': runtime} if runtime else {})}
            encoder = _load(plugin_id, device, **options)
            label = f'{network} ({encoder.runtime})' if runtime else network
            full = FullFrameFaces(encoder)
            if not full.process(frame, 0.0).faces[0].valid:
                raise RuntimeError(f'{detector} found no face in the benchmark frame')
            if plugin_id == 'hsemotion_enet_b0' and runtime == 'torch':
                add(f'{detector} detection, full frame', detector, '640x480 frame',
                    lambda e=encoder: e.detector.detect(frame))
            add(f'full frame: {detector} + {label}', encoder.identity, '640x480 frame',
                lambda f=full: f.process(frame, 0.0))
            if not isinstance(encoder, FaceCropEncoder):
                print(f'  ({plugin_id} has no encode_faces: no tracked row)')
                continue
            tracked = make_tracked_faces(encoder, detector, encoder.device,
                                         min_face_size=DEFAULT_MIN_FACE_SIZE,
                                         min_face_confidence=DEFAULT_MIN_CONFIDENCE,
                                         detection_scale=DEFAULT_DETECTION_SCALE, detection_interval=interval)
            if plugin_id == 'hsemotion_enet_b0' and runtime == 'torch':
                add(f'{detector} detection, {DEFAULT_DETECTION_SCALE:g}x frame', detector, '640x480 frame',
                    lambda t=tracked: t.detect(frame))
            clip = _Clip(tracked, frames)
            add(f'tracked: {detector} 1/{interval} + follow + {label}', encoder.identity,
                f'640x480 frame (mean of {interval})', lambda c=clip: c.play(interval), items=interval)
            if plugin_id == 'hsemotion_enet_b0':
                crop_encoders[encoder.runtime] = encoder
    box = crop_encoders['torch'].detector.detect(frame)
    crop = frame[int(box.y1):int(box.y2), int(box.x1):int(box.x2)]
    for runtime, encoder in crop_encoders.items():
        add(f'EfficientNet-B0 ({runtime}) on a face crop', encoder.identity, 'face',
            lambda e=encoder: e.encode_faces([crop]))
    import cv2

    grey, moved = (cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames[:2])
    template = _Template(grey, box)
    add('follow one face', 'cross-correlation', 'face', lambda: follow(moved, box, template, 0.0))


def compare_video_paths(rows: list) -> list:
    """Lines comparing the default tracked path with the earlier full-frame path (PyTorch)."""
    by_name = {row['row']: row for row in rows}
    lines = []
    for detector in ('mtcnn', 'haar'):
        full = by_name.get(f'full frame: {detector} + EfficientNet-B0 (torch)')
        tracked = [row for name, row in by_name.items() if name.startswith(f'tracked: {detector} ')
                   and name.endswith('EfficientNet-B0 (onnxruntime)')]
        if full and tracked:
            lines.append(f'default tracked path / earlier full-frame path ({detector} + EfficientNet-B0): '
                         f"{tracked[0]['median_ms'] / full['median_ms']:.2f} of the wall time, "
                         f"{tracked[0]['median_cpu_ms'] / full['median_cpu_ms']:.2f} of the CPU time")
    return lines


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    groups = args.only or list(GROUPS)
    device = args.device
    sync = torch.cuda.synchronize if device.startswith('cuda') or (
        device == 'auto' and torch.cuda.is_available()) else (lambda: None)
    rows = []

    def add(name: str, identity: str, item: str, call: Callable[[], object], items: int = 1) -> None:
        wall, cpu = (value / items for value in median_ms(call, args.repeats, args.warmup, sync))
        rows.append({'row': name, 'encoder': identity, 'per': item, 'median_ms': round(wall, 2),
                     'median_cpu_ms': round(cpu, 2)})
        print(f'{name:<60} {wall:8.2f} ms wall {cpu:8.2f} ms CPU  per {item:<26} [{identity}]', flush=True)

    # Other processes competing for the CPU inflate every row; the load average makes that visible.
    load_before = os.getloadavg()[0]
    print(f'device {device}, torch threads {args.threads}, {os.cpu_count()} CPUs, load average '
          f'{load_before:.2f}; median of {args.repeats} (after {args.warmup} warm-up calls)')
    plugins = available_encoders()
    if 'video' in groups:
        video_rows(add, device, plugins)
        for line in compare_video_paths(rows):
            print(line)
    if 'audio' in groups:
        window = test_window()
        for plugin_id, name in (('dasheng_base', 'Dasheng base'), ('egemaps', 'openSMILE eGeMAPSv02')):
            if plugin_id in plugins:
                encoder = _load(plugin_id, device)
                add(name, encoder.identity, '1 s window', lambda e=encoder: e.encode(window))
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
