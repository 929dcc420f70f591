"""FusionPredictor: batched multi-stream serving with per-stream states."""

import numpy as np
import pytest
import torch

from affective_trm_ros.core.baselines import MemorylessMLP, MLPConfig
from affective_trm_ros.core.checkpoint import save_checkpoint
from affective_trm_ros.core.predictor import FusionPredictor
from affective_trm_ros.core.trm import StatefulTRM, TRMConfig

torch.set_num_threads(1)  # tiny models: one thread avoids contention on a shared CPU

DIMS = {'audio': 12, 'video': 20, 'text': 8}
SPEC = [{'modality': 'audio', 'encoder': 'dasheng_base', 'dim': 12},
        {'modality': 'video', 'encoder': 'hsemotion_enet_b0', 'dim': 20},
        {'modality': 'text', 'encoder': 'minilm', 'dim': 8}]


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = StatefulTRM(TRMConfig(modality_dims=DIMS, hidden_size=32, num_heads=4, h_cycles=2))
    model.set_normalization(torch.randn(40), torch.rand(40) + 0.5)
    return save_checkpoint(tmp_path_factory.mktemp('ckpt') / 'trm.pt', model, SPEC, {'note': 'test'})


def frames(seed, count):
    rng = np.random.default_rng(seed)
    return [{'audio': rng.normal(size=12).astype(np.float32), 'video': rng.normal(size=20),
             'text': None if i % 2 else rng.normal(size=8)} for i in range(count)]


def test_exposes_the_checkpoint_spec_and_dims(checkpoint):
    predictor = FusionPredictor(checkpoint, device='cpu')
    assert predictor.encoder_spec == SPEC
    assert predictor.dims == DIMS
    assert predictor.kind == 'trm' and predictor.metadata == {'note': 'test'}
    assert predictor.device == torch.device('cpu')
    predictor.check_encoders(SPEC)
    with pytest.raises(ValueError, match='minilm'):
        predictor.check_encoders(SPEC[:2] + [{'modality': 'text', 'encoder': 'embeddinggemma', 'dim': 768}])


def test_batched_streams_match_streams_run_alone(checkpoint):
    together = FusionPredictor(checkpoint, device='cpu')
    alone_a, alone_b = FusionPredictor(checkpoint, device='cpu'), FusionPredictor(checkpoint, device='cpu')
    for fa, fb in zip(frames(1, 5), frames(2, 5)):
        both = together.step([('a', fa), ('b', fb)])
        expected = alone_a.step([('a', fa)]) + alone_b.step([('b', fb)])
        np.testing.assert_allclose(both, expected, atol=1e-5)
    assert sorted(together.streams()) == ['a', 'b']


def test_state_persists_and_reset_affects_only_that_stream(checkpoint):
    predictor = FusionPredictor(checkpoint, device='cpu')
    probe = frames(9, 1)[0]
    first = predictor.step([('a', probe), ('b', probe)])
    for frame in frames(3, 4):
        predictor.step([('a', frame), ('b', frame)])
    later = predictor.step([('a', probe)])[0]
    assert not np.allclose(later[:2], first[0][:2], atol=1e-4)  # history matters
    assert predictor.reset('a') == ['a']
    assert predictor.reset('a') == []  # already gone
    after = predictor.step([('a', probe), ('b', probe)])
    np.testing.assert_allclose(after[0], first[0], atol=1e-6)      # 'a' starts again
    assert not np.allclose(after[1][:2], first[1][:2], atol=1e-4)  # 'b' kept its memory
    assert sorted(predictor.reset()) == ['a', 'b'] and predictor.streams() == []


def test_outputs_are_bounded_floats_and_missing_modalities_lower_confidence(checkpoint):
    predictor = FusionPredictor(checkpoint, device='cpu')
    full, partial = predictor.step([('a', {'audio': np.ones(12), 'video': np.ones(20), 'text': np.ones(8)}),
                                    ('b', {'video': np.ones(20)})])
    for valence, arousal, confidence in (full, partial):
        assert all(isinstance(v, float) for v in (valence, arousal, confidence))
        assert -1 <= valence <= 1 and -1 <= arousal <= 1 and 0 <= confidence <= 1
    assert partial[2] < full[2]
    assert predictor.step([]) == []


def test_bad_inputs_are_refused_with_the_stream_and_modality_named(checkpoint):
    predictor = FusionPredictor(checkpoint, device='cpu')
    with pytest.raises(ValueError, match=r"'x'.*'video' has 19 values, the model expects 20"):
        predictor.step([('x', {'video': np.zeros(19)})])
    with pytest.raises(ValueError, match='unknown modalities'):
        predictor.step([('x', {'smell': np.zeros(3)})])
    with pytest.raises(ValueError, match='NaN'):
        predictor.step([('x', {'audio': np.full(12, np.nan)})])
    with pytest.raises(ValueError, match='twice'):
        predictor.step([('x', {}), ('x', {})])
    assert predictor.streams() == []  # nothing half-applied


def test_memoryless_models_serve_through_the_same_api():
    torch.manual_seed(0)
    predictor = FusionPredictor.from_model(MemorylessMLP(MLPConfig(modality_dims=DIMS, hidden_size=8)), SPEC,
                                           device='cpu')
    a = predictor.step([('a', frames(1, 1)[0]), ('b', frames(2, 1)[0])])
    b = predictor.step([('b', frames(2, 1)[0])])
    np.testing.assert_allclose(a[1], b[0], atol=1e-6)
    assert predictor.reset() == ['a', 'b']


def test_missing_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.pt'):
        FusionPredictor(tmp_path / 'missing.pt', device='cpu')
