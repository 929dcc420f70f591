"""Train/serve parity and deterministic replay, with the real encoder plugins and the real nodes.

A short generated bag is (1) prepared offline by ``training.bag_features`` and (2) replayed
through the video/audio/text encoder nodes and the fusion node over DDS. The embeddings the nodes
publish must equal the offline features, the fused estimates must equal an offline run of the
checkpoint over the offline aligned features, and a second replay must give identical estimates.
Encoders run untrained (no weight files on test machines), seeded, so both sides agree.
"""

import numpy as np
import pytest

from affective_trm_ros.core.modalities import FEATURE_ORDER
from affective_trm_ros.offline.synthetic import sample_sessions as ss

pytestmark = [pytest.mark.skipif(not ss.espeak_available(), reason='espeak-ng is not installed'),
              pytest.mark.timeout(600)]

SPEC = [{'modality': 'audio', 'encoder': 'dasheng_base', 'dim': 768},
        {'modality': 'video', 'encoder': 'hsemotion_enet_b0', 'dim': 1280},
        {'modality': 'text', 'encoder': 'minilm', 'dim': 384}]
# The same node parameters for the nodes and for offline extraction.
OVERRIDES = {'video_encoder': {'plugin': 'hsemotion_enet_b0', 'allow_untrained': True, 'detector': 'haar'},
             'audio_encoder': {'plugin': 'dasheng_base', 'allow_untrained': True},
             'text_encoder': {'plugin': 'minilm', 'allow_untrained': True},
             'fusion': {}}
EMBEDDING_TOLERANCE = 1e-4   # batch-of-16 offline vs one-by-one in the node: float32 rounding only
OUTPUT_TOLERANCE = 1e-5


@pytest.fixture(scope='module')
def bag(tmp_path_factory):
    path = tmp_path_factory.mktemp('parity') / 'session'
    # 10 FPS keeps the test short; 6 s holds at least one utterance and one face absence.
    ss.generate_session(path, ss.SessionConfig(duration_s=6.0, seed=11, fps=10.0, segment_s=1.5,
                                               face_absent_fraction=0.15, speech_fraction=0.7))
    return path


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    import torch

    from affective_trm_ros.core.checkpoint import save_checkpoint
    from affective_trm_ros.offline.learning.train import build_model
    torch.manual_seed(3)
    model = build_model('trm', {e['modality']: e['dim'] for e in SPEC})
    # non-trivial normalisation, so serving must apply the stored statistics
    dim = sum(e['dim'] for e in SPEC)
    model.set_normalization(torch.linspace(-0.1, 0.1, dim), torch.linspace(0.5, 2.0, dim))
    return save_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tiny.pt', model, SPEC, {'purpose': 'test'})


@pytest.fixture(scope='module')
def offline(bag, tmp_path_factory):
    from affective_trm_ros.offline.extraction.bag import (
        NodeSettings,
        extract_embeddings,
        node_parameters,
        prepare_bag,
    )
    from affective_trm_ros.offline.io.feature_store import FeatureStore

    parameters = {node: node_parameters(node, overrides=values) for node, values in OVERRIDES.items()}
    settings = NodeSettings.from_parameters(parameters)
    encoders = settings.load_encoders('cpu')
    embeddings = extract_embeddings(bag, encoders, audio=settings.audio)
    store = FeatureStore(tmp_path_factory.mktemp('store'), encoder_spec=SPEC)
    prepared = prepare_bag(bag, store, encoders, settings.alignment, audio=settings.audio)
    again = prepare_bag(bag, store, encoders, settings.alignment, audio=settings.audio)
    return embeddings, store, prepared, again


@pytest.fixture(scope='module')
def replays(bag, checkpoint, tmp_path_factory):
    from affective_trm_ros.replay.session import ReplayOptions, replay_bag

    outcomes = []
    for run in range(2):
        options = ReplayOptions(allow_untrained=True, parameters={k: v for k, v in OVERRIDES.items() if v},
                                record_embeddings=True, progress=False, timeout_s=60.0)
        outcomes.append(replay_bag(bag, checkpoint, tmp_path_factory.mktemp(f'replay{run}'), options))
    return outcomes


def test_offline_preparation_is_cached_and_labelled(offline):
    embeddings, store, prepared, again = offline
    assert not prepared.skipped and again.skipped
    session = store.load(prepared.session_id)
    assert len(session) == prepared.frames == 60
    assert np.all(np.isfinite(session.labels))                     # ground truth on every frame
    assert session.mask[:, FEATURE_ORDER.index('video')].mean() < 1.0  # the face leaves the frame
    assert session.mask[:, FEATURE_ORDER.index('text')].any()         # an utterance was heard
    assert embeddings.counts['text_embeddings'] >= 1


