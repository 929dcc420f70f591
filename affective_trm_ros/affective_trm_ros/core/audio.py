"""Audio messages to fixed windows at the encoder rate: PCM decoding, resampling, windowing, silence.

The audio encoder node and offline bag feature extraction run the same steps, in this order:

1. :func:`decode_pcm` turns one message's bytes into float32 mono samples in [-1, 1];
2. :class:`AudioWindower` resamples them to the encoder rate (16 kHz) with a streaming polyphase
   filter and cuts a window (default 1.0 s) every hop (default 0.5 s), each stamped at its END;
3. :func:`embed_windows` marks silent windows invalid and encodes the others.

:class:`AudioStreamProcessor` bundles steps 1-2 per message, for stamped messages
(``AudioDataStamped``) and headerless ones (``AudioData``). Every time is derived from message
stamps and sample counts, never from the wall clock, and the result does not depend on how the
audio was cut into messages: feeding the same samples in different chunk sizes gives the same
windows, bit for bit.

Stamp rule: a message's stamp is the capture time of its FIRST sample. A stream runs in
*segments*; within a segment the time of sample ``n`` is ``t0 + n / rate`` (message stamps only
start segments). When a message's stamp differs from the time its first sample would have in the
current segment by more than ``stamp_tolerance_s`` (dropped messages, a jump, a bag loop), or the
sample rate or format changes, the buffered audio is discarded, a new segment starts at that
message and the reset is counted. Windows never span two segments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from math import gcd
from typing import Any, Optional

import numpy as np

# The rate every built-in audio encoder (Dasheng) expects.
DEFAULT_SAMPLE_RATE_OUT = 16000
# Default window and hop: one embedding per 0.5 s, each over the last second of audio.
DEFAULT_WINDOW_S = 1.0
DEFAULT_HOP_S = 0.5
# Stamps of consecutive messages may jitter this much around the sample clock before a reset.
DEFAULT_STAMP_TOLERANCE_S = 0.1
# Headerless audio: a message arriving this much later than its sample-count time restarts the clock.
DEFAULT_MAX_LAG_S = 1.0
# Windows quieter than this RMS level are silence: -60 dBFS (RMS 0.001), below speech at arm's length.
DEFAULT_SILENCE_THRESHOLD_DBFS = -60.0
# Float PCM is nominally in [-1, 1]; a peak above this means the declared format is wrong.
MAX_FLOAT_PEAK = 16.0
# Sanity bounds on stream parameters (corrupt AudioInfo, not a microphone).
MAX_CHANNELS = 64
MAX_SAMPLE_RATE = 768_000
# Resampler: half the FIR length in units of max(up, down) and its Kaiser window (scipy's
# resample_poly defaults, so the streaming output equals resample_poly on the whole signal).
_HALF_LEN_FACTOR = 10
_KAISER_BETA = 5.0
# Outputs computed per block, bounding the resampler's scratch memory for very long messages.
_RESAMPLE_BLOCK = 8192


class AudioDecodeError(ValueError):
    """Audio bytes or stream parameters cannot be decoded; the message says why."""


# sample_format (GStreamer names, as in audio_common_msgs/AudioInfo) -> (dtype, scale, offset).
_PCM_FORMATS = {
    'U8': ('u1', 1 / 128.0, -128.0),
    'S8': ('i1', 1 / 128.0, 0.0),
    'S16LE': ('<i2', 1 / 32768.0, 0.0),
    'S16BE': ('>i2', 1 / 32768.0, 0.0),
    'S24LE': (None, 1 / 8388608.0, 0.0),  # packed 3-byte little-endian, decoded by hand
    'S32LE': ('<i4', 1 / 2147483648.0, 0.0),
    'S32BE': ('>i4', 1 / 2147483648.0, 0.0),
    'F32LE': ('<f4', 1.0, 0.0),
    'F32BE': ('>f4', 1.0, 0.0),
    'F64LE': ('<f8', 1.0, 0.0),
}
SUPPORTED_SAMPLE_FORMATS = tuple(_PCM_FORMATS)


def sample_width(sample_format: str) -> int:
    """Bytes per sample of one channel."""
    fmt = _normalise_format(sample_format)
    dtype = _PCM_FORMATS[fmt][0]
    return 3 if dtype is None else np.dtype(dtype).itemsize


def _normalise_format(sample_format: str) -> str:
    fmt = str(sample_format).strip().upper()
    if fmt not in _PCM_FORMATS:
        raise AudioDecodeError(f"unsupported sample_format '{sample_format}'; supported: "
                               f"{', '.join(SUPPORTED_SAMPLE_FORMATS)}")
    return fmt


def decode_pcm(data: Any, sample_format: str, channels: int) -> np.ndarray:
    """Interleaved PCM bytes -> float32 mono samples (channels averaged), nominally in [-1, 1].

    ``data`` is any bytes-like object or uint8 array. Raises :class:`AudioDecodeError` for an
    unknown format, a channel count outside 1..64, a byte count that is not a whole number of
    frames, NaN/Inf samples, or float samples so large that the declared format must be wrong.
    """
    fmt = _normalise_format(sample_format)
    channels = int(channels)
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioDecodeError(f'channels must be in 1..{MAX_CHANNELS}, got {channels}')
    raw = _as_uint8(data)
    width = sample_width(fmt)
    frame_bytes = width * channels
    if raw.size % frame_bytes:
        raise AudioDecodeError(f'{raw.size} bytes is not a whole number of {fmt} frames of {channels} '
                               f'channel(s) ({frame_bytes} bytes each): truncated data or wrong format')
    if raw.size == 0:
        return np.zeros(0, np.float32)
    dtype, scale, offset = _PCM_FORMATS[fmt]
    if dtype is None:  # S24LE: sign-extend three little-endian bytes
        triplets = raw.reshape(-1, 3).astype(np.int32)
        values = triplets[:, 0] | (triplets[:, 1] << 8) | (triplets[:, 2] << 16)
        values = ((values ^ 0x800000) - 0x800000).astype(np.float64)
    else:
        with np.errstate(invalid='ignore'):  # signalling-NaN bit patterns; rejected just below
            values = np.frombuffer(raw.tobytes(), dtype=np.dtype(dtype)).astype(np.float64)
    if fmt.startswith('F'):
        if not np.all(np.isfinite(values)):
            raise AudioDecodeError(f'{fmt} audio contains NaN or Inf samples')
        peak = float(np.max(np.abs(values)))
        if peak > MAX_FLOAT_PEAK:
            raise AudioDecodeError(f'{fmt} samples reach {peak:.3g}, far outside [-1, 1]: '
                                   f'the data is probably not {fmt}')
    samples = (values + offset) * scale
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return samples.astype(np.float32)


def _as_uint8(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
    if isinstance(data, (list, tuple)):
        return np.asarray(data, dtype=np.uint8)
    return np.frombuffer(memoryview(data).cast('B'), np.uint8)


def rms_dbfs(samples: np.ndarray) -> float:
    """RMS level in dB relative to full scale (a full-scale square wave is 0 dBFS); -inf for silence."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.size == 0:
        return -math.inf
    rms = math.sqrt(float(np.mean(samples * samples)))
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def dbfs_to_amplitude(level_dbfs: float) -> float:
    """A level in dB full scale as an RMS amplitude (full scale 1.0): -20 dBFS -> 0.1."""
    return 10.0 ** (float(level_dbfs) / 20.0)


