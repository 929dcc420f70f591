"""core.encoders.runtime: ONNX Runtime runs the face network with PyTorch's numbers.

Tolerance: 1e-4 relative plus 1e-5 of the largest feature magnitude (float32 sums in another
order; a wrong export differs by whole units).

The weights are a real-format file with BatchNorm statistics far from their defaults (a network
whose BatchNorm does nothing would hide a wrong export), and the inputs are real face crops.
"""

import importlib.util

import numpy as np
import pytest
import torch

from affective_trm_ros.benchmarks.face_frames import astronaut_head
from affective_trm_ros.core.encoders import runtime as runtime_module
from affective_trm_ros.core.encoders.base import load_encoder
from affective_trm_ros.core.encoders.video import build_efficientnet_b0

pytest.importorskip('onnxruntime', reason='onnxruntime is not installed')
pytest.importorskip('onnx', reason='onnx (the exporter onnxruntime needs) is not installed')


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """An HSEmotion-shaped state dict (8 classes) with non-default BatchNorm statistics and scales."""
    model = build_efficientnet_b0(None, 8, 'random init')
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.2)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.2)
    path = tmp_path_factory.mktemp('weights') / 'enet_b0_8_best_afew.pt'
    torch.save(model.state_dict(), path)
    return str(path)


def faces():
    return [astronaut_head(150), astronaut_head(210, mirror=True)]


def test_onnxruntime_gives_pytorchs_features_and_classes(weights):
    fast = load_encoder('hsemotion_enet_b0', device='cpu', weights=weights, runtime='onnxruntime')
    exact = load_encoder('hsemotion_enet_b0', device='cpu', weights=weights, runtime='torch')
    assert fast.runtime == 'onnxruntime' and exact.runtime == 'torch'
    ours, reference = fast.encode_faces(faces()), exact.encode_faces(faces())
    assert np.abs(reference.embeddings).max() > 0.1                  # features that carry numbers
    for got, expected in ((ours.embeddings, reference.embeddings),
                          (ours.extras['emotion_logits'], reference.extras['emotion_logits'])):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    # One face at a time and both in one batch give the same rows.
    single = fast.encode_faces(faces()[1:]).embeddings[0]
    np.testing.assert_allclose(single, ours.embeddings[1], rtol=1e-5, atol=1e-6)


def test_auto_uses_onnxruntime_on_cpu_and_falls_back_to_pytorch_without_it(weights, monkeypatch):
    assert load_encoder('hsemotion_enet_b0', device='cpu', weights=weights).runtime == 'onnxruntime'
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(runtime_module.importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'onnxruntime' else real_find_spec(name, *a))
    assert load_encoder('hsemotion_enet_b0', device='cpu', weights=weights).runtime == 'torch'
    with pytest.raises(RuntimeError, match='pip install onnxruntime'):
        load_encoder('hsemotion_enet_b0', device='cpu', weights=weights, runtime='onnxruntime')


def test_unknown_runtime_and_onnxruntime_off_the_cpu_are_refused():
    module = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match='unknown runtime'):
        runtime_module.accelerated(module, torch.zeros(1, 2), torch.device('cpu'), 'tensorrt')
    with pytest.raises(ValueError, match='CPU'):
        runtime_module.accelerated(module, torch.zeros(1, 2), torch.device('cuda'), 'onnxruntime')
    assert runtime_module.accelerated(module, torch.zeros(1, 2), torch.device('cuda'), 'auto') is None
