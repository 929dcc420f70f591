"""FusionPredictor.from_model: what it serves and reports, on small constructed models."""

import numpy as np
import pytest
import torch

from affective_trm_ros.core.baselines import MemorylessMLP, MLPConfig
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