def is_silent(samples: np.ndarray, threshold_dbfs: float = DEFAULT_SILENCE_THRESHOLD_DBFS) -> bool:
    """True when the RMS level of ``samples`` is below ``threshold_dbfs`` (an empty window is silent)."""
    return rms_dbfs(samples) < threshold_dbfs


# ---------------------------------------------------------------- resampling

class StreamingResampler:
    """Polyphase FIR resampler fed in chunks; the output does not depend on the chunking.

    Output sample ``k`` is ``sum_j x[j] * h[k*down - j*up + L]`` with scipy's ``resample_poly``
    filter ``h`` (Kaiser-windowed sinc of half-length ``L``), so output sample k sits at input time
    ``k * rate_in / rate_out`` and the concatenated output equals ``scipy.signal.resample_poly`` on
    the whole signal except its last few samples (which wait for look-ahead input). Each output is
    accumulated in a fixed order, so any chunking gives bit-identical results.
    """

    def __init__(self, rate_in: int, rate_out: int) -> None:
        if not (0 < rate_in <= MAX_SAMPLE_RATE and 0 < rate_out <= MAX_SAMPLE_RATE):
            raise AudioDecodeError(f'sample rates must be in 1..{MAX_SAMPLE_RATE} Hz, '
                                   f'got {rate_in} -> {rate_out}')
        self.rate_in, self.rate_out = int(rate_in), int(rate_out)
        divisor = gcd(self.rate_in, self.rate_out)
        self._up, self._down = self.rate_out // divisor, self.rate_in // divisor
        self._passthrough = self._up == self._down
        self._n_in = 0
        self._n_out = 0
        if self._passthrough:
            return
        from scipy.signal import firwin  # filter design only; imported lazily (slow import)

        max_rate = max(self._up, self._down)
        self._half_len = _HALF_LEN_FACTOR * max_rate
        taps = firwin(2 * self._half_len + 1, 1.0 / max_rate, window=('kaiser', _KAISER_BETA)) * self._up
        self._taps_per_phase = -(-taps.size // self._up)
        padded = np.zeros(self._taps_per_phase * self._up)
        padded[:taps.size] = taps
        # _phases[r, i] = h[r + i*up]: the taps applied to x[j_hi - i] for outputs of phase r.
        self._phases = padded.reshape(self._taps_per_phase, self._up).T.copy()
        # Input history; samples before the first one are zeros, as in resample_poly.
        self._history = np.zeros(self._taps_per_phase, np.float64)
        self._history_start = -self._taps_per_phase

    @property
    def samples_in(self) -> int:
        return self._n_in

    @property
    def samples_out(self) -> int:
        return self._n_out

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Feed input samples; return every output sample that is now fully determined (float32)."""
        samples = np.asarray(samples, dtype=np.float32)
        self._n_in += samples.size
        if self._passthrough:
            self._n_out += samples.size
            return samples.copy()
        self._history = np.concatenate([self._history, samples.astype(np.float64)])
        # Output k needs inputs up to j_hi(k) = (k*down + L) // up; it is ready when j_hi < n_in.
        last_ready = (self._n_in * self._up - 1 - self._half_len) // self._down
        outputs = []
        for block_start in range(self._n_out, last_ready + 1, _RESAMPLE_BLOCK):
            ks = np.arange(block_start, min(block_start + _RESAMPLE_BLOCK, last_ready + 1), dtype=np.int64)
            outputs.append(self._compute(ks))
        if outputs:
            self._n_out = last_ready + 1
        # Keep only the history the next output needs.
        next_first = (self._n_out * self._down + self._half_len) // self._up - self._taps_per_phase + 1
        drop = next_first - self._history_start
        if drop > 0:
            self._history = self._history[drop:]
            self._history_start += drop
        return np.concatenate(outputs).astype(np.float32) if outputs else np.zeros(0, np.float32)

    def _compute(self, ks: np.ndarray) -> np.ndarray:
        base = ks * self._down + self._half_len
        j_hi = base // self._up
        phases = self._phases[base % self._up]                      # (n, taps)
        first = j_hi - self._history_start                          # index of x[j_hi] in history
        result = np.zeros(ks.size, np.float64)
        for i in range(self._taps_per_phase):                       # fixed order: chunking-independent
            result += self._history[first - i] * phases[:, i]
        return result


# ---------------------------------------------------------------- windowing

@dataclass(frozen=True)
class AudioWindow:
    """One analysis window at the output rate, stamped at its end (capture time of the sample after it)."""

    end_stamp_s: float
    samples: np.ndarray  # float32 mono at the windower's output rate, length window_samples
    sample_rate: int = DEFAULT_SAMPLE_RATE_OUT

    @property
    def start_stamp_s(self) -> float:
        return self.end_stamp_s - self.samples.size / self.sample_rate


class _Segment:
    """A run of audio with one sample clock: t(n) = t0 + n / rate_in."""

    def __init__(self, t0: float, rate_in: int, rate_out: int, window: int, hop: int) -> None:
        self.t0 = t0
        self.rate_in = rate_in
        self.resampler = StreamingResampler(rate_in, rate_out)
        self.buffer = np.zeros(0, np.float32)
        self.buffer_start = 0          # output-sample index of buffer[0]
        self.next_end = window         # output-sample index where the next window ends
        self.hop = hop

    def expected_stamp(self) -> float:
        return self.t0 + self.resampler.samples_in / self.rate_in


class AudioWindower:
    """Bounded buffer turning stamped chunks of mono audio into windows at ``sample_rate_out``.

    ``push(samples, sample_rate, start_stamp_s)`` returns the windows completed by this chunk. A
    window covers ``window_s`` and ends every ``hop_s``; it ends at output sample ``e`` of the
    current segment and is stamped ``t0 + e / sample_rate_out``. At most one window plus one
    chunk of audio is buffered. See the module docstring for the stamp/reset rule; the counters
    ``discontinuities`` (stamp gaps/jumps) and ``rate_changes`` say how often it reset.
    """

    def __init__(self, sample_rate_out: int = DEFAULT_SAMPLE_RATE_OUT, window_s: float = DEFAULT_WINDOW_S,
                 hop_s: float = DEFAULT_HOP_S,
                 stamp_tolerance_s: float = DEFAULT_STAMP_TOLERANCE_S) -> None:
        error = validate_window_config(sample_rate_out, window_s, hop_s, stamp_tolerance_s)
        if error:
            raise ValueError(error)
        self.sample_rate_out = int(sample_rate_out)
        self.window_samples = int(round(window_s * sample_rate_out))
        self.hop_samples = int(round(hop_s * sample_rate_out))
        self.stamp_tolerance_s = float(stamp_tolerance_s)
        self.discontinuities = 0
        self.rate_changes = 0
        self._segment: Optional[_Segment] = None

    def reset(self) -> None:
        """Drop buffered audio; the next push starts a new segment at its stamp."""
        self._segment = None

    def expected_stamp(self) -> Optional[float]:
        """Capture time the next chunk's first sample has if it continues the current segment."""
        return None if self._segment is None else self._segment.expected_stamp()

    @property
    def sample_rate_in(self) -> Optional[int]:
        return None if self._segment is None else self._segment.rate_in

    def push(self, samples: np.ndarray, sample_rate: int,
             start_stamp_s: Optional[float]) -> list:
        """Add a chunk whose first sample was captured at ``start_stamp_s`` (None: continues the segment).

        Returns the completed :class:`AudioWindow` list (oldest first).
        """
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(samples)):
            raise AudioDecodeError('audio samples contain NaN or Inf')
        sample_rate = int(sample_rate)
        segment = self._segment
        if segment is not None and segment.rate_in != sample_rate:
            self.rate_changes += 1
            segment = None
        elif (segment is not None and start_stamp_s is not None
              and abs(start_stamp_s - segment.expected_stamp()) > self.stamp_tolerance_s):
            self.discontinuities += 1
            segment = None
        if segment is None:
            if start_stamp_s is None:
                raise ValueError('the first chunk of a segment needs a stamp')
            segment = _Segment(float(start_stamp_s), sample_rate, self.sample_rate_out,
                               self.window_samples, self.hop_samples)
            self._segment = segment
        if samples.size == 0:
            return []
        produced = segment.resampler.push(samples)
        segment.buffer = np.concatenate([segment.buffer, produced])
        n_out = segment.resampler.samples_out
        windows = []
        while segment.next_end <= n_out:
            start = segment.next_end - self.window_samples - segment.buffer_start
            window = segment.buffer[start:start + self.window_samples].copy()
            windows.append(AudioWindow(segment.t0 + segment.next_end / self.sample_rate_out, window,
                                       self.sample_rate_out))
            segment.next_end += segment.hop
        keep_from = min(max(0, segment.next_end - self.window_samples - segment.buffer_start),
                        segment.buffer.size)
        if keep_from:
            segment.buffer = segment.buffer[keep_from:]
            segment.buffer_start += keep_from
        return windows


