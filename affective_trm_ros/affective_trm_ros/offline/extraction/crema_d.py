"""CREMA-D as published -> feature store.

Layout expected under the dataset root (as distributed by its authors)::

    AudioWAV/<ActorID>_<Sentence>_<Emotion>_<Intensity>.wav
    VideoFlash/<ActorID>_<Sentence>_<Emotion>_<Intensity>.flv

CREMA-D has categorical labels only; each clip gets one valence/arousal target drawn around the
emotion's centroid (the mapping of the AffectiveTRM prototype): centroid × intensity scale plus
Gaussian noise, clipped to [-1, 1]. The draw is seeded per clip name, so a restarted or partial
preparation gives every clip the same label. Every video frame of the clip carries that label.

Features come per video frame at the clip's own frame rate; audio is windowed over the whole clip
and aligned to the frames by time; the sentence text (known from the sentence code) is entered
at the start of the clip. The speaker id is the ActorID, which makes speaker-independent splits
possible.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

# The prototype's valence/arousal centroid of each CREMA-D emotion code.
EMOTION_CENTROIDS = {
    'ANG': (-0.6, 0.7),  # anger
    'DIS': (-0.7, 0.3),  # disgust
    'FEA': (-0.3, 0.8),  # fear
    'HAP': (0.7, 0.6),  # happy
    'SAD': (-0.7, -0.5),  # sad
    'NEU': (0.0, 0.0),  # neutral
}
# Intensity code -> scale of the centroid; 'XX' (unspecified) is drawn uniformly from XX_RANGE.
INTENSITY_SCALES = {'LO': 0.6, 'MD': 1.0, 'HI': 1.2}
XX_RANGE = (0.7, 1.2)
# Spread of the labels around the scaled centroid; neutral clips stay closer to the origin.
NOISE_SIGMA = 0.15
NEUTRAL_NOISE_SIGMA = 0.08
# The twelve CREMA-D sentences, by sentence code.
SENTENCES = {
    'IEO': "It's eleven o'clock",
    'TIE': 'That is exactly what happened',
    'IOM': "I'm on my way to the meeting",
    'IWW': 'I wonder what this is about',
    'TAI': 'The airplane is almost full',
    'MTI': 'Maybe tomorrow it will be cold',
    'IWL': 'I would like a new alarm clock',
    'ITH': "I think I have a doctor's appointment",
    'DFA': "Don't forget a jacket",
    'ITS': "I think I've seen this before",
    'TSI': 'The surface is slick',
    'WSI': "We'll stop in a couple of minutes",
}
AUDIO_DIR = 'AudioWAV'
VIDEO_DIR = 'VideoFlash'
DEFAULT_LABEL_SEED = 0


@dataclass(frozen=True)
class CremaClip:
    """One CREMA-D recording, parsed from its file name."""

    name: str  # e.g. '1001_DFA_ANG_XX'
    actor: str  # '1001'
    sentence: str  # code, e.g. 'DFA'
    emotion: str  # code, e.g. 'ANG'
    intensity: str  # 'LO' | 'MD' | 'HI' | 'XX'
    audio_path: Optional[Path] = None
    video_path: Optional[Path] = None

    @property
    def text(self) -> str:
        return SENTENCES[self.sentence]


def parse_clip_name(name: str) -> CremaClip:
    """Parse ``ActorID_Sentence_Emotion_Intensity`` (with or without extension); ValueError if malformed."""
    stem = Path(name).name.split('.')[0]
    parts = stem.split('_')
    if len(parts) != 4:
        raise ValueError(f"'{name}' is not a CREMA-D clip name (ActorID_Sentence_Emotion_Intensity)")
    actor, sentence, emotion, intensity = parts
    if not actor.isdigit():
        raise ValueError(f"'{name}': actor id '{actor}' is not numeric")
    if sentence not in SENTENCES:
        raise ValueError(f"'{name}': unknown sentence code '{sentence}' (known: {sorted(SENTENCES)})")
    if emotion not in EMOTION_CENTROIDS:
        raise ValueError(f"'{name}': unknown emotion code '{emotion}' (known: {sorted(EMOTION_CENTROIDS)})")
    if intensity not in INTENSITY_SCALES and intensity != 'XX':
        raise ValueError(f"'{name}': unknown intensity code '{intensity}' (known: LO, MD, HI, XX)")
    return CremaClip(stem, actor, sentence, emotion, intensity)


def clip_label(clip: CremaClip, seed: int = DEFAULT_LABEL_SEED) -> np.ndarray:
    """The clip's (valence, arousal) target: centroid × intensity + noise, clipped to [-1, 1].

    The random draws depend only on ``seed`` and the clip name (not on the order clips are seen).
    """
    rng = np.random.default_rng([int(seed), zlib.crc32(clip.name.encode())])
    if clip.intensity == 'XX':
        scale = rng.uniform(*XX_RANGE)
    else:
        scale = INTENSITY_SCALES[clip.intensity]
    sigma = NEUTRAL_NOISE_SIGMA if clip.emotion == 'NEU' else NOISE_SIGMA
    target = np.asarray(EMOTION_CENTROIDS[clip.emotion], dtype=np.float64) * scale
    target = target + rng.normal(0.0, sigma, size=2)
    return np.clip(target, -1.0, 1.0).astype(np.float32)


def discover_clips(root) -> tuple[list, list]:
    """Clips with both an audio and a video file under ``root``; returns (clips, problems).

    ``problems`` lists human-readable reasons for files that were skipped (bad names, a missing
    partner file), so the caller can report them instead of failing silently.
    """
    root = Path(root)
    audio_dir, video_dir = root / AUDIO_DIR, root / VIDEO_DIR
    if not audio_dir.is_dir() or not video_dir.is_dir():
        raise FileNotFoundError(
            f'{root} does not look like CREMA-D: expected folders {AUDIO_DIR}/ and {VIDEO_DIR}/ inside it'
        )
    videos = {path.stem: path for path in video_dir.glob('*.flv')}
    clips, problems = [], []
    for audio in sorted(audio_dir.glob('*.wav')):
        try:
            clip = parse_clip_name(audio.name)
        except ValueError as error:
            problems.append(str(error))
            continue
        video = videos.get(clip.name)
        if video is None:
            problems.append(f'{clip.name}: no {VIDEO_DIR}/{clip.name}.flv')
            continue
        clips.append(
            CremaClip(
                clip.name,
                clip.actor,
                clip.sentence,
                clip.emotion,
                clip.intensity,
                audio_path=audio,
                video_path=video,
            )
        )
    audio_names = {path.stem for path in audio_dir.glob('*.wav')}
    problems += [f'{name}: no {AUDIO_DIR}/{name}.wav' for name in sorted(set(videos) - audio_names)]
    return clips, problems


def prepare_crema_d(
    root,
    store,
    extractor,
    *,
    label_seed: int = DEFAULT_LABEL_SEED,
    limit: Optional[int] = None,
    progress: bool = True,
    clips: Optional[list] = None,
    problems: Optional[list] = None,
) -> dict:
    """Extract every clip under ``root`` into ``store``, skipping clips already there.

    ``extractor``: a :class:`~.extraction.SessionExtractor` (encoders, windowing, alignment).
    ``limit``: only the first N clips (sorted by name), for trial runs. ``clips``/``problems``: the
    result of :func:`discover_clips` when the caller has already looked (``limit`` then does not
    apply). A clip whose video or audio cannot be read (corrupt, empty, truncated) is skipped and
    listed in ``problems`` with the reason; the run goes on.
    Returns a summary dict: clips found, written, skipped (already in the store), problems.
    """
    from tqdm.auto import tqdm

    from affective_trm_ros.offline.io.media import MediaError, load_wav, read_video_frames

    if clips is None:
        clips, problems = discover_clips(root)
        if limit is not None:
            clips = clips[:limit]
    problems = list(problems or [])
    written = skipped = 0
    for clip in tqdm(clips, desc='CREMA-D clips', unit='clip', disable=not progress):
        if store.has(clip.name):
            skipped += 1
            continue
        try:
            frames, fps = read_video_frames(clip.video_path)
            waveform, sample_rate = load_wav(clip.audio_path)
            result = extractor.extract(frames, audio=(waveform, sample_rate), texts=[(0.0, clip.text)])
        except (MediaError, ValueError) as error:  # one bad file skips its clip, not the run
            problems.append(f'{clip.name}: {error}')
            continue
        label = clip_label(clip, label_seed)
        labels = np.repeat(label[None, :], len(result.timestamps), axis=0)
        result.write(store, clip.name, speaker=clip.actor, labels=labels, meta={
            'source': 'crema-d', 'emotion': clip.emotion, 'intensity': clip.intensity,
            'sentence': clip.sentence, 'text': clip.text, 'fps': fps, 'label_seed': label_seed})
        written += 1
    store.update_info(
        source='crema-d',
        label_seed=label_seed,
        encoders=extractor.identities(),
        extraction=extractor.config.as_dict(),
    )
    return {'clips': len(clips), 'written': written, 'skipped': skipped, 'problems': problems}
