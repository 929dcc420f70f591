"""Training of the stateful TRM and its baselines on a feature store.

One loop serves every model kind ('trm', 'seed_trm', 'mlp', 'gru'):

* speaker-independent seeded splits (:mod:`.splits`), input normalisation from the training
  split's statistics, stored inside the model (so serving normalises identically);
* batches of whole sessions (or random crops of them), run window by window for truncated
  back-propagation through time: the recurrent state is carried from window to window, detached,
  and reset exactly where the fusion node resets it (:func:`~.data.session_resets`);
* one optimiser step per batch on ``ccc_weight · (1 − CCC) + mse_weight · MSE + nll_weight · NLL``,
  the CCC computed over the *whole sequences* of the batch (every window's predictions gathered),
  never over one window (:func:`sequence_loss_backward`);
* modality dropout (whole modalities hidden for whole windows) so missing inputs are handled;
* AdamW, linear warm-up then cosine decay over the counted number of steps, gradient clipping,
  an exponential moving average of the weights (evaluated and saved), bf16 autocast on CUDA for
  the training steps only (validation runs in fp32, as the fusion node serves);
* validation every ``eval_every`` steps on every validation session; early stopping on the mean
  of the last ``smoothing`` validation scores; the best (EMA) model is written with
  :func:`~affective_trm_ros.core.checkpoint.save_checkpoint`, with ``history.csv`` and PNG plots;
  the checkpoint records the features' hash and the thread count.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from affective_trm_ros.core.baselines import GRUConfig, MLPConfig
from affective_trm_ros.core.checkpoint import (
    KINDS,
    audio_policy_of_sessions,
    build_from_kind,
    load_checkpoint,
    save_checkpoint,
)
from affective_trm_ros.core.device import resolve_device
from affective_trm_ros.core.metrics import regression_report
from affective_trm_ros.core.trm import TRMConfig, detach_state
from affective_trm_ros.offline.learning.data import (
    Batch,
    SessionSource,
    batches_by_length,
    collate,
    input_statistics,
    modality_dropout,
)
from affective_trm_ros.offline.learning.losses import CCCMSELoss
from affective_trm_ros.offline.learning.splits import (
    DEFAULT_FRACTIONS,
    DEFAULT_SPLIT_SEED,
    make_splits,
    split_speakers,
)

CHECKPOINT_NAME = 'best.pt'
HISTORY_NAME = 'history.csv'
# Parameter names (last component) that are states, tokens or embeddings rather than weights.
NO_DECAY_KEYS = ('init', 'absent', 'embedding', 'token')
# Frames per step when predicting whole sessions for evaluation (bounds activation memory).
EVAL_CHUNK_FRAMES = 512
# cuBLAS needs this workspace setting for deterministic results (PyTorch's reproducibility notes).
CUBLAS_DETERMINISTIC_WORKSPACE = ':4096:8'


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the checkpoint metadata).

    Defaults come from the recorded sweep in docs/training.md.
    """

    model: str = 'trm'  # 'trm' | 'seed_trm' | 'mlp' | 'gru'
    model_config: dict = field(default_factory=dict)  # overrides of the model's config fields
    out_dir: str = 'runs/train'
    epochs: int = 40  # passes over the training sessions (used when steps is None)
    steps: Optional[int] = None  # optimiser steps (one per batch); None: epochs x batches per epoch
    eval_every: Optional[int] = None  # steps between validations; None: once per epoch
    batch_size: int = 16  # sessions per batch: one optimiser step, one CCC over all of them
    window: int = 64  # frames per truncated-BPTT window
    crop_frames: Optional[int] = None  # train on a random crop of at most this many frames per session
    graph_frames: int = 16384  # batch frames whose autograd graph is kept at once (else two passes)
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05  # of all optimiser steps
    min_lr_ratio: float = 0.05  # cosine decays to lr * this
    grad_clip: float = 1.0
    ema_decay: float = 0.995  # 0 disables the moving average
    patience: int = 8  # validations without improvement of the smoothed score before stopping
    smoothing: int = 3  # early stopping watches the mean of the last this many validation scores
    min_epochs: int = 1  # validations before early stopping may end the run
    ccc_weight: float = 1.0
    mse_weight: float = 0.25
    nll_weight: float = 0.1  # Gaussian NLL that trains the confidence (models with a learned one)
    modality_dropout: float = 0.15  # per window, stream and modality
    reset_after_s: Optional[float] = None  # gap that resets the state; None: the store's setting
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms (CUDA included)
    device: str = 'auto'
    bf16: bool = True  # autocast to bfloat16 on CUDA (ignored on CPU)
    split_by: str = 'speaker'
    split_fractions: tuple = DEFAULT_FRACTIONS
    split_seed: int = DEFAULT_SPLIT_SEED
    splits: Optional[dict] = None  # explicit {'train': [...], 'val': [...], 'test': [...]}
    eval_batch_size: int = 64
    plots: bool = True
    progress: bool = True

    def validate(self) -> None:
        if self.model not in KINDS:
            raise ValueError(f'unknown model kind {self.model!r}; choose one of {KINDS}')
        positive = ('epochs', 'batch_size', 'window', 'eval_batch_size', 'min_epochs', 'smoothing',
                    'graph_frames')
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
        for name in ('steps', 'eval_every', 'crop_frames'):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f'{name} must be >= 1 or None, got {value}')
        if not self.lr > 0:
            raise ValueError(f'lr must be > 0, got {self.lr}')
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f'ema_decay must be in [0, 1), got {self.ema_decay}')
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f'modality_dropout must be in [0, 1), got {self.modality_dropout}')
        if not 0.0 <= self.warmup_fraction < 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError('warmup_fraction must be in [0, 1) and min_lr_ratio in [0, 1]')
        if self.patience < 1:
            raise ValueError(f'patience must be >= 1, got {self.patience}')
        if self.nll_weight < 0:
            raise ValueError(f'nll_weight must be >= 0, got {self.nll_weight}')
        if self.reset_after_s is not None and not self.reset_after_s > 0:
            raise ValueError(f'reset_after_s must be > 0 or None, got {self.reset_after_s}')


