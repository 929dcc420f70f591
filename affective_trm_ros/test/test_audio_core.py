"""core.audio: PCM decoding, streaming resampling, windowing with stamps, silence, per-message processing."""

import math

import numpy as np
import pytest
from scipy.signal import resample_poly

from affective_trm_ros.core.audio import (
    AudioDecodeError,
    AudioFormat,
    AudioStreamProcessor,
    AudioWindow,
    AudioWindower,
    StreamingResampler,
    dbfs_to_amplitude,
    decode_pcm,
    embed_windows,
    is_silent,
    rms_dbfs,
)
from affective_trm_ros.core.encoders.base import EncodeResult

T0 = 1_700_000_000.25  # a realistic ROS time (s): stamps keep sub-microsecond precision there


def tone(rate: int, seconds: float, freq: float = 440.0, amplitude: float = 0.3, seed: int = 0) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    noise = np.random.default_rng(seed).standard_normal(t.size) * 0.01
    return (amplitude * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def feed(windower, samples, rate, chunk_sizes, t0=T0):
    """Push `samples` in chunks of the given sizes (cycled), each stamped from the sample clock."""
    windows, start, index = [], 0, 0
    while start < samples.size:
        size = chunk_sizes[index % len(chunk_sizes)]
        index += 1
        windows += windower.push(samples[start:start + size], rate, t0 + start / rate)
        start += size
    return windows


# ---------------------------------------------------------------- decode_pcm

def test_decode_integer_formats():
    np.testing.assert_array_equal(decode_pcm(np.array([0, 16384, -32768], '<i2').tobytes(), 'S16LE', 1),
                                  [0.0, 0.5, -1.0])
    np.testing.assert_array_equal(decode_pcm(np.array([0, 16384, -32768], '>i2').tobytes(), 'S16BE', 1),
                                  [0.0, 0.5, -1.0])
    np.testing.assert_array_equal(decode_pcm(np.array([2**30, -2**31], '<i4').tobytes(), 's32le', 1),
                                  [0.5, -1.0])
    np.testing.assert_array_equal(decode_pcm(bytes([128, 192, 0]), 'U8', 1), [0.0, 0.5, -1.0])
    # S24LE: 0x400000 = +0.5, 0x800000 = -1.0, 0xFFFFFF = -1 LSB
    data = bytes([0x00, 0x00, 0x40, 0x00, 0x00, 0x80, 0xFF, 0xFF, 0xFF])
    np.testing.assert_allclose(decode_pcm(data, 'S24LE', 1), [0.5, -1.0, -1 / 2**23], rtol=0, atol=1e-9)


def test_decode_float_formats():
    values = np.array([0.25, -0.75, 1.0], np.float32)
    np.testing.assert_array_equal(decode_pcm(values.astype('<f4').tobytes(), 'F32LE', 1), values)
    np.testing.assert_array_equal(decode_pcm(values.astype('>f4').tobytes(), 'F32BE', 1), values)
    np.testing.assert_array_equal(decode_pcm(values.astype('<f8').tobytes(), 'F64LE', 1), values)


def test_multichannel_is_averaged_to_mono():
    stereo = np.array([[16384, -16384], [32767, 32767], [-32768, 0]], '<i2')  # interleaved L, R
    np.testing.assert_allclose(decode_pcm(stereo.tobytes(), 'S16LE', 2), [0.0, 32767 / 32768, -0.5])
    assert decode_pcm(np.zeros(12, '<i2').tobytes(), 'S16LE', 6).shape == (2,)


def test_decode_accepts_message_containers():
    import array
    raw = np.array([1000, -1000], '<i2').tobytes()
    expected = decode_pcm(raw, 'S16LE', 1)
    for data in (bytearray(raw), array.array('B', raw), list(raw), np.frombuffer(raw, np.uint8)):
        np.testing.assert_array_equal(decode_pcm(data, 'S16LE', 1), expected)
    assert decode_pcm(b'', 'S16LE', 1).size == 0


@pytest.mark.parametrize('data,fmt,channels,match', [
    (b'\x00' * 4, 'S12LE', 1, 'unsupported sample_format'),
    (b'\x00' * 4, 'mp3', 1, 'unsupported sample_format'),
    (b'\x00' * 3, 'S16LE', 1, 'whole number'),
    (b'\x00' * 6, 'S16LE', 2, 'whole number'),
    (b'\x00' * 4, 'S16LE', 0, 'channels'),
    (np.array([0.0, np.nan], '<f4').tobytes(), 'F32LE', 1, 'NaN or Inf'),
    (np.array([np.inf, 0.0], '<f4').tobytes(), 'F32LE', 1, 'NaN or Inf'),
    (np.array([1e6, 0.0], '<f4').tobytes(), 'F32LE', 1, 'outside'),
])
def test_decode_errors(data, fmt, channels, match):
    with pytest.raises(AudioDecodeError, match=match):
        decode_pcm(data, fmt, channels)


def test_int16_data_declared_as_float_is_caught():
    # Loud int16 audio reinterpreted as float32 gives huge or denormal values, not [-1, 1].
    loud = (tone(16000, 0.1, amplitude=0.9) * 32767).astype('<i2').tobytes()
    with pytest.raises(AudioDecodeError):
        decode_pcm(loud, 'F32LE', 1)


# ---------------------------------------------------------------- resampling

@pytest.mark.parametrize('rate_in', [8000, 11025, 22050, 32000, 44100, 48000])
def test_streaming_resampler_matches_resample_poly_and_ignores_chunking(rate_in):
    x = tone(rate_in, 1.5, seed=rate_in)
    whole = StreamingResampler(rate_in, 16000).push(x)
    g = math.gcd(rate_in, 16000)
    reference = resample_poly(x.astype(np.float64), 16000 // g, rate_in // g)
    # Everything but the last few samples (still waiting for look-ahead input) is final.
    assert reference.size - 20 <= whole.size <= reference.size
    np.testing.assert_allclose(whole, reference[:whole.size], rtol=0, atol=1e-6)
    chunked_resampler = StreamingResampler(rate_in, 16000)
    rng = np.random.default_rng(1)
    pieces, start = [], 0
    while start < x.size:
        size = int(rng.integers(1, 3000))
        pieces.append(chunked_resampler.push(x[start:start + size]))
        start += size
    np.testing.assert_array_equal(np.concatenate(pieces), whole)   # bit for bit


def test_same_rate_passes_through():
    x = tone(16000, 0.2)
    np.testing.assert_array_equal(StreamingResampler(16000, 16000).push(x), x)


# ---------------------------------------------------------------- windowing and stamps

def test_windows_are_stamped_at_their_end_from_the_sample_clock():
    x = tone(16000, 3.0)
    windows = feed(AudioWindower(16000, 1.0, 0.5), x, 16000, [320])
    assert [round(w.end_stamp_s - T0, 9) for w in windows] == [1.0, 1.5, 2.0, 2.5, 3.0]
    for w in windows:
        end = int(round((w.end_stamp_s - T0) * 16000))
        np.testing.assert_array_equal(w.samples, x[end - 16000:end])
        assert w.samples.dtype == np.float32 and w.start_stamp_s == pytest.approx(w.end_stamp_s - 1.0)


@pytest.mark.parametrize('rate_in', [44100, 48000, 8000])
def test_windows_do_not_depend_on_chunk_sizes(rate_in):
    x = tone(rate_in, 4.0, seed=3)
    runs = [feed(AudioWindower(16000, 1.0, 0.5), x, rate_in, sizes)
            for sizes in ([rate_in // 100], [1024], [4096, 17, 999], [rate_in * 4])]
    reference = runs[0]
    assert len(reference) >= 6
    for windows in runs[1:]:
        count = min(len(windows), len(reference))
        assert count >= len(reference) - 1       # the last window may wait for look-ahead input
        for a, b in zip(windows[:count], reference[:count]):
            assert a.end_stamp_s == b.end_stamp_s
            np.testing.assert_array_equal(a.samples, b.samples)


def test_windows_equal_the_resampled_whole_signal():
    x = tone(48000, 3.0, seed=5)
    windows = feed(AudioWindower(16000, 1.0, 0.5), x, 48000, [960])
    whole = resample_poly(x.astype(np.float64), 1, 3)
    for w in windows:
        end = int(round((w.end_stamp_s - T0) * 16000))
        np.testing.assert_allclose(w.samples, whole[end - 16000:end], atol=1e-6)


def test_stamp_jitter_within_tolerance_keeps_the_sample_clock():
    x = tone(16000, 2.0)
    rng = np.random.default_rng(2)
    windower = AudioWindower(16000, 1.0, 0.5, stamp_tolerance_s=0.05)
    windows = []
    for start in range(0, x.size, 800):
        jitter = float(rng.uniform(-0.03, 0.03)) if start else 0.0   # the first stamp starts the clock
        windows += windower.push(x[start:start + 800], 16000, T0 + start / 16000 + jitter)
    assert [round(w.end_stamp_s - T0, 9) for w in windows] == [1.0, 1.5, 2.0]
    assert windower.discontinuities == 0


@pytest.mark.parametrize('jump_s', [0.5, -0.5, 3600.0])
def test_gap_or_jump_resets_the_buffer_and_is_counted(jump_s):
    x = tone(16000, 1.2)
    windower = AudioWindower(16000, 1.0, 0.5, stamp_tolerance_s=0.1)
    before = feed(windower, x, 16000, [1600])
    assert [round(w.end_stamp_s - T0, 6) for w in before] == [1.0]
    restart = T0 + 1.2 + jump_s
    after = feed(windower, x, 16000, [1600], t0=restart)
    assert windower.discontinuities == 1
    # No window spans the discontinuity: the first one after it covers a full second of new audio.
    assert [round(w.end_stamp_s - restart, 6) for w in after] == [1.0]
    np.testing.assert_array_equal(after[0].samples, x[:16000])


def test_sample_rate_change_resets():
    windower = AudioWindower()
    windower.push(tone(16000, 0.7), 16000, T0)
    windows = windower.push(tone(48000, 1.2), 48000, T0 + 0.7)
    assert windower.rate_changes == 1 and windower.discontinuities == 0
    assert [round(w.end_stamp_s - (T0 + 0.7), 6) for w in windows] == [1.0]


def test_buffer_stays_bounded_over_a_long_stream():
    windower = AudioWindower(16000, 1.0, 0.5)
    x = tone(44100, 1.0)
    count = 0
    for second in range(60):
        count += len(windower.push(x, 44100, T0 + second))
        assert windower._segment.buffer.size <= 16000 + x.size   # noqa: SLF001 - checking the bound
    assert count == 118   # ends at 1.0, 1.5, ..., 59.5 s; the one at 60 s waits for look-ahead input


def test_hop_longer_than_window():
    x = tone(16000, 5.0)
    windows = feed(AudioWindower(16000, 0.5, 2.0), x, 16000, [700])
    assert [round(w.end_stamp_s - T0, 6) for w in windows] == [0.5, 2.5, 4.5]
    np.testing.assert_array_equal(windows[1].samples, x[32000:40000])


def test_bad_configuration_and_samples():
    with pytest.raises(ValueError, match='hop_s'):
        AudioWindower(16000, 1.0, 0.0)
    with pytest.raises(ValueError, match='window_s'):
        AudioWindower(16000, -1.0, 0.5)
    with pytest.raises(AudioDecodeError, match='NaN'):
        AudioWindower().push(np.array([0.0, np.nan], np.float32), 16000, T0)
    with pytest.raises(ValueError, match='needs a stamp'):
        AudioWindower().push(np.zeros(10, np.float32), 16000, None)


# ---------------------------------------------------------------- silence

def test_levels_and_silence():
    square = np.tile(np.array([1.0, -1.0], np.float32), 800)
    assert rms_dbfs(square) == pytest.approx(0.0)
    assert rms_dbfs(square * 1e-3) == pytest.approx(-60.0)
    assert rms_dbfs(np.zeros(100, np.float32)) == -math.inf
    assert is_silent(np.zeros(100, np.float32), -60.0)
    assert is_silent(np.zeros(0, np.float32), -60.0)
    assert is_silent(square * 1e-4, -60.0) and not is_silent(square * 1e-2, -60.0)
    # the audio node hands plugins its dBFS level as an RMS amplitude: the inverse of rms_dbfs
    assert dbfs_to_amplitude(-20.0) == pytest.approx(0.1) and dbfs_to_amplitude(0.0) == 1.0
    assert rms_dbfs(square * dbfs_to_amplitude(-37.5)) == pytest.approx(-37.5)


# ---------------------------------------------------------------- per message

def s16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype('<i2').tobytes()


def test_stream_processor_stamped_messages():
    fmt = AudioFormat(44100, 2, 'S16LE')
    mono = tone(44100, 2.0)
    stereo = np.repeat(mono[:, None], 2, axis=1).reshape(-1)
    processor = AudioStreamProcessor()
    windows = []
    for start in range(0, mono.size, 2205):           # 50 ms messages
        windows += processor.process(s16(stereo[2 * start:2 * (start + 2205)]), fmt, T0 + start / 44100)
    assert [round(w.end_stamp_s - T0, 6) for w in windows] == [1.0, 1.5]   # 2.0 waits for look-ahead
    assert all(w.samples.size == 16000 for w in windows)


def test_stream_processor_headerless_clock_starts_at_first_arrival():
    fmt = AudioFormat(16000, 1, 'S16LE')
    chunk = s16(tone(16000, 0.1))
    processor = AudioStreamProcessor(max_lag_s=1.0)
    windows = []
    for i in range(15):   # arrivals jitter by up to 40 ms; the sample clock ignores that
        windows += processor.process_headerless(chunk, fmt, arrival_s=T0 + 0.1 * (i + 1) + 0.04 * (i % 2))
    # The first message arrived at T0 + 0.1 carrying 0.1 s: its first sample was captured at T0.
    assert [round(w.end_stamp_s - T0, 6) for w in windows] == [1.0, 1.5]
    # A message 5 s late (the microphone paused) restarts the clock at its arrival.
    processor.process_headerless(chunk, fmt, arrival_s=T0 + 6.6)
    assert processor.lag_resets == 1
    assert processor.windower.expected_stamp() == pytest.approx(T0 + 6.6)


def test_stream_processor_rejects_bad_messages_without_losing_its_state():
    fmt = AudioFormat(16000, 1, 'S16LE')
    processor = AudioStreamProcessor()
    processor.process(s16(tone(16000, 0.6)), fmt, T0)
    with pytest.raises(AudioDecodeError):
        processor.process(b'\x00\x01\x02', fmt, T0 + 0.6)
    with pytest.raises(AudioDecodeError, match='coding_format'):
        processor.process(b'\x00' * 100, AudioFormat(16000, 1, 'S16LE', 'mp3'), T0 + 0.6)
    with pytest.raises(AudioDecodeError, match='sample_format'):
        processor.process(b'\x00' * 100, AudioFormat(16000, 1, 'S7LE'), T0 + 0.6)
    windows = processor.process(s16(tone(16000, 0.6)), fmt, T0 + 0.6)
    assert [round(w.end_stamp_s - T0, 6) for w in windows] == [1.0]
    assert processor.resets == 0


def test_stream_processor_format_change_resets():
    processor = AudioStreamProcessor()
    processor.process(s16(tone(16000, 0.6)), AudioFormat(16000, 1, 'S16LE'), T0)
    processor.process(np.zeros(3200, '<f4').tobytes(), AudioFormat(16000, 1, 'F32LE'), T0 + 0.6)
    assert processor.format_changes == 1 and processor.resets == 1


class _FakeEncoder:
    """A waveform encoder whose 'embedding' is [rms, peak]; windows with peak > 0.9 are invalid."""

    dim = 2

    def __init__(self):
        self.calls = 0

    def encode_batch(self, inputs):
        self.calls += 1
        rows = np.array([[np.sqrt(np.mean(x ** 2)), np.abs(x).max()] for x in inputs], np.float32)
        return EncodeResult(rows, rows[:, 1] <= 0.9)


def test_embed_windows_skips_silence_and_keeps_encoder_validity():
    loud, quiet, clipped = (np.full(16000, v, np.float32) for v in (0.3, 1e-5, 0.95))
    windows = [AudioWindow(T0 + i, x) for i, x in enumerate((loud, quiet, clipped))]
    encoder = _FakeEncoder()
    results = embed_windows(encoder, windows, silence_threshold_dbfs=-60.0)
    assert [r.reason for r in results] == ['ok', 'silent', 'invalid']
    assert [r.valid for r in results] == [True, False, False]
    assert [r.end_stamp_s for r in results] == [T0, T0 + 1, T0 + 2]
    np.testing.assert_allclose(results[0].vector, [0.3, 0.3], rtol=1e-6)
    assert encoder.calls == 1                             # one batch for the audible windows
    assert embed_windows(encoder, windows[1:2], -60.0)[0].reason == 'silent' and encoder.calls == 1


def test_audio_format_from_an_audio_info_message():
    from types import SimpleNamespace

    info = SimpleNamespace(channels=2, sample_rate=44100, sample_format=' s16le ', bitrate=0,
                           coding_format='wave')
    fmt = AudioFormat.from_info(info)
    assert fmt == AudioFormat(44100, 2, 'S16LE', 'wave') and fmt.validate() is None
    assert 'sample_rate' in AudioFormat(0, 1, 'S16LE').validate()
    assert 'channels' in AudioFormat(16000, 0, 'S16LE').validate()
