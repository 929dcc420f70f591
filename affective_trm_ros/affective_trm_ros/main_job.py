"""The main job (`affective-trm demo`), end to end on this machine (no GPU, no network needed).

1. generates seeded sample sessions (rosbag2 MCAP: camera, microphone, speech, ground truth):
   training, validation and held-out sessions, each role with its own voices and sentences (model
   selection and the final score both hear speech that training never heard);
2. prepares aligned features from the training and validation bags through the nodes' code;
3. trains the stateful TRM and the memoryless MLP baseline, once per training seed;
4. replays every held-out session through the real ROS 2 nodes (encoders + fusion, simulated
   time, back-pressure: every frame gets an estimate) with each seed's TRM;
5. writes the report: mean +- sd over seeds and a bootstrap confidence interval over sessions for
   every model, beside a trivial predictor; how the learned confidence relates to the error; how
   each encoder's output correlates with the labels it should carry; plots.

Encoders: the default set (HSEmotion, Dasheng, EmbeddingGemma) when its weights are present, else
the offline set whose weights install with pip (FER2013 mini-Xception, openSMILE eGeMAPS,
all-MiniLM-L6-v2); random weights only with ``--allow-untrained``. The report's first line names
the encoders and their weights. Every stage is cached under ``--out`` keyed by the content it
depends on, so running the command again reuses what is already computed.

``--live`` runs the same nodes with the trained checkpoint on live camera/microphone/speech topics
(what ``affective-trm run`` does), instead of the replay.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from affective_trm_ros.core.encoders.sets import ENCODER_SETS


def default_out() -> Path:
    """``outputs/demo`` of the source checkout this module runs from (the same folder from any working
    directory, so ``--live`` finds what the last run trained), else ``~/.cache/affective_trm/demo``."""
    repository = Path(__file__).resolve().parents[2]
    if (repository / 'tools' / 'demo.sh').is_file():
        return repository / 'outputs' / 'demo'
    return Path.home() / '.cache' / 'affective_trm' / 'demo'


DEFAULT_OUT = default_out()
HELDOUT_SEED = 1000  # far from the training seeds
VALIDATION_SEED = 500
LATEST = 'latest.json'  # what --live runs: the last demo's checkpoint and settings
# Smallest face searched for (px): a person within ~1.5 m of a 640x480 camera; a third of the
# default detector's image pyramid, so detection costs several times less.
MIN_FACE_SIZE = 80
# The TRM is a few small matrix products per step: one intra-op thread is faster than two
# contending ones on a 2-core CPU (measured ~10x on a loaded machine); encoders use two.
TRAINING_THREADS = 1
# Share of the time a hand covers part of the face in the generated sessions.
OCCLUSION_FRACTION = 0.04
# The TRM the demo trains: small enough that 3 seeds train in minutes on 2 CPU cores (the sweep
# in docs/training.md).
DEMO_TRM = {'hidden_size': 64, 'num_heads': 2, 'num_layers': 1, 'h_cycles': 1, 'l_cycles': 1}
DEMO_MLP = {'hidden_size': 128}
# Share of (window, stream, modality) hidden in training, both models. With six training sessions
# the TRM overfits their sentences and voices at the default 0.15; 0.3 scored best on the
# validation sessions (their own voices and sentences) for both models in the sweep in
# docs/training.md.
DEMO_MODALITY_DROPOUT = 0.3


@dataclass(frozen=True)
class DemoSize:
    """How much data the demo makes and learns from."""

    train_sessions: int
    val_sessions: int
    heldout_sessions: int
    session_s: float
    heldout_s: float
    fps: float
    steps: int  # optimiser steps per model
    seeds: int  # training seeds (mean +- sd over them)
    crop_s: float  # each step trains on a random crop of this many seconds of every session


# Sized to stay well inside 15 minutes on a 2-core CPU (6.7 min measured on a clone of main; see
# docs/replay_and_demo.md).
# --quick is for the end-to-end test.
SIZES = {
    'default': DemoSize(
        train_sessions=6,
        val_sessions=2,
        heldout_sessions=3,
        session_s=40.0,
        heldout_s=30.0,
        fps=10.0,
        steps=120,
        seeds=3,
        crop_s=12.0,
    ),
    'quick': DemoSize(
        train_sessions=2,
        val_sessions=1,
        heldout_sessions=1,
        session_s=12.0,
        heldout_s=5.0,
        fps=10.0,
        steps=45,  # 30 left the TRM at validation CCC 0.03 on the unseen validation voice; 45: 0.42
        seeds=1,
        crop_s=8.0,
    ),
}


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
        print(f'\n[{self.index}/{self.total}] {name}{": " + detail if detail else ""}', flush=True)

    def end(self) -> None:
        if self._name is not None:
            self.times[self._name] = round(time.perf_counter() - self._started, 1)
            print(f'      done in {self.times[self._name]:.1f} s', flush=True)
            self._name = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.begin_all


def _weights_present(plugin: str) -> bool:
    from affective_trm_ros.core.encoders import weights as weight_registry
    from affective_trm_ros.core.encoders.base import encoder_class

    name = getattr(encoder_class(plugin), 'weights_name', None)
    return name is None or weight_registry.is_present(name)


def choose_encoders(choice: str, detector: str, allow_untrained: bool, people: int = 1) -> tuple:
    """(set name, node parameter overrides, {modality: runs untrained}).

    'auto' takes the default set when all its weights are present, else the offline set. An
    encoder whose weights are absent is an error unless ``allow_untrained``.
    """
    if choice == 'auto':
        choice = (
            'default' if all(_weights_present(p) for p in ENCODER_SETS['default'].values()) else 'offline'
        )
    plugins = ENCODER_SETS[choice]
    untrained = {m: not _weights_present(p) for m, p in plugins.items()}
    missing = [f'{m} ({plugins[m]})' for m, absent in untrained.items() if absent]
    if missing and not allow_untrained:
        raise RuntimeError(
            f'the weights of {", ".join(missing)} are absent. Get them with '
            f'`affective-trm weights fetch`, choose `--encoders offline` (weights install '
            f'with pip), or run them with random weights: --allow-untrained'
        )
    video = {
        'plugin': plugins['video'],
        'allow_untrained': untrained['video'],
        'detector': detector,
        'min_face_size': MIN_FACE_SIZE,
    }
    if people > 1:
        video['max_faces'] = people
    overrides = {
        'video_encoder': video,
        'audio_encoder': {'plugin': plugins['audio'], 'allow_untrained': untrained['audio']},
        'text_encoder': {'plugin': plugins['text'], 'allow_untrained': untrained['text']},
    }
    return choice, overrides, untrained


def run_demo(args: argparse.Namespace, size: DemoSize) -> int:
    import torch

    from affective_trm_ros.offline.synthetic.sample_sessions import espeak_available

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    stages = Stages(6)
    recorded = (
        size.train_sessions + size.val_sessions
    ) * size.session_s + size.heldout_sessions * size.heldout_s
    print(
        f'affective-trm demo: {size.train_sessions} training + {size.val_sessions} validation sessions x '
        f'{size.session_s:g} s, {size.heldout_sessions} held-out x {size.heldout_s:g} s at {size.fps:g} FPS '
        f'({recorded / 60:.1f} min of recordings); {size.seeds} training seed(s) x {size.steps} steps; '
        f'working in {out.resolve()}'
    )

    stages.start('checking the environment and choosing encoders')
    if not espeak_available():
        raise RuntimeError(
            'espeak-ng is not installed; the sample sessions speak through it. '
            'Install it with: sudo apt-get install -y espeak-ng'
        )
    encoder_set, overrides, untrained = choose_encoders(
        args.encoders, args.detector, args.allow_untrained, args.people
    )
    for node, values in overrides.items():
        state = (
            'UNTRAINED (weights absent; random seeded weights, --allow-untrained)'
            if values['allow_untrained']
            else 'pretrained weights'
        )
        print(f'      {node}: {values["plugin"]} - {state}')

    stages.start('generating sample sessions', 'camera 640x480, 16 kHz speech (espeak-ng), ground truth')
    plans = session_plans(size, args.seed, args.people)
    bags = generate(out / 'sessions', plans, progress)
    roles = {name: role for name, role, _ in plans}

    stages.start('preparing features', 'encoders + alignment exactly as the nodes run them')
    prepared = [bags[name] for name, role, _ in plans if role != 'heldout']
    store, settings, spec = prepare(out, prepared, overrides, args.device, progress)

    stages.start('training', f'stateful TRM and memoryless MLP, {size.seeds} seed(s)')
    encoder_threads = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    ids = store.session_ids()
    splits = {
        'train': [s for s in ids if roles.get(s) == 'train'],
        'val': [s for s in ids if roles.get(s) == 'val'],
        'test': [],
    }
    seeds = [args.seed + k for k in range(size.seeds)]
    checkpoints = train_models(out, store, splits, size, seeds, args.device, args.deterministic, progress)
    torch.set_num_threads(encoder_threads)

    stages.start(
        'replaying the held-out sessions through the ROS 2 nodes',
        f'{size.heldout_sessions} session(s) x {size.seeds} seed(s), as fast as possible, no frame dropped',
    )
    heldout = [bags[name] for name, role, _ in plans if role == 'heldout']
    node_seeds = min(size.seeds, args.node_seeds or size.seeds)
    runs = replay_all(out, heldout, checkpoints, overrides, args.device, progress, node_seeds)

    stages.start(
        'writing the report', 'every model on the same held-out features; confidence; encoder signals'
    )
    torch.set_num_threads(TRAINING_THREADS)
    report = build_report(
        out, runs, checkpoints, settings, spec, store, splits, size, encoder_set, overrides, untrained, stages
    )
    stages.end()
    report['demo']['total_seconds'] = round(stages.elapsed, 1)
    files = write_demo_report(out / 'report', report)
    (out / LATEST).write_text(
        json.dumps(
            {
                'checkpoint': str(Path(checkpoints['trm'][0]).resolve()),
                'parameters': overrides,
                'device': args.device,
            },
            indent=2,
        )
    )
    print_summary(report, files, stages)
    return 0


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def session_plans(size: DemoSize, seed: int, people: int = 1) -> list:
    """[(bag name, role 'train' | 'val' | 'heldout', SessionConfig)]: each role with its own voices and
    sentences, so model selection (validation) and the final score (held-out) both measure speech
    that training never heard."""
    from affective_trm_ros.offline.synthetic.sample_sessions import (
        HELDOUT_VOICES,
        TRAINING_VOICES,
        VALIDATION_VOICES,
        SessionConfig,
    )

    voices_of = {'train': TRAINING_VOICES, 'val': VALIDATION_VOICES, 'heldout': HELDOUT_VOICES}

    def config(role: str, session_seed: int, index: int, duration: float) -> SessionConfig:
        heldout = role == 'heldout'
        voices = voices_of[role]
        return SessionConfig(
            duration_s=duration,
            seed=session_seed,
            fps=size.fps,
            segment_s=min(25.0, max(4.0, duration / 4)),
            occlusion_fraction=OCCLUSION_FRACTION,
            voice=voices[index % len(voices)],
            sentence_set=role,
            people=people if heldout else 1,
            variety=True,
        )

    plans = []
    for role, count, first, duration in (
        ('train', size.train_sessions, seed, size.session_s),
        ('val', size.val_sessions, VALIDATION_SEED + seed, size.session_s),
        ('heldout', size.heldout_sessions, HELDOUT_SEED + seed, size.heldout_s),
    ):
        for index in range(count):
            cfg = config(role, first + index, index, duration)
            people_tag = f'_{cfg.people}p' if cfg.people > 1 else ''
            name = f'{role}_{cfg.seed:04d}_{duration:g}s_{size.fps:g}fps{people_tag}'
            plans.append((name, role, cfg))
    return plans


def generate(directory: Path, plans: list, progress: bool) -> dict:
    from affective_trm_ros.offline.synthetic.sample_sessions import generate_session, session_is_current

    paths = {}
    for name, _, config in plans:
        path = directory / name
        if session_is_current(path, config):
            print(f'      {path.name}: reused')
        else:
            summary = generate_session(path, config, overwrite=True, progress=progress)
            print(
                f'      {path.name}: {summary.frames} frames, {summary.utterances} utterances '
                f'({config.voice}, {config.sentence_set} sentences), face absent in '
                f'{summary.face_absent_frames} frames'
            )
        paths[name] = path
    return paths


def _settings(overrides: dict):
    from affective_trm_ros.offline.extraction.settings import NodeSettings, node_parameters

    parameters = {
        node: node_parameters(node, overrides=overrides.get(node))
        for node in ('video_encoder', 'audio_encoder', 'text_encoder', 'fusion')
    }
    return NodeSettings.from_parameters(parameters)


def prepare(out: Path, bags: list, overrides: dict, device: str, progress: bool) -> tuple:
    import torch

    from affective_trm_ros.offline.extraction.bag import (
        PREPARATION_VERSION,
        bag_files,
        encoder_spec,
        prepare_bag,
        session_id_for,
    )
    from affective_trm_ros.offline.io.feature_store import FeatureStore
    from affective_trm_ros.offline.learning.data import SessionSource

    settings = _settings(overrides)
    key = _key(
        {
            'version': PREPARATION_VERSION,
            'plugins': settings.plugins,
            'options': settings.options,
            'untrained': settings.allow_untrained,
            'weights': settings.weights,
            'encoder_parameters': settings.encoder_parameters,   # the face path's parameters too
            'audio': asdict(settings.audio),
            'alignment': asdict(settings.alignment),
        }
    )
    directory = out / 'features' / key
    if (directory / 'index.json').is_file():
        store = FeatureStore(directory)
        current = all(
            store.has(session_id_for(bag))
            and store.load(session_id_for(bag)).meta.get('bag_files')
            == json.loads(json.dumps(bag_files(bag)))
            for bag in bags
        )
        if current and len(store.session_ids()) == len(bags):
            for bag in bags:
                print(f'      {session_id_for(bag)}: reused ({store.num_frames(session_id_for(bag))} frames)')
            return store, settings, store.encoder_spec
        shutil.rmtree(directory)
    encoders = settings.load_encoders(device)
    spec = encoder_spec(encoders)
    store = FeatureStore(directory, encoder_spec=spec)
    for bag in bags:
        started = time.perf_counter()
        result = prepare_bag(
            bag, store, encoders, settings.alignment, audio=settings.audio, progress=progress,
            video_path=settings.video_path(encoders),   # the video node's face path, as in the replay
        )
        elapsed = time.perf_counter() - started
        print(
            f'      {result.session_id}: {result.frames} frames in {elapsed:.0f} s '
            f'({result.frames / max(elapsed, 1e-9):.1f} frames/s); faces in '
            f'{result.counts.get("video_valid", 0)}, audible windows '
            f'{result.counts.get("audio_ok", 0)}, utterances {result.counts.get("text_embeddings", 0)}'
        )
    store.update_info(
        source='affective-trm demo',
        encoders={m: e.identity for m, e in encoders.items()},
        features_hash=SessionSource(store, store.session_ids()).digest(),
        torch_threads=torch.get_num_threads(),
    )
    return store, settings, spec


def train_models(
    out: Path,
    store,
    splits: dict,
    size: DemoSize,
    seeds: list,
    device: str,
    deterministic: bool,
    progress: bool,
) -> dict:
    """{'trm': [checkpoint per seed], 'mlp': [...]}; a run is reused when the features (by content)
    and its configuration are unchanged."""
    from affective_trm_ros.offline.learning.data import SessionSource
    from affective_trm_ros.offline.learning.train import TrainConfig

    features_hash = SessionSource(store, splits['train'] + splits['val']).digest()
    crop = max(1, int(round(size.crop_s * size.fps)))
    done_runs: dict = {}
    pending = []
    for seed in seeds:
        for kind, model_config in (('trm', DEMO_TRM), ('mlp', DEMO_MLP)):
            config = TrainConfig(
                model=kind,
                model_config=dict(model_config),
                steps=size.steps,
                eval_every=max(1, size.steps // 12),
                batch_size=len(splits['train']),
                window=32,
                crop_frames=crop,
                lr=3e-3,
                warmup_fraction=0.1,
                patience=4,
                smoothing=3,
                min_epochs=6,
                modality_dropout=DEMO_MODALITY_DROPOUT,
                seed=seed,
                device=device,
                splits=splits,
                deterministic=deterministic,
                progress=progress,
            )
            settings = {k: v for k, v in asdict(config).items() if k not in ('progress', 'plots', 'out_dir')}
            key = _key({'features': features_hash, 'config': settings})
            run_dir = out / 'models' / f'{kind}_seed{seed}_{key}'
            done = run_dir / 'done.json'
            if done.is_file():
                done_runs[kind, seed] = json.loads(done.read_text())
                print(f'      {kind} seed {seed}: reused {done_runs[kind, seed]["checkpoint"]}')
            else:
                pending.append(((kind, seed), dataclasses.replace(config, out_dir=str(run_dir))))
    workers = _training_workers(len(pending), device)
    if workers > 1:
        print(f'      training {len(pending)} models, {workers} at a time ({TRAINING_THREADS} thread each)')
        pending = [(job, dataclasses.replace(config, progress=False)) for job, config in pending]
    for (kind, seed), result in _run_training(store.root, pending, workers):
        (Path(result['out_dir']) / 'done.json').write_text(json.dumps(result))
        done_runs[kind, seed] = result
        print(
            f'      {kind} seed {seed}: best step {result["best_step"]}, validation CCC '
            f'{result["best_val_ccc"]:.3f} ({result["seconds"]:.0f} s) -> {result["checkpoint"]}'
        )
    return {kind: [Path(done_runs[kind, seed]['checkpoint']) for seed in seeds] for kind in ('trm', 'mlp')}


def _training_workers(jobs: int, device: str) -> int:
    """Training processes at a time: one per available core (each trains with TRAINING_THREADS), one
    when a GPU trains (one CUDA context) or there is at most one job."""
    import os

    if jobs <= 1 or not str(device).startswith('cpu'):
        return 1
    return max(1, min(jobs, len(os.sched_getaffinity(0)) // TRAINING_THREADS))


def _train_job(store_root: str, config) -> dict:
    """One training run (in a worker process or in this one); what done.json records."""
    import torch

    from affective_trm_ros.offline.io.feature_store import FeatureStore
    from affective_trm_ros.offline.learning.train import train

    torch.set_num_threads(TRAINING_THREADS)
    result = train(FeatureStore(store_root), config)
    return {
        'checkpoint': str(result.checkpoint_path),
        'best_step': result.best_step,
        'best_val_ccc': result.best_val_ccc,
        'seconds': result.seconds,
        'out_dir': config.out_dir,
    }


def _run_training(store_root: Path, jobs: list, workers: int):
    """Yield ((kind, seed), result) as the runs finish. Each run is seeded and single-threaded, so
    it gives the same model in a worker process as in this one."""
    if workers <= 1:
        for job, config in jobs:
            yield job, _train_job(str(store_root), config)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context('spawn')  # no fork after torch started its threads
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_train_job, str(store_root), config): job for job, config in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()


@dataclass
class ReplayRun:
    """One held-out session replayed through the nodes with one seed's TRM."""

    seed_index: int
    session: str
    report: dict  # the replay report (metrics, coverage, latency, ...)
    estimates: object  # (N, 2) the nodes' estimates per frame
    confidence: object  # (N,)
    truth: object  # (N, 2)
    stamps_ns: object  # (N,)
    embeddings: list  # (modality, stamp_ns, valid, data) the nodes published
    files: dict


