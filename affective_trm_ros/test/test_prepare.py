"""Preparation sources: CREMA-D (names, labels, extraction) and video + CSV, on generated media files."""

import csv

import cv2
import numpy as np
import pytest
from scipy.io import wavfile

from affective_trm_ros.core.encoders.base import Encoder, EncodeResult
from affective_trm_ros.offline.extraction import crema_d
from affective_trm_ros.offline.extraction.crema_d import (
    EMOTION_CENTROIDS,
    SENTENCES,
    clip_label,
    discover_clips,
    parse_clip_name,
    prepare_crema_d,
)
from affective_trm_ros.offline.extraction.pipeline import ExtractionConfig, SessionExtractor
from affective_trm_ros.offline.extraction.video_csv import (
    LabelFileError,
    labels_for_frames,
    prepare_video,
    read_label_csv,
)
from affective_trm_ros.offline.io.feature_store import FeatureStore
from affective_trm_ros.offline.io.media import MediaError, load_container_audio, load_wav, read_video_frames

FPS = 15
SAMPLE_RATE = 16000


# ---------------------------------------------------------------- tiny encoder plugins


class BrightnessEncoder(Encoder):
    """Video: mean R, G, B in [0, 1]; a dark frame holds 'no face' (invalid)."""

    modality, input_kind, dim = 'video', 'rgb_image', 3

    def _encode_batch(self, inputs):
        means = np.stack([np.asarray(frame, np.float32).reshape(-1, 3).mean(0) / 255 for frame in inputs])
        return EncodeResult(means.astype(np.float32), means.mean(1) > 0.05)


class LevelEncoder(Encoder):
    """Audio: RMS and peak of the window, and its length in seconds."""

    modality, input_kind, dim, sample_rate = 'audio', 'waveform', 3, SAMPLE_RATE

    def _encode_batch(self, inputs):
        rows = [[np.sqrt(np.mean(np.square(w))), np.abs(w).max(), w.size / SAMPLE_RATE] for w in inputs]
        return EncodeResult(np.asarray(rows, np.float32), np.ones(len(inputs), bool))


class WordEncoder(Encoder):
    """Text: characters and words."""

    modality, input_kind, dim = 'text', 'text', 2

    def _encode_batch(self, inputs):
        rows = [[len(text), len(text.split())] for text in inputs]
        return EncodeResult(np.asarray(rows, np.float32), np.array([bool(t.strip()) for t in inputs]))


def make_encoders():
    encoders = {
        'video': BrightnessEncoder(device='cpu'),
        'audio': LevelEncoder(device='cpu'),
        'text': WordEncoder(device='cpu'),
    }
    for modality, encoder in encoders.items():
        encoder.plugin_id = f'test_{modality}'
    return encoders


# ---------------------------------------------------------------- media writers


def write_wav(path, seconds, amplitude=0.3, rate=SAMPLE_RATE):
    t = np.arange(int(seconds * rate)) / rate
    wavfile.write(str(path), rate, (amplitude * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16))


def write_video(path, frames, fourcc='FLV1', dark=(), image=None):
    """Uniform frames of rising brightness (black where ``dark``), or ``image`` (RGB) in every frame."""
    height, width = (24, 32) if image is None else image.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, (width, height))
    assert writer.isOpened(), f'OpenCV cannot write {path}'
    for index in range(frames):
        if image is not None:
            writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        else:
            writer.write(np.full((height, width, 3), 0 if index in dark else 60 + 5 * index, np.uint8))
    writer.release()


@pytest.fixture
def crema_root(tmp_path):
    root = tmp_path / 'CREMA-D'
    (root / 'AudioWAV').mkdir(parents=True)
    (root / 'VideoFlash').mkdir()
    for name, dark in (
        ('1001_DFA_ANG_XX', (0, 1)),
        ('1001_IEO_HAP_HI', ()),
        ('1002_TIE_NEU_XX', ()),
        ('1003_ITS_SAD_LO', ()),
    ):
        write_wav(root / 'AudioWAV' / f'{name}.wav', 1.6)
        write_video(root / 'VideoFlash' / f'{name}.flv', 24, dark=dark)
    write_wav(root / 'AudioWAV' / '1004_WSI_FEA_MD.wav', 1.0)  # no video partner
    write_wav(root / 'AudioWAV' / 'notes.wav', 0.2)  # not a CREMA-D name
    return root


# ---------------------------------------------------------------- CREMA-D labels


def test_parse_clip_name_and_sentence_texts():
    clip = parse_clip_name('AudioWAV/1076_MTI_SAD_XX.wav')
    assert (clip.actor, clip.sentence, clip.emotion, clip.intensity) == ('1076', 'MTI', 'SAD', 'XX')
    assert clip.text == 'Maybe tomorrow it will be cold'
    assert len(SENTENCES) == 12 and SENTENCES['IEO'] == "It's eleven o'clock"
    for bad in ('1001_DFA_ANG', 'abc_DFA_ANG_XX', '1001_XXX_ANG_XX', '1001_DFA_JOY_XX', '1001_DFA_ANG_ZZ'):
        with pytest.raises(ValueError):
            parse_clip_name(bad)


