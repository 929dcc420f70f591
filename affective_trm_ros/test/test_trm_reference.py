"""The stateful TRM against an independent transcription of its forward pass, and exact small facts.

The reference below is written from the architecture in ``core/trm.py``'s docstrings with explicit
matrix products on the model's state dict (the weights are inputs; none of the model's modules or
helpers is called):

* normalised input ``(x - mean) / std``; one token per modality ``block @ W_m.T + b_m`` or the
  learned absent token when masked; a readout token of zeros; plus the token type embedding;
* shared network ``net(h, inj)``: ``h + inj`` then post-norm blocks
  ``h = rms(h + mix(h)); h = rms(h + swiglu(h))``, parameter-free RMSNorm (eps 1e-5), ``mix`` =
  softmax self-attention over the tokens (scale ``1/sqrt(head_dim)``, no RoPE) or a SwiGLU along
  the token axis;
* ``T`` x (``n`` x ``z = net(z, y + x)``, ``y = net(y, z)``), then the carry gate
  ``s = s_prev + sigmoid(W [s_prev, s_new] + b) * (s_new - s_prev)``;
* outputs ``tanh(head(y_readout))`` and ``sigmoid(certainty(y_readout))``, 0 with no modality.
"""

import dataclasses
import math

import pytest
import torch

from affective_trm_ros.core.trm import (
    CONFIDENCE_SIGMA_REF,
    SeedTRM,
    StatefulTRM,
    TRMConfig,
    TRMState,
    build_model,
    clone_state,
    config_from_dict,
    learned_confidence,
    rms_norm,
    rope_cos_sin,
    sigma_from_confidence,
    split_state,
    stack_states,
    straight_through_clamp,
    swiglu_width,
)

torch.set_num_threads(1)  # tiny models: one thread avoids contention on a shared CPU

DIMS = {'audio': 5, 'video': 7, 'text': 3}
D = sum(DIMS.values())
EPS = 1e-5


def rms(h, eps=EPS):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def swiglu(h, gate_up, down):
    width = gate_up.shape[0] // 2
    projected = h @ gate_up.T
    gate, up = projected[..., :width], projected[..., width:]
    return (gate * torch.sigmoid(gate) * up) @ down.T


def attention(h, qkv, out, heads):
    batch, tokens, hidden = h.shape
    head_dim = hidden // heads
    q, k, v = ((h @ qkv[i * hidden:(i + 1) * hidden].T).view(batch, tokens, heads, head_dim)
               for i in range(3))
    scores = torch.einsum('blhd,bmhd->bhlm', q, k) / math.sqrt(head_dim)
    mixed = torch.einsum('bhlm,bmhd->blhd', torch.softmax(scores, dim=-1), v)
    return mixed.reshape(batch, tokens, hidden) @ out.T


def reference_net(sd, config, h, injection):
    h = h + injection
    for i in range(config.num_layers):
        p = f'net.layers.{i}.'
        if config.mixer == 'attention':
            mixed = attention(h, sd[p + 'self_attn.qkv_proj.weight'], sd[p + 'self_attn.o_proj.weight'],
                              config.num_heads)
        else:  # SwiGLU along the token axis
            mixed = swiglu(h.transpose(1, 2), sd[p + 'token_mlp.mlp.gate_up_proj.weight'],
                           sd[p + 'token_mlp.mlp.down_proj.weight']).transpose(1, 2)
        h = rms(h + mixed, config.rms_norm_eps)
        h = rms(h + swiglu(h, sd[p + 'mlp.gate_up_proj.weight'], sd[p + 'mlp.down_proj.weight']),
                config.rms_norm_eps)
    return h


