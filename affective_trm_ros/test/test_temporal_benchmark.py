"""The synthetic temporal benchmark: its data carry what the design says, and the harness runs."""

import json

import numpy as np
import pytest
import torch

from affective_trm_ros.benchmarks.temporal import (
    TemporalBenchmarkConfig,
    build_store,
    results_markdown,
    run_temporal_benchmark,
)
from affective_trm_ros.core.checkpoint import load_checkpoint
from affective_trm_ros.core.metrics import ccc


def small_config(**overrides):
    values = dict(small=True, train_streams=6, val_streams=2, test_streams=3, frames=120)
    values.update(overrides)
    return TemporalBenchmarkConfig(**values)


def test_streams_are_seeded_and_speaker_disjoint():
    store_a, splits_a = build_store(small_config())
    store_b, _ = build_store(small_config())
    store_c, _ = build_store(small_config(seed=1))
    first = splits_a['train'][0]
    np.testing.assert_array_equal(store_a.load(first).inputs(), store_b.load(first).inputs())
    assert not np.array_equal(store_a.load(first).labels, store_c.load(first).labels)
    assert len(splits_a['test']) == 3 and not set(splits_a['test']) & set(splits_a['train'])
    assert store_a.dims == {'audio': 16, 'video': 32, 'text': 16}
    full, _ = build_store(small_config(small=False, train_streams=1, val_streams=0, test_streams=0, frames=5))
    assert full.dims == {'audio': 768, 'video': 1280, 'text': 768}


def test_modalities_carry_what_the_design_says():
    store, splits = build_store(small_config(train_streams=40, frames=240))
    sessions = [store.load(sid) for sid in splits['train']]
    mask = np.concatenate([s.mask for s in sessions])
    presence = dict(zip(store.modalities, mask.mean(0)))
    assert 0.15 < presence['video'] < 0.4          # the face is visible only in stretches
    assert presence['audio'] > 0.8
    labels = np.concatenate([s.labels for s in sessions])
    assert np.abs(labels).max() <= 0.9 and labels.std(0).min() > 0.2

    def explained(block, target):
        """R² of a least-squares fit of target from the features (with intercept)."""
        design = np.hstack([block, np.ones((block.shape[0], 1))])
        coef, *_ = np.linalg.lstsq(design, target, rcond=None)
        residual = target - design @ coef
        return 1 - residual.var(0) / target.var(0)

    video = np.concatenate([s.features['video'][s.mask[:, 1]] for s in sessions])
    video_labels = np.concatenate([s.labels[s.mask[:, 1]] for s in sessions])
    assert explained(video, video_labels).min() > 0.8           # video: the present state
    audio = np.concatenate([s.features['audio'][s.mask[:, 0]] for s in sessions])
    audio_labels = np.concatenate([s.labels[s.mask[:, 0]] for s in sessions])
    derivative = np.concatenate([np.gradient(s.labels, axis=0)[s.mask[:, 0]] for s in sessions])
    assert explained(audio, audio_labels).max() < 0.2           # audio: not the state ...
    assert explained(audio, derivative).min() > 0.5             # ... but its rate of change
    text = np.concatenate([s.features['text'][s.mask[:, 2]] for s in sessions])
    text_labels = np.concatenate([s.labels[s.mask[:, 2]] for s in sessions])
    r2 = explained(text, text_labels)
    assert 0.08 < r2[0] < 0.95 and r2[1] < r2[0] / 3             # text: stale valence, no arousal


def test_benchmark_harness_writes_table_and_json(tmp_path):
    torch.set_num_threads(1)
    results = run_temporal_benchmark(small_config(epochs=2, models=('mlp', 'gru'), out_dir=str(tmp_path)))
    assert set(results['models']) == {'mlp', 'gru'}
    # Independent reference: each saved model stepped over every whole test stream from its initial state.
    store, splits = build_store(small_config())
    for kind, entry in results['models'].items():
        model = load_checkpoint(tmp_path / kind / 'best.pt').model.eval()
        preds, labels = [], []
        with torch.no_grad():
            for sid in splits['test']:
                session = store.load(sid)
                va, _, _ = model.forward_sequence(torch.from_numpy(session.inputs())[None],
                                                  torch.from_numpy(session.mask)[None])
                preds.append(va[0].numpy())
                labels.append(session.labels)
        preds, labels = np.concatenate(preds), np.concatenate(labels)
        for column, name in enumerate(('valence', 'arousal')):
            expected = ccc(preds[:, column], labels[:, column])
            assert entry['test'][name]['ccc'] == pytest.approx(expected, abs=1e-5)
        assert entry['parameters'] == sum(p.numel() for p in model.parameters())
    saved = json.loads((tmp_path / 'results.json').read_text())
    assert saved['models']['gru']['test']['valence']['n'] == 3 * 120
    table = (tmp_path / 'results.md').read_text()
    assert table == results_markdown(results) and '| GRU (`gru`)' in table and 'CCC mean' in table
