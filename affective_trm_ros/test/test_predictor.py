"""FusionPredictor: batched multi-stream serving with per-stream states, against independent references.

The reference is the model itself, stepped by hand: the input concatenated in feature order with
masked blocks zero, normalised with the statistics this test chose (not the ones the predictor
loaded), through a copy of the model whose own normalisation is the identity.
"""

import copy

import numpy as np
import pytest
import torch

from affective_trm_ros.core.baselines import GRUBaseline, GRUConfig, MemorylessMLP, MLPConfig
from affective_trm_ros.core.checkpoint import load_checkpoint, save_checkpoint
from affective_trm_ros.core.predictor import FusionPredictor
from affective_trm_ros.core.trm import StatefulTRM, TRMConfig

torch.set_num_threads(1)  # tiny models: one thread avoids contention on a shared CPU

DIMS = {'audio': 12, 'video': 20, 'text': 8}
SPEC = [{'modality': 'audio', 'encoder': 'dasheng_base', 'dim': 12},
        {'modality': 'video', 'encoder': 'hsemotion_enet_b0', 'dim': 20},
        {'modality': 'text', 'encoder': 'minilm', 'dim': 8}]
MEAN = torch.linspace(-1.0, 2.0, 40)
STD = torch.linspace(0.3, 3.0, 40)


@pytest.fixture(scope='module')
def trained():
    """(checkpoint path, the model that was saved) -- a TRM whose valence and arousal differ."""
    torch.manual_seed(0)
    model = StatefulTRM(TRMConfig(modality_dims=DIMS, hidden_size=32, num_heads=4, h_cycles=2))
    with torch.no_grad():  # clearly different valence and arousal rows, so a swap shows
        model.output_head.weight[1] *= -3.0
        model.output_head.bias.copy_(torch.tensor([0.3, -0.4]))
    model.set_normalization(MEAN, STD)
    return model.eval()


@pytest.fixture(scope='module')
def checkpoint(trained, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp('ckpt') / 'trm.pt', trained, SPEC, {'note': 'test'})


def frames(seed, count):
    rng = np.random.default_rng(seed)
    return [{'audio': rng.normal(size=12).astype(np.float32) * 3 + 1, 'video': rng.normal(size=20) * 2,
             'text': None if i % 2 else rng.normal(size=8)} for i in range(count)]


class HandReference:
    """The saved model stepped by hand on the hand-normalised concatenation, one stream."""

    def __init__(self, model) -> None:
        self.model = copy.deepcopy(model)
        self.model.set_normalization(torch.zeros(40), torch.ones(40))
        self.state = None

    def step(self, features: dict) -> tuple:
        blocks, mask = [], []
        for modality, dim in DIMS.items():          # feature order: audio | video | text
            vector = features.get(modality)
            blocks.append(np.zeros(dim) if vector is None else np.asarray(vector, dtype=np.float64))
            mask.append(vector is not None)
        x = np.concatenate(blocks)
        xn = (x - MEAN.double().numpy()) / STD.double().numpy()
        column_mask = np.repeat(mask, list(DIMS.values()))
        xn[~column_mask] = 0.0                       # masked blocks carry nothing
        with torch.no_grad():
            if self.state is None:
                self.state = self.model.initial_state(1)
            va, confidence, self.state = self.model.step(
                torch.tensor(xn, dtype=torch.float32)[None], torch.tensor([mask]), self.state)
        return float(va[0, 0]), float(va[0, 1]), float(confidence[0])


def test_serving_equals_the_model_on_the_hand_normalised_input_with_state_carried(checkpoint, trained):
    predictor = FusionPredictor(checkpoint, device='cpu')
    reference = HandReference(trained)
    outputs, expected = [], []
    for frame in frames(1, 6):
        outputs += predictor.step([('a', frame)])
        expected.append(reference.step(frame))
    np.testing.assert_allclose(outputs, expected, atol=2e-5)
    valence, arousal, _ = zip(*outputs)
    assert not np.allclose(valence, arousal, atol=0.05)             # a v/a swap would show
    assert not np.allclose(outputs[0], outputs[-1], atol=1e-3)      # the state is carried