def validate_window_config(sample_rate_out: int, window_s: float, hop_s: float,
                           stamp_tolerance_s: float = DEFAULT_STAMP_TOLERANCE_S) -> Optional[str]:
    """Error message for an unusable windowing configuration, or None."""
    if not 0 < sample_rate_out <= MAX_SAMPLE_RATE:
        return f'sample_rate_out must be in 1..{MAX_SAMPLE_RATE}, got {sample_rate_out}'
    if not window_s > 0 or round(window_s * sample_rate_out) < 1:
        return f'window_s must be > 0 (at least one sample), got {window_s}'
    if not hop_s > 0 or round(hop_s * sample_rate_out) < 1:
        return f'hop_s must be > 0 (at least one sample), got {hop_s}'
    if window_s > 60:
        return f'window_s must be at most 60 s, got {window_s}'
    if not stamp_tolerance_s > 0:
        return f'stamp_tolerance_s must be > 0, got {stamp_tolerance_s}'
    return None


# ---------------------------------------------------------------- per message

# AudioInfo.coding_format values that mean uncompressed interleaved PCM ('' = not stated).
PCM_CODINGS = ('', 'wave', 'wav', 'pcm', 'raw')


@dataclass(frozen=True)
class AudioFormat:
    """Stream parameters, as carried by ``audio_common_msgs/AudioInfo``."""

    sample_rate: int = 16000
    channels: int = 1
    sample_format: str = 'S16LE'
    coding_format: str = ''

    @classmethod
    def from_info(cls, info: Any) -> AudioFormat:
        """From an ``AudioInfo`` message (rclpy or rosbags): the node and offline use this same mapping."""
        return cls(int(info.sample_rate), int(info.channels), str(info.sample_format).strip().upper(),
                   str(info.coding_format).strip())

    def validate(self) -> Optional[str]:
        """Error message when this stream cannot be decoded, or None."""
        if not 0 < int(self.sample_rate) <= MAX_SAMPLE_RATE:
            return f'sample_rate must be in 1..{MAX_SAMPLE_RATE} Hz, got {self.sample_rate}'
        if not 1 <= int(self.channels) <= MAX_CHANNELS:
            return f'channels must be in 1..{MAX_CHANNELS}, got {self.channels}'
        if str(self.sample_format).strip().upper() not in _PCM_FORMATS:
            return (f"unsupported sample_format '{self.sample_format}'; supported: "
                    f"{', '.join(SUPPORTED_SAMPLE_FORMATS)}")
        if str(self.coding_format).strip().lower() not in PCM_CODINGS:
            return (f"unsupported coding_format '{self.coding_format}'; only raw PCM "
                    f"({', '.join(repr(c) for c in PCM_CODINGS)}) is decoded")
        return None


