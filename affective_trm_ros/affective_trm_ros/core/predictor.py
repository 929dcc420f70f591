"""Serving wrapper around a fusion checkpoint: many streams, batched model steps, device-resident state.

The recurrent state of every stream lives on the model's device in one preallocated tensor per
state component, one row ("slot") per stream, so a step gathers the rows it needs, runs the model
and writes the new rows back in place: no per-stream tensors, no host round trip of the state.
Inputs are assembled on the host into one staging buffer (pinned memory when the device is CUDA)
and copied to the device once per call; outputs come back with one device-to-host copy per call.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

from affective_trm_ros.core.checkpoint import LoadedCheckpoint, check_encoder_spec, load_checkpoint
from affective_trm_ros.core.device import resolve_device
from affective_trm_ros.core.trm import FusionModel

#: Stream slots allocated up front; the table doubles when more streams are live at once.
DEFAULT_CAPACITY = 16


class FusionPredictor:
    """Runs a fusion checkpoint for any number of independent streams (one per tracked person).

    Each stream has its own recurrent state, created at its first :meth:`step` and kept until
    :meth:`reset`. The device is chosen once, at construction ('auto' = CUDA when present).
    All model calls run under ``torch.inference_mode()``. Thread-safe: one lock guards the states.
    """

    def __init__(self, checkpoint_path: Union[str, os.PathLike], device: str = 'auto',
                 capacity: int = DEFAULT_CAPACITY) -> None:
        self.device = resolve_device(device)
        self._init(load_checkpoint(checkpoint_path, device=str(self.device)), str(checkpoint_path), capacity)

    @classmethod
    def from_model(cls, model: FusionModel, encoder_spec, device: str = 'auto',
                   metadata: Optional[dict] = None, capacity: int = DEFAULT_CAPACITY) -> FusionPredictor:
        """Serve an in-memory model (e.g. right after training) without writing a checkpoint."""
        self = cls.__new__(cls)
        self.device = resolve_device(device)
        loaded = LoadedCheckpoint(model.to(self.device).eval(), model.kind, model.config,
                                  [dict(e) for e in encoder_spec], dict(metadata or {}))
        self._init(loaded, '<in-memory model>', capacity)
        return self

    def _init(self, loaded: LoadedCheckpoint, source: str, capacity: int) -> None:
        if int(capacity) < 1:
            raise ValueError(f'capacity must be >= 1, got {capacity}')
        self.checkpoint = loaded
        self.source = source
        self.model: FusionModel = loaded.model
        self.kind = loaded.kind
        self.metadata = loaded.metadata
        #: The audio policy the training features were aligned with (None: not recorded).
        self.audio_policy = loaded.audio_policy
        self.encoder_spec = [dict(e) for e in loaded.encoder_spec]
        self.dims = dict(self.model.modality_dims)
        self.modalities = tuple(self.dims)
        self._input_dim = sum(self.dims.values())
        self._lock = threading.Lock()
        self._slots: dict = {}        # stream id -> row of the state table
        self._pinned = self.device.type == 'cuda'
        with torch.inference_mode():
            self._initial = self.model.initial_state(1, self.device)
            self._state = self.model.initial_state(int(capacity), self.device)
        self._free = list(range(int(capacity)))[::-1]
        self._x_host = self._mask_host = None
        self._stage(int(capacity))

    # ------------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Stream slots currently allocated on the device."""
        return len(self._slots) + len(self._free)

    def check_encoders(self, actual_spec) -> None:
        """Raise ValueError (naming both sides) unless ``actual_spec`` matches the checkpoint's encoders."""
        check_encoder_spec(self.encoder_spec, actual_spec)

    def streams(self) -> list:
        """Ids of the streams that currently hold a state."""
        with self._lock:
            return list(self._slots)

    def reset(self, stream_id: Optional[str] = None) -> list:
        """Forget the state of one stream (or of all with None) and free its slot; returns the ids reset."""
        with self._lock:
            ids = list(self._slots) if stream_id is None else [stream_id] if stream_id in self._slots else []
            for sid in ids:
                self._free.append(self._slots.pop(sid))
            return ids

    # ------------------------------------------------------------------------------------------

    def step(self, items: Sequence, resets: Optional[Sequence[bool]] = None) -> list:
        """Run ``items`` = [(stream_id, {modality: vector | None}), ...] through the model.

        A missing or None modality is masked. A stream may appear several times: its items are its
        consecutive frames, in order; the r-th item of every stream runs in the r-th batched model
        step, so a call costs as many steps as the most frames any one stream brings. ``resets[i]``
        True starts item i's stream from the initial state. Returns ``[(valence, arousal,
        confidence), ...]`` in the order of ``items``. Invalid input raises ValueError before any
        state changes.
        """
        items = list(items)
        if not items:
            return []
        resets = [False] * len(items) if resets is None else [bool(r) for r in resets]
        if len(resets) != len(items):
            raise ValueError(f'{len(resets)} reset flags for {len(items)} items')
        rounds: list = []
        seen: dict = {}
        for index, (stream_id, _) in enumerate(items):
            r = seen.get(stream_id, 0)
            seen[stream_id] = r + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(index)
        with self._lock, torch.inference_mode():
            self._stage(len(items))
            x_host, mask_host = self._x_host.numpy(), self._mask_host.numpy()
            for row, (stream_id, features) in enumerate(items):
                self._fill(row, stream_id, features, x_host, mask_host)
            count = len(items)
            x = self._x_host[:count].to(self.device, non_blocking=self._pinned)
            mask = self._mask_host[:count].to(self.device, non_blocking=self._pinned)
            for stream_id in seen:
                if stream_id not in self._slots:
                    self._assign(stream_id)
            outputs = []
            for members in rounds:
                slots = [self._slots[items[i][0]] for i in members]
                fresh = [k for k, i in enumerate(members) if resets[i]]
                outputs.append(self._run(x, mask, members, slots, fresh))
            out = torch.cat(outputs).float().cpu().numpy()
        order = [i for members in rounds for i in members]
        result = [None] * count
        for position, index in enumerate(order):
            valence, arousal, confidence = out[position]
            result[index] = (float(valence), float(arousal), float(confidence))
        return result

    # ------------------------------------------------------------------------------------------

    def _run(self, x, mask, members: list, slots: list, fresh: list) -> torch.Tensor:
        """One batched model step for the given rows of x/mask and state slots; (B, 3) on device."""
        rows = torch.tensor(members, device=self.device)
        if len(self._state):
            index = torch.tensor(slots, device=self.device)
            state = [t.index_select(0, index) for t in self._state]
            if fresh:
                which = torch.tensor(fresh, device=self.device)
                for t, init in zip(state, self._initial):
                    t.index_copy_(0, which, init.expand(len(fresh), *init.shape[1:]))
            state = type(self._state)(*state) if hasattr(self._state, '_fields') else tuple(state)
        else:
            state = self._state
        va, confidence, new_state = self.model.step(x.index_select(0, rows), mask.index_select(0, rows),
                                                    state)
        if len(self._state):
            for table, new in zip(self._state, new_state):
                table.index_copy_(0, index, new)
        return torch.cat([va, confidence.unsqueeze(-1)], dim=-1)

    def _assign(self, stream_id) -> None:
        """Give a new stream a slot holding the initial state (the table grows when full)."""
        if not self._free:
            self._grow(2 * self.capacity)
        slot = self._free.pop()
        self._slots[stream_id] = slot
        for table, init in zip(self._state, self._initial):
            table[slot:slot + 1].copy_(init)

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        bigger = self.model.initial_state(capacity, self.device)
        for table, new in zip(self._state, bigger):
            new[:old].copy_(table)
        self._state = bigger
        self._free.extend(range(capacity - 1, old - 1, -1))

    def _stage(self, rows: int) -> None:
        """Host staging buffers for at least ``rows`` items (pinned for CUDA; reused across calls)."""
        if self._x_host is not None and self._x_host.shape[0] >= rows:
            return
        rows = max(rows, 2 * (self._x_host.shape[0] if self._x_host is not None else 0))
        self._x_host = torch.zeros((rows, self._input_dim), dtype=torch.float32, pin_memory=self._pinned)
        self._mask_host = torch.zeros((rows, len(self.dims)), dtype=torch.bool, pin_memory=self._pinned)

    def _fill(self, row: int, stream_id, features, x_host: np.ndarray, mask_host: np.ndarray) -> None:
        """Write one item's concatenated features and mask into the staging row (validated)."""
        if not isinstance(features, dict):
            raise ValueError(f'stream {stream_id!r}: features must be a dict modality -> vector or None')
        # A modality the model does not take may be listed as missing (None), never with data.
        unknown = sorted(m for m in set(features) - set(self.dims) if features[m] is not None)
        if unknown:
            raise ValueError(f'stream {stream_id!r}: unknown modalities {unknown}; this model takes '
                             f'{list(self.dims)}')
        start = 0
        for column, (modality, dim) in enumerate(self.dims.items()):
            vector = features.get(modality)
            block = x_host[row, start:start + dim]
            start += dim
            if vector is None:
                block[:] = 0.0
                mask_host[row, column] = False
                continue
            vector = np.asarray(vector, dtype=np.float32).reshape(-1)
            if vector.shape[0] != dim:
                raise ValueError(f"stream {stream_id!r}: modality '{modality}' has {vector.shape[0]} values, "
                                 f'the model expects {dim}')
            if not np.isfinite(vector).all():
                raise ValueError(f"stream {stream_id!r}: modality '{modality}' contains NaN or inf")
            block[:] = vector
            mask_host[row, column] = True
