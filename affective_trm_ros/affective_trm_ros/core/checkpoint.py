"""Versioned checkpoints of fusion models, encoder-spec checks, and loading the prototype's state dict.

One file (``torch.save`` of a plain dict, loadable with ``weights_only=True``) holds::

    {'format': 'affective_trm_checkpoint', 'version': 1,
     'kind': 'trm' | 'seed_trm' | 'mlp' | 'gru',
     'config': dataclasses.asdict(model.config),
     'state_dict': model.state_dict(),           # weights + feature_mean / feature_std buffers
     'normalization': {'feature_mean': [...], 'feature_std': [...]},   # readable copy
     'encoder_spec': [{'modality': 'audio', 'encoder': 'dasheng_base', 'dim': 768}, ...],
     'feature_order': ['audio', 'video', 'text'],
     'alignment': {'audio_policy': 'nearest' | 'causal'},   # optional: how the features were aligned
     'metadata': {...}}                           # JSON-compatible training metadata

An **encoder spec** lists, in feature order, the modality, encoder plugin id and dimension the
model was trained with; serving compares it with the configured encoders
(:func:`check_encoder_spec`) and refuses a mismatch with a message naming both sides.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from affective_trm_ros.core.alignment import AUDIO_POLICIES, LEGACY_AUDIO_POLICY
from affective_trm_ros.core.baselines import MODEL_CLASSES, baseline_config_from_dict
from affective_trm_ros.core.device import resolve_device
from affective_trm_ros.core.modalities import DEFAULT_ENCODERS, FEATURE_ORDER
from affective_trm_ros.core.trm import (
    DEFAULT_MODALITY_DIMS,
    FusionModel,
    SeedTRM,
    TRMConfig,
    build_model,
    config_from_dict,
)

CHECKPOINT_FORMAT = 'affective_trm_checkpoint'
CHECKPOINT_VERSION = 1
KINDS = ('trm', 'seed_trm', 'mlp', 'gru')

# File name of the AffectiveTRM prototype's published weights (a bare state dict).
SEED_CHECKPOINT_NAME = 'emotion_model_sequential_av.pth'
# Prefix of every key in the prototype's state dict (its model wraps the network in `.inner`).
SEED_KEY_PREFIX = 'inner.'
# The prototype was trained on [Dasheng base 768 | HSEmotion EfficientNet-B0 1280 | EmbeddingGemma 768].
SEED_ENCODER_SPEC = [{'modality': name, 'encoder': DEFAULT_ENCODERS[name], 'dim': DEFAULT_MODALITY_DIMS[name]}
                     for name in FEATURE_ORDER]
# Parameters of SeedTRM that the prototype does not have; they keep their neutral initial values.
SEED_EXTRA_KEYS = {'feature_mean', 'feature_std', 'modality_weight_logits', 'absent_features'}

PathLike = Union[str, os.PathLike]


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns: the model (eval mode, on the device) and its context."""

    model: FusionModel
    kind: str
    config: Any
    encoder_spec: list
    metadata: dict
    #: Audio policy the training features were aligned with ('nearest'/'causal'); None when the
    #: checkpoint does not record one (written before it was recorded: those used 'nearest').
    audio_policy: Optional[str] = None


# ----------------------------------------------------------------------------------------------
# Encoder specs