def replay_all(
    out: Path, bags: list, checkpoints: dict, overrides: dict, device: str, progress: bool,
    node_seeds: Optional[int] = None,
) -> list:
    """Replay every held-out bag with the first ``node_seeds`` seeds' TRMs (default: all; cached by
    checkpoint content and bag). The other seeds get runs without node estimates that share the
    first seed's recorded embeddings (the encoders do not depend on the fusion checkpoint)."""
    import numpy as np

    from affective_trm_ros.offline.extraction.bag import bag_files
    from affective_trm_ros.replay.driver import ReplayError
    from affective_trm_ros.replay.session import ReplayOptions, replay_bag

    gc.collect()  # the encoders of the preparation stage are no longer needed

    runs = []
    replayed = checkpoints['trm'][: node_seeds or len(checkpoints['trm'])]
    for seed_index, checkpoint in enumerate(replayed):
        for bag in bags:
            key = _key(
                {
                    'checkpoint': _file_digest(checkpoint),
                    'bag': bag_files(bag),
                    'parameters': overrides,
                    'device': device,
                }
            )
            directory = out / 'replays' / f'{bag.name}_seed{seed_index}'
            cache = directory / 'replay_cache.npz'
            key_file = directory / 'replay_key.txt'  # written last: its presence means complete
            if cache.is_file() and key_file.is_file() and key_file.read_text() == key:
                saved = np.load(cache, allow_pickle=False)
                report = json.loads((directory / 'report.json').read_text())
                embeddings = json.loads((directory / 'embeddings.json').read_text())
                embeddings = [
                    (m, int(t), bool(v), None if d is None else np.asarray(d, np.float32))
                    for m, t, v, d in embeddings
                ]
                runs.append(
                    ReplayRun(
                        seed_index,
                        bag.name,
                        report,
                        saved['estimates'],
                        saved['confidence'],
                        saved['truth'],
                        saved['stamps_ns'],
                        embeddings,
                        {},
                    )
                )
                print(f'      {bag.name} seed {seed_index}: reused')
                continue
            options = ReplayOptions(
                device=device,
                parameters=overrides,
                record_embeddings=True,
                progress=progress,
                title=f'Held-out replay: {bag.name}, seed {seed_index}',
            )
            started = time.perf_counter()
            try:
                outcome = replay_bag(bag, checkpoint, directory, options)
            except ReplayError as error:  # seen intermittently on a loaded machine: try once more
                print(f'      {bag.name} seed {seed_index}: replay failed ({error}); replaying again')
                gc.collect()
                outcome = replay_bag(bag, checkpoint, directory, options)
            table = outcome.table
            embeddings = [
                (m, int(t), bool(v), None if d is None else np.asarray(d, np.float32))
                for m, t, v, d, *_ in outcome.record.embeddings
            ]
            np.savez(
                cache,
                estimates=table.estimates,
                confidence=table.confidence,
                truth=table.truth,
                stamps_ns=table.stamps_ns,
            )
            (directory / 'embeddings.json').write_text(
                json.dumps(
                    [(m, t, v, None if d is None else [float(x) for x in d]) for m, t, v, d in embeddings]
                )
            )
            key_file.write_text(key)
            runs.append(
                ReplayRun(
                    seed_index,
                    bag.name,
                    outcome.report,
                    table.estimates,
                    table.confidence,
                    table.truth,
                    table.stamps_ns,
                    embeddings,
                    outcome.files,
                )
            )
            print(
                f'      {bag.name} seed {seed_index}: {table.stamps_ns.size} frames in '
                f'{time.perf_counter() - started:.0f} s, coverage {outcome.report["coverage"] * 100:.1f} %'
            )
    first = {run.session: run for run in runs if run.seed_index == 0}
    for seed_index in range(len(replayed), len(checkpoints['trm'])):
        for bag in bags:
            run = first[bag.name]
            runs.append(dataclasses.replace(run, seed_index=seed_index, estimates=None, confidence=None,
                                            files={}))
    return runs


