"""The encoder plugin contract (API version 1) and plugin discovery.

An encoder turns one modality's raw input into a fixed-size float32 vector. Plugins are classes
registered in the setuptools entry-point group ``affective_trm_ros.encoders``::

    # setup.py of a third-party package
    entry_points={'affective_trm_ros.encoders': ['my_face = my_pkg.encoders:MyFaceEncoder']}

The entry-point name is the plugin id used in node parameters, training configs and checkpoints.
A plugin subclasses :class:`Encoder`, sets the class attributes and implements ``_encode_batch``.
Nodes, offline feature preparation and replay all call the same ``encode_batch``, which is what
keeps training and serving features identical.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Optional

import numpy as np

from affective_trm_ros.core.device import resolve_device
from affective_trm_ros.core.encoders import weights as weight_registry

# The weight errors live with the weights registry; re-exported here, where plugins look for them.
from affective_trm_ros.core.encoders.weights import (  # noqa: F401
    WeightsChecksumError,
    WeightsFormatError,
    WeightsNotFoundError,
)

ENTRY_POINT_GROUP = 'affective_trm_ros.encoders'
ENCODER_API_VERSION = 1

# What each input kind means; an encoder declares one of them as `input_kind`.
INPUT_KINDS = {
    'rgb_image': 'HxWx3 uint8 RGB frame (full camera image; the encoder finds the face itself)',
    'waveform': 'float32 mono waveform in [-1, 1] at the encoder sample_rate',
    'text': 'str, one utterance',
}

UNTRAINED = 'untrained'
LOGGER = logging.getLogger(__name__)
# At most one warning per encoder in this many seconds about non-finite outputs: a corrupted model
# gives NaN on every input, and one line per frame would drown the log.
NONFINITE_WARN_PERIOD_S = 10.0


@dataclass
class EncodeResult:
    """Output of encode_batch: one row per input.

    ``extras`` keys shared across plugins: ``expression_classes`` (list of K class names) with
    ``expression_probabilities`` (N, K) for encoders with a categorical expression head.
    """

    embeddings: np.ndarray  # float32, shape (N, dim); rows of invalid inputs are zeros
    valid: np.ndarray       # bool, shape (N,): False when the input held nothing to encode
    extras: Optional[dict] = None  # optional per-row side outputs, e.g. {'valence_arousal': (N, 2)}
    # bool (N,): rows the encoder computed but whose numbers were not finite (NaN/Inf); they are
    # reported valid=False with a zero row. Filled by Encoder.encode_batch.
    nonfinite: Optional[np.ndarray] = None


class Encoder(abc.ABC):
    """Base class of all encoder plugins.

    Subclasses set ``modality``, ``input_kind`` and ``dim`` (class attribute or instance attribute
    set in ``__init__``), load their weights in ``__init__`` and implement ``_encode_batch``.

    Constructor contract: ``__init__(device='auto', weights=None, allow_untrained=False, **options)``

    * ``weights``: explicit path to a weight file/directory; None = look in the weights cache.
    * ``allow_untrained``: explicit opt-in to run with random weights when none are found; the
      encoder then reports ``weights_identity == 'untrained'`` so every output says so.
      Without it a missing file raises :class:`WeightsNotFoundError`.

    Outputs that are not finite (NaN/Inf, e.g. from a corrupted weights file) never pass as valid:
    ``encode_batch`` turns such rows into ``valid=False`` zero rows, counts them in
    ``nonfinite_outputs`` (for ``/diagnostics``) and logs a throttled warning.

    ``weights_name`` (class attribute, optional): the registry name of the weights the plugin loads
    by default, so ``affective-trm weights list`` can say whether they are on this machine.
    """

    api_version: ClassVar[int] = ENCODER_API_VERSION
    modality: ClassVar[str]
    input_kind: ClassVar[str]
    dim: int
    sample_rate: ClassVar[Optional[int]] = None  # waveform encoders: expected rate in Hz
    weights_name: ClassVar[Optional[str]] = None  # registry name of the default weights, if any

    def __init__(self, device: str = 'auto', weights: Optional[str] = None,
                 allow_untrained: bool = False, **options: Any) -> None:
        self.device = resolve_device(device)
        self.weights_path = weights
        self.allow_untrained = allow_untrained
        self.options = options
        self.weights_identity = UNTRAINED
        self.plugin_id = type(self).__name__
        self.nonfinite_outputs = 0          # rows invalidated because their numbers were not finite
        self._last_nonfinite_warning = -float('inf')

    def _weights_or_untrained(self, weights_name: str, untrained_note: str = '') -> Optional[str]:
        """Path of the weight file, or None when it is missing and ``allow_untrained`` opted in.

        In the second case ``weights_identity`` becomes 'untrained' and a warning says so. A missing
        explicit ``weights`` path always raises: the user named a file that is not there.
        """
        try:
            return weight_registry.resolve(weights_name, self.weights_path)
        except FileNotFoundError:
            if not self.allow_untrained or self.weights_path:
                raise
        LOGGER.warning('%s: no weights (%s); running UNTRAINED with random features%s, as requested '
                       '(allow_untrained)', type(self).__name__, weights_name, untrained_note)
        self.weights_identity = UNTRAINED
        return None

    @property
    def identity(self) -> str:
        """'<plugin id>@<weights identity>': what ModalityEmbedding.encoder carries."""
        return f'{self.plugin_id}@{self.weights_identity}'

    @property
    def untrained(self) -> bool:
        return self.weights_identity == UNTRAINED

    def encode_batch(self, inputs: Sequence[Any]) -> EncodeResult:
        """Encode a batch; batch and one-by-one calls give the same numbers."""
        if len(inputs) == 0:
            return EncodeResult(np.zeros((0, self.dim), np.float32), np.zeros(0, bool))
        result = self._encode_batch(list(inputs))
        if result.embeddings.shape != (len(inputs), self.dim):
            raise RuntimeError(f'{self.identity} returned shape {result.embeddings.shape}, '
                               f'expected {(len(inputs), self.dim)}')
        return self._invalidate_nonfinite(result)

    def _invalidate_nonfinite(self, result: EncodeResult) -> EncodeResult:
        """Rows with NaN/Inf become valid=False zero rows; counted and warned about (throttled)."""
        valid = np.asarray(result.valid, dtype=bool)
        bad = valid & ~np.isfinite(result.embeddings).all(axis=1)
        result.nonfinite = bad
        if not bad.any():
            return result
        result.valid = valid & ~bad
        result.embeddings = result.embeddings.copy()
        result.embeddings[bad] = 0.0
        self.nonfinite_outputs += int(bad.sum())
        now = time.monotonic()
        if now - self._last_nonfinite_warning >= NONFINITE_WARN_PERIOD_S:
            self._last_nonfinite_warning = now
            LOGGER.warning('%s produced non-finite (NaN/Inf) embeddings for %d of %d input(s), %d so far; '
                           'they are reported invalid. Corrupted weights, or an input the model cannot '
                           'handle? Check the weights with `affective-trm weights verify`',
                           self.identity, int(bad.sum()), bad.size, self.nonfinite_outputs)
        return result

    def encode(self, item: Any) -> tuple[np.ndarray, bool]:
        """Encode one input: (vector of shape (dim,), valid)."""
        result = self.encode_batch([item])
        return result.embeddings[0], bool(result.valid[0])

    @abc.abstractmethod
    def _encode_batch(self, inputs: list) -> EncodeResult:
        """Encode a non-empty batch of inputs of this encoder's input_kind."""