def draws(emotion, intensity, n=3000, seed=0):
    return np.stack(
        [
            clip_label(
                parse_clip_name(
                    f'{1001 + i % 91}_{list(SENTENCES)[i % 12]}_{emotion}_{intensity}'.replace(
                        f'{1001 + i % 91}_', f'{1001 + i}_'
                    )
                ),
                seed,
            )
            for i in range(n)
        ]
    )


def test_labels_are_seeded_per_clip_and_reproducible():
    clip = parse_clip_name('1001_DFA_ANG_XX')
    np.testing.assert_array_equal(clip_label(clip, 0), clip_label(clip, 0))
    assert not np.array_equal(clip_label(clip, 0), clip_label(clip, 1))
    assert not np.array_equal(clip_label(clip, 0), clip_label(parse_clip_name('1002_DFA_ANG_XX'), 0))


def test_labels_follow_centroid_intensity_and_noise():
    sad_lo = draws('SAD', 'LO')  # -0.42, -0.30: far from the clipping bounds
    np.testing.assert_allclose(sad_lo.mean(0), np.array(EMOTION_CENTROIDS['SAD']) * 0.6, atol=0.015)
    np.testing.assert_allclose(sad_lo.std(0), [0.15, 0.15], atol=0.01)
    neutral = draws('NEU', 'XX')
    np.testing.assert_allclose(neutral.mean(0), [0, 0], atol=0.01)
    np.testing.assert_allclose(neutral.std(0), [0.08, 0.08], atol=0.006)
    ang_md = draws('ANG', 'MD')
    np.testing.assert_allclose(ang_md.mean(0), EMOTION_CENTROIDS['ANG'], atol=0.015)
    # XX: the scale is uniform in [0.7, 1.2], mean 0.95, and adds spread along the centroid direction.
    fea_xx = draws('FEA', 'XX')
    np.testing.assert_allclose(fea_xx.mean(0), np.array(EMOTION_CENTROIDS['FEA']) * 0.95, atol=0.02)
    expected_std = np.sqrt(0.15**2 + (np.array(EMOTION_CENTROIDS['FEA']) * 0.5 / np.sqrt(12)) ** 2)
    np.testing.assert_allclose(fea_xx[:, 0].std(), expected_std[0], atol=0.01)


def test_labels_are_clipped_to_the_unit_square():
    hap_hi = draws('HAP', 'HI')  # valence centre 0.84: noise pushes some past 1
    assert hap_hi.max() == 1.0 and hap_hi.min() >= -1.0
    assert 0.05 < np.mean(hap_hi[:, 0] == 1.0) < 0.3


# ---------------------------------------------------------------- CREMA-D extraction


def test_discover_reports_unusable_files(crema_root):
    clips, problems = discover_clips(crema_root)
    assert [c.name for c in clips] == [
        '1001_DFA_ANG_XX',
        '1001_IEO_HAP_HI',
        '1002_TIE_NEU_XX',
        '1003_ITS_SAD_LO',
    ]
    assert any('1004_WSI_FEA_MD' in p and 'VideoFlash' in p for p in problems)
    assert any('notes' in p for p in problems)
    with pytest.raises(FileNotFoundError, match='AudioWAV'):
        discover_clips(crema_root / 'AudioWAV')


def test_prepare_crema_d_aligns_every_frame_and_restarts(crema_root, tmp_path):
    extractor = SessionExtractor(make_encoders())
    store = FeatureStore(tmp_path / 'store', encoder_spec=extractor.spec)
    summary = prepare_crema_d(crema_root, store, extractor, label_seed=7, progress=False)
    assert summary['written'] == 4 and summary['skipped'] == 0
    session = store.load('1001_DFA_ANG_XX')
    assert session.speaker == '1001' and session.meta['text'] == "Don't forget a jacket"
    # One step per video frame, at the clip's frame rate.
    np.testing.assert_allclose(session.timestamps, np.arange(24) / FPS)
    # Every frame carries the clip's label.
    np.testing.assert_allclose(
        session.labels, np.repeat(clip_label(parse_clip_name('1001_DFA_ANG_XX'), 7)[None], 24, axis=0)
    )
    mask = dict(zip(store.modalities, session.mask.T))
    # Dark frames hold "no face": video masked there only.
    assert not mask['video'][:2].any() and mask['video'][2:].all()
    # Audio: 1 s windows every 0.5 s over the WHOLE clip (ends at 1.0 and 1.5 s), matched within the
    # 0.3 s slop: frames from 0.7 s to the end have audio, the first ones (no full window yet) do not.
    expected_audio = session.timestamps >= 0.7 - 1e-6
    np.testing.assert_array_equal(mask['audio'], expected_audio)
    late = session.features['audio'][session.timestamps >= 1.25]
    np.testing.assert_allclose(late[:, 2], 1.0)  # a full 1-s window
    assert late[:, 0].min() > 0.15  # RMS of the 0.3-amplitude tone
    # The sentence is known from the start of the clip.
    assert mask['text'].all()
    np.testing.assert_allclose(session.features['text'][0], [len("Don't forget a jacket"), 4])
    # Restart: everything is skipped, nothing is re-extracted.
    calls = []
    extractor.extract = lambda *a, **k: calls.append(1)
    again = prepare_crema_d(crema_root, FeatureStore(tmp_path / 'store'), extractor, progress=False)
    assert again['skipped'] == 4 and again['written'] == 0 and not calls


