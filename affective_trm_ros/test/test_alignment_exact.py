"""Alignment helpers on constructed inputs with exact expected outputs: arrays, identities, messages."""

import numpy as np
import pytest

from affective_trm_ros.core.alignment import (
    AlignedStep,
    embedding_mismatch,
    split_encoder_identity,
    steps_to_arrays,
)
from affective_trm_ros.core.modalities import AUDIO, TEXT, VIDEO

DIMS = {AUDIO: 2, VIDEO: 3, TEXT: 1}


def step(stamp, audio=None, video=None, text=None, reset=False):
    features = {AUDIO: audio, VIDEO: video, TEXT: text}
    return AlignedStep(stamp_s=stamp, features=features, bits=0, staleness={}, reset=reset)


def test_steps_to_arrays_exact_values_types_and_zero_rows():
    stamp = 1_700_000_000.123456789  # a ROS time in seconds: needs float64
    steps = [step(stamp, audio=[1, 2], video=np.array([[0.5, 0.25, 0.125]]), text=[7.0]),
             step(stamp + 0.1, video=np.float64([1e-3, 2e-3, 3e-3]), reset=True),
             step(stamp + 0.2, audio=(3.0, 4.0))]
    timestamps, features, mask, resets = steps_to_arrays(steps, DIMS)
    assert timestamps.dtype == np.float64 and timestamps[0] == stamp
    assert timestamps[2] - timestamps[0] == pytest.approx(0.2, abs=1e-6)
    assert {m: (a.dtype, a.shape) for m, a in features.items()} == {
        AUDIO: (np.float32, (3, 2)), VIDEO: (np.float32, (3, 3)), TEXT: (np.float32, (3, 1))}
    np.testing.assert_array_equal(features[AUDIO], np.float32([[1, 2], [0, 0], [3, 4]]))
    np.testing.assert_array_equal(features[VIDEO],
                                  np.float32([[0.5, 0.25, 0.125], [1e-3, 2e-3, 3e-3], [0, 0, 0]]))
    np.testing.assert_array_equal(features[TEXT], np.float32([[7], [0], [0]]))
    assert mask.dtype == np.bool_ and mask.tolist() == [[True, True, True], [False, True, False],
                                                        [True, False, False]]
    assert resets.dtype == np.bool_ and resets.tolist() == [False, True, False]


def test_steps_to_arrays_of_nothing_and_a_wrong_length():
    timestamps, features, mask, resets = steps_to_arrays([], DIMS)
    assert timestamps.shape == (0,) and features[VIDEO].shape == (0, 3) and mask.shape == (0, 3)
    assert resets.shape == (0,)
    with pytest.raises(ValueError, match=r'^video embedding at t=2\.500 s has 4 values, expected 3$'):
        steps_to_arrays([step(2.5, video=[1, 2, 3, 4])], DIMS)


@pytest.mark.parametrize('identity, expected', [
    ('hsemotion_enet_b0@enet_b0_8_best_afew', ('hsemotion_enet_b0', 'enet_b0_8_best_afew')),
    (' tiny_video @ none ', ('tiny_video', 'none')),
    ('dasheng_base', ('dasheng_base', '')),
    ('', ('', '')),
    (None, ('', '')),
    ('a@b@c', ('a', 'b@c')),
])
def test_split_encoder_identity(identity, expected):
    assert split_encoder_identity(identity) == expected


SPEC = {'modality': VIDEO, 'encoder': 'hsemotion_enet_b0', 'dim': 1280}


def test_embedding_mismatch_messages():
    assert embedding_mismatch(SPEC, VIDEO, 'hsemotion_enet_b0@enet_b0_8_best_afew', 1280) is None
    # An invalid embedding (no data, dim None) from the right plugin fits.
    assert embedding_mismatch(SPEC, VIDEO, 'hsemotion_enet_b0', None) is None
    assert embedding_mismatch(SPEC, VIDEO, 'tiny_video@none', 8) == (
        "video embeddings from 'tiny_video@none' (dim 8) do not match the checkpoint, which expects video "
        "from 'hsemotion_enet_b0' with dim 1280: encoder 'tiny_video' instead of 'hsemotion_enet_b0', "
        "dim 8 instead of 1280")
    assert embedding_mismatch(SPEC, VIDEO, '', None) == (
        "video embeddings from '' (dim ?) do not match the checkpoint, which expects video from "
        "'hsemotion_enet_b0' with dim 1280: encoder '<empty>' instead of 'hsemotion_enet_b0'")
    assert embedding_mismatch(SPEC, VIDEO, 'hsemotion_enet_b0', 512).endswith(': dim 512 instead of 1280')
