"""FusionPredictor.from_model: what it serves and reports, on small constructed models."""

import numpy as np
import pytest
import torch

from affective_trm_ros.core.baselines import MemorylessMLP, MLPConfig
from affective_trm_ros.core.checkpoint import save_checkpoint
from affective_trm_ros.core.device import resolve_device
from affective_trm_ros.core.predictor import FusionPredictor
from affective_trm_ros.core.trm import StatefulTRM, TRMConfig

DIMS = {'audio': 3, 'video': 4}
SPEC = [{'modality': 'audio', 'encoder': 'a', 'dim': 3}, {'modality': 'video', 'encoder': 'v', 'dim': 4}]


def test_from_model_reports_the_model_and_its_context():
    torch.manual_seed(0)
    model = StatefulTRM(TRMConfig(modality_dims=DIMS, hidden_size=8, num_heads=2))
    predictor = FusionPredictor.from_model(model, SPEC, metadata={'epoch': 3}, capacity=2)
    assert predictor.device == resolve_device('auto')  # the default device
    assert predictor.kind == 'trm' and predictor.checkpoint.config is model.config
    assert predictor.metadata == {'epoch': 3} and predictor.source == '<in-memory model>'
    assert predictor.encoder_spec == SPEC and predictor.dims == DIMS and predictor.capacity == 2
    assert not predictor.model.training
    with pytest.raises(ValueError, match='capacity must be >= 1, got 0'):
        FusionPredictor.from_model(model, SPEC, device='cpu', capacity=0)


def test_a_memoryless_model_is_served_frame_by_frame():
    torch.manual_seed(0)
    model = MemorylessMLP(MLPConfig(modality_dims=DIMS, hidden_size=8)).eval()
    predictor = FusionPredictor.from_model(model, SPEC, device='cpu')
    audio, video = np.arange(3, dtype=np.float32), np.ones(4, np.float32)
    first = predictor.step([('a', {'audio': audio, 'video': video}), ('b', {'video': video})])
    again = predictor.step([('a', {'audio': audio, 'video': video})])
    with torch.no_grad():
        va, confidence, _ = model.step(torch.from_numpy(np.concatenate([audio, video]))[None],
                                       torch.tensor([[True, True]]), ())
    expected = (float(va[0, 0]), float(va[0, 1]), float(confidence[0]))
    assert first[0] == pytest.approx(expected, abs=1e-6) and again[0] == pytest.approx(expected, abs=1e-6)
    assert predictor.streams() == ['a', 'b']


def test_from_a_checkpoint_file_with_the_default_device(tmp_path):
    torch.manual_seed(0)
    model = StatefulTRM(TRMConfig(modality_dims=DIMS, hidden_size=8, num_heads=2))
    path = save_checkpoint(tmp_path / 'tiny.pt', model, SPEC, {'epoch': 1})
    predictor = FusionPredictor(path)
    assert predictor.device == resolve_device('auto') and predictor.source == str(path)
    assert predictor.modalities == ('audio', 'video') and predictor.metadata['epoch'] == 1
    assert predictor.checkpoint.kind == 'trm' and predictor.capacity == 16


def test_slots_double_when_full_and_inputs_are_flattened_and_checked():
    torch.manual_seed(0)
    model = StatefulTRM(TRMConfig(modality_dims=DIMS, hidden_size=8, num_heads=2))
    predictor = FusionPredictor.from_model(model, SPEC, device='cpu', capacity=2)
    video = np.ones((1, 4), np.float32)   # a (1, dim) vector is taken as (dim,)
    predictor.step([(name, {'video': video}) for name in 'abc'])
    assert predictor.capacity == 4 and predictor.streams() == ['a', 'b', 'c']
    predictor.step([('d', {'video': video}), ('e', {'video': video})])
    assert predictor.capacity == 8
    with pytest.raises(ValueError, match=r"^stream 'x': features must be a dict modality -> vector or None$"):
        predictor.step([('x', [1.0, 2.0])])