@dataclass
class TrainResult:
    checkpoint_path: Path
    history: list
    best_epoch: int  # the validation round whose model was saved (history row 'epoch')
    best_val_ccc: float  # pooled validation mean CCC of the saved model
    splits: dict
    out_dir: Path
    val_report: dict
    seconds: float
    best_step: int = 0
    features_hash: str = ''


# ----------------------------------------------------------------------------------------------
# Models


def make_model_config(kind: str, modality_dims: dict, overrides: Optional[dict] = None):
    """The config dataclass of ``kind`` for these input dims, with ``overrides`` applied."""
    overrides = dict(overrides or {})
    overrides.pop('modality_dims', None)
    dims = dict(modality_dims)
    if kind == 'trm':
        base = TRMConfig(modality_dims=dims)
    elif kind == 'seed_trm':
        base = TRMConfig.seed(dims)
    elif kind == 'mlp':
        base = MLPConfig(modality_dims=dims)
    elif kind == 'gru':
        base = GRUConfig(modality_dims=dims)
    else:
        raise ValueError(f'unknown model kind {kind!r}; choose one of {KINDS}')
    known = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f'{type(base).__name__} has no fields {unknown}; known: {sorted(known)}')
    return dataclasses.replace(base, **overrides)


def build_model(kind: str, modality_dims: dict, overrides: Optional[dict] = None):
    config = make_model_config(kind, modality_dims, overrides)
    model, _ = build_from_kind(kind, dataclasses.asdict(config))
    return model


# ----------------------------------------------------------------------------------------------
# Helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_deterministic(enabled: bool = True) -> None:
    """PyTorch's deterministic algorithms (CUDA included; raises where an op has none)."""
    if enabled:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', CUBLAS_DETERMINISTIC_WORKSPACE)
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up from ~0 to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """AdamW groups: weight decay on weight matrices only, not on biases, norms, learned states or
    embeddings (decaying those pulls the initial state and absent tokens towards zero for no reason)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        leaf = name.rsplit('.', 1)[-1]
        plain = parameter.dim() < 2 or any(key in leaf for key in NO_DECAY_KEYS)
        (no_decay if plain else decay).append(parameter)
    return [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]


class WeightEMA:
    """Exponential moving average of a model's floating-point parameters and buffers.

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so short runs are not dominated by the
    random initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = copy.deepcopy(model).eval()
        for parameter in self.shadow.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        own = self.shadow.state_dict()
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                own[name].mul_(decay).add_(value.detach(), alpha=1.0 - decay)
            else:
                own[name].copy_(value)


# Kinds whose output at a frame depends on that frame alone (the seed-compatible TRM resets its
# carry every frame): their sequences can run as one batch of independent frames.
FRAME_INDEPENDENT_KINDS = ('seed_trm',)