def available_encoders() -> dict:
    """Plugin id -> entry point, for every installed encoder plugin."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def encoder_class(plugin_id: str) -> type:
    """The class registered under ``plugin_id``; a clear error lists the installed ones."""
    plugins = available_encoders()
    if plugin_id not in plugins:
        raise KeyError(f"unknown encoder plugin '{plugin_id}'; installed: {sorted(plugins) or 'none'} "
                       f"(entry-point group '{ENTRY_POINT_GROUP}')")
    cls = plugins[plugin_id].load()
    if not (isinstance(cls, type) and issubclass(cls, Encoder)):
        raise TypeError(f"encoder plugin '{plugin_id}' ({plugins[plugin_id].value}) "
                        f"is not an Encoder subclass")
    if cls.api_version != ENCODER_API_VERSION:
        raise TypeError(f"encoder plugin '{plugin_id}' implements encoder API v{cls.api_version}; "
                        f"this suite speaks v{ENCODER_API_VERSION}")
    return cls


def plugin_weights_status(plugin_id: str) -> tuple:
    """(modality, weights name or None, status) for an installed plugin, without loading any weights.

    status: 'present' (its real weights are on this machine), 'missing', or 'none known' (the plugin
    names no registry weights; a third-party plugin that manages its own).
    """
    cls = encoder_class(plugin_id)
    name = getattr(cls, 'weights_name', None)
    if not name or name not in weight_registry.KNOWN_WEIGHTS:
        return cls.modality, None, 'none known'
    return cls.modality, name, 'present' if weight_registry.is_present(name) else 'missing'


def load_encoder(plugin_id: str, **kwargs: Any) -> Encoder:
    """Instantiate the plugin registered under ``plugin_id`` with the constructor contract's kwargs."""
    encoder = encoder_class(plugin_id)(**kwargs)
    encoder.plugin_id = plugin_id
    return encoder
