"""Alignment helpers on constructed inputs with exact expected outputs: arrays, identities, messages."""

import math

import numpy as np
import pytest

from affective_trm_ros.core.alignment import (
    AlignedStep,
    AlignmentConfig,
    StreamAligner,
    align_events,
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


def vec(value, dim=2):
    return np.full(dim, value, np.float32)


def test_next_deadline_follows_arrival_wait_and_the_audio_watermark():
    aligner = StreamAligner(AlignmentConfig())   # nearest, slop 0.3, max wait 0.6
    assert aligner.next_deadline() is None
    aligner.add_video(1.0, vec(1.0), arrival_s=1.05)
    assert aligner.next_deadline() == pytest.approx(1.65)   # arrival + max wait
    aligner.add(AUDIO, 1.1, vec(2.0))   # watermark 1.1 < 1.0 + slop: still waiting
    assert aligner.next_deadline() == pytest.approx(1.65)
    aligner.add(AUDIO, 1.3, vec(3.0))   # watermark exactly at t + slop: due now
    assert aligner.next_deadline() == -math.inf
    causal = StreamAligner(AlignmentConfig(audio_policy='causal'))
    causal.add_video(1.0, vec(1.0), arrival_s=1.05)
    assert causal.next_deadline() == -math.inf   # never waits


def test_time_going_back_forgets_the_abandoned_future_but_keeps_audio_within_the_slop():
    aligner = StreamAligner(AlignmentConfig())   # nearest, slop 0.3
    aligner.add(TEXT, 0.9, vec(9.0, 1))
    aligner.add_video(1.0, vec(1.0))
    for stamp in (1.1, 1.2, 1.25, 2.0):
        aligner.add(AUDIO, stamp, vec(stamp))
    aligner.add_video(0.9, vec(0.5))   # back in time: flush 1.0, forget what is newer than 0.9 + slop
    assert aligner.stats['reset_backwards'] == 1
    assert aligner.last_valid_stamp == {TEXT: 0.9, VIDEO: 0.9}
    steps = aligner.ready(-math.inf)   # audio up to 1.2 was kept: the watermark releases 0.9 now
    assert [(s.stamp_s, s.released_by, s.reset) for s in steps] == [(1.0, 'flush', False),
                                                                     (0.9, 'audio', True)]
    np.testing.assert_array_equal(steps[0].features[AUDIO], vec(1.1))
    np.testing.assert_array_equal(steps[1].features[AUDIO], vec(1.1))   # nearest of 1.1 and 1.2
    assert steps[1].staleness[AUDIO] == pytest.approx(-0.2)
    np.testing.assert_array_equal(steps[1].features[TEXT], vec(9.0, 1))
    aligner.add_video(1.24, vec(0.7))
    aligner.add(AUDIO, 1.6, vec(1.6))   # 1.25 and 2.0 were forgotten: 1.2 is the nearest to 1.24
    (late,) = aligner.ready(-math.inf)
    np.testing.assert_array_equal(late.features[AUDIO], vec(1.2))


def test_time_going_back_under_the_causal_policy_forgets_audio_after_the_new_time():
    aligner = StreamAligner(AlignmentConfig(audio_policy='causal'))
    aligner.add_video(1.0, vec(1.0))
    aligner.ready(1.0)
    aligner.add(AUDIO, 0.8, vec(0.8))
    aligner.add(AUDIO, 0.95, vec(0.95))
    aligner.add_video(0.9, vec(0.5))   # back in time: 0.95 is after the new time and is forgotten
    (step,) = aligner.ready(0.9)
    assert step.reset and step.stamp_s == 0.9
    np.testing.assert_array_equal(step.features[AUDIO], vec(0.8))
    aligner.add_video(1.0, vec(1.0))   # the forgotten 0.95 would be the newest window here
    (step,) = aligner.ready(1.0)
    np.testing.assert_array_equal(step.features[AUDIO], vec(0.8))


def test_text_late_counts_and_the_newest_valid_text_stamp():
    aligner = StreamAligner(AlignmentConfig(wait_for_audio=False))
    aligner.add(TEXT, 2.0, vec(2.0, 1))
    aligner.add(TEXT, 1.5, vec(1.5, 1))   # older, out of order: the newest valid stays 2.0
    aligner.add(TEXT, 2.5, None)          # invalid: not a valid stamp
    assert aligner.last_valid_stamp == {TEXT: 2.0}
    aligner.add_video(3.0, vec(3.0))
    aligner.ready(3.0)
    aligner.add(TEXT, 3.0, vec(3.0, 1))   # at the fused frame's stamp: not late
    assert aligner.stats['text_late'] == 0
    aligner.add(TEXT, 2.7, vec(2.7, 1))
    aligner.add(TEXT, 2.8, vec(2.8, 1))
    assert aligner.stats['text_late'] == 2 and aligner.last_valid_stamp[TEXT] == 3.0


def test_align_events_keeps_the_given_order_of_same_stamp_events_and_extra_fields():
    events = [(VIDEO, 1.0, vec(1.0), 'frame meta'), (AUDIO, 1.0, vec(5.0)), (AUDIO, 1.0, vec(6.0)),
              (TEXT, 0.5, vec(7.0, 1))]
    (step,) = align_events(events)
    np.testing.assert_array_equal(step.features[AUDIO], vec(6.0))   # the later of two equal stamps
    np.testing.assert_array_equal(step.features[TEXT], vec(7.0, 1))
    assert step.staleness == {VIDEO: 0.0, AUDIO: 0.0, TEXT: 0.5}


def test_config_boundaries():
    AlignmentConfig(audio_slop_s=0.0, audio_max_age_s=0.0, text_max_age_s=0.0, max_wait_s=0.0,
                    reset_after_s=0.5, max_pending_frames=1, max_audio=1, max_text=1).validate()
    AlignmentConfig(audio_slop_s=0.3, max_wait_s=0.3).validate()   # the wait may equal the slop
    with pytest.raises(ValueError, match=r'^reset_after_s \(0.6\) must be > max_wait_s \(0.6\)$'):
        AlignmentConfig(max_wait_s=0.6, reset_after_s=0.6).validate()
    with pytest.raises(ValueError, match='max_audio must be >= 1, got 0'):
        AlignmentConfig(max_audio=0).validate()


def test_nearest_policy_counters_boundaries_and_buffer_on_a_script():
    """Stamps in binary-exact seconds, slop 0.25: every boundary is hit exactly."""
    config = AlignmentConfig(audio_slop_s=0.25, max_wait_s=0.5, reset_after_s=2.0, text_max_age_s=1.0,
                             max_audio=3)
    aligner = StreamAligner(config)
    aligner.add(TEXT, 0.5, vec(0.5, 1))
    aligner.add(AUDIO, 0.75, vec(0.75))
    aligner.add_video(1.0, vec(1.0))
    aligner.add(AUDIO, 1.25, vec(1.25))   # watermark exactly t + slop: frame 1.0 is due
    (first,) = aligner.ready(1.0)
    assert first.released_by == 'audio'
    np.testing.assert_array_equal(first.features[AUDIO], vec(0.75))   # tie at 0.25: the earlier one
    assert first.staleness == {VIDEO: 0.0, AUDIO: 0.25, TEXT: 0.5}
    aligner.add(AUDIO, 0.75, vec(7.5))    # exactly slop before the fused frame: late, kept
    aligner.add(AUDIO, 0.5, vec(0.5))     # older than that: dropped
    aligner.add(AUDIO, 0.25, vec(0.25))   # dropped
    aligner.add(AUDIO, 1.25, vec(12.5))   # exactly slop after it: late; replaces the earlier 1.25
    aligner.add(AUDIO, 2.25, None)        # invalid: advances the watermark, not the valid stamp
    assert aligner.last_valid_stamp == {TEXT: 0.5, AUDIO: 1.25, VIDEO: 1.0}
    aligner.add_video(1.25, None)         # no face
    aligner.add(AUDIO, 1.5, vec(1.5))     # buffer of 3: the oldest entry (0.75) is evicted
    (second,) = aligner.ready(1.25)       # watermark 2.25 passed 1.5
    np.testing.assert_array_equal(second.features[AUDIO], vec(12.5))
    assert second.staleness == {VIDEO: None, AUDIO: 0.0, TEXT: 0.75} and second.features[VIDEO] is None
    aligner.add_video(1.5, vec(1.5))
    (third,) = aligner.ready(1.5)
    np.testing.assert_array_equal(third.features[AUDIO], vec(1.5))
    assert third.staleness == {VIDEO: 0.0, AUDIO: 0.0, TEXT: 1.0}   # text exactly at its maximum age
    assert aligner.stats == {'frames_in': 3, 'frames_out': 3, 'video_invalid': 1, 'audio_late': 2,
                             'audio_dropped_late': 2, 'audio_overflow': 1, 'masked_video': 1}


def test_causal_policy_maximum_age_and_pruning_on_a_script():
    config = AlignmentConfig(audio_policy='causal', audio_max_age_s=0.5, max_audio=2)
    aligner = StreamAligner(config)
    aligner.add(AUDIO, 0.5, vec(0.5))
    aligner.add_video(1.0, vec(1.0))
    (first,) = aligner.ready(1.0)   # the window ended exactly the maximum age ago: still used
    np.testing.assert_array_equal(first.features[AUDIO], vec(0.5))
    assert first.released_by == 'no_wait' and first.staleness[AUDIO] == 0.5
    aligner.add(AUDIO, 1.0, vec(1.0))   # ends exactly at the fused frame: too late for it
    aligner.add(AUDIO, 1.5, vec(1.5))   # three windows in a buffer of two: 0.5 is evicted
    aligner.add_video(2.0, vec(2.0))
    (second,) = aligner.ready(2.0)
    np.testing.assert_array_equal(second.features[AUDIO], vec(1.5))
    aligner.add(AUDIO, 2.5, vec(2.5))   # 1.0 was pruned at the release of 2.0: no second overflow
    aligner.add_video(3.25, vec(3.25))
    (third,) = aligner.ready(3.25)      # newest window 0.75 old: stale, masked
    assert third.features[AUDIO] is None
    assert aligner.stats == {'frames_in': 3, 'frames_out': 3, 'audio_late': 1, 'audio_overflow': 1,
                             'masked_audio': 1, 'masked_text': 3}


def test_video_counters_duplicates_jumps_and_gaps():
    aligner = StreamAligner(AlignmentConfig(wait_for_audio=False, reset_after_s=5.0))
    # 1.0 twice more (duplicates), a gap of exactly 5 s (no reset), two jumps back, two gaps of 5.5 s
    for stamp, vector in [(1.0, vec(1.0)), (1.0, vec(1.0)), (1.0, None), (6.0, None),
                          (3.0, vec(3.0)), (2.0, vec(2.0)), (7.5, vec(7.5)), (13.0, vec(13.0))]:
        aligner.add_video(stamp, vector)
    steps = aligner.flush()
    assert [(s.stamp_s, s.reset) for s in steps] == [(1.0, False), (6.0, False), (3.0, True), (2.0, True),
                                                     (7.5, True), (13.0, True)]
    assert aligner.stats['video_duplicate'] == 2 and aligner.stats['video_invalid'] == 1
    assert aligner.stats['reset_backwards'] == 2 and aligner.stats['reset_gap'] == 2