def run_sequence(model, x: torch.Tensor, mask: torch.Tensor, state):
    """``model.forward_sequence``, with frame-independent models run as one batch of frames.

    For a model whose every step restarts from its initial state, running the B×T frames as a
    batch of B·T one-frame sequences gives the same outputs as stepping through time, at a
    fraction of the cost; the carried state is then returned unchanged (it is never read).
    """
    if getattr(model, 'kind', None) not in FRAME_INDEPENDENT_KINDS:
        return model.forward_sequence(x, mask, state)
    batch, steps = x.shape[:2]
    va, confidence, _ = model.forward_sequence(
        x.reshape(batch * steps, 1, -1), mask.reshape(batch * steps, 1, -1)
    )
    return va.reshape(batch, steps, -1), confidence.reshape(batch, steps), state


def run_with_resets(model, x: torch.Tensor, mask: torch.Tensor, state, resets: Optional[torch.Tensor]):
    """:func:`run_sequence` that resets the streams' state before every frame marked in ``resets`` (B, T),
    as the fusion node does on a backward time jump or a long gap."""
    if resets is None or not bool(resets.any()) or len(state) == 0:
        return run_sequence(model, x, mask, state)
    columns = torch.nonzero(resets.any(0)).flatten().tolist()
    cuts = sorted(set(columns) | {0, x.shape[1]})
    outputs, confidences = [], []
    for start, stop in zip(cuts[:-1], cuts[1:]):
        if start in columns:
            state = model.reset_state(state, resets[:, start])
        va, confidence, state = run_sequence(model, x[:, start:stop], mask[:, start:stop], state)
        outputs.append(va)
        confidences.append(confidence)
    return torch.cat(outputs, 1), torch.cat(confidences, 1), state


def _autocast(device: torch.device, enabled: bool):
    if device.type == 'cuda' and enabled:
        return torch.autocast(device_type='cuda', dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


@torch.no_grad()
def predict_sessions(
    model,
    source: SessionSource,
    session_ids,
    device,
    batch_size: int = 64,
    bf16: bool = False,
    chunk: int = EVAL_CHUNK_FRAMES,
) -> dict:
    """Run the model over whole sessions (state carried over every frame, from the initial state,
    reset where the fusion node would reset it).

    Returns session id -> (predictions (T, 2) float32, confidence (T,) float32).
    """
    model.eval()
    device = torch.device(device)
    out = {}
    for ids in batches_by_length(session_ids, source.lengths, batch_size, rng=None):
        batch = collate(source, ids).to(device)
        state = model.initial_state(len(ids), device)
        preds, confs = [], []
        for start in range(0, batch.x.shape[1], chunk):
            part = batch.window(start, start + chunk)
            with _autocast(device, bf16):
                va, confidence, state = run_with_resets(model, part.x, part.mask, state, part.resets)
            preds.append(va.float())
            confs.append(confidence.float())
        va = torch.cat(preds, 1).cpu().numpy()
        confidence = torch.cat(confs, 1).cpu().numpy()
        for row, sid in enumerate(ids):
            length = batch.lengths[row]
            out[sid] = (va[row, :length], confidence[row, :length])
    return out


def evaluate_predictions(source: SessionSource, predictions: dict) -> dict:
    """regression_report over all labelled frames of the sessions in ``predictions`` (pooled), plus
    ``'session_ccc_mean'``: the mean over sessions of each session's mean CCC."""
    preds, truths, per_session = [], [], []
    for sid, (va, _) in predictions.items():
        preds.append(va)
        truths.append(source.arrays(sid)[2])
        per_session.append(regression_report(va, truths[-1])['mean']['ccc'])
    if not preds:
        return regression_report(np.zeros((0, 2)), np.zeros((0, 2)))
    report = regression_report(np.concatenate(preds), np.concatenate(truths))
    finite = [value for value in per_session if math.isfinite(value)]
    report['session_ccc_mean'] = float(np.mean(finite)) if finite else math.nan
    return report


def _validation_loss(loss_fn, source: SessionSource, predictions: dict) -> float:
    preds = np.concatenate([va for va, _ in predictions.values()])
    truths = np.concatenate([source.arrays(sid)[2] for sid in predictions])
    parts = loss_fn(torch.from_numpy(preds)[None], torch.from_numpy(truths)[None])
    return float(parts.loss)


def _write_history(rows: list, path: Path) -> None:
    keys = list(rows[0])
    with open(path, 'w', newline='') as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in row.items()})


def _score(report: dict) -> float:
    value = report['mean']['ccc']
    return value if math.isfinite(value) else -1.0