def test_node_embeddings_equal_offline_features(offline, replays):
    embeddings, *_ = offline
    record = replays[0].record
    for modality in FEATURE_ORDER:
        published = sorted(((stamp, valid, data) for m, stamp, valid, data, _ in record.embeddings
                            if m == modality), key=lambda item: item[0])
        expected = embeddings.embeddings[modality]
        assert len(published) == len(expected) > 0, modality
        for (stamp_ns, valid, data), (stamp_s, vector) in zip(published, expected):
            assert stamp_ns / 1e9 == pytest.approx(stamp_s, abs=1e-6), modality
            assert valid == (vector is not None), (modality, stamp_s)
            if valid:
                np.testing.assert_allclose(data, vector, atol=EMBEDDING_TOLERANCE, rtol=EMBEDDING_TOLERANCE)


def test_fused_estimates_equal_an_offline_run_of_the_checkpoint(offline, replays, checkpoint):
    from affective_trm_ros.core.predictor import FusionPredictor

    _, store, prepared, _ = offline
    session = store.load(prepared.session_id)
    predictor = FusionPredictor(checkpoint, device='cpu')
    expected = []
    for row in range(len(session)):
        features = {m: (session.features[m][row] if session.mask[row, i] else None)
                    for i, m in enumerate(FEATURE_ORDER)}
        expected.append(predictor.step([('default', features)])[0])
    table = replays[0].table
    assert table.covered.all()
    np.testing.assert_allclose(table.stamps_ns / 1e9, session.timestamps, atol=1e-6)
    bits = (session.mask * np.array([2, 1, 4])).sum(axis=1)     # FEATURE_ORDER = audio, video, text
    np.testing.assert_array_equal(table.modalities, bits)
    np.testing.assert_allclose(table.estimates, np.array(expected)[:, :2], atol=OUTPUT_TOLERANCE)
    np.testing.assert_allclose(table.confidence, np.array(expected)[:, 2], atol=OUTPUT_TOLERANCE)


def test_replay_is_deterministic_and_complete(replays):
    first, second = (outcome.table for outcome in replays)
    assert first.covered.all() and second.covered.all()
    np.testing.assert_array_equal(first.stamps_ns, second.stamps_ns)
    np.testing.assert_array_equal(first.estimates, second.estimates)
    np.testing.assert_array_equal(first.modalities, second.modalities)
    report = replays[0].report
    assert report['coverage'] == 1.0 and report['republished_frames'] == 0
    assert all(np.isfinite(report['metrics'][d]['ccc']) for d in ('valence', 'arousal'))
    assert report['untrained_encoders'].keys() == {'video', 'audio'}


def test_replay_command_in_real_time_writes_a_report(bag, checkpoint, tmp_path, capsys):
    """The CLI end to end, on the recording's schedule (nothing waited for; frames may drop)."""
    import json

    from affective_trm_ros.cli import main as cli_main

    out = tmp_path / 'realtime'
    assert cli_main(['replay', str(bag), '--checkpoint', str(checkpoint), '--realtime', '--rate', '2',
                     '--allow-untrained', '--set', 'video_encoder.detector=haar', '--out', str(out),
                     '--quiet']) == 0
    report = json.loads((out / 'report.json').read_text())
    assert report['mode'] == 'realtime x2'
    assert 0.0 < report['coverage'] <= 1.0 and report['frames'] == 60
    assert report['wall_s'] >= 6.0 / 2 - 0.1                  # the schedule was kept
    assert (out / 'estimates.csv').is_file() and (out / 'va_plane.png').is_file()
    assert 'coverage' in capsys.readouterr().out


def test_replay_of_a_two_person_bag_reports_each_person(checkpoint, tmp_path_factory):
    """Two faces, each with its own scripted affect: one stream per face, each scored against its
    own ground truth, coverage per person, metrics pooled over both."""
    from affective_trm_ros.replay.session import ReplayOptions, replay_bag

    bag = tmp_path_factory.mktemp('two_people') / 'session'
    ss.generate_session(bag, ss.SessionConfig(duration_s=5.0, seed=5, fps=10.0, segment_s=1.5, people=2,
                                              face_absent_fraction=0.0))
    parameters = {k: dict(v) for k, v in OVERRIDES.items() if v}
    parameters['video_encoder']['max_faces'] = 2
    outcome = replay_bag(bag, checkpoint, tmp_path_factory.mktemp('replay_two'),
                         ReplayOptions(allow_untrained=True, parameters=parameters, progress=False,
                                       timeout_s=60.0))
    people = outcome.report['people']
    assert sorted(people) == ['face_0', 'face_1']
    for person in people.values():
        assert person['coverage'] == 1.0 and person['labelled_frames'] == 50
        assert person['metrics']['valence']['n'] == 50
    assert outcome.report['metrics']['valence']['n'] == 100        # pooled over both people
    assert '## People' in outcome.files['markdown'].read_text()
