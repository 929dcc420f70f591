"""Pieces of the training loop on hand-made inputs: decay groups, schedule values, the weight average."""

import math

import pytest
import torch

from affective_trm_ros.core.trm import StatefulTRM, TRMConfig
from affective_trm_ros.offline.learning.train import WeightEMA, lr_factor, parameter_groups


def test_weight_decay_applies_to_weight_matrices_only():
    torch.manual_seed(0)
    model = StatefulTRM(TRMConfig(modality_dims={'audio': 3, 'video': 4}, hidden_size=8, num_heads=2))
    decay, plain = parameter_groups(model, 0.05)
    assert decay['weight_decay'] == 0.05 and plain['weight_decay'] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay['params'])
    kept = sorted(names[id(p)] for p in plain['params'])
    # Matrices decay, except the learned states and tokens (2-D, but not weights); vectors never.
    assert {'absent_tokens', 'token_embedding', 'y_init', 'z_init'} <= set(kept)
    assert 'input_proj.0.weight' in decayed and 'net.layers.0.self_attn.qkv_proj.weight' in decayed
    assert 'input_proj.0.bias' in kept and 'output_head.bias' in kept
    assert all(model.get_parameter(n).dim() >= 2 for n in decayed)
    assert all(not any(k in n.rsplit('.', 1)[-1] for k in ('init', 'absent', 'embedding', 'token'))
               for n in decayed)
    assert 'modality_weight_logits' not in kept + decayed   # frozen: in no group
    assert len(decayed) + len(kept) == sum(1 for p in model.parameters() if p.requires_grad)


def test_weight_decay_looks_at_the_last_name_component_only():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.token_mixer = torch.nn.Linear(3, 3)   # 'token' in a module name, not the leaf
            self.init_state = torch.nn.Parameter(torch.zeros(2, 3))
            self.cube = torch.nn.Parameter(torch.zeros(2, 2, 2))

    net = Net()
    decay, plain = parameter_groups(net, 0.1)
    assert {id(p) for p in decay['params']} == {id(net.token_mixer.weight), id(net.cube)}
    assert {id(p) for p in plain['params']} == {id(net.token_mixer.bias), id(net.init_state)}


def test_learning_rate_schedule_values():
    # warm-up 4 of 14 steps: 1/4, 2/4, 3/4, 4/4, then cosine from 1 to 0.1 over 10 steps.
    assert [lr_factor(s, 14, 4, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 14, 4, 0.1) == pytest.approx(1.0)
    assert lr_factor(9, 14, 4, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(14, 14, 4, 0.1) == pytest.approx(0.1)
    assert lr_factor(30, 14, 4, 0.1) == pytest.approx(0.1)   # past the end: stays at the minimum
    assert lr_factor(0, 10, 0, 0.0) == pytest.approx(1.0)    # no warm-up
    assert lr_factor(5, 10, 0, 0.0) == pytest.approx(0.5)
    assert lr_factor(3, 3, 3, 0.2) == pytest.approx(1.0)     # nothing after the warm-up


def test_weight_average_follows_the_ramped_decay_exactly():
    model = torch.nn.Linear(1, 1, bias=False)
    model.register_buffer('steps', torch.tensor(0))
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = WeightEMA(model, decay=0.2)
    expected = 0.0
    for update, value in enumerate([1.0, 2.0, 4.0], start=1):
        with torch.no_grad():
            model.weight.fill_(value)
            model.steps.fill_(update)
        ema.update(model)
        decay = min(0.2, (1 + update) / (10 + update))   # 2/11, then the cap 0.2
        expected = decay * expected + (1 - decay) * value
        assert ema.shadow.weight.item() == pytest.approx(expected, rel=1e-6)
        assert ema.shadow.steps.item() == update   # integer buffers are copied, not averaged
    assert ema.updates == 3 and not ema.shadow.weight.requires_grad and not ema.shadow.training
    assert model.weight.item() == 4.0   # the live model is untouched