def normalize_encoder_spec(spec) -> list:
    """Validate an encoder spec and return it as a list of plain dicts in feature order."""
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f'an encoder spec is a non-empty list of {{modality, encoder, dim}} dicts, '
                         f'got {spec!r}')
    entries = []
    for entry in spec:
        if not isinstance(entry, dict) or not {'modality', 'encoder', 'dim'} <= set(entry):
            raise ValueError(f'encoder spec entry {entry!r} needs the keys modality, encoder and dim')
        modality, encoder, dim = entry['modality'], entry['encoder'], entry['dim']
        if modality not in FEATURE_ORDER:
            raise ValueError(f'encoder spec: unknown modality {modality!r}; known: {list(FEATURE_ORDER)}')
        if not isinstance(encoder, str) or not encoder:
            raise ValueError(f'encoder spec: modality {modality!r} has no encoder plugin id')
        if isinstance(dim, bool) or int(dim) != dim or int(dim) <= 0:
            raise ValueError(f'encoder spec: modality {modality!r} has an invalid dim {dim!r}')
        entries.append({**entry, 'dim': int(dim)})  # extra keys (e.g. a weights identity) are kept
    names = [e['modality'] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f'encoder spec lists a modality twice: {names}')
    if names != [m for m in FEATURE_ORDER if m in names]:
        raise ValueError(f'encoder spec must follow the feature order {list(FEATURE_ORDER)}, got {names}')
    return entries


def encoder_spec_dims(spec) -> dict:
    """Encoder spec -> {modality: dim} in feature order."""
    return {e['modality']: e['dim'] for e in normalize_encoder_spec(spec)}


def _describe(entry: Optional[dict]) -> str:
    return 'no encoder' if entry is None else f"encoder '{entry['encoder']}' ({entry['dim']}-d)"


def _same_encoder(want: Optional[dict], have: Optional[dict]) -> bool:
    """Same dim and plugin id; a ``<plugin id>@<weights>`` identity is compared in full only when
    both sides state one (an embedding's ``encoder`` field carries it, a plain spec may not)."""
    if want is None or have is None:
        return want is have
    if want['dim'] != have['dim']:
        return False
    a, b = want['encoder'], have['encoder']
    if '@' in a and '@' in b:
        return a == b
    return a.split('@', 1)[0] == b.split('@', 1)[0]


def check_encoder_spec(checkpoint_spec, actual_spec) -> None:
    """Raise ValueError naming both sides when the configured encoders differ from the checkpoint's.

    Every modality must use the same plugin id and dimension on both sides.
    """
    expected = {e['modality']: e for e in normalize_encoder_spec(checkpoint_spec)}
    actual = {e['modality']: e for e in normalize_encoder_spec(actual_spec)}
    problems = []
    for modality in FEATURE_ORDER:
        want, have = expected.get(modality), actual.get(modality)
        if _same_encoder(want, have):
            continue
        problems.append(f"modality '{modality}': the checkpoint was trained with {_describe(want)}, "
                        f"the configured side has {_describe(have)}")
    if problems:
        raise ValueError('encoder mismatch between checkpoint and configuration:\n  ' + '\n  '.join(problems))


# ----------------------------------------------------------------------------------------------
# Saving


def _json_compatible(value, where: str = 'metadata'):
    """Plain JSON-compatible copy of ``value`` (NumPy scalars/arrays and tuples converted)."""
    def convert(obj):
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, Path):
            return str(obj)
        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu().tolist()
        raise TypeError(f'{type(obj).__name__} is not JSON-compatible')
    try:
        return json.loads(json.dumps(value, default=convert))
    except (TypeError, ValueError) as exc:
        raise ValueError(f'{where} must be JSON-compatible: {exc}') from exc


