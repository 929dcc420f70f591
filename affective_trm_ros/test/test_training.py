"""Training loop, evaluation reports and the train/evaluate commands on a tiny generated store."""

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from affective_trm_ros.core.checkpoint import load_checkpoint
from affective_trm_ros.offline.evaluation.evaluate import evaluate_checkpoints, resolve_split, write_report
from affective_trm_ros.offline.io.feature_store import FeatureStore
from affective_trm_ros.offline.learning.data import SessionSource, collate, input_statistics, modality_dropout
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
    report = evaluate_checkpoints([trained.checkpoint_path], store, 'test', out_dir=tmp_path / 'eval')
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
        evaluate_checkpoints([trained.checkpoint_path], other, 'all')


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


# ---------------------------------------------------------------------------------------------
# The objective, resets, caches, confidence and the loop's own properties (asserted on train()).


def test_loss_equals_the_metric_on_whole_sequences():
    from affective_trm_ros.core.metrics import regression_report
    from affective_trm_ros.offline.learning.losses import CCCMSELoss

    rng = np.random.default_rng(1)
    labels = np.clip(np.cumsum(rng.normal(0, 0.1, (3, 50, 2)), axis=1), -1, 1).astype(np.float32)
    labels[0, :5] = np.nan
    pred = np.clip(labels + rng.normal(0, 0.3, labels.shape), -1, 1).astype(np.float32)
    pred[0, :5] = 0.3
    valid = np.ones((3, 50), bool)
    valid[2, 40:] = False  # padding
    parts = CCCMSELoss(1.0, 0.0)(torch.from_numpy(pred), torch.from_numpy(labels), torch.from_numpy(valid))
    keep = valid.reshape(-1)
    report = regression_report(pred.reshape(-1, 2)[keep], labels.reshape(-1, 2)[keep])
    assert float(parts.loss) == pytest.approx(1.0 - report['mean']['ccc'], abs=1e-5)
    expected = [report['valence']['ccc'], report['arousal']['ccc']]
    np.testing.assert_allclose(parts.ccc.numpy(), expected, atol=1e-5)


def _window_batch(store, ids):
    source = SessionSource(store, ids)
    return collate(source, ids)


@pytest.mark.parametrize('kind', ['trm', 'gru'])
def test_one_step_gets_the_gradient_of_the_whole_sequence_loss(kind, store):
    """Both ways of back-propagating (all graphs kept; two passes with one window of memory) give
    the gradient of the loss over the whole sequences, which differs from a per-window loss."""
    from affective_trm_ros.core.trm import detach_state
    from affective_trm_ros.offline.learning.losses import CCCMSELoss
    from affective_trm_ros.offline.learning.train import sequence_loss_backward

    batch = _window_batch(store, store.session_ids()[:4])
    masks = [batch.mask[:, s:s + 8] for s in range(0, batch.x.shape[1], 8)]
    loss_fn = CCCMSELoss(1.0, 0.25, 0.1)
    grads = []
    for graph_frames in (10**9, 1):
        torch.manual_seed(0)
        model = build_model(kind, store.dims, TINY[kind])
        torch.manual_seed(5)  # dropout draws
        parts = sequence_loss_backward(model, batch, masks, loss_fn, 8, torch.device('cpu'), False,
                                       graph_frames)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert parts.frames > 0
    assert grads[0].keys() == grads[1].keys() and 'output_head.weight' in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)
    # a per-window CCC is a different objective
    torch.manual_seed(0)
    model = build_model(kind, store.dims, TINY[kind])
    torch.manual_seed(5)
    state = model.initial_state(len(batch.ids))
    for start, mask in zip(range(0, batch.x.shape[1], 8), masks):
        part = batch.window(start, start + 8)
        va, _, state = model.forward_sequence(part.x, mask, state)
        state = detach_state(state)
        window_parts = loss_fn(va, part.labels, part.valid)
        if window_parts.frames:
            window_parts.loss.backward()
    per_window = dict(model.named_parameters())['output_head.weight'].grad
    assert not torch.allclose(per_window, grads[0]['output_head.weight'], atol=1e-4)


def test_session_resets_follow_the_node_rule():
    from affective_trm_ros.offline.learning.data import session_resets

    stamps = np.array([0.0, 0.1, 0.2, 6.0, 6.1, 12.0, 12.1])
    assert session_resets(stamps, {}).nonzero()[0].tolist() == [3, 5]  # gaps > 5 s (the node's default)
    assert session_resets(stamps, {'alignment': {'reset_after_s': 10.0}}).nonzero()[0].tolist() == []
    assert session_resets(stamps, {'reset_frames': [1]}, reset_after_s=10.0).nonzero()[0].tolist() == [1]
    assert session_resets(stamps, {}, reset_after_s=0.05).all() == False  # noqa: E712  (frame 0 never)