def test_a_checkpoint_round_trip_keeps_the_normalisation(checkpoint):
    loaded = load_checkpoint(checkpoint, device='cpu').model
    torch.testing.assert_close(loaded.feature_mean, MEAN)
    torch.testing.assert_close(loaded.feature_std, STD)


def test_exposes_the_checkpoint_spec_and_dims(checkpoint):
    predictor = FusionPredictor(checkpoint, device='cpu')
    assert predictor.encoder_spec == SPEC
    assert predictor.dims == DIMS
    assert predictor.kind == 'trm' and predictor.metadata == {'note': 'test'}
    assert predictor.device == torch.device('cpu')
    assert predictor.audio_policy is None                 # not recorded in this checkpoint
    predictor.check_encoders(SPEC)
    with pytest.raises(ValueError, match='minilm'):
        predictor.check_encoders(SPEC[:2] + [{'modality': 'text', 'encoder': 'embeddinggemma', 'dim': 768}])


def test_batched_streams_each_match_their_own_hand_reference(checkpoint, trained):
    predictor = FusionPredictor(checkpoint, device='cpu', capacity=2)   # 5 streams: the table grows
    streams = {name: (HandReference(trained), frames(seed, 4)) for seed, name in enumerate('abcde')}
    for k in range(4):
        items = [(name, data[1][k]) for name, data in streams.items()]
        outputs = predictor.step(items)
        expected = [ref.step(data[k]) for ref, data in streams.values()]
        np.testing.assert_allclose(outputs, expected, atol=2e-5)
    assert sorted(predictor.streams()) == list('abcde') and predictor.capacity >= 5


def test_several_frames_of_a_stream_in_one_call_run_in_order_in_few_model_steps(checkpoint, trained):
    predictor = FusionPredictor(checkpoint, device='cpu')
    calls = []
    original = predictor.model.step

    def counting_step(x, mask, state):
        calls.append(x.shape[0])
        return original(x, mask, state)

    predictor.model.step = counting_step
    a, b = frames(3, 3), frames(4, 2)
    items = [('a', a[0]), ('a', a[1]), ('b', b[0]), ('a', a[2]), ('b', b[1])]
    outputs = predictor.step(items, resets=[False, False, False, True, False])
    assert calls == [2, 2, 1]                        # round r = the r-th frame of every stream
    ref_a, ref_b = HandReference(trained), HandReference(trained)
    expected_a = [ref_a.step(a[0]), ref_a.step(a[1]), HandReference(trained).step(a[2])]  # reset at a[2]
    expected_b = [ref_b.step(b[0]), ref_b.step(b[1])]
    np.testing.assert_allclose([outputs[i] for i in (0, 1, 3)], expected_a, atol=2e-5)
    np.testing.assert_allclose([outputs[i] for i in (2, 4)], expected_b, atol=2e-5)


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


def test_outputs_are_floats_and_no_modality_means_no_confidence(checkpoint):
    predictor = FusionPredictor(checkpoint, device='cpu')
    full, empty = predictor.step([('a', {'audio': np.ones(12), 'video': np.ones(20), 'text': np.ones(8)}),
                                  ('b', {})])
    for values in (full, empty):
        assert all(isinstance(v, float) for v in values)
    assert full[2] > 0.0 and empty[2] == 0.0
    assert predictor.step([]) == []


def test_bad_inputs_are_refused_with_the_stream_and_modality_named(checkpoint):
    predictor = FusionPredictor(checkpoint, device='cpu')
    with pytest.raises(ValueError, match=r"'x'.*'video' has 19 values, the model expects 20"):
        predictor.step([('x', {'video': np.zeros(19)})])
    with pytest.raises(ValueError, match='unknown modalities'):
        predictor.step([('x', {'smell': np.zeros(3)})])
    with pytest.raises(ValueError, match='NaN'):
        predictor.step([('y', {'video': np.zeros(20)}), ('x', {'audio': np.full(12, np.nan)})])
    with pytest.raises(ValueError, match='2 reset flags for 1 items'):
        predictor.step([('x', {})], resets=[False, True])
    assert predictor.streams() == []  # nothing half-applied


