"""The stateful TRM and the baselines: state, reset, masking, bounds, sequence API, learning."""

import math

import pytest
import torch

from affective_trm_ros.core.baselines import GRUBaseline, GRUConfig, MemorylessMLP, MLPConfig
from affective_trm_ros.core.trm import (
    SeedTRM,
    StatefulTRM,
    TRMConfig,
    TRMState,
    detach_state,
    split_state,
    stack_states,
    swiglu_width,
)

torch.set_num_threads(1)  # tiny models: one thread avoids contention on a shared CPU

# Small modality dims keep these tests fast; the architecture does not depend on the sizes.
DIMS = {'audio': 12, 'video': 20, 'text': 8}
D = sum(DIMS.values())


def small_trm(**overrides) -> StatefulTRM:
    options = dict(modality_dims=DIMS, hidden_size=32, num_heads=4, h_cycles=2, l_cycles=2)
    options.update(overrides)
    torch.manual_seed(0)
    return StatefulTRM(TRMConfig(**options)).eval()


def all_models():
    torch.manual_seed(0)
    return [small_trm(), small_trm(mixer='mlp'),
            SeedTRM(TRMConfig(modality_dims=DIMS, hidden_size=32, num_heads=4, num_layers=2, expansion=4.0,
                              h_cycles=2, l_cycles=1, grad_cycles=2, seed_compatible=True)).eval(),
            MemorylessMLP(MLPConfig(modality_dims=DIMS, hidden_size=32)).eval(),
            GRUBaseline(GRUConfig(modality_dims=DIMS, hidden_size=32)).eval()]


def inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, D, generator=g), torch.ones(batch, 3, dtype=torch.bool)


def test_swiglu_width_rounds_like_the_reference():
    assert swiglu_width(512, 4.0) == 1536  # round(1365.3) -> next multiple of 256
    assert swiglu_width(128, 2.0) == 256


@pytest.mark.parametrize('bad', [dict(hidden_size=30, num_heads=4), dict(mixer='conv'),
                                 dict(grad_cycles=3, h_cycles=2), dict(state_gradient='full'),
                                 dict(modality_dims={'video': 4, 'audio': 3}),
                                 dict(modality_dims={'smell': 3}), dict(h_cycles=0)])
def test_config_rejects_invalid_values(bad):
    with pytest.raises(ValueError):
        TRMConfig(**bad)


