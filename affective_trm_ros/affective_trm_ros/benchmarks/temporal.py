"""The synthetic temporal benchmark: does a model use the past?

Seeded streams whose valence/arousal follow a smooth latent process (a sum of slow sinusoids per
dimension, squashed into [-0.9, 0.9]) are observed through three noisy modalities:

* **video** carries the current valence and arousal (a fixed random linear map plus noise), but
  only in stretches: the face is visible about a quarter of the time;
* **audio** carries only the *rate of change* of valence and arousal (plus noise), almost always;
* **text** arrives as sparse utterances (every few seconds) that carry the *valence* at the moment
  they were spoken; as in the fusion node, the latest utterance stays in force for up to
  ``text_max_age_s``.

Between video stretches, the current state can only be recovered by remembering the last video
reading and integrating the audio-borne changes since then. A memoryless model sees the
derivative and a stale valence only, so it cannot; a stateful one can. Every model is trained by
the same :func:`~affective_trm_ros.offline.learning.train.train` harness on the training streams and
scored on held-out streams with the same metrics as real evaluations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from affective_trm_ros.core.checkpoint import load_checkpoint
from affective_trm_ros.core.metrics import mean_sd, regression_report
from affective_trm_ros.core.trm import DEFAULT_MODALITY_DIMS
from affective_trm_ros.offline.io.feature_store import InMemoryStore
from affective_trm_ros.offline.learning.train import TrainConfig, predict_sessions, to_json_compatible, train

# Feature sizes of the default (fast) variant; --full-dims uses the real encoders' sizes.
SMALL_DIMS = {'audio': 16, 'video': 32, 'text': 16}
# Latent process: per dimension, a sum of this many sinusoids with periods drawn in PERIOD_RANGE_S.
NUM_SINUSOIDS = 3
PERIOD_RANGE_S = (6.0, 30.0)
AMPLITUDE_RANGE = (0.3, 0.7)
LATENT_BOUND = 0.9
# Visibility of the face: alternating visible/hidden stretches with these mean durations.
VIDEO_ON_MEAN_S = 1.5
VIDEO_OFF_MEAN_S = 4.5
# Audio drop-outs (e.g. the microphone muted) with these mean durations.
AUDIO_ON_MEAN_S = 12.0
AUDIO_OFF_MEAN_S = 1.0
# Utterances: mean gap between them, and how long one stays in force.
TEXT_GAP_MEAN_S = 4.0
TEXT_MAX_AGE_S = 10.0
# Noise standard deviation per feature, relative to the unit-variance signal projection.
VIDEO_NOISE = 1.0
AUDIO_NOISE = 1.0
TEXT_NOISE = 1.0
# The audio block carries d(va)/dt times this (seconds), so its scale matches the other blocks.
DERIVATIVE_SCALE_S = 2.0
# Model sizes used by the benchmark (same hidden width for the three neural sequence models).
# Model sizes of the benchmark: about 30k parameters each, small enough for a CPU run of minutes.
# The TRMs use one block of width 32 and one (latent, answer) update per frame.
DEFAULT_MODEL_CONFIGS = {
    'trm': {
        'hidden_size': 32,
        'num_heads': 2,
        'num_layers': 1,
        'expansion': 2.0,
        'h_cycles': 1,
        'l_cycles': 1,
        'grad_cycles': 1,
    },
    'gru': {'hidden_size': 64, 'dropout': 0.0},
    'mlp': {'hidden_size': 128, 'num_layers': 2, 'dropout': 0.0},
    'seed_trm': {
        'hidden_size': 32,
        'num_heads': 2,
        'num_layers': 1,
        'expansion': 2.0,
        'h_cycles': 2,
        'l_cycles': 1,
        'grad_cycles': 2,
    },
}
MODEL_ORDER = ('trm', 'gru', 'mlp', 'seed_trm')
MODEL_LABELS = {
    'trm': 'stateful TRM',
    'gru': 'GRU',
    'mlp': 'memoryless MLP',
    'seed_trm': 'seed-compatible TRM',
}


@dataclass
class TemporalBenchmarkConfig:
    seed: int = 0  # seed of the streams and of the first training run
    seeds: int = 1  # training seeds per model (seed, seed + 1, ...): the table gives mean +- sd
    small: bool = True  # 16/32/16-dim features; False: the real encoders' 768/1280/768
    train_streams: int = 192
    val_streams: int = 16
    test_streams: int = 32
    frames: int = 240
    fps: float = 10.0
    epochs: int = 10
    batch_size: int = 8
    window: int = 40
    lr: float = 2e-3
    weight_decay: float = 0.01
    models: tuple = MODEL_ORDER
    model_configs: dict = field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_MODEL_CONFIGS.items()}
    )
    device: str = 'cpu'
    out_dir: str = 'runs/temporal_benchmark'
    progress: bool = False

    @property
    def dims(self) -> dict:
        return dict(SMALL_DIMS if self.small else DEFAULT_MODALITY_DIMS)


# ----------------------------------------------------------------------------------------------
# Data


def _alternating(rng, frames: int, fps: float, on_mean: float, off_mean: float) -> np.ndarray:
    """Boolean presence with exponentially distributed on/off stretches, random initial phase."""
    present = np.zeros(frames, bool)
    state = rng.random() < on_mean / (on_mean + off_mean)
    index = 0
    while index < frames:
        length = max(1, int(round(rng.exponential(on_mean if state else off_mean) * fps)))
        present[index : index + length] = state
        index += length
        state = not state
    return present


def _projections(rng, dims: dict) -> dict:
    """Fixed random 'encoders': 2 latent values -> features (unit variance per feature)."""
    return {
        name: rng.normal(0.0, 1.0, size=(2 if name != 'text' else 1, dim)).astype(np.float32)
        for name, dim in dims.items()
    }


def generate_stream(rng, projections: dict, frames: int, fps: float) -> tuple:
    """One stream: (timestamps, features, mask (T, 3), labels (T, 2))."""
    times = np.arange(frames) / fps
    latent = np.zeros((frames, 2))
    for column in range(2):
        for _ in range(NUM_SINUSOIDS):
            period = rng.uniform(*PERIOD_RANGE_S)
            latent[:, column] += rng.uniform(*AMPLITUDE_RANGE) * np.sin(
                2 * np.pi * times / period + rng.uniform(0, 2 * np.pi)
            )
    labels = LATENT_BOUND * np.tanh(latent)
    derivative = np.gradient(labels, 1.0 / fps, axis=0) * DERIVATIVE_SCALE_S

    video_on = _alternating(rng, frames, fps, VIDEO_ON_MEAN_S, VIDEO_OFF_MEAN_S)
    audio_on = _alternating(rng, frames, fps, AUDIO_ON_MEAN_S, AUDIO_OFF_MEAN_S)
    # Utterances: Poisson times; each carries the valence at its time, in force for TEXT_MAX_AGE_S.
    text_value = np.zeros((frames, 1))
    text_on = np.zeros(frames, bool)
    last_index, last_time = None, -math.inf
    next_time = rng.exponential(TEXT_GAP_MEAN_S)
    for index, now in enumerate(times):
        if now >= next_time:
            last_index, last_time = index, now
            next_time = now + rng.exponential(TEXT_GAP_MEAN_S)
        if last_index is not None and now - last_time <= TEXT_MAX_AGE_S:
            text_on[index] = True
            text_value[index, 0] = labels[last_index, 0]

    def observe(name: str, signal: np.ndarray, noise: float, present: np.ndarray) -> np.ndarray:
        block = signal @ projections[name] + rng.normal(0.0, noise, size=(frames, projections[name].shape[1]))
        return np.where(present[:, None], block, 0.0).astype(np.float32)

    features = {
        'audio': observe('audio', derivative, AUDIO_NOISE, audio_on),
        'video': observe('video', labels, VIDEO_NOISE, video_on),
        'text': observe('text', text_value, TEXT_NOISE, text_on),
    }
    mask = np.stack([audio_on, video_on, text_on], axis=1)
    return times, features, mask, labels.astype(np.float32)


def build_store(config: TemporalBenchmarkConfig) -> tuple:
    """An in-memory feature store of all streams and the fixed train/val/test split."""
    rng = np.random.default_rng(config.seed)
    dims = config.dims
    projections = _projections(rng, dims)
    spec = [{'modality': name, 'encoder': f'synthetic_{name}', 'dim': dim} for name, dim in dims.items()]
    store = InMemoryStore(spec, root='<temporal benchmark>')
    splits: dict = {'train': [], 'val': [], 'test': []}
    counts = {'train': config.train_streams, 'val': config.val_streams, 'test': config.test_streams}
    for split, count in counts.items():
        for index in range(count):
            session_id = f'{split}_{index:03d}'
            times, features, mask, labels = generate_stream(rng, projections, config.frames, config.fps)
            store.write_session(
                session_id, speaker=session_id, timestamps=times, features=features, mask=mask, labels=labels
            )
            splits[split].append(session_id)
    return store, splits


# ----------------------------------------------------------------------------------------------
# Running


def run_temporal_benchmark(config: Optional[TemporalBenchmarkConfig] = None, **overrides) -> dict:
    """Train every model of ``config.models`` on the same streams; score them on held-out streams.

    Writes ``results.json`` and ``results.md`` into ``config.out_dir``; returns the results dict.
    """

    from affective_trm_ros.offline.learning.data import SessionSource

    config = dataclasses.replace(config or TemporalBenchmarkConfig(), **overrides)
    started = time.perf_counter()
    store, splits = build_store(config)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    test_source = SessionSource(store, splits['test'])
    mask_all = np.concatenate([test_source.arrays(sid)[1] for sid in splits['test']])
    results: dict = {
        'config': to_json_compatible(dataclasses.asdict(config)),
        'dims': config.dims,
        'presence_test': {m: float(mask_all[:, i].mean()) for i, m in enumerate(store.modalities)},
        'models': {},
    }
    for kind in config.models:
        model_started = time.perf_counter()
        runs = []
        for run_seed in range(config.seed, config.seed + max(1, config.seeds)):
            runs.append(_train_and_test(kind, config, store, splits, test_source, run_seed, out_dir))
        reports = [run['test'] for run in runs]
        summary = {name: dict(zip(('ccc_mean', 'ccc_sd'), mean_sd([r[name]['ccc'] for r in reports])))
                   for name in ('valence', 'arousal', 'mean')}
        results['models'][kind] = {
            'label': MODEL_LABELS.get(kind, kind),
            'test': reports[0],
            'seeds': [run['seed'] for run in runs],
            'test_per_seed': reports,
            'summary': summary,
            'rmse_mean': mean_sd([r['mean']['rmse'] for r in reports])[0],
            'pearson_mean': mean_sd([r['mean']['pearson'] for r in reports])[0],
            'best_epoch': runs[0]['best_epoch'],
            'val_ccc_mean': runs[0]['val_ccc_mean'],
            'parameters': runs[0]['parameters'],
            'train_seconds': time.perf_counter() - model_started,
        }
        if config.progress:
            print(
                f'{kind}: test mean CCC {summary["mean"]["ccc_mean"]:.3f} ± {summary["mean"]["ccc_sd"]:.3f} '
                f'over {len(runs)} seed(s) ({time.perf_counter() - model_started:.0f} s)',
                flush=True,
            )
    results['seconds'] = time.perf_counter() - started
    (out_dir / 'results.json').write_text(json.dumps(to_json_compatible(results), indent=2))
    (out_dir / 'results.md').write_text(results_markdown(results))
    return results


def _train_and_test(kind: str, config: TemporalBenchmarkConfig, store, splits: dict, test_source, seed: int,
                    out_dir: Path) -> dict:
    """Train one model with one seed; its metrics on the held-out streams."""
    import torch

    train_config = TrainConfig(
        model=kind,
        model_config=dict(config.model_configs.get(kind, {})),
        out_dir=str(out_dir / (kind if seed == config.seed else f'{kind}_seed{seed}')),
        epochs=config.epochs,
        batch_size=config.batch_size,
        window=config.window,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_fraction=0.05,
        ema_decay=0.99,
        patience=config.epochs,
        modality_dropout=0.1,
        seed=seed,
        device=config.device,
        splits=splits,
        plots=False,
        progress=config.progress,
    )
    result = train(store, train_config)
    best = load_checkpoint(result.checkpoint_path, device=config.device)
    predictions = predict_sessions(best.model, test_source, splits['test'], torch.device(config.device))
    preds = np.concatenate([predictions[sid][0] for sid in splits['test']])
    truths = np.concatenate([test_source.arrays(sid)[2] for sid in splits['test']])
    return {'seed': seed, 'test': regression_report(preds, truths), 'best_epoch': result.best_epoch,
            'val_ccc_mean': result.best_val_ccc, 'parameters': best.model.num_parameters()}


def results_markdown(results: dict) -> str:
    """The benchmark's table: CCC (valence, arousal, mean) and RMSE per model on held-out streams."""
    models = results['models']
    seeds = max((len(entry.get('seeds', [0])) for entry in models.values()), default=1)
    heading = f'CCC mean (mean ± sd over {seeds} seeds)' if seeds > 1 else 'CCC mean'
    lines = [
        f'| model | CCC valence | CCC arousal | {heading} | RMSE mean | Pearson r mean | parameters |',
        '|---|---|---|---|---|---|---|',
    ]
    for kind, entry in models.items():
        summary = entry.get('summary') or {name: {'ccc_mean': entry['test'][name]['ccc'], 'ccc_sd': math.nan}
                                           for name in ('valence', 'arousal', 'mean')}
        cells = {name: f'{value["ccc_mean"]:.3f}' + (f' ± {value["ccc_sd"]:.3f}' if seeds > 1 else '')
                 for name, value in summary.items()}
        rmse = entry.get('rmse_mean', entry['test']['mean']['rmse'])
        pearson = entry.get('pearson_mean', entry['test']['mean']['pearson'])
        lines.append(
            f'| {entry["label"]} (`{kind}`) | {cells["valence"]} | {cells["arousal"]} | **{cells["mean"]}** '
            f'| {rmse:.3f} | {pearson:.3f} | {entry["parameters"]:,} |'
        )
    return '\n'.join(lines) + '\n'