def reference_tokens(sd, config, x, mask):
    xn = (x - sd['feature_mean']) / sd['feature_std']
    tokens, start = [], 0
    for m, dim in enumerate(config.modality_dims.values()):
        projected = xn[:, start:start + dim] @ sd[f'input_proj.{m}.weight'].T + sd[f'input_proj.{m}.bias']
        tokens.append(torch.where(mask[:, m:m + 1], projected, sd['absent_tokens'][m]))
        start += dim
    tokens.append(torch.zeros_like(tokens[0]))
    return torch.stack(tokens, 1) + sd['token_embedding']


def reference_cycle(sd, config, x_tokens, y, z):
    for _ in range(config.l_cycles):
        z = reference_net(sd, config, z, y + x_tokens)
    return reference_net(sd, config, y, z), z


def reference_heads(sd, y, mask):
    readout = y[:, -1]
    va = torch.tanh(readout @ sd['output_head.weight'].T + sd['output_head.bias'])
    logit = (readout @ sd['certainty_head.weight'].T + sd['certainty_head.bias'])[:, 0]
    return va, torch.sigmoid(logit) * mask.any(-1).float()


def reference_step(sd, config, x, mask, y, z):
    x_tokens = reference_tokens(sd, config, x, mask)
    y_prev, z_prev = y, z
    for _ in range(config.h_cycles):
        y, z = reference_cycle(sd, config, x_tokens, y, z)
    if config.carry_gate:
        def gate(name, old, new):
            g = torch.sigmoid(torch.cat([old, new], -1) @ sd[name + '.weight'].T + sd[name + '.bias'])
            return old + g * (new - old)
        y, z = gate('carry_gate_y', y_prev, y), gate('carry_gate_z', z_prev, z)
    va, confidence = reference_heads(sd, y, mask)
    return va, confidence, y, z


def randomised_model(seed=0, **overrides) -> StatefulTRM:
    """A small TRM with every parameter and the normalisation moved away from its initial value.

    (Moved by 0.1 sd: much larger weights make the deep recursion chaotic, so float32 rounding
    alone separates two correct implementations after a few frames.)"""
    options = dict(modality_dims=DIMS, hidden_size=16, num_heads=4, num_layers=2, h_cycles=3, l_cycles=2)
    options.update(overrides)
    torch.manual_seed(seed)
    model = StatefulTRM(TRMConfig(**options)).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=g))
        dim = model.input_dim
        model.set_normalization(torch.randn(dim, generator=g), torch.rand(dim, generator=g) + 0.5)
    return model


@pytest.mark.parametrize('overrides', [dict(), dict(mixer='mlp'), dict(carry_gate=False),
                                       dict(h_cycles=2, l_cycles=3, grad_cycles=2, num_layers=1),
                                       dict(rms_norm_eps=0.3)],
                         ids=['attention+gate', 'mlp+gate', 'attention', 'shallow', 'rms-eps'])
def test_steps_match_the_independent_reference_over_frames(overrides):
    model = randomised_model(**overrides)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    masks = [torch.tensor([[True, True, True], [False, True, False]]),
             torch.tensor([[True, False, True], [False, False, False]]),
             torch.tensor([[False, True, True], [True, True, False]])]
    state = model.initial_state(2)
    y, z = sd['y_init'].expand(2, -1, -1), sd['z_init'].expand(2, -1, -1)
    confidences = []
    with torch.no_grad():
        for mask in masks:
            x = torch.randn(2, D, generator=g) * 2 + 0.5
            va, confidence, state = model.step(x, mask, state)
            ref_va, ref_confidence, y, z = reference_step(sd, model.config, x, mask, y, z)
            torch.testing.assert_close(va, ref_va, atol=5e-5, rtol=1e-4)
            torch.testing.assert_close(confidence, ref_confidence, atol=5e-5, rtol=1e-4)
            torch.testing.assert_close(state.y, y, atol=5e-5, rtol=1e-4)
            torch.testing.assert_close(state.z, z, atol=5e-5, rtol=1e-4)
            confidences.append(ref_confidence)
    assert ref_va.abs().max() > 0.05
    assert confidences[1][1] == 0 and all(0.05 < float(c[0]) < 0.95 for c in confidences)