class AudioStreamProcessor:
    """Per-message audio pipeline shared by the audio node and offline extraction.

    ``process(data, fmt, stamp_s)`` for stamped messages (stamp = capture time of the first
    sample); ``process_headerless(data, fmt, arrival_s)`` for ``AudioData`` (the first arrival
    starts the clock, then sample counts advance it; a message arriving more than ``max_lag_s``
    after its sample-count time restarts it, e.g. after the microphone paused). Both return
    completed windows and raise :class:`AudioDecodeError` for undecodable input, leaving the
    stream state unchanged.
    """

    def __init__(self, sample_rate_out: int = DEFAULT_SAMPLE_RATE_OUT, window_s: float = DEFAULT_WINDOW_S,
                 hop_s: float = DEFAULT_HOP_S, stamp_tolerance_s: float = DEFAULT_STAMP_TOLERANCE_S,
                 max_lag_s: float = DEFAULT_MAX_LAG_S) -> None:
        self.windower = AudioWindower(sample_rate_out, window_s, hop_s, stamp_tolerance_s)
        self.max_lag_s = float(max_lag_s)
        self.format_changes = 0
        self.lag_resets = 0
        self._format: Optional[AudioFormat] = None

    @property
    def resets(self) -> int:
        """Every time buffered audio was discarded: stamp discontinuities, rate/format changes, lag."""
        w = self.windower
        return w.discontinuities + w.rate_changes + self.format_changes + self.lag_resets

    def _decode(self, data: Any, fmt: AudioFormat) -> np.ndarray:
        error = fmt.validate()
        if error:
            raise AudioDecodeError(error)
        samples = decode_pcm(data, fmt.sample_format, fmt.channels)
        # A new rate resets the windower by itself (and is counted there); other changes reset here.
        if (self._format is not None and fmt != self._format
                and int(fmt.sample_rate) == int(self._format.sample_rate)):
            self.format_changes += 1
            self.windower.reset()
        self._format = fmt
        return samples

    def process(self, data: Any, fmt: AudioFormat, stamp_s: float) -> list:
        """One stamped message -> completed windows."""
        samples = self._decode(data, fmt)
        return self.windower.push(samples, int(fmt.sample_rate), float(stamp_s))

    def process_headerless(self, data: Any, fmt: AudioFormat, arrival_s: float) -> list:
        """One headerless message that arrived at ``arrival_s`` -> completed windows.

        A message arrives after its last sample was captured, so a new clock starts at
        ``arrival_s`` minus the message's duration; later messages continue it by sample count.
        """
        samples = self._decode(data, fmt)
        rate = int(fmt.sample_rate)
        duration = samples.size / rate
        expected = self.windower.expected_stamp()
        stamp: Optional[float] = None
        if expected is None or self.windower.sample_rate_in != rate:
            stamp = float(arrival_s) - duration
        elif arrival_s - (expected + duration) > self.max_lag_s:
            self.lag_resets += 1
            self.windower.reset()
            stamp = float(arrival_s) - duration
        return self.windower.push(samples, rate, stamp)


