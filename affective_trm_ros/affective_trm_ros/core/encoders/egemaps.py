"""Audio encoder ``egemaps``: openSMILE's eGeMAPSv02 functionals (88 features) of a waveform window.

eGeMAPS (Eyben et al., 2016, "The Geneva Minimalistic Acoustic Parameter Set") is the standard
acoustic parameter set for affect: pitch (F0 in semitones from 27.5 Hz), jitter, shimmer,
loudness, harmonics-to-noise ratio, formants, spectral slopes and balance, MFCCs, and rates of
voiced segments, each summarised over the window (means, deviations, percentiles). The numbers
come from the ``opensmile`` package (which ships the openSMILE library and the feature-set
configuration files); nothing is learned, so there are no weights to download: the "weights" of
this plugin are the configuration file inside the package, checked against pip's RECORD SHA-256.

Same contract as ``dasheng_base``: a 16 kHz mono float window in [-1, 1] (the audio node and
offline preparation cut the windows, every ``hop_s``, stamped at the window's end), one 88-d
vector out in :attr:`EGeMAPSEncoder.feature_names` order. Windows whose RMS level is below
``silence_threshold`` are ``valid=False`` with a zero row. CPU only (openSMILE is native code).
The features are on their natural scales (semitones, dB, Hz, ratios); the fusion model's input
normalisation, stored in its checkpoint, puts them on a common scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from affective_trm_ros.core.encoders import weights as weight_registry
from affective_trm_ros.core.encoders.audio import DEFAULT_SILENCE_THRESHOLD, check_waveform, rms
from affective_trm_ros.core.encoders.base import Encoder, EncodeResult, WeightsFormatError

SAMPLE_RATE = 16000          # the windows the audio node cuts for every waveform plugin
FEATURE_DIM = 88             # eGeMAPSv02 functionals
FEATURE_LEVEL = 'func'       # openSMILE's functionals output (opensmile.FeatureLevel.Functionals)
# eGeMAPS's longest analysis frame is 60 ms (the pitch window); openSMILE returns NaN for less.
MIN_SAMPLES = SAMPLE_RATE * 60 // 1000


class EGeMAPSEncoder(Encoder):
    """openSMILE eGeMAPSv02 functionals: 88 acoustic features per window (audio, 16 kHz float mono in).

    Options: ``silence_threshold`` (RMS, full scale 1.0; quieter windows are ``valid=False``;
    0 disables). ``weights`` may name another eGeMAPSv02 configuration file; ``device`` and
    ``allow_untrained`` are accepted for the common contract and change nothing.
    """

    modality = 'audio'
    input_kind = 'waveform'
    dim = FEATURE_DIM
    sample_rate = SAMPLE_RATE
    weights_name = 'egemaps_v02'

    def __init__(self, device: str = 'auto', weights: Optional[str] = None, allow_untrained: bool = False,
                 silence_threshold: float = DEFAULT_SILENCE_THRESHOLD) -> None:
        super().__init__(device='cpu', weights=weights, allow_untrained=allow_untrained,
                         silence_threshold=silence_threshold)
        if silence_threshold < 0:
            raise ValueError(f'silence_threshold must be >= 0, got {silence_threshold}')
        self.silence_threshold = float(silence_threshold)
        config = weight_registry.resolve(self.weights_name, weights)   # not installed -> pip install hint
        import opensmile

        try:
            self.smile = opensmile.Smile(feature_set=str(config), feature_level=FEATURE_LEVEL)
        except Exception as err:  # noqa: BLE001 - openSMILE reports bad configs with assorted errors
            raise WeightsFormatError(f'openSMILE cannot use {config}: {err}') from err
        self.feature_names = list(self.smile.feature_names)
        if len(self.feature_names) != self.dim:
            raise WeightsFormatError(f'{config} gives {len(self.feature_names)} functionals; eGeMAPSv02 has '
                                     f'{self.dim}')
        self.weights_identity = Path(config).stem if weights else 'eGeMAPSv02'

    def is_silent(self, samples: np.ndarray) -> bool:
        return self.silence_threshold > 0 and rms(samples) < self.silence_threshold

    def features(self, samples: np.ndarray) -> np.ndarray:
        """The 88 functionals of one window (no silence check)."""
        frame = self.smile.process_signal(samples, self.sample_rate)
        return frame.to_numpy(dtype=np.float32).reshape(-1)

    def _encode_batch(self, inputs: list) -> EncodeResult:
        windows = [check_waveform(samples) for samples in inputs]
        for window in windows:
            if window.size < MIN_SAMPLES:
                raise ValueError(f'window of {window.size} samples is shorter than eGeMAPS\'s 60 ms analysis '
                                 f'frame ({MIN_SAMPLES} samples at {SAMPLE_RATE} Hz)')
        valid = np.array([not self.is_silent(w) for w in windows], dtype=bool)
        embeddings = np.zeros((len(windows), self.dim), np.float32)
        for index in np.flatnonzero(valid):
            embeddings[index] = self.features(windows[index])
        return EncodeResult(embeddings, valid)
