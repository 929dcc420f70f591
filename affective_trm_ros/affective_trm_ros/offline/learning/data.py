"""Batches of padded sequences from a feature store, input statistics, and modality dropout.

A batch stacks B sessions (or windows of them) padded to the longest: ``x`` (B, T, D) raw
features, ``mask`` (B, T, M) modality presence, ``labels`` (B, T, 2) with NaN where unlabelled
``valid`` (B, T) marking real (non-padding) frames and ``resets`` (B, T) marking the frames before
which the fusion node would reset the stream's state (:func:`session_resets`). Padding frames have
every modality masked and no label, so they contribute neither to the loss nor to the metrics.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from affective_trm_ros.core.alignment import STAMP_TOLERANCE_S, AlignmentConfig

# Sessions are sorted by length inside pools of this many batches, so batches pad little while
# their order stays random.
LENGTH_POOL_BATCHES = 8
# Keep every session of a split in memory when their features take less than this.
DEFAULT_MEMORY_BUDGET_BYTES = 4 * 1024**3
# A feature is constant when its std is below this fraction of its magnitude (float32 inputs carry
# ~1e-7 relative precision; moments are accumulated in float64), or exactly 0. A relative test: an
# absolute one zeroes informative features that merely have a small scale.
RELATIVE_STD_THRESHOLD = 1e-5


@dataclass
class Batch:
    ids: list
    x: torch.Tensor  # (B, T, D) float32
    mask: torch.Tensor  # (B, T, M) bool
    labels: torch.Tensor  # (B, T, 2) float32, NaN = unlabelled
    valid: torch.Tensor  # (B, T) bool
    lengths: list

    resets: Optional[torch.Tensor] = None  # (B, T) bool: reset the state before this frame

    def __post_init__(self) -> None:
        if self.resets is None:
            self.resets = torch.zeros(self.valid.shape, dtype=torch.bool, device=self.valid.device)

    def to(self, device) -> Batch:
        return Batch(
            self.ids,
            self.x.to(device),
            self.mask.to(device),
            self.labels.to(device),
            self.valid.to(device),
            self.lengths,
            self.resets.to(device),
        )

    def window(self, start: int, stop: int) -> Batch:
        return Batch(
            self.ids,
            self.x[:, start:stop],
            self.mask[:, start:stop],
            self.labels[:, start:stop],
            self.valid[:, start:stop],
            [max(0, min(length, stop) - start) for length in self.lengths],
            self.resets[:, start:stop],
        )


def session_resets(timestamps: np.ndarray, meta: Optional[dict] = None,
                   reset_after_s: Optional[float] = None) -> np.ndarray:
    """(T,) bool: frames before which the fusion node resets the stream's state.

    The node resets when video time goes backwards or jumps forward by more than ``reset_after_s``
    (:class:`~affective_trm_ros.core.alignment.StreamAligner`). Sessions prepared from bags record
    the aligner's decisions as ``meta['reset_frames']``; for every session the same rule is also
    applied to the stored timestamps, with ``reset_after_s`` from the argument, else the session's
    alignment settings, else the node's default. Frame 0 starts from the initial state anyway.
    """
    timestamps = np.asarray(timestamps, np.float64).reshape(-1)
    meta = meta or {}
    resets = np.zeros(timestamps.shape[0], bool)
    for index in meta.get('reset_frames') or []:
        if 0 <= int(index) < resets.shape[0]:
            resets[int(index)] = True
    if reset_after_s is None:
        reset_after_s = (meta.get('alignment') or {}).get('reset_after_s', AlignmentConfig().reset_after_s)
    steps = np.diff(timestamps)
    resets[1:] |= (steps < 0) | (steps > float(reset_after_s) + STAMP_TOLERANCE_S)
    resets[:1] = False
    return resets


class SessionSource:
    """Sessions of one split, held in memory when they fit ``memory_budget`` bytes, else read on demand."""

    def __init__(
        self, store, session_ids: Sequence[str], memory_budget: int = DEFAULT_MEMORY_BUDGET_BYTES,
        reset_after_s: Optional[float] = None,
    ) -> None:
        self.store = store
        self.ids = list(session_ids)
        self.lengths = {sid: store.num_frames(sid) for sid in self.ids}
        self.reset_after_s = reset_after_s
        needed = sum(self.lengths.values()) * store.input_dim * 4
        self._cache: Optional[dict] = {} if needed <= memory_budget else None
        self._resets: dict = {}

    def __len__(self) -> int:
        return len(self.ids)

    def arrays(self, session_id: str) -> tuple:
        """(inputs (T, D) float32, mask (T, M) bool, labels (T, 2) float32, timestamps (T,))."""
        if self._cache is not None and session_id in self._cache:
            return self._cache[session_id]
        session = self.store.load(session_id)
        item = (
            session.inputs(),
            session.mask.astype(bool),
            session.labels.astype(np.float32),
            session.timestamps,
        )
        self._resets[session_id] = session_resets(session.timestamps, session.meta, self.reset_after_s)
        if self._cache is not None:
            self._cache[session_id] = item
        return item

    def resets(self, session_id: str) -> np.ndarray:
        """(T,) bool: where the fusion node would reset this session's state (:func:`session_resets`)."""
        if session_id not in self._resets:
            self.arrays(session_id)
        return self._resets[session_id]

    def digest(self) -> str:
        """SHA-256 (16 hex digits) of these sessions' ids, inputs, masks, labels, timestamps and resets:
        changes whenever the features change, whatever the store is called."""
        hasher = hashlib.sha256()
        for sid in sorted(self.ids):
            hasher.update(sid.encode())
            for array in (*self.arrays(sid), self.resets(sid)):
                array = np.ascontiguousarray(array)
                hasher.update(str((array.dtype.str, array.shape)).encode())
                hasher.update(array.tobytes())
        return hasher.hexdigest()[:16]

    def labelled_frames(self) -> int:
        return sum(int(np.sum(np.all(np.isfinite(self.arrays(sid)[2]), axis=1))) for sid in self.ids)


