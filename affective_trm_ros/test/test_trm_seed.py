"""Seed-compatible mode: parity with an independent transcription of the prototype's forward pass.

The reference below is written from the published architecture description, with explicit
matrix products on a state dict that uses the prototype's key names and shapes:

* input: LayerNorm over all 2816 features, no learned parameters, eps 1e-5;
* one token: ``x @ input_proj.T`` (no embedding scale); state reset every frame to
  (``H_init``, ``L_init``) because ``halt_max_steps`` is 1;
* shared network ``net(h, inj)``: h + inj, then 2 post-norm blocks
  ``h = rms(h + attn(h)); h = rms(h + swiglu(h))`` with parameter-free RMSNorm (eps 1e-5);
  attention over one token is ``o_proj(v)`` (softmax of one score is 1, RoPE at position 0 is the
  identity) with v the third third of ``qkv_proj``; SwiGLU width 1536 with gate = first half of
  ``gate_up_proj``;
* ``H_cycles`` 2 x (``L_cycles`` 1 x ``z_L = net(z_L, z_H + inj)``, ``z_H = net(z_H, z_L)``);
* output: ``z_H @ output_head.T + x_norm @ shortcut_head.T + shortcut_bias``.
"""

import pytest
import torch

from affective_trm_ros.core.checkpoint import (
    SEED_ENCODER_SPEC,
    load_checkpoint,
    load_seed_state_dict,
    seed_model_from_state_dict,
)
from affective_trm_ros.core.predictor import FusionPredictor
from affective_trm_ros.core.trm import SelfAttention, TRMConfig, rope_cos_sin

torch.set_num_threads(1)  # tiny models: one thread avoids contention on a shared CPU

HIDDEN, INPUT, HEADS, LAYERS, INTER = 512, 2816, 8, 2, 1536
EPS = 1e-5


def prototype_shapes() -> dict:
    """Key names and shapes of the prototype's published state dict."""
    shapes = {'inner.input_proj.weight': (HIDDEN, INPUT), 'inner.output_head.weight': (2, HIDDEN),
              'inner.shortcut_head.weight': (2, INPUT), 'inner.shortcut_head.bias': (2,),
              'inner.q_head.weight': (2, HIDDEN), 'inner.q_head.bias': (2,),
              'inner.H_init': (HIDDEN,), 'inner.L_init': (HIDDEN,)}
    for i in range(LAYERS):
        prefix = f'inner.L_level.layers.{i}.'
        shapes[prefix + 'self_attn.qkv_proj.weight'] = (3 * HIDDEN, HIDDEN)
        shapes[prefix + 'self_attn.o_proj.weight'] = (HIDDEN, HIDDEN)
        shapes[prefix + 'mlp.gate_up_proj.weight'] = (2 * INTER, HIDDEN)
        shapes[prefix + 'mlp.down_proj.weight'] = (HIDDEN, INTER)
    return shapes


def random_prototype_state_dict(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in prototype_shapes().items():
        fan_in = shape[-1] if len(shape) == 2 else 1
        scale = 0.1 if key.endswith(('H_init', 'L_init', 'bias')) else fan_in ** -0.5
        if 'output_head' in key or 'shortcut_head.weight' in key:
            scale *= 0.5  # keeps most outputs inside [-1, 1] so the clamp rarely acts
        state[key] = torch.randn(shape, generator=g) * scale
    return state


def rms(h):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)


def reference_forward(sd: dict, x_raw: torch.Tensor) -> torch.Tensor:
    """The prototype's evaluation-mode output for a batch of raw 2816-d inputs (B, 2)."""
    mu = x_raw.mean(-1, keepdim=True)
    var = ((x_raw - mu) ** 2).mean(-1, keepdim=True)
    x = (x_raw - mu) / torch.sqrt(var + EPS)
    inj = x @ sd['inner.input_proj.weight'].T

    def net(h, injection):
        h = h + injection
        for i in range(LAYERS):
            p = f'inner.L_level.layers.{i}.'
            v = h @ sd[p + 'self_attn.qkv_proj.weight'][2 * HIDDEN:].T
            h = rms(h + v @ sd[p + 'self_attn.o_proj.weight'].T)
            gate_up = h @ sd[p + 'mlp.gate_up_proj.weight'].T
            gate, up = gate_up[:, :INTER], gate_up[:, INTER:]
            h = rms(h + (gate * torch.sigmoid(gate) * up) @ sd[p + 'mlp.down_proj.weight'].T)
        return h

    z_h = sd['inner.H_init'].expand(x.shape[0], -1)
    z_l = sd['inner.L_init'].expand(x.shape[0], -1)
    for _ in range(2):  # H_cycles
        z_l = net(z_l, z_h + inj)  # L_cycles = 1
        z_h = net(z_h, z_l)
    return z_h @ sd['inner.output_head.weight'].T + x @ sd['inner.shortcut_head.weight'].T \
        + sd['inner.shortcut_head.bias']


@pytest.fixture(scope='module')
def seed_dict():
    return random_prototype_state_dict()


@pytest.fixture(scope='module')
def seed_model(seed_dict):
    return seed_model_from_state_dict(seed_dict)


def test_seed_config_is_the_prototype_configuration():
    cfg = TRMConfig.seed()
    assert (cfg.input_dim, cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.expansion,
            cfg.h_cycles, cfg.l_cycles) == (2816, 512, 8, 2, 4.0, 2, 1)
    assert list(cfg.modality_dims.items()) == [('audio', 768), ('video', 1280), ('text', 768)]