def save_checkpoint(path: PathLike, model: FusionModel, encoder_spec,
                    metadata: Optional[dict] = None, *, audio_policy: Optional[str] = None) -> Path:
    """Write ``model`` with its config, normalisation, encoder spec and metadata to ``path`` (atomically).

    ``audio_policy``: the alignment audio policy the training features were prepared with (see
    :func:`audio_policy_of_sessions`); serving warns when it runs another. None: not recorded.
    """
    if audio_policy is not None and audio_policy not in AUDIO_POLICIES:
        raise ValueError(f'audio_policy must be one of {AUDIO_POLICIES} or None, got {audio_policy!r}')
    if model.kind not in KINDS:
        raise ValueError(f'cannot checkpoint a model of kind {model.kind!r}; known kinds: {KINDS}')
    spec = normalize_encoder_spec(encoder_spec)
    spec_dims = {e['modality']: e['dim'] for e in spec}
    if spec_dims != dict(model.modality_dims):
        raise ValueError(f'encoder spec dims {spec_dims} do not match the model input dims '
                         f'{dict(model.modality_dims)}')
    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        'format': CHECKPOINT_FORMAT,
        'version': CHECKPOINT_VERSION,
        'kind': model.kind,
        'config': dataclasses.asdict(model.config),
        'state_dict': state_dict,
        'normalization': {'feature_mean': model.feature_mean.detach().cpu().tolist(),
                          'feature_std': model.feature_std.detach().cpu().tolist()},
        'encoder_spec': spec,
        'feature_order': list(FEATURE_ORDER),
        'metadata': _json_compatible(dict(metadata or {})),
    }
    if audio_policy is not None:
        payload['alignment'] = {'audio_policy': audio_policy}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + '.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp_name)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path


# ----------------------------------------------------------------------------------------------
# Loading


def build_from_kind(kind: str, config: dict) -> tuple:
    """(model, config object) for a checkpoint kind and its config dict."""
    if kind in ('trm', 'seed_trm'):
        cfg = config_from_dict(config)
        if cfg.seed_compatible != (kind == 'seed_trm'):
            raise ValueError(f"checkpoint kind '{kind}' disagrees with its config "
                             f'(seed_compatible={cfg.seed_compatible})')
        return build_model(cfg), cfg
    if kind in MODEL_CLASSES:
        cfg = baseline_config_from_dict(kind, config)
        return MODEL_CLASSES[kind](cfg), cfg
    raise ValueError(f'unknown model kind {kind!r}; known kinds: {KINDS}')


def _read(path: PathLike):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint not found: {path} (train one with `affective-trm train`, '
                                f'or pass the prototype weights {SEED_CHECKPOINT_NAME})')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or corrupt files
        raise ValueError(f'{path} is not a readable PyTorch checkpoint: {exc}') from exc


def is_seed_state_dict(obj) -> bool:
    """True for the prototype's bare state dict (all keys under ``inner.``)."""
    return (isinstance(obj, dict) and bool(obj) and 'format' not in obj
            and all(isinstance(k, str) and k.startswith(SEED_KEY_PREFIX) for k in obj))


def load_checkpoint(path: PathLike, device: str = 'cpu') -> LoadedCheckpoint:
    """Load a checkpoint written by :func:`save_checkpoint` (or the prototype's bare state dict).

    The model is returned in eval mode on ``device`` ('auto', 'cpu', 'cuda', 'cuda:N').
    """
    target = resolve_device(device) if isinstance(device, str) else torch.device(device)
    payload = _read(path)
    if is_seed_state_dict(payload):
        model = seed_model_from_state_dict(payload)
        return LoadedCheckpoint(model.to(target).eval(), 'seed_trm', model.config,
                                [dict(e) for e in SEED_ENCODER_SPEC],
                                {'source': 'AffectiveTRM prototype state dict', 'path': str(path)})
    if not isinstance(payload, dict) or payload.get('format') != CHECKPOINT_FORMAT:
        found = payload.get('format') if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not an affective-trm checkpoint (expected format '{CHECKPOINT_FORMAT}', "
                         f'found {found!r})')
    version = payload.get('version')
    if version != CHECKPOINT_VERSION:
        raise ValueError(f'{path}: checkpoint version {version!r} is not supported (this code reads '
                         f'version {CHECKPOINT_VERSION})')
    missing = [k for k in ('kind', 'config', 'state_dict', 'encoder_spec') if k not in payload]
    if missing:
        raise ValueError(f'{path}: checkpoint is missing {missing}')
    if payload.get('feature_order', list(FEATURE_ORDER)) != list(FEATURE_ORDER):
        raise ValueError(f"{path}: feature order {payload['feature_order']} differs from this code's "
                         f'{list(FEATURE_ORDER)}')
    model, config = build_from_kind(payload['kind'], payload['config'])
    spec = normalize_encoder_spec(payload['encoder_spec'])
    if encoder_spec_dims(spec) != dict(model.modality_dims):
        raise ValueError(f'{path}: encoder spec dims {encoder_spec_dims(spec)} do not match the model '
                         f'config {dict(model.modality_dims)}')
    try:
        model.load_state_dict(payload['state_dict'])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the '{payload['kind']}' model config: {exc}") from exc
    return LoadedCheckpoint(model.to(target).eval(), payload['kind'], config, spec,
                            dict(payload.get('metadata') or {}), _recorded_audio_policy(payload, path))