def store_digest(store) -> str:
    """The features hash of a whole store: :meth:`SessionSource.digest` over all its sessions, with
    each session's own reset settings. ``affective-trm prepare`` records it in the store's info as
    ``features_hash``; sessions are read one at a time, so any store size fits in memory."""
    return SessionSource(store, store.session_ids(), memory_budget=0).digest()


def stale_store_message(store) -> Optional[str]:
    """Why the store's content differs from the ``features_hash`` recorded when it was prepared
    (sessions edited, added or removed since), or None when it matches or none was recorded."""
    recorded = (getattr(store, 'info', None) or {}).get('features_hash')
    if not recorded:
        return None
    actual = store_digest(store)
    if actual == recorded:
        return None
    return (f'the feature store {store.root} changed since it was prepared: its features hash is {actual}, '
            f'its info records {recorded} (sessions edited, added or removed by hand?); '
            f"re-run 'affective-trm prepare' on it to record the current content")

def collate(source: SessionSource, session_ids: Sequence[str], crops: Optional[dict] = None) -> Batch:
    """Pad sessions into one Batch; ``crops`` maps a session id to a (start, stop) frame range."""
    items = []
    for sid in session_ids:
        inputs, mask, labels, _ = source.arrays(sid)
        resets = source.resets(sid)
        if crops and sid in crops:
            start, stop = crops[sid]
            inputs, mask, labels = inputs[start:stop], mask[start:stop], labels[start:stop]
            resets = resets[start:stop]
        items.append((inputs, mask, labels, resets))
    lengths = [item[0].shape[0] for item in items]
    batch, longest = len(items), max(lengths)
    dim, modalities = items[0][0].shape[1], items[0][1].shape[1]
    x = np.zeros((batch, longest, dim), np.float32)
    mask = np.zeros((batch, longest, modalities), bool)
    labels = np.full((batch, longest, 2), np.nan, np.float32)
    valid = np.zeros((batch, longest), bool)
    resets = np.zeros((batch, longest), bool)
    for row, (inputs, m, lab, res) in enumerate(items):
        n = inputs.shape[0]
        x[row, :n], mask[row, :n], labels[row, :n], valid[row, :n] = inputs, m, lab, True
        resets[row, :n] = res
    return Batch(
        list(session_ids),
        torch.from_numpy(x),
        torch.from_numpy(mask),
        torch.from_numpy(labels),
        torch.from_numpy(valid),
        lengths,
        torch.from_numpy(resets),
    )