def test_a_fresh_model_starts_at_confidence_one_half_and_its_initial_state_is_learned():
    torch.manual_seed(0)
    model = StatefulTRM(TRMConfig(modality_dims=DIMS, hidden_size=16, num_heads=4))
    assert model.certainty_head.weight.abs().sum() == 0 and model.certainty_head.bias.item() == 0.0
    assert model.learns_confidence and not model.modality_weight_logits.requires_grad
    x, mask = torch.randn(3, D), torch.tensor([[True, False, False]] * 3)
    with torch.no_grad():
        _, confidence, _ = model.step(x, mask, model.initial_state(3))
    torch.testing.assert_close(confidence, torch.full((3,), 0.5))
    state = model.initial_state(2)
    assert state.y.shape == state.z.shape == (2, 4, 16)
    torch.testing.assert_close(state.y[1], model.y_init.detach())
    torch.testing.assert_close(state.z[0], model.z_init.detach())
    assert model.readout_index == 3 and model.num_tokens == 4
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_initial_state_is_a_copy_not_a_view_of_the_parameters():
    model = randomised_model()
    state = model.initial_state(2)
    before = model.y_init.detach().clone()
    state.y.add_(1.0)
    torch.testing.assert_close(model.y_init.detach(), before)


def test_learned_confidence_and_sigma_are_exact_inverses():
    logit = torch.tensor([0.0, math.log(3.0), -math.log(3.0)])
    mask = torch.tensor([[True, False], [False, True], [False, False]])
    torch.testing.assert_close(learned_confidence(logit, mask), torch.tensor([0.5, 0.75, 0.0]))
    # sigma = ref * (1 - c) / c: c 0.5 -> ref, c 0.75 -> ref / 3, c 0.2 -> 4 ref.
    sigma = sigma_from_confidence(torch.tensor([0.5, 0.75, 0.2]))
    torch.testing.assert_close(sigma, CONFIDENCE_SIGMA_REF * torch.tensor([1.0, 1 / 3, 4.0]))
    # Clamped away from 0 and 1 so sigma stays finite and positive.
    extremes = sigma_from_confidence(torch.tensor([0.0, 1.0]))
    assert torch.isfinite(extremes).all() and (extremes > 0).all()
    torch.testing.assert_close(extremes[0], torch.tensor(CONFIDENCE_SIGMA_REF * (1 - 1e-6) / 1e-6))


def test_rms_norm_rope_and_clamp_on_hand_values():
    torch.testing.assert_close(rms_norm(torch.tensor([[3.0, 4.0]])),
                               torch.tensor([[3.0, 4.0]]) / math.sqrt(12.5 + 1e-5))
    assert rms_norm(torch.ones(2, dtype=torch.float64)).dtype == torch.float64
    cos, sin = rope_cos_sin(4, 3, 100.0)
    # head_dim 4: frequencies 1 and 1/10, duplicated (rotate-half layout); positions 0, 1, 2.
    angles = torch.tensor([[0.0, 0.0], [1.0, 0.1], [2.0, 0.2]]).repeat(1, 2)
    torch.testing.assert_close(cos, angles.cos())
    torch.testing.assert_close(sin, angles.sin())
    x = torch.tensor([-3.0, -0.5, 0.5, 2.0], requires_grad=True)
    clamped = straight_through_clamp(x)
    torch.testing.assert_close(clamped, torch.tensor([-1.0, -0.5, 0.5, 1.0]))
    clamped.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4))  # identity gradient, even where clamped
    assert swiglu_width(64, 1.0) == 256 and swiglu_width(384, 2.0) == 512 and swiglu_width(10, 3.0, 4) == 20