def test_seed_mode_matches_the_independent_reference(seed_model, seed_dict):
    x = torch.randn(5, INPUT, generator=torch.Generator().manual_seed(1)) * 3 + 0.5
    mask = torch.ones(5, 3, dtype=torch.bool)
    with torch.no_grad():
        expected = reference_forward(seed_dict, x)
        logits, _ = seed_model.raw_output(x, mask)
        va, confidence, _ = seed_model.step(x, mask, seed_model.initial_state(5))
    assert expected.abs().max() > 0.05  # a non-trivial output
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(va, expected.clamp(-1, 1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(confidence, torch.ones(5))


def test_seed_mode_resets_its_state_every_frame(seed_model):
    x = torch.randn(2, INPUT, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        first, _, state = seed_model.step(x, mask, seed_model.initial_state(2))
        for _ in range(3):
            _, _, state = seed_model.step(torch.randn(2, INPUT), mask, state)
        again, _, _ = seed_model.step(x, mask, state)
    torch.testing.assert_close(first, again)


def test_attention_with_rope_matches_explicit_softmax_attention():
    """The block's attention on several tokens (the seed only ever sees one) against einsum maths."""
    torch.manual_seed(0)
    attn = SelfAttention(64, 4).eval()
    h = torch.randn(2, 3, 64)
    cos, sin = rope_cos_sin(16, 3, 10000.0)
    qkv = h @ attn.qkv_proj.weight.T
    q, k, v = (t.view(2, 3, 4, 16) for t in qkv.split(64, dim=-1))

    def rotate(t):
        t1, t2 = t[..., :8], t[..., 8:]
        return t * cos[:, None] + torch.cat([-t2, t1], -1) * sin[:, None]

    q, k = rotate(q), rotate(k)
    scores = torch.einsum('bqhd,bkhd->bhqk', q, k) / 4.0
    out = torch.einsum('bhqk,bkhd->bqhd', scores.softmax(-1), v).reshape(2, 3, 64)
    expected = out @ attn.o_proj.weight.T
    with torch.no_grad():
        torch.testing.assert_close(attn(h, (cos, sin)), expected, atol=1e-5, rtol=1e-4)


def test_seed_state_dict_file_loads_through_every_entry_point(tmp_path, seed_dict):
    path = tmp_path / 'emotion_model_sequential_av.pth'
    torch.save(seed_dict, path)
    x = torch.randn(1, INPUT, generator=torch.Generator().manual_seed(3))
    expected = reference_forward(seed_dict, x).clamp(-1, 1)
    model = load_seed_state_dict(path)
    loaded = load_checkpoint(path)
    assert loaded.kind == 'seed_trm' and loaded.encoder_spec == SEED_ENCODER_SPEC
    with torch.no_grad():
        for m in (model, loaded.model):
            va, _, _ = m.step(x, torch.ones(1, 3, dtype=torch.bool), m.initial_state(1))
            torch.testing.assert_close(va, expected, atol=1e-4, rtol=1e-4)
    predictor = FusionPredictor(path, device='cpu')
    features = {'audio': x[0, :768].numpy(), 'video': x[0, 768:2048].numpy(), 'text': x[0, 2048:].numpy()}
    valence, arousal, confidence = predictor.step([('person', features)])[0]
    torch.testing.assert_close(torch.tensor([valence, arousal]), expected[0], atol=1e-4, rtol=1e-4)
    assert confidence == pytest.approx(1.0)


def test_seed_masking_uses_the_absent_block_not_the_values(seed_model):
    x = torch.randn(1, INPUT)
    mask = torch.tensor([[True, True, False]])
    other = x.clone()
    other[0, 2048:] = 50.0
    with torch.no_grad():
        a, conf, _ = seed_model.step(x, mask, seed_model.initial_state(1))
        b, _, _ = seed_model.step(other, mask, seed_model.initial_state(1))
    torch.testing.assert_close(a, b)
    assert conf.item() == pytest.approx(2 / 3)


@pytest.mark.parametrize('change', ['missing', 'shape', 'extra'])
def test_mismatching_seed_state_dicts_are_refused_naming_the_key(seed_dict, change):
    broken = dict(seed_dict)
    if change == 'missing':
        del broken['inner.L_level.layers.1.mlp.down_proj.weight']
        needle = 'inner.L_level.layers.1.mlp.down_proj.weight'
    elif change == 'shape':
        broken['inner.input_proj.weight'] = torch.zeros(512, 2432)
        needle = r'inner.input_proj.weight: file \(512, 2432\) vs model \(512, 2816\)'
    else:
        broken['inner.lm_head.weight'] = torch.zeros(2, 512)
        needle = 'unexpected inner.lm_head.weight'
    with pytest.raises(ValueError, match=needle):
        seed_model_from_state_dict(broken)


def test_seed_block_uses_post_norm_and_parameter_free_rms(seed_model):
    h = torch.randn(1, 1, HIDDEN) * 7
    with torch.no_grad():
        out = seed_model.L_level(h, torch.zeros_like(h), (seed_model.rope_cos, seed_model.rope_sin))
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(1, 1), atol=1e-4, rtol=1e-4)
    assert not any('norm' in key for key in seed_model.state_dict())  # no learned norm weights