def batches_by_length(
    session_ids: Sequence[str], lengths: dict, batch_size: int, rng: Optional[np.random.Generator]
) -> list:
    """Group sessions into batches of similar length; random order when ``rng`` is given."""
    ids = list(session_ids)
    if rng is not None:
        ids = [ids[i] for i in rng.permutation(len(ids))]
    pool = max(batch_size * LENGTH_POOL_BATCHES, batch_size)
    batches = []
    for start in range(0, len(ids), pool):
        chunk = sorted(ids[start : start + pool], key=lambda sid: lengths[sid])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def input_statistics(source: SessionSource, block_bounds: Sequence[tuple]) -> tuple:
    """Per-feature mean and std over the frames where the feature's modality is present.

    Masked frames hold zeros that mean "absent", so they are left out of the statistics. Two
    passes in float64 (mean, then squared deviations), so small-scale features keep their spread.
    A feature never present, or constant (std <= ``RELATIVE_STD_THRESHOLD`` x |mean|, or 0),
    gets std 1 (it is only centred).
    """
    dim = block_bounds[-1][1]
    total = np.zeros(dim, np.float64)
    count = np.zeros(dim, np.float64)
    for sid in source.ids:
        inputs, mask, _, _ = source.arrays(sid)
        for column, (lo, hi) in enumerate(block_bounds):
            rows = inputs[mask[:, column], lo:hi].astype(np.float64)
            total[lo:hi] += rows.sum(axis=0)
            count[lo:hi] += rows.shape[0]
    safe = np.maximum(count, 1.0)
    mean = np.where(count > 0, total / safe, 0.0)
    squares = np.zeros(dim, np.float64)
    for sid in source.ids:
        inputs, mask, _, _ = source.arrays(sid)
        for column, (lo, hi) in enumerate(block_bounds):
            rows = inputs[mask[:, column], lo:hi].astype(np.float64) - mean[lo:hi]
            squares[lo:hi] += np.square(rows).sum(axis=0)
    std = np.sqrt(squares / safe)
    constant = (count == 0) | (std == 0.0) | (std <= RELATIVE_STD_THRESHOLD * np.abs(mean))
    std = np.where(constant, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def modality_dropout(
    mask: torch.Tensor, valid: torch.Tensor, probability: float, generator: torch.Generator
) -> torch.Tensor:
    """Hide whole modalities of whole windows at random (per stream and modality), in place of a copy.

    ``mask`` (B, T, M); each (stream, modality) pair is dropped for the window with ``probability``.
    At least one modality that was present stays present in every stream, so a window never
    becomes entirely blind because of the augmentation.
    """
    if probability <= 0.0:
        return mask
    batch, _, modalities = mask.shape
    drop = torch.rand((batch, modalities), generator=generator, device='cpu') < probability
    drop = drop.to(mask.device)
    present = mask.any(dim=1)  # (B, M) present somewhere in the window
    kept = present & ~drop
    # Streams that would lose every present modality keep them all.
    keep_all = ~kept.any(dim=1, keepdim=True) & present.any(dim=1, keepdim=True)
    drop = drop & ~keep_all
    return mask & ~drop.unsqueeze(1)
