"""`affective-trm evaluate` over several training seeds (mean ± sd, per-session CCC, a bootstrap CI
over sessions) and the features hash a feature store records: checked against numbers computed here
with plain numpy, on stores written by the real writer and checkpoints made by `affective-trm train`."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_prepare import write_labels, write_video, write_wav

from affective_trm_ros.cli import main
from affective_trm_ros.core.checkpoint import load_checkpoint
from affective_trm_ros.offline.extraction.pipeline import record_store_provenance
from affective_trm_ros.offline.io.feature_store import FeatureStore
from affective_trm_ros.offline.learning.data import SessionSource, stale_store_message

SPEC = [{'modality': 'audio', 'encoder': 'test_audio', 'dim': 3},
        {'modality': 'video', 'encoder': 'test_video', 'dim': 4}]
SPEAKERS = ('p1', 'p2', 'p3', 'p4', 'p5', 'p6')
TINY_TRM = '{"hidden_size": 16, "num_heads": 2, "num_layers": 1, "h_cycles": 1, "l_cycles": 1}'
# A few optimiser steps: the statistics, not the fit, are under test. Half the speakers train, one
# validates, two are held out (4 test sessions).
FAST = ['--window', '16', '--batch-size', '2', '--no-plots', '--quiet', '--device', 'cpu',
        '--split-fractions', '0.5', '0.17', '0.33']
STEPS = ['--steps', '3']
ONE_STEP = ['--steps', '1']
PLUGINS = Path(__file__).parent / 'fixtures' / 'encoder_node_plugins'


def make_store(path, spec=SPEC, frames=40):
    """Two sessions per speaker whose labels follow the features (something to learn), written by
    the store's writer and finished as `affective-trm prepare` finishes a store."""
    store = FeatureStore(path, encoder_spec=spec)
    rng = np.random.default_rng(0)
    for index, speaker in enumerate(SPEAKERS):
        for take in range(2):
            t = np.arange(frames) / 10.0
            labels = np.stack([np.sin(t + index), np.cos(0.7 * t + take)], axis=1).astype(np.float32) * 0.8
            audio = labels[:, :1] + rng.normal(0, 0.3, (frames, 3))
            video = labels[:, 1:] + rng.normal(0, 0.3, (frames, 4))
            labels[:2] = np.nan   # unlabelled frames are left out of every metric
            store.write_session(f'{speaker}_{take}', speaker=speaker, timestamps=t,
                                features={'audio': audio, 'video': video},
                                mask=np.ones((frames, 2), bool), labels=labels)
    record_store_provenance(store)
    return store


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def train_cli(store_dir, out, *extra):
    code = main(['train', '--store', str(store_dir), '--out', str(out), '--model-config', TINY_TRM, *FAST,
                 *STEPS, *[str(e) for e in extra]])
    assert code == 0
    return out / 'best.pt'


@pytest.fixture(scope='module')
def seeds(tmp_path_factory):
    """A store and three checkpoints of the TRM trained on it with seeds 0, 1, 2."""
    root = tmp_path_factory.mktemp('seeds')
    make_store(root / 'store')
    checkpoints = [train_cli(root / 'store', root / f'trm_s{seed}', '--seed', seed) for seed in range(3)]
    return root / 'store', checkpoints


# ---------------------------------------------------------------- the numbers, by hand


def ccc(pred, true):
    """Lin's concordance correlation over the labelled frames, straight from its definition."""
    keep = np.isfinite(true)
    p, t = pred[keep].astype(np.float64), true[keep].astype(np.float64)
    covariance = np.mean((p - p.mean()) * (t - t.mean()))
    return 2 * covariance / (p.var() + t.var() + (p.mean() - t.mean()) ** 2)


def mean_ccc(pred, true):
    return (ccc(pred[:, 0], true[:, 0]) + ccc(pred[:, 1], true[:, 1])) / 2


def rmse_mean(pred, true):
    return np.mean([np.sqrt(np.nanmean((pred[:, d] - true[:, d]) ** 2)) for d in range(2)])


def predictions_by_hand(checkpoint, store, sessions):
    """Each session from the initial state, frame by frame (no gap in these sessions: no reset)."""
    model = load_checkpoint(checkpoint).model
    out = []
    for sid in sessions:
        session = store.load(sid)
        with torch.no_grad():
            va, _, _ = model.forward_sequence(torch.from_numpy(session.inputs())[None],
                                              torch.from_numpy(session.mask)[None])
        out.append(va[0].numpy().astype(np.float64))
    return out


