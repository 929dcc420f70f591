"""Audio encoder: Dasheng base (768-d) over a 16 kHz mono waveform window.

Dasheng turns a waveform into 64-band log-mel frames every 10 ms and patches of 4 frames, i.e.
25 tokens per second; the window's embedding is the mean of its tokens. Windows whose RMS level is
below ``silence_threshold`` are reported ``valid=False`` (nothing to hear), with a zero row.

Weights use the published checkpoint format of the ``dasheng`` package: a dict with ``"model"``
(state dict) and ``"config"`` (constructor keyword arguments). It is read with
``torch.load(weights_only=True)`` and loaded with ``strict=True``; architecture keys missing from
``config`` default to Dasheng base (768-d, 12 layers, 12 heads), as the package's ``dasheng_base()``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from affective_trm_ros.core.encoders import weights as weight_registry
from affective_trm_ros.core.encoders.base import Encoder, EncodeResult, WeightsFormatError

LOGGER = logging.getLogger(__name__)

SAMPLE_RATE = 16000                 # Dasheng's mel front end is fixed at 16 kHz
EMBED_DIM = 768                     # Dasheng base width
TOKENS_PER_SECOND = 25              # 10 ms mel hop x 4 frames per patch
MIN_SAMPLES = SAMPLE_RATE // TOKENS_PER_SECOND  # one token (40 ms); shorter windows hold no token
DEFAULT_SILENCE_THRESHOLD = 1e-3    # RMS (full scale 1.0), about -60 dBFS: below any speech at arm's length
# Dasheng base architecture, as the dasheng package's dasheng_base() sets it.
BASE_ARCHITECTURE = {'embed_dim': EMBED_DIM, 'depth': 12, 'num_heads': 12}
UNTRAINED_SEED = 0                  # random init is seeded so untrained features are reproducible


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0


def check_waveform(samples: np.ndarray) -> np.ndarray:
    """Validate one window: 1-D, finite, at least one token long; returned as float32."""
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(f'expected a 1-D mono waveform, got shape {samples.shape}')
    if not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f'expected float samples in [-1, 1], got dtype {samples.dtype}')
    if samples.size < MIN_SAMPLES:
        raise ValueError(f'window of {samples.size} samples is shorter than one Dasheng token '
                         f'({MIN_SAMPLES} samples = 40 ms at {SAMPLE_RATE} Hz)')
    if not np.all(np.isfinite(samples)):
        raise ValueError('waveform contains NaN or Inf samples')
    return samples.astype(np.float32, copy=False)


def load_dasheng(path: Path) -> torch.nn.Module:
    """Build Dasheng from a published-format checkpoint ({"model", "config"}) and load it strictly."""
    from dasheng.pretrained.pretrained import Dasheng

    try:
        dump = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means: not a readable checkpoint
        raise WeightsFormatError(f'cannot read {path} as a Dasheng checkpoint: '
                                 f'{weight_registry.describe_unreadable(path, err)}') from err
    if not isinstance(dump, dict) or 'model' not in dump or 'config' not in dump:
        keys = sorted(dump) if isinstance(dump, dict) else type(dump).__name__
        raise WeightsFormatError(f'{path} is not a Dasheng checkpoint: expected a dict with "model" and '
                                 f'"config", got {keys}')
    config = {**BASE_ARCHITECTURE, **dict(dump['config'])}
    model = Dasheng(**config)
    try:
        model.load_state_dict(dump['model'], strict=True)
    except RuntimeError as err:
        raise WeightsFormatError(f'{path}: weights do not match the Dasheng model its config describes: '
                                 f'{err}') from err
    return model


def untrained_dasheng() -> torch.nn.Module:
    from dasheng.pretrained.pretrained import Dasheng

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(UNTRAINED_SEED)
        return Dasheng(**BASE_ARCHITECTURE)


class DashengEncoder(Encoder):
    """Dasheng base: mean of the window's 25-per-second tokens -> 768-d (audio, 16 kHz float mono in).

    Options: ``silence_threshold`` (RMS, full scale 1.0; quieter windows are ``valid=False``;
    0 disables the check).
    """

    modality = 'audio'
    input_kind = 'waveform'
    dim = EMBED_DIM
    sample_rate = SAMPLE_RATE
    weights_name = 'dasheng_base'

    def __init__(self, device: str = 'auto', weights: Optional[str] = None, allow_untrained: bool = False,
                 silence_threshold: float = DEFAULT_SILENCE_THRESHOLD) -> None:
        super().__init__(device=device, weights=weights, allow_untrained=allow_untrained,
                         silence_threshold=silence_threshold)
        if silence_threshold < 0:
            raise ValueError(f'silence_threshold must be >= 0, got {silence_threshold}')
        self.silence_threshold = float(silence_threshold)
        self.model = self._load_model().to(self.device).eval()
        if self.model.embed_dim != self.dim:
            raise WeightsFormatError(f'{self.weights_path or self.weights_name}: a {self.model.embed_dim}-d '
                                     f'Dasheng model, but dasheng_base produces {self.dim}-d embeddings')

    def _load_model(self) -> torch.nn.Module:
        path = self._weights_or_untrained(self.weights_name)   # a cached file's SHA-256 is checked there
        if path is None:
            return untrained_dasheng()
        model = load_dasheng(path)
        self.weights_identity = Path(path).stem
        return model

    def is_silent(self, samples: np.ndarray) -> bool:
        return self.silence_threshold > 0 and rms(samples) < self.silence_threshold

    def _encode_batch(self, inputs: list) -> EncodeResult:
        windows = [check_waveform(samples) for samples in inputs]
        valid = np.array([not self.is_silent(w) for w in windows], dtype=bool)
        embeddings = np.zeros((len(windows), self.dim), np.float32)
        # Windows of equal length run as one batch; the nodes' windows all have the same length.
        by_length: dict = {}
        for index in np.flatnonzero(valid):
            by_length.setdefault(windows[index].size, []).append(int(index))
        with torch.inference_mode():
            for indices in by_length.values():
                batch = torch.from_numpy(np.stack([windows[i] for i in indices])).to(self.device)
                tokens = self.model(batch)                 # (B, tokens, 768)
                embeddings[indices] = tokens.mean(dim=1).float().cpu().numpy()
        return EncodeResult(embeddings, valid)