MODEL_ROWS = (
    'stateful TRM, through the ROS 2 nodes',
    'stateful TRM, offline on the same features',
    'memoryless MLP baseline',
    'trivial: training-label mean',
)


def _heldout_features(run: ReplayRun, settings, spec: list) -> tuple:
    """The features the nodes published during a replay, aligned with the fusion policy, with the
    replay's ground truth: (timestamps, features {modality: (T, dim)}, mask (T, M), labels (T, 2))."""
    import numpy as np

    from affective_trm_ros.core.alignment import align_events, steps_to_arrays

    events = [
        (modality, stamp_ns / 1e9, data if valid and data is not None else None)
        for modality, stamp_ns, valid, data in run.embeddings
    ]
    steps = align_events(events, settings.alignment)
    dims = {e['modality']: int(e['dim']) for e in spec}
    timestamps, features, mask, _ = steps_to_arrays(steps, dims)
    by_stamp = {int(ns): run.truth[i] for i, ns in enumerate(run.stamps_ns)}
    labels = np.array(
        [by_stamp.get(int(round(t * 1e9)), (np.nan, np.nan)) for t in timestamps], np.float32
    ).reshape(-1, 2)
    return timestamps, {m: features[m] for m in dims}, mask[:, : len(dims)], labels


def build_report(
    out: Path,
    runs: list,
    checkpoints: dict,
    settings,
    spec: list,
    store,
    splits: dict,
    size: DemoSize,
    encoder_set: str,
    overrides: dict,
    untrained: dict,
    stages: Stages,
) -> dict:
    """Every model on every held-out session and seed; mean +- sd over seeds, bootstrap CI over sessions."""
    import numpy as np

    from affective_trm_ros.core.checkpoint import load_checkpoint
    from affective_trm_ros.core.metrics import confidence_vs_error
    from affective_trm_ros.offline.evaluation.seeds import seed_session_statistics
    from affective_trm_ros.offline.evaluation.signals import (
        correlations_markdown,
        egemaps_feature_names,
        encoder_label_correlations,
    )
    from affective_trm_ros.offline.io.feature_store import InMemoryStore
    from affective_trm_ros.offline.learning.data import SessionSource
    from affective_trm_ros.offline.learning.train import predict_sessions

    sessions = sorted({run.session for run in runs})
    seeds = len(checkpoints['trm'])
    train_labels = np.concatenate([store.load(s).labels for s in splits['train']])
    label_mean = np.nanmean(train_labels, axis=0)
    predictions = {row: [[None] * len(sessions) for _ in range(seeds)] for row in MODEL_ROWS}
    truths = [None] * len(sessions)
    confidence_runs, features_by_session = [], {}
    for run in runs:
        s = sessions.index(run.session)
        timestamps, features, mask, labels = _heldout_features(run, settings, spec)
        features_by_session.setdefault(run.session, (features, mask, labels))
        memory = InMemoryStore(spec)
        memory.write_session(
            'heldout', speaker='heldout', timestamps=timestamps, features=features, mask=mask, labels=labels
        )
        source = SessionSource(memory, ['heldout'])
        truths[s] = labels
        for row, kind in ((MODEL_ROWS[1], 'trm'), (MODEL_ROWS[2], 'mlp')):
            model = load_checkpoint(checkpoints[kind][run.seed_index], device='cpu').model
            predictions[row][run.seed_index][s] = predict_sessions(model, source, ['heldout'], 'cpu')[
                'heldout'
            ][0]
        predictions[MODEL_ROWS[3]][run.seed_index][s] = np.tile(label_mean, (labels.shape[0], 1))
        if run.estimates is None:  # this seed was not replayed through the nodes
            continue
        by_stamp = {int(ns): (run.estimates[i], run.confidence[i]) for i, ns in enumerate(run.stamps_ns)}
        node = np.array(
            [by_stamp.get(int(round(t * 1e9)), ((np.nan, np.nan), np.nan))[0] for t in timestamps], np.float64
        ).reshape(-1, 2)
        predictions[MODEL_ROWS[0]][run.seed_index][s] = node
        node_conf = np.array(
            [by_stamp.get(int(round(t * 1e9)), (None, np.nan))[1] for t in timestamps], np.float64
        )
        confidence_runs.append((node_conf, node, labels))
    table = {}
    for row in MODEL_ROWS:
        rows = [k for k in range(seeds) if all(p is not None for p in predictions[row][k])]
        table[row] = seed_session_statistics([predictions[row][k] for k in rows], truths, sessions)
    confidence = confidence_vs_error(
        np.concatenate([c for c, _, _ in confidence_runs]),
        np.concatenate([p for _, p, _ in confidence_runs]),
        np.concatenate([t for _, _, t in confidence_runs]),
    )
    egemaps_names = egemaps_feature_names() if any(e['encoder'] == 'egemaps' for e in spec) else None
    anchors = _text_anchors(spec, overrides)
    signal_sessions = dict(features_by_session)
    for sid in splits['train'] + splits['val']:
        session = store.load(sid)
        signal_sessions[sid] = (session.features, session.mask, session.labels)
    correlations = encoder_label_correlations(
        signal_sessions, spec, egemaps_names=egemaps_names, anchors=anchors
    )
    encoders = dict(runs[0].report.get('encoders', {})) if runs else {}
    node_nodes = table[MODEL_ROWS[0]]['mean']['ccc_mean']
    return {
        'first_line': _encoders_line(encoder_set, encoders, untrained),
        'encoders': encoders,
        'encoder_set': encoder_set,
        'untrained_encoders': {m: encoders.get(m, '') for m, absent in untrained.items() if absent},
        'models': table,
        'sessions': sessions,
        'seeds': seeds,
        'confidence_vs_error': confidence,
        'encoder_signals': correlations,
        'encoder_signals_markdown': correlations_markdown(correlations),
        'node_seeds': len({r.seed_index for r in runs if r.estimates is not None}),
        'replays': [
            {
                'session': r.session,
                'seed': r.seed_index,
                'coverage': r.report.get('coverage'),
                'frames': r.report.get('frames'),
                'latency_ms': r.report.get('latency_ms'),
                'throughput_fps': r.report.get('throughput_fps'),
                'mean_ccc': r.report.get('metrics', {}).get('mean', {}).get('ccc'),
            }
            for r in runs
            if r.estimates is not None
        ],
        'targets': {
            'trm_nodes_mean_ccc': node_nodes,
            'margin_over_mlp': node_nodes - table[MODEL_ROWS[2]]['mean']['ccc_mean'],
        },
        'demo': {
            'sizes': asdict(size),
            'stage_seconds': stages.times,
            'node_parameters': overrides,
            'splits': splits,
            'checkpoints': {k: [str(p) for p in v] for k, v in checkpoints.items()},
        },
    }


