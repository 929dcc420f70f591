"""The feature store: per-frame aligned features of many sessions, written once, read by training.

Layout of a store directory::

    index.json              format/version, encoder spec, feature order, one entry per session,
                            info (see below)
    sessions/<id>.npz       timestamps, one array per modality, mask, labels, speaker, meta (JSON)

``info`` (:meth:`FeatureStore.update_info`) records where the features came from: the encoders'
identities, the source and, after every ``affective-trm prepare`` run, ``features_hash`` (the content
hash of all sessions, :func:`affective_trm_ros.offline.learning.data.store_digest`, which training
checks) and ``torch_threads`` (the torch thread count during extraction). Stores written before
these entries existed lack them and load as before.

A session is written atomically (temporary file, then rename) and only then entered in the
index, so an interrupted preparation restarts where it stopped: ``has(id)`` is True only for
sessions that were completely written, and preparation skips those.

Features of a masked modality at a frame are stored as zeros; the mask says they are absent and
the model replaces them by its learned "absent" embedding.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from affective_trm_ros.core.checkpoint import normalize_encoder_spec  # one check of a spec, shared
from affective_trm_ros.core.modalities import FEATURE_ORDER

STORE_FORMAT = 'affective_trm_feature_store'
STORE_VERSION = 1
INDEX_NAME = 'index.json'
SESSIONS_DIR = 'sessions'
# Session ids become file names: keep them portable.
_SESSION_ID_PATTERN = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')


def validate_session(session_id: str, dims: dict, timestamps, features: dict, mask, labels) -> tuple:
    """Check one session's arrays against the store's dims; returns them as (timestamps float64,
    {modality: (T, dim) float32}, mask (T, M) bool, labels (T, 2) float32). ValueError names the problem.
    """
    if not _SESSION_ID_PATTERN.match(session_id or ''):
        raise ValueError(f'session id {session_id!r} must match {_SESSION_ID_PATTERN.pattern}')
    timestamps = np.asarray(timestamps, dtype=np.float64)
    if timestamps.ndim != 1 or timestamps.size == 0:
        raise ValueError(f'{session_id}: timestamps must be a non-empty 1-D array, got {timestamps.shape}')
    if np.any(np.diff(timestamps) < 0):
        raise ValueError(f'{session_id}: timestamps must not decrease')
    frames = timestamps.shape[0]
    if set(features) != set(dims):
        raise ValueError(f'{session_id}: features for {sorted(features)} given, the store holds {list(dims)}')
    arrays = {}
    for name, dim in dims.items():
        block = np.asarray(features[name], dtype=np.float32)
        if block.shape != (frames, dim):
            raise ValueError(
                f'{session_id}: {name} features have shape {block.shape}, expected {(frames, dim)}'
            )
        if not np.all(np.isfinite(block)):
            raise ValueError(f'{session_id}: {name} features contain NaN or inf')
        arrays[name] = block
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (frames, len(dims)):
        raise ValueError(
            f'{session_id}: mask has shape {mask.shape}, expected {(frames, len(dims))} '
            f'(columns {list(dims)})'
        )
    labels = np.asarray(labels, dtype=np.float32)
    if labels.shape != (frames, 2):
        raise ValueError(f'{session_id}: labels have shape {labels.shape}, expected {(frames, 2)}')
    finite = labels[np.isfinite(labels)]
    if finite.size and (finite.min() < -1.0 or finite.max() > 1.0):
        raise ValueError(f'{session_id}: labels must lie in [-1, 1] (NaN = unlabelled)')
    return timestamps, arrays, mask, labels


@dataclass
class Session:
    """One recorded stream: per-frame aligned features, modality mask and labels."""

    id: str
    speaker: str
    timestamps: np.ndarray  # (T,) float64 seconds
    features: dict  # modality -> (T, dim) float32, in encoder-spec order
    mask: np.ndarray  # (T, M) bool: modality present at the frame
    labels: np.ndarray  # (T, 2) float32 valence/arousal, NaN = unlabelled
    meta: dict = field(default_factory=dict)

    @property
    def modalities(self) -> list:
        return list(self.features)

    def __len__(self) -> int:
        return int(self.timestamps.shape[0])

    def inputs(self) -> np.ndarray:
        """The model input: modality blocks concatenated in FEATURE_ORDER, shape (T, D) float32."""
        return np.concatenate(
            [self.features[name] for name in FEATURE_ORDER if name in self.features], axis=1
        ).astype(np.float32, copy=False)


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class _SpecView:
    """Read-only views of the encoder spec shared by the stores (``self._spec`` holds it)."""

    _spec: list

    @property
    def encoder_spec(self) -> list:
        return [dict(entry) for entry in self._spec]

    @property
    def modalities(self) -> list:
        return [entry['modality'] for entry in self._spec]

    @property
    def dims(self) -> dict:
        """modality -> feature dimension, in FEATURE_ORDER."""
        return {entry['modality']: entry['dim'] for entry in self._spec}

    @property
    def encoder_identities(self) -> dict:
        """modality -> '<plugin>@<weights>' of the encoders that made the features (says '@untrained'
        when they ran with random weights; the plugin id alone when the store does not know)."""
        recorded = dict(getattr(self, 'info', {}).get('encoders') or {})
        return {e['modality']: e.get('identity') or recorded.get(e['modality']) or e['encoder']
                for e in self.encoder_spec}

    @property
    def input_dim(self) -> int:
        return sum(self.dims.values())


class FeatureStore(_SpecView):
    """A directory of sessions sharing one encoder spec.

    ``FeatureStore(root)`` opens an existing store. ``FeatureStore(root, encoder_spec=spec)``
    creates it when absent, or opens it and checks that the stored spec is the same.
    """

    def __init__(self, root, encoder_spec: Optional[list] = None) -> None:
        self.root = Path(root)
        index_path = self.root / INDEX_NAME
        if index_path.exists():
            self._index = json.loads(index_path.read_text())
            if self._index.get('format') != STORE_FORMAT:
                raise ValueError(
                    f'{index_path} is not a feature store index (format '
                    f'{self._index.get("format")!r}, expected {STORE_FORMAT!r})'
                )
            if self._index.get('version') != STORE_VERSION:
                raise ValueError(
                    f'{index_path}: feature store version {self._index.get("version")} '
                    f'is not supported (this code reads version {STORE_VERSION})'
                )
            if encoder_spec is not None:
                wanted = normalize_encoder_spec(encoder_spec)
                stored = self._index['encoder_spec']
                if _spec_core(wanted) != _spec_core(stored):
                    raise ValueError(
                        f'feature store {self.root} was prepared with encoders '
                        f'{_describe_spec(stored)}, but {_describe_spec(wanted)} were '
                        f'requested; use another store directory'
                    )
        elif encoder_spec is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._index = {
                'format': STORE_FORMAT,
                'version': STORE_VERSION,
                'feature_order': list(FEATURE_ORDER),
                'encoder_spec': normalize_encoder_spec(encoder_spec),
                'sessions': {},
            }
            self._write_index()
        else:
            raise FileNotFoundError(
                f'no feature store at {self.root} ({INDEX_NAME} missing); '
                f"create one with 'affective-trm prepare'"
            )
        (self.root / SESSIONS_DIR).mkdir(parents=True, exist_ok=True)
        self._spec = self._index['encoder_spec']

    # ---- description ----------------------------------------------------------------------------
    def session_ids(self) -> list:
        return sorted(self._index['sessions'])

    def speakers(self) -> dict:
        """session id -> speaker id."""
        return {sid: entry['speaker'] for sid, entry in sorted(self._index['sessions'].items())}

    def num_frames(self, session_id: str) -> int:
        return int(self._index['sessions'][session_id]['frames'])

    def has(self, session_id: str) -> bool:
        entry = self._index['sessions'].get(session_id)
        return entry is not None and (self.root / entry['file']).exists()

    def __len__(self) -> int:
        return len(self._index['sessions'])

    def __contains__(self, session_id: str) -> bool:
        return self.has(session_id)

    # ---- writing ------------------------------------------------------------------------------
    def write_session(
        self,
        session_id: str,
        *,
        speaker,
        timestamps,
        features: dict,
        mask,
        labels,
        meta: Optional[dict] = None,
    ) -> None:
        """Validate and store one session (replacing a previous one of the same id)."""
        timestamps, arrays, mask, labels = validate_session(
            session_id, self.dims, timestamps, features, mask, labels
        )
        meta = dict(meta or {})
        file_name = f'{SESSIONS_DIR}/{session_id}.npz'
        path = self.root / file_name
        blocks = {f'feat_{name}': block for name, block in arrays.items()}

        def write(handle):
            np.savez(
                handle,
                timestamps=timestamps,
                mask=mask,
                labels=labels,
                speaker=np.array(str(speaker)),
                meta=np.array(json.dumps(meta)),
                **blocks,
            )

        _atomic_write_bytes(path, write)
        self._index['sessions'][session_id] = {
            'file': file_name,
            'speaker': str(speaker),
            'frames': int(timestamps.shape[0]),
            'labelled_frames': int(np.sum(np.all(np.isfinite(labels), axis=1))),
        }
        self._write_index()

    def update_info(self, **info) -> None:
        """Record store-level information (e.g. source, encoder identities) in the index."""
        self._index.setdefault('info', {}).update(info)
        self._write_index()

    @property
    def info(self) -> dict:
        return dict(self._index.get('info', {}))

    def _write_index(self) -> None:
        data = json.dumps(self._index, indent=1, sort_keys=True).encode()
        _atomic_write_bytes(self.root / INDEX_NAME, lambda handle: handle.write(data))

    # ---- reading ------------------------------------------------------------------------------
    def load(self, session_id: str) -> Session:
        if not self.has(session_id):
            raise KeyError(f"session '{session_id}' is not in the feature store {self.root}")
        entry = self._index['sessions'][session_id]
        with np.load(self.root / entry['file'], allow_pickle=False) as data:
            features = {name: data[f'feat_{name}'] for name in self.dims}
            return Session(
                id=session_id,
                speaker=str(data['speaker']),
                timestamps=data['timestamps'],
                features=features,
                mask=data['mask'],
                labels=data['labels'],
                meta=json.loads(str(data['meta'])),
            )


def _spec_core(spec) -> list:
    return [(entry['modality'], entry['encoder'], int(entry['dim'])) for entry in spec]


def _describe_spec(spec) -> str:
    return ', '.join(f'{entry["modality"]}={entry["encoder"]}({entry["dim"]})' for entry in spec)


class InMemoryStore(_SpecView):
    """The reading API of :class:`FeatureStore` over sessions held in memory (no files).

    For generated data that need not outlive the process (the temporal benchmark, tests).
    """

    def __init__(self, encoder_spec: list, root: str = '<memory>') -> None:
        self._spec = normalize_encoder_spec(encoder_spec)
        self._sessions: dict = {}
        self.root = root
        self.info: dict = {}

    def write_session(
        self,
        session_id: str,
        *,
        speaker,
        timestamps,
        features: dict,
        mask,
        labels,
        meta: Optional[dict] = None,
    ) -> None:
        timestamps, arrays, mask, labels = validate_session(
            session_id, self.dims, timestamps, features, mask, labels
        )
        self._sessions[session_id] = Session(
            session_id, str(speaker), timestamps, arrays, mask, labels, dict(meta or {})
        )

    def session_ids(self) -> list:
        return sorted(self._sessions)

    def speakers(self) -> dict:
        return {sid: self._sessions[sid].speaker for sid in self.session_ids()}

    def num_frames(self, session_id: str) -> int:
        return len(self._sessions[session_id])

    def has(self, session_id: str) -> bool:
        return session_id in self._sessions

    def load(self, session_id: str) -> Session:
        if session_id not in self._sessions:
            raise KeyError(f"session '{session_id}' is not in this in-memory store")
        return self._sessions[session_id]

    def update_info(self, **info) -> None:
        self.info.update(info)

    def __len__(self) -> int:
        return len(self._sessions)