def sequence_loss_backward(model, batch: Batch, masks: list, loss_fn: CCCMSELoss, window: int,
                           device: torch.device, bf16: bool, graph_frames: int):
    """Forward ``batch`` window by window (state carried, detached between windows, reset where
    ``batch.resets`` says), compute the loss over the whole sequences and back-propagate it.

    ``masks``: the (augmented) modality mask of every window. The CCC's moments span every frame
    of every sequence, so each window receives the gradient of the whole-sequence loss with respect
    to its own predictions. When the batch holds at most ``graph_frames`` frames the graphs of all
    windows are kept and one backward runs; otherwise a gradient-free pass gives the predictions,
    the loss's gradient with respect to them is taken, and each window is recomputed (same random
    state) and back-propagated with its slice of that gradient: the same gradient, one window of
    memory. Returns the LossParts (loss detached).
    """
    learned = getattr(model, 'learns_confidence', False)
    starts = list(range(0, batch.x.shape[1], window))

    def forward(start, mask, state):
        part = batch.window(start, start + window)
        with _autocast(device, bf16):
            va, confidence, state = run_with_resets(model, part.x, mask, state, part.resets)
        return va.float(), confidence.float(), detach_state(state)

    def loss_of(va, confidence):
        return loss_fn(va, batch.labels, batch.valid, confidence if learned else None)

    state = model.initial_state(len(batch.ids), device)
    if batch.x.shape[0] * batch.x.shape[1] <= graph_frames:
        outputs, confidences = [], []
        for start, mask in zip(starts, masks):
            va, confidence, state = forward(start, mask, state)
            outputs.append(va)
            confidences.append(confidence)
        parts = loss_of(torch.cat(outputs, 1), torch.cat(confidences, 1))
        if parts.frames:
            parts.loss.backward()
        return dataclasses.replace(parts, loss=parts.loss.detach())
    random_states = []
    outputs, confidences = [], []
    with torch.no_grad():
        for start, mask in zip(starts, masks):
            random_states.append(_random_state(device))
            va, confidence, state = forward(start, mask, state)
            outputs.append(va)
            confidences.append(confidence)
    va_all = torch.cat(outputs, 1).requires_grad_(True)
    confidence_all = torch.cat(confidences, 1).requires_grad_(True)
    parts = loss_of(va_all, confidence_all)
    if not parts.frames:
        return dataclasses.replace(parts, loss=parts.loss.detach())
    grad_va, grad_confidence = torch.autograd.grad(parts.loss, [va_all, confidence_all], allow_unused=True)
    after = _random_state(device)
    state = model.initial_state(len(batch.ids), device)
    for start, mask, random_state in zip(starts, masks, random_states):
        _set_random_state(device, random_state)
        va, confidence, state = forward(start, mask, state)
        stop = start + va.shape[1]
        tensors, grads = [va], [grad_va[:, start:stop]]
        if grad_confidence is not None and confidence.requires_grad:
            tensors.append(confidence)
            grads.append(grad_confidence[:, start:stop])
        if tensors[0].requires_grad:
            torch.autograd.backward(tensors, grads)
    _set_random_state(device, after)
    return dataclasses.replace(parts, loss=parts.loss.detach())


def _random_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == 'cuda' else None
    return torch.get_rng_state(), cuda


def _set_random_state(device: torch.device, saved) -> None:
    torch.set_rng_state(saved[0])
    if saved[1] is not None:
        torch.cuda.set_rng_state(saved[1], device)


# ----------------------------------------------------------------------------------------------
# Training


def resolve_splits(store, config: TrainConfig) -> dict:
    """Explicit splits from the config (checked against the store), else seeded automatic ones."""
    if config.splits:
        splits = {name: list(config.splits.get(name, [])) for name in ('train', 'val', 'test')}
        missing = [sid for ids in splits.values() for sid in ids if not store.has(sid)]
        if missing:
            raise ValueError(
                f'{len(missing)} sessions of the given splits are not in the store, e.g. {missing[:3]}'
            )
        return splits
    return make_splits(store.speakers(), config.split_fractions, config.split_seed, config.split_by)