def make_gap_store(root):
    """Sessions with a long gap in their timestamps (the node resets its state there)."""
    rng = np.random.default_rng(3)
    store = FeatureStore(root, encoder_spec=SPEC)
    for index in range(6):
        frames = 30
        labels = np.clip(rng.normal(0, 0.4, size=(frames, 2)), -1, 1).astype(np.float32)
        stamps = np.arange(frames) / 10.0
        if index < 4:  # training sessions: a 10 s gap before frame 12
            stamps[12:] += 10.0
        store.write_session(f'g{index}', speaker=f'p{index}', timestamps=stamps,
                            features={'audio': rng.normal(size=(frames, 4)) + labels[:, :1],
                                      'video': rng.normal(size=(frames, 6))},
                            mask=np.ones((frames, 2), bool), labels=labels)
    return store


def test_resets_are_honoured_in_evaluation(tmp_path):
    from affective_trm_ros.offline.learning.train import predict_sessions

    store = make_gap_store(tmp_path / 'gaps')
    model = build_model('gru', store.dims, TINY['gru']).eval()
    source = SessionSource(store, ['g0'])
    predicted, _ = predict_sessions(model, source, ['g0'], torch.device('cpu'))['g0']
    inputs, mask, _, _ = source.arrays('g0')
    x, m = torch.from_numpy(inputs)[None], torch.from_numpy(mask)[None]
    with torch.no_grad():
        first, _, _ = model.forward_sequence(x[:, :12], m[:, :12])
        after, _, _ = model.forward_sequence(x[:, 12:], m[:, 12:])  # from the initial state again
    np.testing.assert_allclose(predicted, torch.cat([first, after], 1)[0].numpy(), atol=1e-5)
    with torch.no_grad():
        carried, _, _ = model.forward_sequence(x, m)
    assert not np.allclose(predicted[12:], carried[0, 12:].numpy(), atol=1e-4)


def test_resets_are_honoured_in_training(tmp_path, monkeypatch):
    from affective_trm_ros.core.baselines import GRUBaseline

    store = make_gap_store(tmp_path / 'gaps')
    resets_seen = []
    original = GRUBaseline.reset_state

    def spy(self, state, which):
        if self.training:
            resets_seen.append(int(torch.as_tensor(which).sum()))
        return original(self, state, which)

    monkeypatch.setattr(GRUBaseline, 'reset_state', spy)
    splits = {'train': ['g0', 'g1', 'g2', 'g3'], 'val': ['g4'], 'test': ['g5']}
    result = train(store, TrainConfig(model='gru', model_config=TINY['gru'], out_dir=str(tmp_path / 'run'),
                                      steps=3, eval_every=3, batch_size=4, window=8, splits=splits,
                                      device='cpu', plots=False, progress=False))
    assert result.history[-1]['step'] == 3
    assert sum(resets_seen) == 3 * 4  # every step, every training session, once at its gap


def test_features_hash_changes_with_the_features_not_the_name(store, tmp_path):
    import shutil

    digest = SessionSource(store, store.session_ids()).digest()
    copy = tmp_path / 'renamed'
    shutil.copytree(store.root, copy)
    assert SessionSource(FeatureStore(copy), store.session_ids()).digest() == digest
    changed = FeatureStore(copy)
    session = changed.load('s00')
    features = dict(session.features)
    features['audio'] = features['audio'].copy()
    features['audio'][5, 1] += 1e-3
    changed.write_session('s00', speaker=session.speaker, timestamps=session.timestamps, features=features,
                          mask=session.mask, labels=session.labels, meta=session.meta)
    assert SessionSource(FeatureStore(copy), store.session_ids()).digest() != digest


def test_checkpoint_records_features_hash_and_threads(trained, store):
    meta = load_checkpoint(trained.checkpoint_path).metadata
    train_hash = SessionSource(store, trained.splits['train']).digest()
    assert meta['features_hash'].startswith(train_hash) and meta['features_hash'] == trained.features_hash
    assert meta['torch_threads'] == torch.get_num_threads() and meta['deterministic'] is False