def test_state_persists_across_frames_and_reset_restores_initial_behaviour():
    model = small_trm()
    x, mask = inputs(batch=1)
    history = torch.randn(4, 1, D, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fresh_va, _, _ = model.step(x, mask, model.initial_state(1))
        state = model.initial_state(1)
        for frame in history:
            _, _, state = model.step(frame, mask, state)
        after_history_va, _, state = model.step(x, mask, state)
        reset = model.reset_state(state, torch.tensor([True]))
        reset_va, _, _ = model.step(x, mask, reset)
    assert (after_history_va - fresh_va).abs().max() > 1e-3  # the past changes the present
    torch.testing.assert_close(reset_va, fresh_va)


def test_different_histories_give_different_outputs_for_the_same_input():
    model = small_trm()
    x, mask = inputs(batch=1)
    outputs = []
    with torch.no_grad():
        for seed in (11, 12):
            state = model.initial_state(1)
            for frame in torch.randn(3, 1, D, generator=torch.Generator().manual_seed(seed)):
                _, _, state = model.step(frame, mask, state)
            outputs.append(model.step(x, mask, state)[0])
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


@pytest.mark.parametrize('index', range(5))
def test_per_stream_reset_is_isolated_within_a_batch(index):
    model = all_models()[index]
    x, mask = inputs(batch=3)
    with torch.no_grad():
        state = model.initial_state(3)
        for _ in range(3):
            _, _, state = model.step(torch.randn(3, D), mask, state)
        reset = model.reset_state(state, torch.tensor([False, True, False]))
        va, conf, _ = model.step(x, mask, reset)
        kept_va, _, _ = model.step(x, mask, state)
        fresh_va, _, _ = model.step(x[1:2], mask[1:2], model.initial_state(1))
    torch.testing.assert_close(va[1:2], fresh_va)
    torch.testing.assert_close(va[[0, 2]], kept_va[[0, 2]])
    for before, after in zip(state, reset):
        torch.testing.assert_close(before[[0, 2]], after[[0, 2]])


@pytest.mark.parametrize('index', range(5))
def test_masked_modality_values_have_no_effect(index):
    model = all_models()[index]
    x, _ = inputs(batch=2)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    other = x.clone()
    other[0, 12:32] = torch.randn(20) * 100  # video of stream 0 (masked)
    other[1, 0:12] = float('nan')            # audio of stream 1 (masked)
    with torch.no_grad():
        state = model.initial_state(2)
        va1, conf1, s1 = model.step(x, mask, state)
        va2, conf2, s2 = model.step(other, mask, state)
        unmasked_va, _, _ = model.step(other.nan_to_num(), torch.ones(2, 3, dtype=torch.bool), state)
    torch.testing.assert_close(va1, va2)
    torch.testing.assert_close(conf1, conf2)
    for a, b in zip(s1, s2):
        torch.testing.assert_close(a, b)
    assert (unmasked_va - va2).abs().max() > 1e-4  # the same values do matter when present


@pytest.mark.parametrize('index', range(5))
def test_outputs_are_bounded_and_confidence_is_zero_without_input(index):
    model = all_models()[index]
    x = torch.randn(4, D) * 1e3
    full = torch.ones(4, 3, dtype=torch.bool)
    partial = torch.tensor([[True, False, False]] * 4)
    with torch.no_grad():
        va, conf_full, _ = model.step(x, full, model.initial_state(4))
        _, conf_partial, _ = model.step(x, partial, model.initial_state(4))
        _, conf_none, _ = model.step(x, torch.zeros(4, 3, dtype=torch.bool), model.initial_state(4))
    assert va.shape == (4, 2) and conf_full.shape == (4,)
    assert va.abs().max() <= 1.0
    assert ((conf_full >= 0) & (conf_full <= 1)).all()
    if model.learns_confidence:  # learned (Gaussian NLL): nothing to say before training
        assert ((conf_partial > 0) & (conf_partial <= 1)).all()
    else:  # the seed-compatible mode: the present fraction
        assert (conf_partial < conf_full).all()
    assert (conf_none == 0).all()


@pytest.mark.parametrize('index', range(5))
def test_forward_sequence_equals_repeated_step(index):
    model = all_models()[index]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, D, generator=g)
    mask = torch.rand(2, 6, 3, generator=g) > 0.3
    with torch.no_grad():
        va_seq, conf_seq, final = model.forward_sequence(x, mask)
        state = model.initial_state(2)
        steps = []
        for t in range(6):
            va, conf, state = model.step(x[:, t], mask[:, t], state)
            steps.append((va, conf))
    torch.testing.assert_close(va_seq, torch.stack([s[0] for s in steps], 1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(conf_seq, torch.stack([s[1] for s in steps], 1), atol=1e-5, rtol=1e-4)
    for a, b in zip(final, state):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_normalization_is_applied_inside_the_model():
    model = small_trm()
    x, mask = inputs(batch=2)
    mean, std = torch.randn(D), torch.rand(D) + 0.5
    with torch.no_grad():
        reference, _, _ = model.step((x - mean) / std, mask, model.initial_state(2))
        model.set_normalization(mean, std)
        va, _, _ = model.step(x, mask, model.initial_state(2))
    torch.testing.assert_close(va, reference)
    with pytest.raises(ValueError, match='40 features'):
        model.set_normalization(torch.zeros(5), torch.ones(5))


def test_bad_shapes_are_rejected_with_clear_errors():
    model = small_trm()
    with pytest.raises(ValueError, match=r'\(B, 40\)'):
        model.step(torch.zeros(1, 39), torch.ones(1, 3, dtype=torch.bool), model.initial_state(1))
    with pytest.raises(ValueError, match='mask'):
        model.step(torch.zeros(1, 40), torch.ones(1, 2, dtype=torch.bool), model.initial_state(1))
    with pytest.raises(ValueError, match='bool'):
        model.step(torch.zeros(1, 40), torch.ones(1, 3), model.initial_state(1))


def test_state_helpers_split_stack_and_detach():
    model = small_trm()
    state = model.initial_state(3)
    parts = split_state(state, 3)
    assert isinstance(parts[0], TRMState) and parts[0].y.shape[0] == 1
    rebuilt = stack_states(parts)
    torch.testing.assert_close(rebuilt.z, state.z)
    assert stack_states([(), ()]) == ()
    assert not detach_state(TRMState(state.y.requires_grad_(), state.z)).y.requires_grad


def test_gradients_reach_the_carried_state_only_as_configured():
    x, mask = inputs(batch=1)
    outputs = {}
    for grad_cycles, state_gradient, expect_grad in ((1, 'none', False), (2, 'none', True),
                                                     (1, 'identity', True)):
        model = small_trm(grad_cycles=grad_cycles, state_gradient=state_gradient, carry_gate=False).train()
        state = model.initial_state(1)
        state = TRMState(state.y.detach().requires_grad_(), state.z.detach().requires_grad_())
        va, _, _ = model.step(x, mask, state)
        va.sum().backward()
        has_grad = state.y.grad is not None and state.y.grad.abs().sum() > 0
        assert has_grad == expect_grad
        outputs[(grad_cycles, state_gradient)] = va.detach()
    # The Jacobian-free path changes gradients only, never values.
    torch.testing.assert_close(outputs[(1, 'identity')], outputs[(1, 'none')])


def test_the_carry_gate_mixes_the_previous_and_the_new_state():
    model = small_trm()
    x, mask = inputs(batch=1)
    state = model.initial_state(1)
    with torch.no_grad():
        _, _, gated = model.step(x, mask, state)
        new_y, new_z = model._recurse(model.embed_inputs(x, mask), state.y, state.z)
    for old, new, out in ((state.y, new_y, gated.y), (state.z, new_z, gated.z)):
        low, high = torch.minimum(old, new), torch.maximum(old, new)
        assert ((out >= low - 1e-6) & (out <= high + 1e-6)).all()  # per channel, between old and new
        assert (out - new).abs().max() > 1e-3 and (out - old).abs().max() > 1e-3
    with pytest.raises(ValueError, match='carry_gate'):
        TRMConfig(modality_dims=DIMS, seed_compatible=True, carry_gate=True)


def _toy_stream(batch, steps, generator):
    """Valence/arousal = a slow random walk, seen through video only every 4th frame (memory needed)."""
    target = torch.cumsum(torch.randn(batch, steps, 2, generator=generator) * 0.15, dim=1).clamp(-0.9, 0.9)
    x = torch.randn(batch, steps, D, generator=generator) * 0.1
    x[..., 12:14] += target  # video block carries the target
    mask = torch.ones(batch, steps, 3, dtype=torch.bool)
    mask[:, :, 1] = (torch.arange(steps) % 4 == 0)
    return x, mask, target


def test_a_tiny_training_run_decreases_the_loss():
    torch.manual_seed(0)
    model = small_trm().train()  # default recursion: last deep recursion with gradients
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(50):
        x, mask, target = _toy_stream(8, 10, g)
        va, _, _ = model.forward_sequence(x, mask)
        loss = torch.nn.functional.mse_loss(va, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
