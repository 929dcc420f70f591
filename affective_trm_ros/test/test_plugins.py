"""Encoder plugin discovery: built-ins, a third-party distribution, clear errors."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from affective_trm_ros.core.encoders import base
from affective_trm_ros.core.encoders.base import (
    ENTRY_POINT_GROUP,
    Encoder,
    EncodeResult,
    available_encoders,
    encoder_class,
    load_encoder,
)

THIRD_PARTY = Path(__file__).parent / 'fixtures' / 'thirdparty_plugin'
BUILT_INS = {
    'hsemotion_enet_b0': ('video', 1280, 'rgb_image'),
    'hsemotion_enet_b0_va': ('video', 1280, 'rgb_image'),
    'fer_mini_xception': ('video', 135, 'rgb_image'),
    'dasheng_base': ('audio', 768, 'waveform'),
    'egemaps': ('audio', 88, 'waveform'),
    'embeddinggemma': ('text', 768, 'text'),
    'minilm': ('text', 384, 'text'),
}


@pytest.fixture
def third_party_installed(monkeypatch):
    """Put the test-only distribution on sys.path, as `pip install` of a plugin package would."""
    monkeypatch.syspath_prepend(str(THIRD_PARTY))
    yield
    sys.modules.pop('affect_plugin_example', None)


@pytest.mark.parametrize('plugin_id', sorted(BUILT_INS))
def test_built_in_plugins_are_registered_with_their_contract(plugin_id):
    cls = encoder_class(plugin_id)
    modality, dim, input_kind = BUILT_INS[plugin_id]
    assert issubclass(cls, Encoder)
    assert (cls.modality, cls.dim, cls.input_kind) == (modality, dim, input_kind)
    assert cls.input_kind in base.INPUT_KINDS
    if input_kind == 'waveform':
        assert cls.sample_rate == 16000


@pytest.mark.parametrize('plugin_id', sorted(BUILT_INS))
def test_built_in_plugins_name_registered_weights(plugin_id):
    from affective_trm_ros.core.encoders import weights as registry
    modality, name, status = base.plugin_weights_status(plugin_id)
    assert modality == BUILT_INS[plugin_id][0]
    assert name in registry.KNOWN_WEIGHTS and plugin_id in registry.known(name).used_by
    assert status in ('present', 'missing')


def test_third_party_plugin_without_registered_weights(third_party_installed):
    assert base.plugin_weights_status('example_energy') == ('audio', None, 'none known')


def test_third_party_distribution_registers_an_encoder(third_party_installed):
    assert 'example_energy' in available_encoders()
    encoder = load_encoder('example_energy', device='cpu', scale=2.0)
    assert encoder.plugin_id == 'example_energy'
    assert encoder.identity == 'example_energy@none'
    wave = np.sin(np.linspace(0, 20 * np.pi, 16000)).astype(np.float32)
    result = encoder.encode_batch([wave, np.zeros(16000, np.float32)])
    assert result.embeddings.shape == (2, 4)
    np.testing.assert_allclose(result.embeddings[0, 0], 2.0 * np.sqrt(0.5), rtol=1e-3)
    assert result.valid.tolist() == [True, False]


def test_third_party_plugin_is_invisible_when_not_installed():
    assert 'example_energy' not in available_encoders()


def test_entry_point_that_is_not_an_encoder_fails_clearly(third_party_installed):
    with pytest.raises(TypeError, match="'example_broken'.*not an Encoder subclass"):
        encoder_class('example_broken')


def test_unknown_plugin_lists_installed_ones():
    with pytest.raises(KeyError, match="unknown encoder plugin 'nope'.*minilm"):
        load_encoder('nope')


def test_api_version_mismatch_is_refused(monkeypatch):
    class FutureEncoder(Encoder):
        api_version = base.ENCODER_API_VERSION + 1
        modality, input_kind, dim = 'text', 'text', 1

        def _encode_batch(self, inputs):
            raise AssertionError('never called')

    class FakeEntryPoint:
        name, value = 'future', 'pkg:FutureEncoder'

        def load(self):
            return FutureEncoder

    monkeypatch.setattr(base, 'available_encoders', lambda: {'future': FakeEntryPoint()})
    with pytest.raises(TypeError, match='encoder API v2'):
        encoder_class('future')


def test_wrong_output_shape_is_caught():
    class Broken(Encoder):
        modality, input_kind, dim = 'text', 'text', 3

        def _encode_batch(self, inputs):
            return EncodeResult(np.zeros((len(inputs), 2), np.float32), np.ones(len(inputs), bool))

    with pytest.raises(RuntimeError, match=r'expected \(1, 3\)'):
        Broken(device='cpu').encode_batch(['x'])


def test_empty_batch_gives_empty_result(third_party_installed):
    result = load_encoder('example_energy', device='cpu').encode_batch([])
    assert result.embeddings.shape == (0, 4) and result.valid.shape == (0,)


def test_device_choices():
    assert base.resolve_device('cpu') == torch.device('cpu')
    assert base.resolve_device('auto').type == ('cuda' if torch.cuda.is_available() else 'cpu')
    with pytest.raises(ValueError, match='unknown device'):
        base.resolve_device('tpu')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'):
            base.resolve_device('cuda:0')


def test_entry_point_group_name_is_stable():
    # Third-party packages hard-code this string in their setup.py.
    assert ENTRY_POINT_GROUP == 'affective_trm_ros.encoders'