@dataclass(frozen=True)
class WindowEmbedding:
    """The encoder output for one window; ``vector`` is None when invalid (``reason`` says why)."""

    end_stamp_s: float
    vector: Optional[np.ndarray]
    reason: str  # 'ok', 'silent' or 'invalid' (the encoder found nothing to encode)

    @property
    def valid(self) -> bool:
        return self.vector is not None


def embed_windows(encoder, windows: Sequence[AudioWindow],
                  silence_threshold_dbfs: float = DEFAULT_SILENCE_THRESHOLD_DBFS) -> list:
    """Encode windows with a waveform encoder plugin; silent windows are invalid and not encoded."""
    results: list = [None] * len(windows)
    audible = []
    for index, window in enumerate(windows):
        if is_silent(window.samples, silence_threshold_dbfs):
            results[index] = WindowEmbedding(window.end_stamp_s, None, 'silent')
        else:
            audible.append(index)
    if audible:
        encoded = encoder.encode_batch([windows[i].samples for i in audible])
        for row, index in enumerate(audible):
            valid = bool(encoded.valid[row])
            vector = np.asarray(encoded.embeddings[row], np.float32) if valid else None
            results[index] = WindowEmbedding(windows[index].end_stamp_s, vector,
                                             'ok' if valid else 'invalid')
    return results