def train(store, config: Optional[TrainConfig] = None, **overrides) -> TrainResult:
    """Train a model on ``store`` (a FeatureStore) and write the best checkpoint, history and plots.

    ``overrides`` are TrainConfig fields, for convenience (``train(store, epochs=5)``).
    """
    from tqdm.auto import tqdm

    config = dataclasses.replace(config or TrainConfig(), **overrides)
    config.validate()
    started = time.perf_counter()
    if config.deterministic:
        set_deterministic(True)
    seed_everything(config.seed)
    device = resolve_device(config.device)
    use_bf16 = config.bf16 and device.type == 'cuda'
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    splits = resolve_splits(store, config)
    if not splits['train']:
        raise ValueError('the training split is empty; the store needs more sessions/speakers')
    train_source = SessionSource(store, splits['train'], reset_after_s=config.reset_after_s)
    val_ids = splits['val'] or splits['train']  # tiny stores: select on training data, and say so
    val_source = (train_source if not splits['val']
                  else SessionSource(store, splits['val'], reset_after_s=config.reset_after_s))
    if train_source.labelled_frames() == 0:
        raise ValueError('the training split has no labelled frame')
    features_hash = train_source.digest() + (val_source.digest() if splits['val'] else '')

    model = build_model(config.model, store.dims, config.model_config)
    mean, std = input_statistics(train_source, model.block_bounds)
    model.set_normalization(mean, std)
    model.to(device)
    ema = WeightEMA(model, config.ema_decay) if config.ema_decay > 0 else None
    loss_fn = CCCMSELoss(config.ccc_weight, config.mse_weight, config.nll_weight)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr)
    rng = np.random.default_rng(config.seed)
    dropout_gen = torch.Generator().manual_seed(config.seed)

    batches_per_epoch = len(batches_by_length(splits['train'], train_source.lengths, config.batch_size, None))
    total_steps = int(config.steps or config.epochs * batches_per_epoch)
    eval_every = int(config.eval_every or batches_per_epoch)
    warmup_steps = int(config.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, config.min_lr_ratio)
    )

    def batch_stream():
        while True:
            yield from batches_by_length(splits['train'], train_source.lengths, config.batch_size, rng)

    history: list = []
    best_smoothed, best_epoch, best_step, best_score, best_report = -math.inf, 0, 0, -math.inf, {}
    checkpoint_path = out_dir / CHECKPOINT_NAME
    evaluations_without_gain = 0
    # Serving warns when it aligns audio differently from the features the model learned on.
    audio_policy = audio_policy_of_sessions(store.load(s).meta for s in splits['train'])
    meta_base = {
        'train_config': to_json_compatible(dataclasses.asdict(config)),
        'splits': splits,
        'split_speakers': split_speakers(splits, store.speakers()),
        'store': str(Path(store.root).resolve()),
        'store_info': store.info,
        'features_hash': features_hash,
        'torch_threads': torch.get_num_threads(),
        'torch_version': torch.__version__,
        'deterministic': bool(config.deterministic),
        'model_parameters': model.num_parameters(),
    }
    stream = batch_stream()
    bar = tqdm(total=total_steps, desc=f'training {config.model}', unit='step', leave=False,
               disable=not config.progress)
    running = {'loss': 0.0, 'ccc': np.zeros(2), 'nll': 0.0, 'steps': 0}
    for step in range(1, total_steps + 1):
        model.train()
        ids = next(stream)
        crops = _random_crops(ids, train_source.lengths, config.crop_frames, rng)
        batch = collate(train_source, ids, crops).to(device)
        masks = [modality_dropout(batch.mask[:, start:start + config.window],
                                  batch.valid[:, start:start + config.window], config.modality_dropout,
                                  dropout_gen)
                 for start in range(0, batch.x.shape[1], config.window)]
        optimizer.zero_grad(set_to_none=True)
        parts = sequence_loss_backward(model, batch, masks, loss_fn, config.window, device, use_bf16,
                                       config.graph_frames)
        if parts.frames:
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            running['loss'] += float(parts.loss)
            running['ccc'] += parts.ccc.cpu().numpy()
            running['nll'] += parts.nll if math.isfinite(parts.nll) else 0.0
            running['steps'] += 1
        scheduler.step()
        if ema is not None:
            ema.update(model)
        bar.update(1)
        bar.set_postfix(loss=f"{running['loss'] / max(running['steps'], 1):.3f}")
        if step % eval_every and step != total_steps:
            continue
        eval_model = ema.shadow if ema is not None else model
        # validated in fp32, the precision the fusion node serves in (bf16 only speeds up training)
        predictions = predict_sessions(eval_model, val_source, val_ids, device, config.eval_batch_size)
        report = evaluate_predictions(val_source, predictions)
        score = _score(report)
        epoch = len(history) + 1
        recent = [row['val_ccc_mean_score'] for row in history[-(config.smoothing - 1):]] + [score] \
            if config.smoothing > 1 else [score]
        smoothed = float(np.mean(recent))
        done = max(running['steps'], 1)
        row = {
            'epoch': epoch,
            'step': step,
            'lr': optimizer.param_groups[0]['lr'],
            'train_loss': running['loss'] / done,
            'train_ccc_mean': float(running['ccc'].mean() / done),
            'train_nll': running['nll'] / done,
            'val_loss': _validation_loss(loss_fn, val_source, predictions),
            'val_ccc_valence': report['valence']['ccc'],
            'val_ccc_arousal': report['arousal']['ccc'],
            'val_ccc_mean': report['mean']['ccc'],
            'val_ccc_mean_score': score,
            'val_ccc_smoothed': smoothed,
            'val_session_ccc_mean': report.get('session_ccc_mean', math.nan),
            'val_rmse_mean': report['mean']['rmse'],
            'seconds': time.perf_counter() - started,
        }
        running = {'loss': 0.0, 'ccc': np.zeros(2), 'nll': 0.0, 'steps': 0}
        history.append(row)
        _write_history(history, out_dir / HISTORY_NAME)
        if smoothed > best_smoothed:
            best_smoothed, best_epoch, best_step = smoothed, epoch, step
            best_score, best_report = score, report
            evaluations_without_gain = 0
            save_checkpoint(
                checkpoint_path,
                _cpu_copy(eval_model),
                store.encoder_spec,
                {
                    **meta_base,
                    'epoch': epoch,
                    'step': step,
                    'val_report': to_json_compatible(report),
                    'val_ccc_smoothed': smoothed,
                    'validation_split': 'val' if splits['val'] else 'train (no validation sessions)',
                },
                audio_policy=audio_policy,
            )
        else:
            evaluations_without_gain += 1
        if config.progress:
            bar.write(
                f'step {step:5d}  loss {row["train_loss"]:.4f}  val CCC v {row["val_ccc_valence"]:.3f} '
                f'a {row["val_ccc_arousal"]:.3f} mean {row["val_ccc_mean"]:.3f} (smoothed {smoothed:.3f})'
                f'{"  *" if best_epoch == epoch else ""}'
            )
        if evaluations_without_gain >= config.patience and epoch >= config.min_epochs:
            break
    bar.close()
    if config.plots:
        from affective_trm_ros.offline.evaluation.plots import plot_curves, plot_va_plane

        plot_curves(history, out_dir / 'curves.png')
        best = load_checkpoint(checkpoint_path, device=str(device)).model
        predictions = predict_sessions(best, val_source, val_ids, device, config.eval_batch_size)
        preds = np.concatenate([va for va, _ in predictions.values()])
        truths = np.concatenate([val_source.arrays(sid)[2] for sid in predictions])
        plot_va_plane(
            preds,
            truths,
            out_dir / 'va_plane_val.png',
            title=f'{config.model} on validation (step {best_step})',
        )
    summary = {
        'checkpoint': str(checkpoint_path),
        'best_epoch': best_epoch,
        'best_step': best_step,
        'best_val_ccc_mean': best_score,
        'best_val_ccc_smoothed': best_smoothed,
        'evaluations_run': len(history),
        'steps_run': history[-1]['step'] if history else 0,
        'total_steps': total_steps,
        'val_report': best_report,
        'splits': {k: len(v) for k, v in splits.items()},
        'features_hash': features_hash,
        'torch_threads': torch.get_num_threads(),
        'seconds': time.perf_counter() - started,
    }
    (out_dir / 'summary.json').write_text(json.dumps(to_json_compatible(summary), indent=2))
    return TrainResult(
        checkpoint_path,
        history,
        best_epoch,
        best_score,
        splits,
        out_dir,
        best_report,
        time.perf_counter() - started,
        best_step,
        features_hash,
    )


def _random_crops(ids, lengths: dict, crop_frames: Optional[int], rng) -> Optional[dict]:
    if not crop_frames:
        return None
    crops = {}
    for sid in ids:
        length = lengths[sid]
        if length > crop_frames:
            start = int(rng.integers(0, length - crop_frames + 1))
            crops[sid] = (start, start + crop_frames)
    return crops


def _cpu_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).cpu()


def to_json_compatible(value):
    """Replace non-finite floats by None and tuples by lists, for strict JSON."""
    if isinstance(value, dict):
        return {str(k): to_json_compatible(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_compatible(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return to_json_compatible(value.item())
    return value
