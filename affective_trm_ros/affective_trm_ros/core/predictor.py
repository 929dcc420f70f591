"""Serving wrapper around a fusion checkpoint: many streams, one batched model step, explicit states."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

from affective_trm_ros.core.checkpoint import LoadedCheckpoint, check_encoder_spec, load_checkpoint
from affective_trm_ros.core.device import resolve_device
from affective_trm_ros.core.trm import FusionModel, clone_state, split_state, stack_states


class FusionPredictor:
    """Runs a fusion checkpoint for any number of independent streams (one per tracked person).

    Each stream has its own recurrent state, created at its first :meth:`step` and kept until
    :meth:`reset`. The device is chosen once, at construction ('auto' = CUDA when present).
    All model calls run under ``torch.inference_mode()``. Thread-safe: one lock guards the states.
    """

    def __init__(self, checkpoint_path: Union[str, os.PathLike], device: str = 'auto') -> None:
        self.device = resolve_device(device)
        self._init(load_checkpoint(checkpoint_path, device=str(self.device)), str(checkpoint_path))

    @classmethod
    def from_model(cls, model: FusionModel, encoder_spec, device: str = 'auto',
                   metadata: Optional[dict] = None) -> FusionPredictor:
        """Serve an in-memory model (e.g. right after training) without writing a checkpoint."""
        self = cls.__new__(cls)
        self.device = resolve_device(device)
        loaded = LoadedCheckpoint(model.to(self.device).eval(), model.kind, model.config,
                                  [dict(e) for e in encoder_spec], dict(metadata or {}))
        self._init(loaded, '<in-memory model>')
        return self

    def _init(self, loaded: LoadedCheckpoint, source: str) -> None:
        self.checkpoint = loaded
        self.source = source
        self.model: FusionModel = loaded.model
        self.kind = loaded.kind
        self.metadata = loaded.metadata
        self.encoder_spec = [dict(e) for e in loaded.encoder_spec]
        self.dims = dict(self.model.modality_dims)
        self.modalities = tuple(self.dims)
        self._states: dict = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------

    def check_encoders(self, actual_spec) -> None:
        """Raise ValueError (naming both sides) unless ``actual_spec`` matches the checkpoint's encoders."""
        check_encoder_spec(self.encoder_spec, actual_spec)

    def streams(self) -> list:
        """Ids of the streams that currently hold a state."""
        with self._lock:
            return list(self._states)

    def reset(self, stream_id: Optional[str] = None) -> list:
        """Forget the state of one stream (or of all with None); returns the ids that were reset."""
        with self._lock:
            if stream_id is None:
                ids = list(self._states)
                self._states.clear()
                return ids
            return [stream_id] if self._states.pop(stream_id, None) is not None else []

    def _row(self, stream_id, features: dict) -> tuple:
        """One stream's features dict -> (x (D,) float32, mask (M,) bool)."""
        if not isinstance(features, dict):
            raise ValueError(f'stream {stream_id!r}: features must be a dict modality -> vector or None')
        unknown = sorted(set(features) - set(self.dims))
        if unknown:
            raise ValueError(f'stream {stream_id!r}: unknown modalities {unknown}; this model takes '
                             f'{list(self.dims)}')
        blocks, mask = [], []
        for modality, dim in self.dims.items():
            vector = features.get(modality)
            if vector is None:
                blocks.append(np.zeros(dim, dtype=np.float32))
                mask.append(False)
                continue
            vector = np.asarray(vector, dtype=np.float32).reshape(-1)
            if vector.shape[0] != dim:
                raise ValueError(f"stream {stream_id!r}: modality '{modality}' has {vector.shape[0]} values, "
                                 f'the model expects {dim}')
            if not np.isfinite(vector).all():
                raise ValueError(f"stream {stream_id!r}: modality '{modality}' contains NaN or inf")
            blocks.append(vector)
            mask.append(True)
        return np.concatenate(blocks), np.asarray(mask, dtype=bool)

    def step(self, items: Sequence) -> list:
        """One batched model step for ``items`` = [(stream_id, {modality: vector | None}), ...].

        Returns ``[(valence, arousal, confidence), ...]`` in the order of ``items``; a missing or
        None modality is masked. Each stream appears at most once per call.
        """
        items = list(items)
        if not items:
            return []
        ids = [stream_id for stream_id, _ in items]
        if len(set(ids)) != len(ids):
            raise ValueError(f'a stream appears twice in one step: {ids}')
        rows = [self._row(stream_id, features) for stream_id, features in items]
        x = torch.from_numpy(np.stack([r[0] for r in rows])).to(self.device)
        mask = torch.from_numpy(np.stack([r[1] for r in rows])).to(self.device)
        with self._lock, torch.inference_mode():
            fresh = self.model.initial_state(1, self.device)
            state = stack_states([self._states.get(stream_id, fresh) for stream_id in ids])
            va, confidence, new_state = self.model.step(x, mask, state)
            for stream_id, stream_state in zip(ids, split_state(new_state, len(ids))):
                # A clone, not a view: a view would keep the whole batch's storage alive.
                self._states[stream_id] = clone_state(stream_state)
            out = torch.cat([va, confidence.unsqueeze(-1)], dim=-1).float().cpu().numpy()
        return [(float(v), float(a), float(c)) for v, a, c in out]