def test_prepare_command_runs_the_real_plugins(tmp_path, capsys):
    """The CLI path with the real (untrained) plugins and the nodes' configuration."""
    from skimage.data import astronaut

    from affective_trm_ros.cli import main

    root = tmp_path / 'CREMA-D'
    (root / 'AudioWAV').mkdir(parents=True)
    (root / 'VideoFlash').mkdir()
    # 256 px: the face stays findable at the tracked face path's detection scale (0.5) after FLV coding
    face = cv2.resize(astronaut(), (256, 256))
    for name in ('1001_DFA_ANG_XX', '1002_IEO_HAP_HI'):
        write_wav(root / 'AudioWAV' / f'{name}.wav', 1.0)
        write_video(root / 'VideoFlash' / f'{name}.flv', 16, image=face)
    code = main(
        [
            'prepare',
            'crema-d',
            '--root',
            str(root),
            '--store',
            str(tmp_path / 'cli'),
            '--video-encoder',
            'hsemotion_enet_b0',
            '--audio-encoder',
            'dasheng_base',
            '--text-encoder',
            'none',
            '--allow-untrained',
            '--device',
            'cpu',
            '--limit',
            '1',
            '--quiet',
        ]
    )
    output = capsys.readouterr()
    assert code == 0, output.err
    assert output.err.startswith('UNTRAINED encoders') and '1 written' in output.out
    store = FeatureStore(tmp_path / 'cli')
    assert [(e['modality'], e['encoder'], e['dim']) for e in store.encoder_spec] == [
        ('audio', 'dasheng_base', 768),
        ('video', 'hsemotion_enet_b0', 1280),
    ]
    assert store.session_ids() == ['1001_DFA_ANG_XX']
    session = store.load('1001_DFA_ANG_XX')
    assert len(session) == 16 and session.speaker == '1001'
    assert session.mask[:, 1].all()  # the face is found in every frame
    # The one 1-s window ends at 1.0 s: within the 0.3 s slop of the frames from 0.7 s on.
    np.testing.assert_array_equal(session.mask[:, 0], session.timestamps >= 0.7 - 1e-6)
    assert 0 < session.mask[:, 0].sum() < 16
    assert np.abs(session.features['video']).sum() > 0


# ---------------------------------------------------------------- video + CSV


def test_label_csv_conventions(tmp_path):
    path = tmp_path / 'labels.csv'
    path.write_text('time,valence,arousal\n0.0,0.1,0.2\n0.1,-5,-5\n0.2,0.3,\n0.3,0.5,0.6\n')
    times, labels = read_label_csv(path)
    np.testing.assert_allclose(times, [0, 0.1, 0.2, 0.3])
    assert np.isnan(labels[1]).all()  # Aff-Wild2's -5 = unannotated
    assert labels[2, 0] == pytest.approx(0.3) and np.isnan(labels[2, 1])
    # Frames at 15 fps take the nearest row within half the 0.1 s spacing; later frames: unlabelled.
    frames = labels_for_frames(np.arange(8) / FPS, times, labels, FPS)
    np.testing.assert_allclose(frames[0], [0.1, 0.2])
    np.testing.assert_allclose(frames[4], [0.5, 0.6])  # 0.267 s -> row 0.3
    assert np.isnan(frames[6:]).all()  # 0.4 s and later: no row close enough
    per_frame = tmp_path / 'affwild.csv'
    per_frame.write_text('valence,arousal\n0.1,0.2\n0.3,0.4\n')
    times, labels = read_label_csv(per_frame)
    assert times is None
    frames = labels_for_frames(np.arange(3) / FPS, None, labels, FPS)
    np.testing.assert_allclose(frames[:2], [[0.1, 0.2], [0.3, 0.4]]) and np.isnan(frames[2]).all()
    bad = tmp_path / 'bad.csv'
    bad.write_text('t,v,a\n0,0,0\n')
    with pytest.raises(LabelFileError, match='valence'):
        read_label_csv(bad)
    bad.write_text('time,valence,arousal\n0,abc,0\n')
    with pytest.raises(LabelFileError, match=r'bad.csv:2'):
        read_label_csv(bad)