def _text_anchors(spec: list, overrides: dict):
    text = [e for e in spec if e['modality'] == 'text']
    if not text:
        return None
    from affective_trm_ros.core.encoders.loading import encoder_from_parameters
    from affective_trm_ros.offline.evaluation.signals import text_anchors

    parameters = _settings(overrides).encoder_parameters.get('text')
    return text_anchors(encoder_from_parameters('text', parameters, device='cpu')) if parameters else None


def _encoders_line(encoder_set: str, encoders: dict, untrained: dict) -> str:
    named = ', '.join(f'{m} {encoders.get(m, "?")}' for m in ('video', 'audio', 'text'))
    if any(untrained.values()):
        absent = ', '.join(m for m, a in untrained.items() if a)
        return (
            f'Encoders ({encoder_set} set): {named}. UNTRAINED (random weights, --allow-untrained): {absent}.'
        )
    return f'Encoders ({encoder_set} set), all with their published weights: {named}.'


def _fmt(value: float, digits: int = 3) -> str:
    return 'n/a' if value is None or not math.isfinite(value) else f'{value:.{digits}f}'


def _pm(entry: dict) -> str:
    return f'{_fmt(entry["ccc_mean"])} ± {_fmt(entry["ccc_sd"])}'


def results_markdown(report: dict) -> str:
    seeds, sessions = report['seeds'], len(report['sessions'])
    lines = [
        f'| model (held-out, {sessions} sessions, {seeds} seeds) | CCC valence | CCC arousal | '
        'mean CCC | 95 % CI over sessions |',
        '|---|---|---|---|---|',
    ]
    for name, entry in report['models'].items():
        low, high = entry['ci95_mean_ccc']
        if entry.get('seeds', seeds) != seeds:
            name = f'{name} ({entry["seeds"]} of {seeds} seeds)'
        lines.append(
            f'| {name} | {_pm(entry["valence"])} | {_pm(entry["arousal"])} | **{_pm(entry["mean"])}** | '
            f'[{_fmt(low)}, {_fmt(high)}] |'
        )
    return '\n'.join(lines)