@pytest.mark.parametrize('bad, message', [
    (dict(expansion=0.0), 'expansion'),
    (dict(num_layers=0), 'num_layers'),
    (dict(l_cycles=0), 'l_cycles'),
    (dict(grad_cycles=0), 'grad_cycles'),
    (dict(hidden_size=0), 'hidden_size'),
    (dict(num_heads=3, hidden_size=16), 'divisible'),
    (dict(modality_dims={}), 'empty'),
    (dict(modality_dims={'audio': 0}), 'positive int'),
    (dict(modality_dims={'audio': True}), 'positive int'),
    (dict(modality_dims={'audio': 2.0}), 'positive int'),
    (dict(seed_compatible=True, mixer='mlp'), 'attention'),
])
def test_config_errors_name_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        TRMConfig(**bad)


def test_config_boundaries_that_are_valid():
    config = TRMConfig(modality_dims={'video': 4}, hidden_size=4, num_heads=4, h_cycles=2, grad_cycles=2)
    assert config.input_dim == 4 and config.carry_gate is True
    assert TRMConfig(seed_compatible=True).carry_gate is False
    assert TRMConfig.seed({'video': 8}).modality_dims == {'video': 8}
    with pytest.raises(ValueError, match="unknown TRMConfig fields \\['bogus'\\]"):
        config_from_dict({'hidden_size': 8, 'bogus': 1})
    assert config_from_dict({'hidden_size': 8, 'num_heads': 2}).hidden_size == 8
    assert isinstance(build_model(TRMConfig(modality_dims=DIMS, hidden_size=8, num_heads=2)), StatefulTRM)
    message = r'^config.seed_compatible is set; build SeedTRM \(or use build_model\)$'
    with pytest.raises(ValueError, match=message):
        StatefulTRM(TRMConfig(modality_dims=DIMS, hidden_size=8, num_heads=2, seed_compatible=True))
    with pytest.raises(ValueError, match='seed-compatible config'):
        SeedTRM(TRMConfig(modality_dims=DIMS, hidden_size=8, num_heads=2))


def test_normalisation_guards_and_exact_values():
    model = randomised_model()
    with pytest.raises(ValueError, match='NaN or infinite'):
        model.set_normalization(torch.full((D,), float('nan')), torch.ones(D))
    with pytest.raises(ValueError, match='NaN or infinite'):
        model.set_normalization(torch.zeros(D), torch.full((D,), float('inf')))
    model.set_normalization(torch.arange(D, dtype=torch.float64), torch.zeros(D))  # constant features
    assert model.feature_std.dtype == torch.float32 and (model.feature_std > 0).all()
    x = torch.arange(D, dtype=torch.float32)[None] + 1.0
    mask = torch.tensor([[True, False, True]])
    normalised = model.normalize(x, mask)
    assert torch.isfinite(normalised).all()
    assert (normalised[0, 5:12] == 0).all() and (normalised[0, :5] > 0).all()


def test_reset_state_and_state_helpers_errors_and_copies():
    model = randomised_model()
    state = model.initial_state(2)
    with pytest.raises(ValueError, match='3 entries for a batch of 2'):
        model.reset_state(state, torch.tensor([True, False, True]))
    assert model.reset_state((), torch.tensor([True])) == ()
    copy = clone_state(state)
    copy.y.add_(1.0)
    assert not torch.equal(copy.y, state.y)
    with pytest.raises(ValueError, match='at least one state'):
        stack_states([])
    assert stack_states([(torch.zeros(1, 2),), (torch.ones(1, 2),)])[0].shape == (2, 2)
    assert isinstance(stack_states([TRMState(torch.zeros(1), torch.zeros(1))] * 2), TRMState)
    with pytest.raises(ValueError, match=r'x \(B, T, D\)'):
        model.forward_sequence(torch.zeros(1, D), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r'x \(B, T, D\)'):
        model.forward_sequence(torch.zeros(1, 2, D), torch.ones(1, 3, 3, dtype=torch.bool))