def _recorded_audio_policy(payload: dict, path) -> Optional[str]:
    alignment = payload.get('alignment') or {}
    policy = alignment.get('audio_policy') if isinstance(alignment, dict) else None
    if policy is not None and policy not in AUDIO_POLICIES:
        raise ValueError(f'{path}: unknown audio policy {policy!r} (known: {AUDIO_POLICIES})')
    return policy


def audio_policy_of_sessions(metas) -> Optional[str]:
    """The audio policy shared by prepared sessions, from their ``meta['alignment']`` (what feature
    preparation stores); a session without one counts as the legacy policy. None for no sessions;
    ValueError when sessions were prepared with different policies (training on a mix serves neither).
    """
    policies = set()
    for meta in metas:
        alignment = (meta or {}).get('alignment') or {}
        policies.add(alignment.get('audio_policy', LEGACY_AUDIO_POLICY))
    if len(policies) > 1:
        raise ValueError(f'the sessions were aligned with different audio policies {sorted(policies)}; '
                         f'prepare them all with one')
    return policies.pop() if policies else None


# ----------------------------------------------------------------------------------------------
# The prototype's published state dict


def seed_model_from_state_dict(state_dict: dict) -> SeedTRM:
    """Build :class:`SeedTRM` (seed config) and load the prototype's ``inner.*`` state dict into it."""
    if not is_seed_state_dict(state_dict):
        raise ValueError(f"not an AffectiveTRM prototype state dict: expected keys under '{SEED_KEY_PREFIX}'")
    model = SeedTRM(TRMConfig.seed())
    renamed = {key[len(SEED_KEY_PREFIX):]: value for key, value in state_dict.items()}
    own = model.state_dict()
    expected = set(own) - SEED_EXTRA_KEYS
    missing = sorted(expected - set(renamed))
    unexpected = sorted(set(renamed) - set(own) - SEED_EXTRA_KEYS)
    mismatched = [f'{SEED_KEY_PREFIX}{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in renamed.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append('missing ' + ', '.join(SEED_KEY_PREFIX + k for k in missing))
        if unexpected:
            details.append('unexpected ' + ', '.join(SEED_KEY_PREFIX + k for k in unexpected))
        details.extend(mismatched)
        raise ValueError('state dict does not match the seed-compatible TRM (input 2816, hidden 512, '
                         '8 heads, 2 layers, expansion 4): ' + '; '.join(details))
    model.load_state_dict({k: v.float() for k, v in renamed.items()}, strict=False)
    return model.eval()


def load_seed_state_dict(path: PathLike, device: str = 'cpu') -> SeedTRM:
    """Load the prototype's published ``emotion_model_sequential_av.pth`` as a :class:`SeedTRM`."""
    target = resolve_device(device) if isinstance(device, str) else torch.device(device)
    payload = _read(path)
    if not is_seed_state_dict(payload):
        raise ValueError(f"{path} is not an AffectiveTRM prototype state dict (keys under "
                         f"'{SEED_KEY_PREFIX}'); for checkpoints written by this suite use load_checkpoint")
    return seed_model_from_state_dict(payload).to(target)