def test_three_checkpoints_give_the_sd_and_session_ci_computed_by_hand(seeds, tmp_path, capsys):
    store_dir, checkpoints = seeds
    code, out, err = run(['evaluate', '--checkpoint', *checkpoints, '--store', store_dir,
                          '--out', tmp_path / 'eval', '--max-timeseries', '1'], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / 'eval' / 'report.json').read_text())
    stats = report['seed_statistics']
    sessions = list(stats['session_ccc'])
    assert len(sessions) == 4 and report['sessions'] == 4 and stats['seeds'] == 3
    store = FeatureStore(store_dir)
    truths = [store.load(sid).labels.astype(np.float64) for sid in sessions]
    runs = [predictions_by_hand(c, store, sessions) for c in checkpoints]
    pooled_truth = np.concatenate(truths)
    per_seed = np.array([mean_ccc(np.concatenate(r), pooled_truth) for r in runs])
    valence = np.array([ccc(np.concatenate(r)[:, 0], pooled_truth[:, 0]) for r in runs])
    rmse = np.array([rmse_mean(np.concatenate(r), pooled_truth) for r in runs])
    assert stats['mean']['ccc_per_seed'] == pytest.approx(per_seed, abs=1e-5)
    assert stats['mean']['ccc_mean'] == pytest.approx(per_seed.mean(), abs=1e-5)
    assert stats['mean']['ccc_sd'] == pytest.approx(per_seed.std(ddof=1), abs=1e-5)
    assert stats['valence']['ccc_sd'] == pytest.approx(valence.std(ddof=1), abs=1e-5)
    assert stats['mean']['rmse_sd'] == pytest.approx(rmse.std(ddof=1), abs=1e-5)
    assert stats['mean']['ccc_sd'] > 0   # three different seeds: a real spread
    for s, sid in enumerate(sessions):
        by_hand = np.mean([mean_ccc(r[s], truths[s]) for r in runs])
        assert stats['session_ccc'][sid] == pytest.approx(by_hand, abs=1e-5)
    # Percentile bootstrap over sessions: 1000 draws of 4 sessions with replacement from seed 0; each
    # draw scores every checkpoint on the pooled frames of the drawn sessions and averages them.
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(1000):
        pick = rng.integers(0, len(sessions), len(sessions))
        true = np.concatenate([truths[s] for s in pick])
        draws.append(np.mean([mean_ccc(np.concatenate([r[s] for s in pick]), true) for r in runs]))
    low, high = np.percentile(draws, [2.5, 97.5])
    assert stats['ci95_mean_ccc'] == pytest.approx([low, high], abs=1e-5)
    assert low < high
    # The same numbers on the terminal and in report.md.
    markdown = (tmp_path / 'eval' / 'report.md').read_text()
    for text in (out, markdown):
        assert f'{per_seed.mean():.3f} ± {per_seed.std(ddof=1):.3f}' in text
        assert f'[{low:.3f}, {high:.3f}]' in text
        assert f'| {sessions[0]} | 40 | {stats["session_ccc"][sessions[0]]:.3f} |' in text
    assert 'mean over the 3 checkpoints' in markdown


def test_one_checkpoint_says_the_sd_is_not_available_and_still_resamples_sessions(seeds, tmp_path, capsys):
    store_dir, checkpoints = seeds
    code, out, err = run(['evaluate', '--checkpoint', checkpoints[0], '--store', store_dir,
                          '--out', tmp_path / 'one', '--max-timeseries', '0'], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / 'one' / 'report.json').read_text())
    assert report['seed_statistics']['mean']['ccc_sd'] is None
    assert 'sd not available' in report['sd_note'] and 'sd not available' in out
    assert '± n/a' in out
    low, high = report['seed_statistics']['ci95_mean_ccc']
    assert low < high
    assert report['metrics']['mean']['ccc'] == pytest.approx(report['seed_statistics']['mean']['ccc_mean'])


def test_two_runs_print_and_write_the_same_numbers(seeds, tmp_path, capsys):
    store_dir, checkpoints = seeds
    outputs, reports = [], []
    for name in ('first', 'second'):
        code, out, err = run(['evaluate', '--checkpoint', *checkpoints, '--store', store_dir,
                              '--out', tmp_path / name, '--max-timeseries', '0'], capsys)
        assert code == 0, err
        outputs.append([line for line in out.splitlines() if not line.startswith('report:')])
        reports.append((tmp_path / name / 'report.json').read_text())
    assert outputs[0] == outputs[1]
    assert reports[0] == reports[1]


def test_checkpoints_that_do_not_belong_together_are_refused(seeds, tmp_path, capsys):
    store_dir, checkpoints = seeds
    make_store(tmp_path / 'other', spec=[SPEC[0], dict(SPEC[1], encoder='another_video')])
    other = train_cli(tmp_path / 'other', tmp_path / 'other_run')
    code, _, err = run(['evaluate', '--checkpoint', checkpoints[0], other, '--store', store_dir], capsys)
    assert code == 1 and 'different features' in err and 'another_video' in err and str(other) in err
    mlp = tmp_path / 'mlp'
    assert main(['train', '--store', str(store_dir), '--out', str(mlp), '--model', 'mlp',
                 '--model-config', '{"hidden_size": 8}', *FAST, *STEPS]) == 0
    code, _, err = run(['evaluate', '--checkpoint', checkpoints[0], mlp / 'best.pt', '--store', store_dir],
                       capsys)
    assert code == 1 and "'mlp' model" in err
    resplit = train_cli(store_dir, tmp_path / 'resplit', '--split-seed', '7')
    code, _, err = run(['evaluate', '--checkpoint', checkpoints[0], resplit, '--store', store_dir], capsys)
    assert code == 1 and "different 'test' sessions" in err and '--sessions' in err
    code, _, err = run(['evaluate', '--checkpoint', checkpoints[0], checkpoints[0], '--store', store_dir],
                       capsys)
    assert code == 1 and 'given twice' in err