def test_seed_configuration_in_full():
    config = TRMConfig.seed({'audio': 4, 'video': 6})
    assert dataclasses.asdict(config) == {
        'modality_dims': {'audio': 4, 'video': 6}, 'hidden_size': 512, 'num_heads': 8, 'num_layers': 2,
        'expansion': 4.0, 'h_cycles': 2, 'l_cycles': 1, 'grad_cycles': 2, 'mixer': 'attention',
        'state_gradient': 'identity', 'carry_gate': False, 'seed_compatible': True, 'rms_norm_eps': 1e-5,
        'rope_theta': 10000.0}
    assert isinstance(build_model(config), SeedTRM)


def test_state_helpers_on_plain_tuple_states_and_single_states():
    plain = (torch.ones(2, 3), torch.zeros(2, 1))   # a state that is not a NamedTuple
    copied = clone_state(plain)
    assert type(copied) is tuple and len(copied) == 2
    torch.testing.assert_close(copied[0], plain[0])
    assert copied[0].data_ptr() != plain[0].data_ptr()
    parts = split_state(plain, 2)
    assert type(parts[1]) is tuple and parts[1][0].shape == (1, 3)
    single = TRMState(torch.ones(1, 2), torch.zeros(1, 2))
    stacked = stack_states([single])
    torch.testing.assert_close(stacked.y, single.y)
    with pytest.raises(ValueError, match='^stack_states needs at least one state$'):
        stack_states([])


def test_normalisation_is_checked_in_float32_and_both_sizes_are_checked():
    model = randomised_model()
    huge = torch.zeros(D, dtype=torch.float64)
    huge[3] = 1e300  # finite in float64, infinite once stored as float32
    with pytest.raises(ValueError, match='^normalisation statistics contain NaN or infinite values$'):
        model.set_normalization(huge, torch.ones(D))
    with pytest.raises(ValueError, match='NaN or infinite'):
        model.set_normalization(torch.zeros(D), huge + 1.0)
    with pytest.raises(ValueError, match=f'has {D} means and 4 stds'):
        model.set_normalization(torch.zeros(D), torch.ones(4))
    with pytest.raises(ValueError, match=f'has 4 means and {D} stds'):
        model.set_normalization(torch.zeros(4), torch.ones(D))


def test_reset_flags_may_be_any_truthy_values():
    model = randomised_model()
    with torch.no_grad():
        mask = torch.ones(2, 3, dtype=torch.bool)
        _, _, state = model.step(torch.randn(2, D), mask, model.initial_state(2))
    reset = model.reset_state(state, [0, 1])
    torch.testing.assert_close(reset.y[1], model.y_init.detach())
    torch.testing.assert_close(reset.y[0], state.y[0])


def test_seed_network_normalises_with_eps_1e_5_even_for_tiny_states():
    """Inputs with a mean square of 1e-6: the RMSNorm epsilon (1e-5) dominates, so a different
    epsilon changes the output by about 3x; one token, so attention is o_proj(v)."""
    torch.manual_seed(0)
    config = TRMConfig.seed({'video': 8})
    config = dataclasses.replace(config, hidden_size=16, num_heads=2)
    model = SeedTRM(config).eval()
    sd = {k.replace('L_level.', 'net.'): v for k, v in model.state_dict().items()}
    h = 1e-3 * torch.randn(3, 1, 16)
    with torch.no_grad():
        out = model.L_level(h, torch.zeros_like(h), (model.rope_cos, model.rope_sin))
    torch.testing.assert_close(out, reference_net(sd, config, h, torch.zeros_like(h)), atol=1e-5, rtol=1e-4)