def test_normalisation_ignores_tiny_scale_features_only_when_constant():
    from affective_trm_ros.offline.learning.data import input_statistics

    rng = np.random.default_rng(0)
    store = FeatureStore.__new__(FeatureStore)  # not needed: a stand-in source is enough

    class Source:
        ids = ['a']

        def arrays(self, sid):
            x = np.stack([rng.normal(0, 1e-7, 200),            # informative, tiny scale
                          np.full(200, 3.0),                    # constant
                          3.0 + rng.normal(0, 1e-3, 200)], 1).astype(np.float32)  # offset + spread
            return x, np.ones((200, 1), bool), np.zeros((200, 2), np.float32), np.arange(200.0)

    del store
    mean, std = input_statistics(Source(), [(0, 3)])
    assert 5e-8 < std[0] < 2e-7  # kept: an absolute threshold (1e-6) would have zeroed it
    assert std[1] == 1.0 and mean[1] == pytest.approx(3.0)
    assert 5e-4 < std[2] < 2e-3


def test_learned_confidence_is_lower_where_the_error_is_larger(tmp_path):
    """A feature says how noisy the label is; the learned confidence must fall where it is noisy."""
    rng = np.random.default_rng(7)
    store = FeatureStore(tmp_path / 'hetero', encoder_spec=SPEC)
    for index in range(12):
        frames = 60
        signal = rng.uniform(-0.6, 0.6, size=(frames, 1))
        noisy = (np.arange(frames) // 10) % 2 == 1
        noise = np.where(noisy[:, None], rng.normal(0, 0.35, (frames, 2)), rng.normal(0, 0.02, (frames, 2)))
        labels = np.clip(np.concatenate([signal, -signal], 1) + noise, -1, 1).astype(np.float32)
        audio = np.concatenate([signal, noisy[:, None].astype(float), rng.normal(0, 1, (frames, 2))], 1)
        store.write_session(f'h{index:02d}', speaker=f'p{index}', timestamps=np.arange(frames) / 10,
                            features={'audio': audio, 'video': rng.normal(0, 1, (frames, 6))},
                            mask=np.ones((frames, 2), bool), labels=labels)
    result = train(store, TrainConfig(model='mlp', model_config={'hidden_size': 32, 'dropout': 0.0},
                                      out_dir=str(tmp_path / 'run'), steps=150, eval_every=50, batch_size=4,
                                      window=30, lr=3e-3, nll_weight=1.0, ema_decay=0.0,
                                      splits={'train': store.session_ids()[:10],
                                              'val': store.session_ids()[10:], 'test': []},
                                      modality_dropout=0.0, device='cpu', plots=False, progress=False))
    model = load_checkpoint(result.checkpoint_path).model
    source = SessionSource(store, store.session_ids()[10:])
    confidence, errors, flags = [], [], []
    for sid in source.ids:
        inputs, mask, labels, _ = source.arrays(sid)
        with torch.no_grad():
            va, conf, _ = model.forward_sequence(torch.from_numpy(inputs)[None], torch.from_numpy(mask)[None])
        confidence.append(conf[0].numpy())
        errors.append(np.abs(va[0].numpy() - labels).mean(1))
        flags.append(inputs[:, 1] > 0.5)
    confidence, errors, flags = map(np.concatenate, (confidence, errors, flags))
    assert errors[flags].mean() > 3 * errors[~flags].mean()  # the set has the error built in
    assert confidence[flags].mean() < confidence[~flags].mean() - 0.2
    from affective_trm_ros.core.metrics import spearman
    assert spearman(confidence, errors) < -0.3


def test_truncated_bptt_in_train_carries_the_state_from_window_to_window(store, tmp_path, monkeypatch):
    """Spy on the model inside train(): every window after a batch's first starts from the state the
    previous window ended in, never from the initial state."""
    from affective_trm_ros.core.baselines import GRUBaseline

    calls = []
    original = GRUBaseline.forward_sequence

    def spy(self, x, mask, state=None):
        va, confidence, out = original(self, x, mask, state)
        if self.training:
            start = self.initial_state(x.shape[0]) if state is None else state
            calls.append((start[0].detach().clone(), out[0].detach().clone(), x.shape[1]))
        return va, confidence, out

    monkeypatch.setattr(GRUBaseline, 'forward_sequence', spy)
    train(store, TrainConfig(model='gru', model_config=TINY['gru'], out_dir=str(tmp_path), steps=2,
                             batch_size=4, window=8, eval_every=2, device='cpu', plots=False, progress=False))
    fresh = [k for k, (start, _, _) in enumerate(calls) if not start.abs().sum()]
    assert len(fresh) == 2  # one per optimiser step (batch)
    carried = [k for k in range(len(calls)) if k not in fresh]
    assert len(carried) >= 4
    for k in carried:
        torch.testing.assert_close(calls[k][0], calls[k - 1][1])


def test_saved_checkpoint_holds_the_moving_average_of_the_weights(store, tmp_path):
    """The EMA is recomputed here from the live weights after every optimiser step and compared with
    the saved checkpoint (not with the training code's own EMA object)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    snapshots = []
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: snapshots.append(
        [p.detach().clone() for group in optimizer.param_groups for p in group['params']]))
    try:
        result = train(store, TrainConfig(model='mlp', model_config=TINY['mlp'], out_dir=str(tmp_path),
                                          steps=6, eval_every=6, batch_size=4, lr=1e-2, ema_decay=0.9,
                                          device='cpu', plots=False, progress=False))
    finally:
        handle.remove()
    assert len(snapshots) == 6 and result.best_step == 6
    torch.manual_seed(0)
    saved = load_checkpoint(result.checkpoint_path).model
    from affective_trm_ros.offline.learning.train import parameter_groups, seed_everything

    seed_everything(0)
    initial = build_model('mlp', store.dims, TINY['mlp'])
    order = [p for group in parameter_groups(initial, 0.01) for p in group['params']]
    names = {id(p): n for n, p in initial.named_parameters()}
    expected = [p.detach().clone() for p in order]
    for n, weights in enumerate(snapshots, start=1):
        decay = min(0.9, (1.0 + n) / (10.0 + n))
        expected = [e * decay + w * (1 - decay) for e, w in zip(expected, weights)]
    saved_params = dict(saved.named_parameters())
    for p, value in zip(order, expected):
        torch.testing.assert_close(saved_params[names[id(p)]].detach(), value, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(saved_params['output_head.weight'], initial.output_head.weight, atol=1e-4)


def test_normalisation_comes_from_the_training_split_only(tmp_path):
    rng = np.random.default_rng(11)
    store = FeatureStore(tmp_path / 'offsets', encoder_spec=SPEC)
    for index in range(6):
        frames = 25
        offset = 0.0 if index < 4 else 50.0  # validation/test sessions sit elsewhere
        mask = np.ones((frames, 2), bool)
        mask[::3, 0] = False
        audio = rng.normal(offset, 2.0, (frames, 4))
        audio[~mask[:, 0]] = 0.0
        store.write_session(f'o{index}', speaker=f'p{index}', timestamps=np.arange(frames) / 10,
                            features={'audio': audio, 'video': rng.normal(0, 1, (frames, 6))}, mask=mask,
                            labels=rng.uniform(-1, 1, (frames, 2)).astype(np.float32))
    splits = {'train': ['o0', 'o1', 'o2', 'o3'], 'val': ['o4'], 'test': ['o5']}
    result = train(store, TrainConfig(model='mlp', model_config=TINY['mlp'], out_dir=str(tmp_path / 'run'),
                                      steps=1, splits=splits, device='cpu', plots=False, progress=False))
    model = load_checkpoint(result.checkpoint_path).model
    sessions = [store.load(s) for s in splits['train']]
    rows = np.concatenate([session.features['audio'][session.mask[:, 0]] for session in sessions])
    np.testing.assert_allclose(model.feature_mean[:4].numpy(), rows.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.feature_std[:4].numpy(), rows.std(0), rtol=1e-4)


def test_deterministic_option_turns_on_deterministic_algorithms(store, tmp_path):
    before = torch.are_deterministic_algorithms_enabled()
    try:
        result = train(store, TrainConfig(model='mlp', model_config=TINY['mlp'], out_dir=str(tmp_path),
                                          steps=1, deterministic=True, device='cpu', plots=False,
                                          progress=False))
        assert torch.are_deterministic_algorithms_enabled()
        assert load_checkpoint(result.checkpoint_path).metadata['deterministic'] is True
    finally:
        torch.use_deterministic_algorithms(before)


def test_checkpoint_records_the_audio_policy_its_features_were_aligned_with(store, tmp_path):
    import shutil

    causal = tmp_path / 'causal'
    shutil.copytree(store.root, causal)
    causal_store = FeatureStore(causal)
    for session_id in causal_store.session_ids():
        session = causal_store.load(session_id)
        causal_store.write_session(session_id, speaker=session.speaker, timestamps=session.timestamps,
                                   features=session.features, mask=session.mask, labels=session.labels,
                                   meta={**session.meta, 'alignment': {'audio_policy': 'causal'}})
    config = TrainConfig(model='mlp', model_config=TINY['mlp'], out_dir=str(tmp_path / 'run'), epochs=1,
                         batch_size=4, window=16, device='cpu', progress=False)
    assert load_checkpoint(train(causal_store, config).checkpoint_path).audio_policy == 'causal'
    # Stores prepared before policies were recorded count as the earlier 'nearest' alignment.
    config = dataclasses.replace(config, out_dir=str(tmp_path / 'legacy'))
    assert load_checkpoint(train(store, config).checkpoint_path).audio_policy == 'nearest'
