"""Feature store round trip and restart behaviour, speaker-independent splits."""

import json

import numpy as np
import pytest

from affective_trm_ros.offline.io.feature_store import FeatureStore, InMemoryStore
from affective_trm_ros.offline.learning.splits import make_splits, split_speakers

SPEC = [
    {'modality': 'audio', 'encoder': 'test_audio', 'dim': 3},
    {'modality': 'video', 'encoder': 'test_video', 'dim': 5},
    {'modality': 'text', 'encoder': 'test_text', 'dim': 2},
]


def session_arrays(frames=7, seed=0):
    rng = np.random.default_rng(seed)
    features = {
        'audio': rng.normal(size=(frames, 3)),
        'video': rng.normal(size=(frames, 5)),
        'text': rng.normal(size=(frames, 2)),
    }
    mask = rng.random((frames, 3)) > 0.3
    labels = rng.uniform(-1, 1, size=(frames, 2)).astype(np.float32)
    labels[2] = np.nan
    return np.arange(frames) / 30.0, features, mask, labels


def test_round_trip_keeps_every_array_and_inputs_follow_feature_order(tmp_path):
    store = FeatureStore(tmp_path / 'store', encoder_spec=SPEC)
    timestamps, features, mask, labels = session_arrays()
    store.write_session(
        '1001_DFA_ANG_XX',
        speaker='1001',
        timestamps=timestamps,
        features=features,
        mask=mask,
        labels=labels,
        meta={'emotion': 'ANG'},
    )
    reopened = FeatureStore(tmp_path / 'store')
    assert reopened.session_ids() == ['1001_DFA_ANG_XX']
    assert reopened.encoder_spec == SPEC and reopened.dims == {'audio': 3, 'video': 5, 'text': 2}
    session = reopened.load('1001_DFA_ANG_XX')
    assert session.speaker == '1001' and session.meta == {'emotion': 'ANG'}
    np.testing.assert_array_equal(session.timestamps, timestamps)
    np.testing.assert_array_equal(session.mask, mask)
    np.testing.assert_array_equal(session.labels, labels)  # NaN survives
    for name, block in features.items():
        np.testing.assert_allclose(session.features[name], block.astype(np.float32))
    inputs = session.inputs()
    assert inputs.shape == (7, 10) and inputs.dtype == np.float32
    np.testing.assert_allclose(inputs[:, :3], features['audio'].astype(np.float32))
    np.testing.assert_allclose(inputs[:, 3:8], features['video'].astype(np.float32))
    index = json.loads((tmp_path / 'store' / 'index.json').read_text())
    assert index['sessions']['1001_DFA_ANG_XX']['labelled_frames'] == 6


def test_restart_sees_only_completed_sessions(tmp_path):
    store = FeatureStore(tmp_path / 's', encoder_spec=SPEC)
    timestamps, features, mask, labels = session_arrays()
    store.write_session('a', speaker='p', timestamps=timestamps, features=features, mask=mask, labels=labels)
    # An interrupted write leaves a temporary file and no index entry: not "has".
    (tmp_path / 's' / 'sessions' / 'b.npz.tmp').write_bytes(b'partial')
    restarted = FeatureStore(tmp_path / 's', encoder_spec=SPEC)
    assert restarted.has('a') and not restarted.has('b')
    # A session file deleted behind the store's back is not "has" either.
    (tmp_path / 's' / 'sessions' / 'a.npz').unlink()
    assert not FeatureStore(tmp_path / 's').has('a')


def test_store_refuses_other_encoders_and_bad_sessions(tmp_path):
    FeatureStore(tmp_path / 's', encoder_spec=SPEC)
    other = [dict(SPEC[0]), dict(SPEC[1], encoder='other_video'), dict(SPEC[2])]
    with pytest.raises(ValueError, match='other_video'):
        FeatureStore(tmp_path / 's', encoder_spec=other)
    with pytest.raises(FileNotFoundError, match='affective-trm prepare'):
        FeatureStore(tmp_path / 'missing')
    store = FeatureStore(tmp_path / 's')
    timestamps, features, mask, labels = session_arrays()
    with pytest.raises(ValueError, match='video features have shape'):
        store.write_session(
            'x',
            speaker='p',
            timestamps=timestamps,
            features={**features, 'video': features['video'][:, :4]},
            mask=mask,
            labels=labels,
        )
    with pytest.raises(ValueError, match=r'\[-1, 1\]'):
        store.write_session(
            'x', speaker='p', timestamps=timestamps, features=features, mask=mask, labels=labels * 3
        )
    with pytest.raises(ValueError, match='must not decrease'):
        store.write_session(
            'x', speaker='p', timestamps=timestamps[::-1], features=features, mask=mask, labels=labels
        )
    with pytest.raises(ValueError, match='session id'):
        store.write_session(
            '../evil', speaker='p', timestamps=timestamps, features=features, mask=mask, labels=labels
        )
    with pytest.raises(ValueError, match='order'):
        FeatureStore(tmp_path / 't', encoder_spec=[SPEC[1], SPEC[0]])


def test_in_memory_store_has_the_same_reading_api():
    store = InMemoryStore(SPEC)
    timestamps, features, mask, labels = session_arrays(frames=4)
    store.write_session('m', speaker='p', timestamps=timestamps, features=features, mask=mask, labels=labels)
    assert store.session_ids() == ['m'] and store.num_frames('m') == 4 and store.input_dim == 10
    assert store.load('m').inputs().shape == (4, 10)


def test_speaker_independent_splits_are_seeded_and_disjoint():
    speakers = {f'{actor}_{clip}': str(actor) for actor in range(1001, 1031) for clip in range(12)}
    splits = make_splits(speakers, (0.8, 0.1, 0.1), seed=3)
    assert splits == make_splits(speakers, (0.8, 0.1, 0.1), seed=3)
    assert splits != make_splits(speakers, (0.8, 0.1, 0.1), seed=4)
    by_split = split_speakers(splits, speakers)
    assert not set(by_split['train']) & set(by_split['val'])
    assert not set(by_split['train']) & set(by_split['test'])
    assert not set(by_split['val']) & set(by_split['test'])
    assert sorted(sum(splits.values(), [])) == sorted(speakers)
    assert len(by_split['train']) == 24 and len(by_split['val']) == 3 and len(by_split['test']) == 3


def test_split_by_session_and_small_stores():
    speakers = {f's{i}': 'same person' for i in range(10)}
    # One speaker cannot be split by speaker: everything lands in one split.
    by_speaker = make_splits(speakers, seed=0)
    assert sorted(len(v) for v in by_speaker.values()) == [0, 0, 10]
    by_session = make_splits(speakers, seed=0, by='session')
    assert all(by_session[name] for name in ('train', 'val', 'test'))
    with pytest.raises(ValueError, match='sum'):
        make_splits(speakers, (0.5, 0.1, 0.1))