def test_one_modality_model_matches_the_reference():
    model = randomised_model(modality_dims={'video': 6})
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, mask = torch.randn(2, 6), torch.tensor([[True], [False]])
    state = model.initial_state(2)
    with torch.no_grad():
        va, confidence, _ = model.step(x, mask, state)
        ref_va, ref_confidence, _, _ = reference_step(sd, model.config, x, mask, state.y, state.z)
    torch.testing.assert_close(va, ref_va, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(confidence, ref_confidence, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize('grad_cycles', [1, 2])
def test_gradient_to_the_carried_state_is_the_reference_gradient(grad_cycles):
    """grad_cycles == h_cycles: plain back-propagation through every recursion. grad_cycles <
    h_cycles with state_gradient 'identity': the gradient that reaches the state entering the
    recursions with gradient, passed on unchanged (the gradient-free recursions as identity)."""
    model = randomised_model(h_cycles=2, grad_cycles=grad_cycles, carry_gate=False).train()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, mask = torch.randn(1, D), torch.ones(1, 3, dtype=torch.bool)
    y0, z0 = (t.detach().clone().requires_grad_() for t in model.initial_state(1))
    va, _, _ = model.step(x, mask, TRMState(y0, z0))
    va.sum().backward()
    x_tokens = reference_tokens(sd, model.config, x, mask)
    y, z = y0.detach(), z0.detach()
    with torch.no_grad():
        for _ in range(model.config.h_cycles - grad_cycles):
            y, z = reference_cycle(sd, model.config, x_tokens, y, z)
    y, z = y.clone().requires_grad_(), z.clone().requires_grad_()
    ref_y, ref_z = y, z
    for _ in range(grad_cycles):
        y, z = reference_cycle(sd, model.config, x_tokens, y, z)
    reference_heads(sd, y, mask)[0].sum().backward()
    assert ref_y.grad.abs().max() > 1e-4
    torch.testing.assert_close(y0.grad, ref_y.grad, atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(z0.grad, ref_z.grad, atol=1e-5, rtol=1e-3)


def test_seed_model_starts_from_the_prototype_initialisation():
    torch.manual_seed(0)
    model = SeedTRM(TRMConfig.seed())
    assert (model.q_head.bias == -3.0).all() and (model.shortcut_head.bias == 0).all()
    assert model.output_head.weight.abs().sum() == 0 and model.absent_features.abs().sum() == 0
    assert abs(model.q_head.weight.mean().item()) < 0.003 and 0.018 < model.q_head.weight.std().item() < 0.022
    for init in (model.H_init, model.L_init):   # truncated normal, std 0.02, cut at 2 std
        assert init.abs().max() <= 0.04 and 0.012 < init.std().item() < 0.02
    assert model.input_proj.bias is None and model.output_head.bias is None
    assert not model.modality_weight_logits.requires_grad  # the prototype has no confidence output
    with pytest.raises(ValueError, match=r'^SeedTRM needs a seed-compatible config \(TRMConfig.seed\(\)\)$'):
        SeedTRM(TRMConfig(modality_dims=DIMS, hidden_size=8, num_heads=2))


def test_stateful_initialisation_scales():
    """Token embeddings ~ 1/sqrt(hidden) (like a projected input), initial states ~ 1 (like the
    post-norm outputs); truncated normals cut at 2 sd have a sample sd of about 0.88 sd."""
    torch.manual_seed(0)
    model = StatefulTRM(TRMConfig(modality_dims=DIMS, hidden_size=64, num_heads=4))
    for tokens in (model.token_embedding, model.absent_tokens):
        assert 0.7 / 8 < tokens.std().item() < 1.0 / 8 and tokens.abs().max() <= 2 / 8
    for state in (model.y_init, model.z_init):
        assert 0.75 < state.std().item() < 1.0 and state.abs().max() <= 2.0


def test_input_shape_errors_name_the_expected_shapes():
    model = randomised_model()
    state = model.initial_state(2)
    message = r"^expected mask of shape \(2, 3\) for modalities \['audio', 'video', 'text'\], got \(2, 2\)$"
    with pytest.raises(ValueError, match=message):
        model.step(torch.zeros(2, D), torch.ones(2, 2, dtype=torch.bool), state)
    with pytest.raises(ValueError, match=rf'^expected x of shape \(B, {D}\), got \(2, 3, {D}\)$'):
        model.step(torch.zeros(2, 3, D), torch.ones(2, 3, dtype=torch.bool), state)