def write_labels(path, seconds, rate=10):
    with open(path, 'w', newline='') as handle:
        writer = csv.writer(handle)
        writer.writerow(['time', 'valence', 'arousal'])
        for i in range(int(seconds * rate)):
            writer.writerow([f'{i / rate:.2f}', f'{np.sin(i / 5) * 0.5:.3f}', f'{np.cos(i / 5) * 0.5:.3f}'])


def test_prepare_video_with_side_wav_and_transcript(tmp_path):
    write_video(tmp_path / 'talk.mp4', 30, fourcc='mp4v')
    write_wav(tmp_path / 'talk.wav', 2.0)
    write_labels(tmp_path / 'talk.csv', 2.0)
    (tmp_path / 'words.csv').write_text('time,text\n1.0,hello there robot\n')
    extractor = SessionExtractor(make_encoders())
    store = FeatureStore(tmp_path / 'store', encoder_spec=extractor.spec)
    sid = prepare_video(
        tmp_path / 'talk.mp4',
        tmp_path / 'talk.csv',
        store,
        extractor,
        audio_path=tmp_path / 'talk.wav',
        transcript_path=tmp_path / 'words.csv',
        speaker='me',
    )
    assert sid == 'talk' and store.load('talk').speaker == 'me'
    session = store.load('talk')
    assert len(session) == 30
    labelled = np.all(np.isfinite(session.labels), axis=1)
    assert labelled.all()
    np.testing.assert_allclose(session.labels[3], [np.sin(2 / 5) * 0.5, np.cos(2 / 5) * 0.5], atol=1e-3)
    text = session.mask[:, 2]
    np.testing.assert_array_equal(text, session.timestamps >= 1.0 - 1e-9)  # utterance at 1.0 s onwards
    assert (
        prepare_video(
            tmp_path / 'talk.mp4', tmp_path / 'talk.csv', store, extractor, audio_path=tmp_path / 'talk.wav'
        )
        is None
    )  # already there


def test_container_audio_is_decoded_with_pyav(tmp_path):
    av = pytest.importorskip('av')
    path = tmp_path / 'clip.mp4'
    with av.open(str(path), 'w') as container:
        video = container.add_stream('mpeg4', rate=FPS)
        video.width, video.height, video.pix_fmt = 32, 24, 'yuv420p'
        audio = container.add_stream('aac', rate=SAMPLE_RATE)
        for i in range(FPS):
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 80 + i, np.uint8), format='rgb24')
            for packet in video.encode(frame):
                container.mux(packet)
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE)).astype(np.float32)
        chunk = av.AudioFrame.from_ndarray(tone[None], format='flt', layout='mono')
        chunk.sample_rate = SAMPLE_RATE
        for packet in audio.encode(chunk):
            container.mux(packet)
        for stream in (audio, video):
            for packet in stream.encode(None):
                container.mux(packet)
    samples, rate = load_container_audio(path)
    assert rate == SAMPLE_RATE and abs(samples.size - SAMPLE_RATE) < 0.1 * SAMPLE_RATE
    assert 0.15 < np.sqrt(np.mean(samples[2000:-2000] ** 2)) < 0.25  # the 0.3 tone's RMS is 0.21
    frames, fps = read_video_frames(path)
    assert fps == FPS and len(list(frames)) == FPS


def test_media_errors_are_clear(tmp_path):
    with pytest.raises(MediaError, match='does not exist'):
        read_video_frames(tmp_path / 'none.mp4')
    (tmp_path / 'junk.wav').write_bytes(b'not audio')
    with pytest.raises(MediaError, match='junk.wav'):
        load_wav(tmp_path / 'junk.wav')
    write_video(tmp_path / 'silent.avi', 3, fourcc='MJPG')
    with pytest.raises(MediaError, match='no audio track|cannot open'):
        load_container_audio(tmp_path / 'silent.avi')


def test_extraction_config_reaches_the_windower(crema_root):
    extractor = SessionExtractor(make_encoders(), ExtractionConfig(audio_hop_s=0.1))
    frames, _ = read_video_frames(crema_root / 'VideoFlash' / '1001_IEO_HAP_HI.flv')
    result = extractor.extract(frames, audio=load_wav(crema_root / 'AudioWAV' / '1001_IEO_HAP_HI.wav'))
    assert result.info['audio_windows'] == 7  # ends at 1.0, 1.1, ..., 1.6 s
    assert result.mask[:, 0].sum() == np.sum(result.timestamps >= 0.7 - 1e-6)
    assert crema_d.AUDIO_DIR == 'AudioWAV'
