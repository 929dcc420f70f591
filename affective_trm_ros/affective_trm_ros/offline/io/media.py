"""Reading media files for offline preparation: video frames (OpenCV) and audio (WAV or container).

* Video: OpenCV's bundled FFmpeg decodes .flv, .mp4, .avi, .mkv, ... Frames come out as RGB
  uint8 arrays, the input the video encoder plugins expect, stamped ``index / fps`` seconds.
* Audio: WAV files through SciPy; the audio track of a video container through PyAV (the ``av``
  package, which bundles FFmpeg's libraries). Without PyAV, pass the audio as a side WAV file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Used when a container reports no (or an absurd) frame rate.
FALLBACK_FPS = 30.0
MAX_PLAUSIBLE_FPS = 1000.0


class MediaError(RuntimeError):
    """A media file could not be opened or decoded; the message names the file and the reason."""


@dataclass
class VideoFrames:
    """A decodable video: its frame rate and an iterator over (stamp_s, RGB frame)."""

    path: Path
    fps: float
    frame_count: int  # as reported by the container (may be approximate)

    def __iter__(self) -> Iterator[tuple]:
        import cv2

        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            raise MediaError(f'cannot open video {self.path}')
        try:
            index = 0
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                yield index / self.fps, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                index += 1
        finally:
            capture.release()
        if index == 0:
            raise MediaError(f'video {self.path} contains no decodable frame')


def read_video_frames(path) -> tuple[VideoFrames, float]:
    """Open a video for frame-by-frame reading; returns (frames, fps). Frames are decoded lazily."""
    import cv2

    path = Path(path)
    if not path.exists():
        raise MediaError(f'video file {path} does not exist')
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise MediaError(f'OpenCV cannot open video {path} (unsupported container or codec)')
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    capture.release()
    if not (0.0 < fps <= MAX_PLAUSIBLE_FPS):
        fps = FALLBACK_FPS
    frames = VideoFrames(path, fps, count)
    return frames, fps


def load_wav(path) -> tuple[np.ndarray, int]:
    """A WAV file as float32 mono in [-1, 1] and its sample rate (integer PCM is scaled).

    MediaError says what is wrong: missing, empty, not a WAV file (corrupt header), truncated
    (fewer bytes than its header announces) or without samples.
    """
    import warnings

    from scipy.io import wavfile

    path = Path(path)
    if not path.exists():
        raise MediaError(f'audio file {path} does not exist')
    if path.stat().st_size == 0:
        raise MediaError(f'audio file {path} is empty (0 bytes)')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', wavfile.WavFileWarning)
        try:
            sample_rate, data = wavfile.read(str(path))
        except (ValueError, EOFError, OSError) as error:
            raise MediaError(f'cannot read WAV file {path} (corrupt or not a WAV file): {error}') from error
    truncated = _wav_truncation(path)
    if truncated:
        raise MediaError(f'WAV file {path} is truncated: {truncated}')
    for warning in caught:
        if 'EOF' in str(warning.message) or 'premature' in str(warning.message).lower():
            raise MediaError(f'WAV file {path} is truncated: {warning.message}')
    if data.size == 0:
        raise MediaError(f'WAV file {path} holds no samples')
    return _to_float_mono(data), int(sample_rate)


def _wav_truncation(path: Path) -> str:
    """'' for a complete RIFF/WAVE file, else what is missing (the data chunk's size vs the file's)."""
    import struct

    size = path.stat().st_size
    with open(path, 'rb') as handle:
        if handle.read(4) != b'RIFF':
            return ''
        handle.seek(12)
        while True:
            header = handle.read(8)
            if len(header) < 8:
                return ''
            chunk_id, chunk_size = header[:4], struct.unpack('<I', header[4:])[0]
            start = handle.tell()
            if chunk_id == b'data':
                if chunk_size in (0, 0xFFFFFFFF):  # written by a streaming recorder: length unknown
                    return ''
                available = size - start
                if chunk_size > available:
                    return f'its header announces {chunk_size} bytes of samples, the file holds {available}'
                return ''
            handle.seek(start + chunk_size + (chunk_size & 1))


def _to_float_mono(data: np.ndarray) -> np.ndarray:
    if data.dtype == np.uint8:
        samples = (data.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(data.dtype, np.integer):
        samples = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    else:
        samples = data.astype(np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    return np.ascontiguousarray(samples, dtype=np.float32)


def load_container_audio(path) -> tuple[np.ndarray, int]:
    """The first audio track of a video/audio container as float32 mono and its sample rate."""
    path = Path(path)
    if not path.exists():
        raise MediaError(f'media file {path} does not exist')
    if path.suffix.lower() == '.wav':
        return load_wav(path)
    try:
        import av
    except ImportError as error:
        raise MediaError(
            f'decoding the audio track of {path} needs PyAV (pip install av); or extract '
            f'it to a WAV file (ffmpeg -i {path.name} -ac 1 audio.wav) and pass that'
        ) from error
    try:
        container = av.open(str(path))
    except Exception as error:  # PyAV raises several FFmpeg error types
        raise MediaError(f'cannot open {path}: {error}') from error
    with container:
        if not container.streams.audio:
            raise MediaError(f'{path} has no audio track; pass the audio as a separate WAV file')
        stream = container.streams.audio[0]
        sample_rate = int(stream.rate or stream.codec_context.sample_rate)
        resampler = av.AudioResampler(format='flt', layout='mono', rate=sample_rate)
        chunks = []
        for frame in container.decode(stream):
            for converted in resampler.resample(frame):
                chunks.append(converted.to_ndarray().reshape(-1))
        for converted in resampler.resample(None):
            chunks.append(converted.to_ndarray().reshape(-1))
    if not chunks:
        raise MediaError(f'the audio track of {path} decoded to no samples')
    return np.concatenate(chunks).astype(np.float32), sample_rate
