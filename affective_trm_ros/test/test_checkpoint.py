"""Checkpoint files: round trip for every model kind, encoder-spec checks and clear load errors."""

import numpy as np
import pytest
import torch

from affective_trm_ros.core.baselines import GRUBaseline, GRUConfig, MemorylessMLP, MLPConfig
from affective_trm_ros.core.checkpoint import (
    CHECKPOINT_FORMAT,
    check_encoder_spec,
    load_checkpoint,
    load_seed_state_dict,
    save_checkpoint,
)
from affective_trm_ros.core.trm import SeedTRM, StatefulTRM, TRMConfig

torch.set_num_threads(1)  # tiny models: one thread avoids contention on a shared CPU

DIMS = {'audio': 12, 'video': 20, 'text': 8}
SPEC = [{'modality': 'audio', 'encoder': 'dasheng_base', 'dim': 12},
        {'modality': 'video', 'encoder': 'hsemotion_enet_b0', 'dim': 20},
        {'modality': 'text', 'encoder': 'minilm', 'dim': 8}]


def make(kind):
    torch.manual_seed(0)
    if kind == 'trm':
        return StatefulTRM(TRMConfig(modality_dims=DIMS, hidden_size=32, num_heads=4, h_cycles=2))
    if kind == 'seed_trm':
        return SeedTRM(TRMConfig(modality_dims=DIMS, hidden_size=32, num_heads=4, h_cycles=2, l_cycles=1,
                                 grad_cycles=2, expansion=4.0, seed_compatible=True))
    if kind == 'mlp':
        return MemorylessMLP(MLPConfig(modality_dims=DIMS, hidden_size=16))
    return GRUBaseline(GRUConfig(modality_dims=DIMS, hidden_size=16))


@pytest.mark.parametrize('kind', ['trm', 'seed_trm', 'mlp', 'gru'])
def test_round_trip_restores_outputs_normalisation_spec_and_metadata(tmp_path, kind):
    model = make(kind).eval()
    mean, std = torch.randn(40), torch.rand(40) + 0.5
    model.set_normalization(mean, std)
    spec = [dict(e, identity=f"{e['encoder']}@test") for e in SPEC]  # extra keys travel along
    path = save_checkpoint(tmp_path / 'sub' / 'model.pt', model, spec,
                           {'epoch': np.int64(4), 'val_ccc': np.float32(0.5), 'split': ('a', 'b')})
    loaded = load_checkpoint(path)
    assert loaded.kind == kind and not loaded.model.training
    assert loaded.encoder_spec == spec
    assert loaded.metadata == {'epoch': 4, 'val_ccc': 0.5, 'split': ['a', 'b']}
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.model.feature_mean, mean)
    torch.testing.assert_close(loaded.model.feature_std, std)
    x = torch.randn(2, 5, 40)
    mask = torch.rand(2, 5, 3) > 0.3
    with torch.no_grad():
        expected = model.forward_sequence(x, mask)
        got = loaded.model.forward_sequence(x, mask)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    raw = torch.load(path, weights_only=True)
    assert raw['format'] == CHECKPOINT_FORMAT and raw['version'] == 1 and raw['kind'] == kind
    assert raw['feature_order'] == ['audio', 'video', 'text']
    assert not list(tmp_path.glob('sub/*.tmp'))  # written atomically, nothing left behind


def test_saving_refuses_a_spec_whose_dims_differ_from_the_model(tmp_path):
    spec = [dict(e) for e in SPEC]
    spec[2]['dim'] = 9
    with pytest.raises(ValueError, match='do not match the model input dims'):
        save_checkpoint(tmp_path / 'm.pt', make('mlp'), spec)


def test_saving_refuses_metadata_that_is_not_json(tmp_path):
    with pytest.raises(ValueError, match='JSON'):
        save_checkpoint(tmp_path / 'm.pt', make('mlp'), SPEC, {'model': object()})


def test_encoder_mismatch_names_both_sides():
    other = [dict(e) for e in SPEC]
    other[2] = {'modality': 'text', 'encoder': 'embeddinggemma', 'dim': 768}
    with pytest.raises(ValueError) as info:
        check_encoder_spec(SPEC, other)
    message = str(info.value)
    assert "'text'" in message and "'minilm' (8-d)" in message and "'embeddinggemma' (768-d)" in message
    assert "'video'" not in message
    check_encoder_spec(SPEC, [dict(e) for e in SPEC])  # identical specs pass


def test_weights_identities_are_compared_only_when_both_sides_state_one():
    with_weights = [dict(e, encoder=e['encoder'] + '@v1') for e in SPEC]
    check_encoder_spec(SPEC, with_weights)  # plain plugin ids match any weights of that plugin
    check_encoder_spec(with_weights, [dict(e) for e in with_weights])
    untrained = [dict(e) for e in with_weights]
    untrained[1]['encoder'] = 'hsemotion_enet_b0@untrained'
    with pytest.raises(ValueError, match="'hsemotion_enet_b0@v1'.*'hsemotion_enet_b0@untrained'"):
        check_encoder_spec(with_weights, untrained)


def test_encoder_mismatch_reports_a_missing_modality():
    with pytest.raises(ValueError, match="'audio'.*'dasheng_base' \\(12-d\\).*no encoder"):
        check_encoder_spec(SPEC, SPEC[1:])


@pytest.mark.parametrize('spec', [[], [{'modality': 'audio', 'dim': 3}], SPEC[::-1],
                                  [{'modality': 'smell', 'encoder': 'x', 'dim': 3}]])
def test_malformed_specs_are_rejected(spec):
    with pytest.raises(ValueError):
        check_encoder_spec(spec, SPEC)


def test_loading_a_missing_file_says_which_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere.pt'):
        load_checkpoint(tmp_path / 'nowhere.pt')


def test_loading_foreign_files_fails_clearly(tmp_path):
    torch.save({'weights': torch.zeros(2)}, tmp_path / 'foreign.pt')
    with pytest.raises(ValueError, match='not an affective-trm checkpoint'):
        load_checkpoint(tmp_path / 'foreign.pt')
    (tmp_path / 'text.pt').write_text('hello')
    with pytest.raises(ValueError, match='not a readable PyTorch checkpoint'):
        load_checkpoint(tmp_path / 'text.pt')
    with pytest.raises(ValueError, match='not an AffectiveTRM prototype state dict'):
        load_seed_state_dict(tmp_path / 'foreign.pt')


def test_loading_refuses_other_versions_and_inconsistent_files(tmp_path):
    path = save_checkpoint(tmp_path / 'm.pt', make('gru'), SPEC)
    payload = torch.load(path, weights_only=True)
    payload['version'] = 2
    torch.save(payload, tmp_path / 'v2.pt')
    with pytest.raises(ValueError, match='version 2 is not supported'):
        load_checkpoint(tmp_path / 'v2.pt')
    payload['version'] = 1
    payload['config']['hidden_size'] = 24
    torch.save(payload, tmp_path / 'bad.pt')
    with pytest.raises(ValueError, match="do not fit the 'gru' model config"):
        load_checkpoint(tmp_path / 'bad.pt')