def write_demo_report(directory: Path, report: dict) -> dict:
    from affective_trm_ros.offline.learning.train import to_json_compatible

    directory.mkdir(parents=True, exist_ok=True)
    confidence = report['confidence_vs_error']
    bins = ', '.join(
        f'{_fmt(b["mean_confidence"], 2)} -> {_fmt(b["mean_abs_error"])}' for b in confidence['bins']
    )
    per_session = [
        '| model | ' + ' | '.join(report['sessions']) + ' |',
        '|---|' + '---|' * len(report['sessions']),
    ]
    for name, entry in report['models'].items():
        per_session.append(
            f'| {name} | ' + ' | '.join(_fmt(entry['session_ccc'][s]) for s in report['sessions']) + ' |'
        )
    sizes = report['demo']['sizes']
    text = '\n'.join(
        [
            report['first_line'],
            '',
            '# Main job: held-out sessions',
            '',
            f'{sizes["train_sessions"]} training, {sizes["val_sessions"]} validation and '
            f'{sizes["heldout_sessions"]} held-out sessions (each with its own voices and sentences: '
            f'validation and held-out speech never heard in training), {sizes["fps"]:g} FPS; '
            f'mean ± sd over {report["seeds"]} '
            'training seeds; the CI resamples sessions (bootstrap, 1000 draws). The TRM through the nodes is '
            'what the fusion node published; the other rows run on the embeddings the nodes published.',
            '',
            results_markdown(report),
            '',
            '## Mean CCC per held-out session (mean over seeds)',
            '',
            '\n'.join(per_session),
            '',
            '## Learned confidence vs absolute error (TRM through the nodes, all seeds)',
            '',
            f'Spearman {_fmt(confidence["spearman"])} over {confidence["n"]} frames (negative: lower '
            f'confidence where the error is larger). Mean |error| per confidence quintile: {bins}.',
            '',
            '## Do the encoders carry the labels? (Pearson r of a read-out with its label)',
            '',
            report['encoder_signals_markdown'],
            '',
            f'Total {report["demo"]["total_seconds"] / 60:.1f} min; stages: '
            + ', '.join(f'{k} {v:.0f} s' for k, v in report['demo']['stage_seconds'].items()),
            '',
        ]
    )
    markdown = directory / 'report.md'
    markdown.write_text(text)
    summary = directory / 'report.json'
    summary.write_text(
        json.dumps(
            to_json_compatible({k: v for k, v in report.items() if k != 'encoder_signals_markdown'}), indent=2
        )
    )
    return {'markdown': markdown, 'json': summary}


def print_summary(report: dict, files: dict, stages: Stages) -> None:
    print('\n' + report['first_line'] + '\n')
    print(results_markdown(report))
    confidence = report['confidence_vs_error']
    print(
        f'\nlearned confidence vs |error|: Spearman {_fmt(confidence["spearman"])} ({confidence["n"]} frames)'
    )
    coverage = [r['coverage'] for r in report['replays'] if r['coverage'] is not None]
    if coverage:
        print(f'coverage through the nodes: {min(coverage) * 100:.2f} % (lowest of {len(coverage)} replays)')
    print(f'report: {files["markdown"]}')
    parts = ', '.join(f'{name} {seconds:.0f} s' for name, seconds in stages.times.items())
    print(f'total {stages.elapsed / 60:.1f} min ({parts})')