def test_a_video_only_model_takes_aligned_frames_that_list_the_other_modalities_as_missing(tmp_path):
    torch.manual_seed(0)
    config = TRMConfig(modality_dims={'video': 20}, hidden_size=16, num_heads=4, h_cycles=1)
    model = StatefulTRM(config).eval()
    path = save_checkpoint(tmp_path / 'video.pt', model, [SPEC[1]], {})
    predictor = FusionPredictor(path, device='cpu')
    video = np.linspace(-1.0, 1.0, 20, dtype=np.float32)
    aligned = predictor.step([('face_0', {'video': video, 'audio': None, 'text': None}),
                              ('face_1', {'video': -video, 'audio': None, 'text': None})])
    plain = FusionPredictor(path, device='cpu').step([('face_0', {'video': video}),
                                                      ('face_1', {'video': -video})])
    np.testing.assert_allclose(np.array(aligned, dtype=float), np.array(plain, dtype=float), atol=1e-6)
    with pytest.raises(ValueError, match=r"unknown modalities \['audio'\]"):
        predictor.step([('face_0', {'video': video, 'audio': np.zeros(12)})])


def test_memoryless_models_serve_through_the_same_api():
    torch.manual_seed(0)
    predictor = FusionPredictor.from_model(MemorylessMLP(MLPConfig(modality_dims=DIMS, hidden_size=8)), SPEC,
                                           device='cpu')
    a = predictor.step([('a', frames(1, 1)[0]), ('b', frames(2, 1)[0])])
    b = predictor.step([('b', frames(2, 1)[0])])
    np.testing.assert_allclose(a[1], b[0], atol=1e-6)
    assert predictor.reset() == ['a', 'b']


def test_recurrent_baselines_keep_their_state_in_slots_too():
    torch.manual_seed(0)
    model = GRUBaseline(GRUConfig(modality_dims=DIMS, hidden_size=8)).eval()
    predictor = FusionPredictor.from_model(model, SPEC, device='cpu', capacity=1)
    sequence = frames(5, 3)
    state = model.initial_state(1)
    expected = []
    with torch.no_grad():
        for frame in sequence:
            x = torch.tensor(np.concatenate([np.zeros(d) if frame[m] is None else frame[m]
                                             for m, d in DIMS.items()]), dtype=torch.float32)[None]
            mask = torch.tensor([[frame[m] is not None for m in DIMS]])
            va, confidence, state = model.step(x, mask, state)
            expected.append((float(va[0, 0]), float(va[0, 1]), float(confidence[0])))
    other = frames(6, 3)
    outputs = [predictor.step([('a', f), ('b', g)])[0] for f, g in zip(sequence, other)]
    np.testing.assert_allclose(outputs, expected, atol=2e-5)


def test_missing_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.pt'):
        FusionPredictor(tmp_path / 'missing.pt', device='cpu')


def test_the_checkpoint_records_the_audio_policy_of_its_training_features(trained, tmp_path):
    from affective_trm_ros.core.checkpoint import audio_policy_of_sessions

    path = save_checkpoint(tmp_path / 'causal.pt', trained, SPEC, audio_policy='causal')
    assert load_checkpoint(path).audio_policy == 'causal'
    assert FusionPredictor(path, device='cpu').audio_policy == 'causal'
    with pytest.raises(ValueError, match="audio_policy must be one of .*'sideways'"):
        save_checkpoint(tmp_path / 'bad.pt', trained, SPEC, audio_policy='sideways')
    # from prepared sessions' meta (what feature preparation stores); none recorded = nearest
    assert audio_policy_of_sessions([{'alignment': {'audio_policy': 'causal'}}] * 2) == 'causal'
    assert audio_policy_of_sessions([{'alignment': {'audio_slop_s': 0.3}}, {}]) == 'nearest'
    assert audio_policy_of_sessions([]) is None
    with pytest.raises(ValueError, match=r"different audio policies \['causal', 'nearest'\]"):
        audio_policy_of_sessions([{'alignment': {'audio_policy': 'causal'}}, {}])
