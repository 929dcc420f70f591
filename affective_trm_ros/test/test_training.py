"""Training loop, evaluation reports and the train/evaluate commands on a tiny generated store."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from affective_trm_ros.core.checkpoint import load_checkpoint
from affective_trm_ros.offline.learning.data import SessionSource, collate, input_statistics, modality_dropout
from affective_trm_ros.offline.evaluation.evaluate import evaluate_checkpoint, resolve_split, write_report
from affective_trm_ros.offline.io.feature_store import FeatureStore
from affective_trm_ros.offline.learning.train import TrainConfig, build_model, lr_factor, train

SPEC = [
    {'modality': 'audio', 'encoder': 'test_audio', 'dim': 4},
    {'modality': 'video', 'encoder': 'test_video', 'dim': 6},
]
# Small models: the loop, not the capacity, is under test.
TINY = {
    'trm': {'hidden_size': 16, 'num_heads': 2, 'num_layers': 1, 'h_cycles': 2, 'l_cycles': 1},
    'seed_trm': {'hidden_size': 16, 'num_heads': 2, 'num_layers': 1},
    'mlp': {'hidden_size': 16},
    'gru': {'hidden_size': 16},
}


def make_store(root, sessions=16, speakers=8, seed=0):
    """Sessions whose labels are a noisy linear function of the features (learnable per frame)."""
    rng = np.random.default_rng(seed)
    store = FeatureStore(root, encoder_spec=SPEC)
    for index in range(sessions):
        frames = int(rng.integers(20, 41))
        labels = np.clip(
            np.cumsum(rng.normal(0, 0.15, size=(frames, 2)), axis=0) + rng.uniform(-0.5, 0.5, 2), -1, 1
        ).astype(np.float32)
        audio = labels[:, :1] * 2 + rng.normal(0, 0.3, size=(frames, 4)) + 5.0  # offset: needs normalising
        video = labels[:, 1:] * 2 + rng.normal(0, 0.3, size=(frames, 6))
        mask = np.ones((frames, 2), bool)
        mask[::5, 1] = False
        video[~mask[:, 1]] = 0.0
        labels[:3] = np.nan
        store.write_session(
            f's{index:02d}',
            speaker=f'p{index % speakers}',
            timestamps=np.arange(frames) / 10,
            features={'audio': audio, 'video': video},
            mask=mask,
            labels=labels,
        )
    return store


@pytest.fixture(scope='module')
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp('store') / 'features')


@pytest.fixture(scope='module')
def trained(store, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp('run')
    result = train(
        store,
        TrainConfig(
            model='trm',
            model_config=TINY['trm'],
            out_dir=str(out),
            epochs=6,
            batch_size=4,
            window=16,
            lr=1e-2,
            ema_decay=0.9,
            patience=6,
            device='cpu',
            progress=False,
        ),
    )
    return result


def test_training_lowers_the_loss_and_writes_its_files(trained):
    losses = [row['train_loss'] for row in trained.history]
    assert losses[-1] < losses[0] - 0.1
    out = trained.out_dir
    for name in ('best.pt', 'history.csv', 'curves.png', 'va_plane_val.png', 'summary.json'):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with open(out / 'history.csv') as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(trained.history)
    assert {
        'epoch',
        'train_loss',
        'val_loss',
        'val_ccc_valence',
        'val_ccc_arousal',
        'val_ccc_mean',
        'lr',
    } <= set(rows[0])
    assert trained.best_val_ccc == max(row['val_ccc_mean'] for row in trained.history)


def test_checkpoint_carries_normalisation_spec_and_splits(trained, store):
    loaded = load_checkpoint(trained.checkpoint_path)
    assert loaded.kind == 'trm' and loaded.encoder_spec == SPEC
    source = SessionSource(store, trained.splits['train'])
    mean, std = input_statistics(source, loaded.model.block_bounds)
    np.testing.assert_allclose(loaded.model.feature_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(loaded.model.feature_std.numpy(), std, rtol=1e-5)
    assert 4.5 < mean[:4].mean() < 5.5  # the audio offset, learned from training data
    meta = loaded.metadata
    assert meta['epoch'] == trained.best_epoch and meta['splits'] == trained.splits
    speakers = meta['split_speakers']
    assert not set(speakers['train']) & (set(speakers['val']) | set(speakers['test']))
    assert meta['train_config']['model_config'] == TINY['trm']


def test_statistics_skip_masked_frames(store):
    source = SessionSource(store, store.session_ids())
    mean, std = input_statistics(source, [(0, 4), (4, 10)])
    video = np.concatenate([source.arrays(sid)[0][source.arrays(sid)[1][:, 1], 4:] for sid in source.ids])
    np.testing.assert_allclose(mean[4:], video.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(std[4:], video.std(0), rtol=1e-4)


def test_evaluation_report_files_and_numbers(trained, store, tmp_path):
    report = evaluate_checkpoint(trained.checkpoint_path, store, 'test', out_dir=tmp_path / 'eval')
    assert report['split_origin'] == "the checkpoint's test split"
    assert report['sessions'] == len(trained.splits['test'])
    loaded = load_checkpoint(trained.checkpoint_path)
    source = SessionSource(store, trained.splits['test'])
    preds, truths = [], []
    for sid in trained.splits['test']:
        inputs, mask, labels, _ = source.arrays(sid)
        with torch.no_grad():
            va, _, _ = loaded.model.forward_sequence(
                torch.from_numpy(inputs)[None], torch.from_numpy(mask)[None]
            )
        preds.append(va[0].numpy())
        truths.append(labels)
    from affective_trm_ros.core.metrics import regression_report

    expected = regression_report(np.concatenate(preds), np.concatenate(truths))
    assert report['metrics']['mean']['ccc'] == pytest.approx(expected['mean']['ccc'], abs=1e-5)
    files = {p.name for p in (tmp_path / 'eval').iterdir()}
    assert {'report.json', 'report.md', 'va_plane.png'} <= files
    assert any(name.startswith('timeseries_') for name in files)
    saved = json.loads((tmp_path / 'eval' / 'report.json').read_text())
    assert saved['metrics']['valence']['n'] == report['metrics']['valence']['n']
    markdown = (tmp_path / 'eval' / 'report.md').read_text()
    assert '| valence |' in markdown and f'{report["metrics"]["mean"]["ccc"]:.3f}' in markdown


def test_evaluation_refuses_other_encoders(trained, tmp_path):
    other = FeatureStore(tmp_path / 'other', encoder_spec=[SPEC[0], dict(SPEC[1], encoder='another_video')])
    with pytest.raises(ValueError, match='another_video'):
        evaluate_checkpoint(trained.checkpoint_path, other, 'all')


def test_split_resolution(trained, store):
    meta = load_checkpoint(trained.checkpoint_path).metadata
    assert resolve_split('all', store, meta)[0] == store.session_ids()
    assert resolve_split(['s01'], store, meta)[0] == ['s01']
    ids, origin = resolve_split('val', store, {})
    assert 'recomputed' in origin and ids
    with pytest.raises(ValueError, match='split'):
        resolve_split('holdout', store, meta)


def test_write_report_accepts_a_single_stream(tmp_path):
    t = np.arange(50) / 10
    truth = np.stack([np.sin(t), np.cos(t)], 1) * 0.5
    files = write_report(
        {
            'metrics': __import__('affective_trm_ros.core.metrics', fromlist=['x']).regression_report(
                truth * 0.8, truth
            )
        },
        tmp_path,
        truth * 0.8,
        truth,
        t,
    )
    assert files['json'].is_file() and files['markdown'].is_file() and files['va_plane'].is_file()
    assert (tmp_path / 'timeseries_stream.png').is_file()


@pytest.mark.parametrize('kind', ['seed_trm', 'mlp', 'gru'])
def test_every_model_kind_trains(kind, store, tmp_path):
    result = train(
        store,
        TrainConfig(
            model=kind,
            model_config=TINY[kind],
            out_dir=str(tmp_path),
            epochs=2,
            batch_size=8,
            window=16,
            device='cpu',
            plots=False,
            progress=False,
        ),
    )
    assert load_checkpoint(result.checkpoint_path).kind == kind
    assert all(math.isfinite(row['train_loss']) for row in result.history)


def test_truncated_bptt_carries_state_across_windows(store):
    """Training windows must continue the sessions' state: the last window's predictions equal a full run."""
    model = build_model('gru', store.dims, TINY['gru']).eval()
    source = SessionSource(store, store.session_ids()[:3])
    batch = collate(source, source.ids)
    full, _, _ = model.forward_sequence(batch.x, batch.mask)
    state = model.initial_state(3)
    outputs = []
    for start in range(0, batch.x.shape[1], 7):
        part = batch.window(start, start + 7)
        va, _, state = model.forward_sequence(part.x, part.mask, state)
        outputs.append(va)
    assert torch.allclose(torch.cat(outputs, 1), full, atol=1e-5)


def test_frame_independent_models_run_as_a_batch_of_frames(store):
    from affective_trm_ros.offline.learning.train import run_sequence

    model = build_model('seed_trm', store.dims, TINY['seed_trm']).eval()
    batch = collate(SessionSource(store, store.session_ids()[:2]), store.session_ids()[:2])
    with torch.no_grad():
        stepped, confidence, _ = model.forward_sequence(batch.x, batch.mask)
        flat, flat_confidence, state = run_sequence(model, batch.x, batch.mask, 'carried')
    assert torch.allclose(stepped, flat, atol=1e-6) and torch.allclose(confidence, flat_confidence)
    assert state == 'carried'


def test_modality_dropout_hides_whole_windows_but_never_everything():
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(64, 10, 3, dtype=torch.bool)
    valid = torch.ones(64, 10, dtype=torch.bool)
    dropped = modality_dropout(mask, valid, 0.6, generator)
    per_window = dropped.all(dim=1) | ~dropped.any(dim=1)
    assert per_window.all()  # a modality is hidden for the whole window or not
    assert dropped.any(dim=(1, 2)).all()  # no stream loses every modality
    assert 0.3 < 1 - dropped.float().mean() < 0.65
    assert torch.equal(modality_dropout(mask, valid, 0.0, generator), mask)


def test_schedule_and_config_validation():
    factors = [lr_factor(step, 100, 10, 0.1) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert max(factors) == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    with pytest.raises(ValueError, match='model kind'):
        TrainConfig(model='transformer').validate()
    with pytest.raises(ValueError, match='no fields'):
        build_model('gru', {'audio': 4}, {'heads': 3})


def test_train_and_evaluate_commands(store, tmp_path, capsys):
    from affective_trm_ros.cli import main

    out = tmp_path / 'cmd'
    code = main(
        [
            'train',
            '--store',
            str(store.root),
            '--out',
            str(out),
            '--model',
            'mlp',
            '--model-config',
            '{"hidden_size": 8}',
            '--epochs',
            '2',
            '--batch-size',
            '8',
            '--device',
            'cpu',
            '--quiet',
            '--no-plots',
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert (out / 'best.pt').is_file() and 'checkpoint:' in capsys.readouterr().out
    code = main(
        [
            'evaluate',
            '--checkpoint',
            str(out / 'best.pt'),
            '--store',
            str(store.root),
            '--split',
            'all',
            '--out',
            str(tmp_path / 'ev'),
        ]
    )
    assert code == 0
    assert '| **mean** |' in capsys.readouterr().out
    assert main(['train', '--store', str(tmp_path / 'nothing'), '--out', str(out)]) == 1
    assert 'affective-trm prepare' in capsys.readouterr().err