def test_one_session_has_no_interval_and_ragged_runs_are_refused():
    from affective_trm_ros.offline.evaluation.seeds import seed_session_statistics

    truth = np.stack([np.linspace(-1, 1, 20), np.linspace(1, -1, 20)], axis=1)
    runs = [[truth * 0.5], [truth * 0.8]]
    stats = seed_session_statistics(runs, [truth], ['only'])
    assert np.isnan(stats['ci95_mean_ccc']).all()     # resampling one session says nothing
    expected = [mean_ccc(truth * 0.5, truth), mean_ccc(truth * 0.8, truth)]
    assert stats['mean']['ccc_sd'] == pytest.approx(np.std(expected, ddof=1))
    assert stats['session_ccc']['only'] == pytest.approx(np.mean(expected))
    with pytest.raises(ValueError, match='one prediction per session'):
        seed_session_statistics([[truth], []], [truth], ['only'])


# ---------------------------------------------------------------- the store's features hash


def test_prepare_records_the_features_hash_and_thread_count(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.setenv('AFFECTIVE_TRM_WEIGHTS', str(tmp_path / 'no_weights'))
    params = tmp_path / 'params.yaml'
    params.write_text('/**/video_encoder:\n  ros__parameters:\n    face_pipeline: full_frame\n')
    write_video(tmp_path / 'talk.mp4', 30, fourcc='mp4v')
    write_wav(tmp_path / 'talk.wav', 2.0)
    write_labels(tmp_path / 'talk.csv', 2.0)
    code, _, err = run(['prepare', 'video', '--video', tmp_path / 'talk.mp4',
                        '--audio', tmp_path / 'talk.wav', '--labels', tmp_path / 'talk.csv',
                        '--store', tmp_path / 's',
                        '--encoders', 'video=tiny_video,audio=tiny_audio,text=tiny_text', '--device', 'cpu',
                        '--quiet', '--params-file', params], capsys)
    assert code == 0, err
    store = FeatureStore(tmp_path / 's')
    assert store.info['features_hash'] == SessionSource(store, store.session_ids()).digest()
    assert store.info['torch_threads'] == torch.get_num_threads()
    assert stale_store_message(store) is None


def test_a_store_changed_after_preparation_makes_train_warn(seeds, tmp_path, capsys):
    store_dir = tmp_path / 'store'
    shutil.copytree(seeds[0], store_dir)
    code, _, err = run(['train', '--store', store_dir, '--out', tmp_path / 'a', '--model-config', TINY_TRM,
                        *FAST, *ONE_STEP], capsys)
    assert code == 0 and 'WARNING' not in err
    store = FeatureStore(store_dir)
    session = store.load('p1_0')
    store.write_session('p1_0', speaker=session.speaker, timestamps=session.timestamps,
                        features=session.features, mask=session.mask, labels=-session.labels)
    code, _, err = run(['train', '--store', store_dir, '--out', tmp_path / 'b', '--model-config', TINY_TRM,
                        *FAST, *ONE_STEP], capsys)
    assert code == 0
    assert 'WARNING' in err and 'changed since it was prepared' in err and store.info['features_hash'] in err


def test_a_store_without_a_recorded_hash_still_loads_and_trains_without_warning(tmp_path, capsys):
    store = FeatureStore(tmp_path / 'old', encoder_spec=SPEC)
    rng = np.random.default_rng(1)
    for index, speaker in enumerate(SPEAKERS):
        t = np.arange(30) / 10.0
        store.write_session(f'{speaker}_0', speaker=speaker, timestamps=t,
                            features={'audio': rng.normal(size=(30, 3)), 'video': rng.normal(size=(30, 4))},
                            mask=np.ones((30, 2), bool),
                            labels=np.stack([np.sin(t + index), np.cos(t)], axis=1).astype(np.float32) * 0.5)
    reopened = FeatureStore(tmp_path / 'old')
    assert 'features_hash' not in reopened.info and stale_store_message(reopened) is None
    code, _, err = run(['train', '--store', tmp_path / 'old', '--out', tmp_path / 'run', '--model-config',
                        TINY_TRM, *FAST, *ONE_STEP], capsys)
    assert code == 0 and 'WARNING' not in err
