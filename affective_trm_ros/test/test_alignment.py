"""The video-clocked alignment policy, case by case (pure Python, no ROS)."""

import math
import random

import numpy as np
import pytest

from affective_trm_ros.core.alignment import (
    AUDIO_CAUSAL,
    RELEASED_BY_AUDIO,
    RELEASED_BY_FLUSH,
    RELEASED_BY_NO_WAIT,
    RELEASED_BY_OVERFLOW,
    RELEASED_BY_TIMEOUT,
    AlignmentConfig,
    StreamAligner,
    align_events,
    embedding_mismatch,
    split_encoder_identity,
    steps_to_arrays,
)
from affective_trm_ros.core.modalities import AUDIO, FEATURE_ORDER, TEXT, VIDEO

CONFIG = AlignmentConfig(audio_slop_s=0.3, text_max_age_s=2.0, max_wait_s=0.6, reset_after_s=3.0)


def vec(value: float, dim: int = 3) -> np.ndarray:
    """A recognisable embedding: every entry equals ``value``."""
    return np.full(dim, value, dtype=np.float64)


def tag(vector):
    return None if vector is None else float(vector[0])


def released(aligner, now=math.inf):
    return aligner.ready(now)


# ---------------------------------------------------------------- audio matching

def test_audio_nearest_within_slop_is_used():
    aligner = StreamAligner(CONFIG)
    aligner.add(AUDIO, 0.5, vec(0.5))
    aligner.add(AUDIO, 1.1, vec(1.1))
    aligner.add(AUDIO, 1.5, vec(1.5))
    aligner.add_video(1.0, vec(10.0))
    (step,) = released(aligner)
    assert tag(step.features[AUDIO]) == 1.1
    assert step.staleness[AUDIO] == pytest.approx(-0.1)
    assert step.bits == 1 | 2


def test_audio_tie_takes_the_earlier_embedding():
    aligner = StreamAligner(CONFIG)
    aligner.add(AUDIO, 0.75, vec(0.75))
    aligner.add(AUDIO, 1.25, vec(1.25))
    aligner.add_video(1.0, vec(1.0))
    (step,) = released(aligner)
    assert tag(step.features[AUDIO]) == 0.75


def test_audio_beyond_slop_is_masked():
    aligner = StreamAligner(CONFIG)
    aligner.add(AUDIO, 0.5, vec(0.5))
    aligner.add(AUDIO, 1.5, vec(1.5))
    aligner.add_video(1.0, vec(1.0))
    (step,) = released(aligner)
    assert step.features[AUDIO] is None
    assert step.staleness[AUDIO] is None
    assert step.bits == 1
    assert aligner.stats['masked_audio'] == 1


def test_invalid_nearest_audio_masks_even_when_a_valid_one_is_within_slop():
    aligner = StreamAligner(CONFIG)
    aligner.add(AUDIO, 0.8, vec(0.8))
    aligner.add(AUDIO, 1.05, None)  # silence right at the frame
    aligner.add_video(1.0, vec(1.0))
    (step,) = released(aligner)
    assert step.features[AUDIO] is None
    assert list(step.mask) == [False, True, False]


# ---------------------------------------------------------------- text matching

def test_text_latest_not_newer_within_max_age():
    aligner = StreamAligner(CONFIG)
    aligner.add(TEXT, 0.2, vec(0.2))
    aligner.add(TEXT, 0.9, vec(0.9))
    aligner.add(TEXT, 1.01, vec(1.01))  # newer than the frame: not used for it
    aligner.add_video(1.0, vec(1.0))
    aligner.add_video(1.02, vec(1.02))
    first, second = released(aligner)
    assert tag(first.features[TEXT]) == 0.9
    assert first.staleness[TEXT] == pytest.approx(0.1)
    assert tag(second.features[TEXT]) == 1.01


def test_text_older_than_max_age_is_masked():
    aligner = StreamAligner(CONFIG)
    aligner.add(TEXT, 1.0, vec(1.0))
    aligner.add_video(2.9, vec(2.9))
    aligner.add_video(3.1, vec(3.1))
    near, far = released(aligner)
    assert tag(near.features[TEXT]) == 1.0
    assert far.features[TEXT] is None
    assert aligner.stats['masked_text'] == 1


def test_invalid_text_masks_until_the_next_valid_one():
    aligner = StreamAligner(CONFIG)
    aligner.add(TEXT, 0.1, vec(0.1))
    aligner.add(TEXT, 0.5, None)  # empty utterance
    aligner.add_video(0.6, vec(0.6))
    (step,) = released(aligner)
    assert step.features[TEXT] is None


def test_several_frames_share_one_audio_window():
    """30 FPS video, audio every 0.5 s: each audio window serves every frame within its slop,
    however the frames are released (one by one as they become due, or together)."""
    aligner = StreamAligner(CONFIG)
    frames = [round(0.9 + k / 30, 6) for k in range(10)]          # 0.9 .. 1.2 s
    aligner.add(AUDIO, 1.0, vec(1.0))
    steps = []
    for stamp in frames:
        aligner.add_video(stamp, vec(stamp))
        steps += aligner.ready(stamp + CONFIG.max_wait_s)           # each frame leaves on its own
    assert [s.stamp_s for s in steps] == frames
    assert [tag(s.features[AUDIO]) for s in steps] == [1.0] * len(frames)
    assert [s.staleness[AUDIO] for s in steps] == pytest.approx([t - 1.0 for t in frames])
    # a newer window takes over only where it is nearer
    aligner.add(AUDIO, 1.5, vec(1.5))
    for stamp in (1.23, 1.26, 1.3):
        aligner.add_video(stamp, vec(stamp))
    aligner.add(AUDIO, 2.0, vec(2.0))
    assert [tag(s.features[AUDIO]) for s in aligner.ready(-math.inf)] == [1.0, 1.5, 1.5]


CAUSAL = AlignmentConfig(audio_policy=AUDIO_CAUSAL, audio_max_age_s=0.8, text_max_age_s=2.0,
                         max_wait_s=0.6, reset_after_s=3.0)


def test_causal_policy_uses_the_newest_window_ending_at_or_before_the_frame_and_never_waits():
    aligner = StreamAligner(CAUSAL)
    aligner.add(AUDIO, 0.5, vec(0.5))
    aligner.add(AUDIO, 1.0, vec(1.0))
    aligner.add(AUDIO, 1.5, vec(1.5))          # after the frames below: never used for them
    frames = [round(1.0 + k / 30, 6) for k in range(6)]
    for stamp in frames:
        aligner.add_video(stamp, vec(stamp))
    steps = aligner.ready(-math.inf)           # no clock, no audio watermark needed
    assert [s.stamp_s for s in steps] == frames
    assert {s.released_by for s in steps} == {RELEASED_BY_NO_WAIT}
    assert [tag(s.features[AUDIO]) for s in steps] == [1.0] * 6     # one window serves them all
    assert steps[0].staleness[AUDIO] == 0.0 and steps[-1].staleness[AUDIO] > 0
    aligner.add_video(1.6, vec(1.6))
    (step,) = aligner.ready(-math.inf)
    assert tag(step.features[AUDIO]) == 1.5
    aligner.add_video(2.35, vec(2.35))          # newest window ended 0.85 s earlier > max age 0.8
    (step,) = aligner.ready(-math.inf)
    assert step.features[AUDIO] is None and step.bits == 1
    assert aligner.next_deadline() is None


def test_causal_policy_counts_audio_that_came_after_its_frame():
    aligner = StreamAligner(CAUSAL)
    aligner.add_video(1.0, vec(1.0))
    (first,) = aligner.ready(-math.inf)
    assert first.features[AUDIO] is None
    aligner.add(AUDIO, 1.0, vec(1.0))          # ended with the frame, arrived after it left: late
    assert aligner.stats['audio_late'] == 1
    aligner.add_video(1.1, vec(1.1))
    (second,) = aligner.ready(-math.inf)
    assert tag(second.features[AUDIO]) == 1.0  # still the newest window for the next frame


def test_causal_offline_alignment_sees_every_window_up_to_the_frame():
    video, audio, text = make_session(seed=5)
    steps = align_events(video + audio + text, CAUSAL)
    stamps = [a[1] for a in audio]
    for step in steps:
        before = [i for i, s in enumerate(stamps) if s <= step.stamp_s + 1e-9]
        newest = audio[before[-1]] if before else None
        expected = (newest[2] if newest is not None and step.stamp_s - newest[1] <= 0.8 + 1e-9 else None)
        assert tag(step.features[AUDIO]) == tag(expected), step.stamp_s


def test_max_wait_runs_from_arrival_not_from_the_stamp():
    """A camera clock 5 s ahead of the consumer: the frame still waits max_wait_s after it arrived,
    neither 5 s more nor released at once when the clock is 5 s behind."""
    ahead = StreamAligner(CONFIG)
    ahead.add_video(105.0, vec(1.0), arrival_s=100.0)
    assert ahead.next_deadline() == pytest.approx(100.6)
    assert ahead.ready(100.59) == []
    (step,) = ahead.ready(100.6)
    assert step.released_by == RELEASED_BY_TIMEOUT and step.stamp_s == 105.0
    behind = StreamAligner(CONFIG)
    behind.add_video(95.0, vec(1.0), arrival_s=100.0)
    assert behind.ready(100.0) == []
    assert len(behind.ready(100.6)) == 1


def test_a_clock_that_jumps_back_does_not_hold_frames():
    aligner = StreamAligner(CONFIG)
    aligner.add_video(50.0, vec(1.0), arrival_s=50.0)
    aligner.clock_went_back(2.0)                # a looping simulated clock
    assert aligner.next_deadline() == pytest.approx(2.6)
    assert len(aligner.ready(2.6)) == 1


# ---------------------------------------------------------------- release rules

def test_frame_waits_for_the_audio_watermark():
    aligner = StreamAligner(CONFIG)
    aligner.add_video(1.0, vec(1.0))
    assert aligner.ready(1.2) == []
    aligner.add(AUDIO, 1.2, vec(1.2))
    assert aligner.ready(1.2) == []        # watermark 1.2 < 1.0 + 0.3
    aligner.add(AUDIO, 1.35, vec(1.35))    # watermark passes t + slop
    (step,) = aligner.ready(-math.inf)
    assert step.released_by == RELEASED_BY_AUDIO
    assert tag(step.features[AUDIO]) == 1.2
    assert aligner.ready(math.inf) == []   # released exactly once


def test_frame_is_released_by_the_clock_when_audio_is_missing():
    aligner = StreamAligner(CONFIG)
    aligner.add_video(1.0, vec(1.0))
    aligner.add_video(1.1, vec(1.1))
    assert aligner.ready(1.59) == []
    (step,) = aligner.ready(1.6)
    assert step.stamp_s == 1.0 and step.released_by == RELEASED_BY_TIMEOUT
    assert step.features[AUDIO] is None
    assert [s.stamp_s for s in aligner.ready(1.7)] == [1.1]


def test_no_wait_for_audio_releases_at_once():
    aligner = StreamAligner(AlignmentConfig(wait_for_audio=False))
    aligner.add_video(1.0, vec(1.0))
    (step,) = aligner.ready(-math.inf)
    assert step.released_by == RELEASED_BY_NO_WAIT


def test_frames_leave_in_stamp_order_and_one_step_per_frame():
    aligner = StreamAligner(CONFIG)
    stamps = [round(i / 30, 6) for i in range(30)]
    for stamp in stamps:
        aligner.add_video(stamp, vec(stamp))
    aligner.add(AUDIO, 0.5, vec(0.5))
    early = aligner.ready(-math.inf)
    assert [s.stamp_s for s in early] == [s for s in stamps if s + 0.3 <= 0.5]
    rest = aligner.flush()
    assert [s.stamp_s for s in early + rest] == stamps
    assert {s.released_by for s in rest} == {RELEASED_BY_FLUSH}


def test_invalid_video_frame_still_gives_a_step():
    aligner = StreamAligner(CONFIG)
    aligner.add(AUDIO, 1.0, vec(1.0))
    aligner.add_video(1.0, None)
    (step,) = released(aligner)
    assert step.features[VIDEO] is None and step.staleness[VIDEO] is None
    assert step.bits == 2
    assert aligner.stats['video_invalid'] == 1


def test_meta_passes_through():
    aligner = StreamAligner(CONFIG)
    aligner.add_video(1.0, vec(1.0), meta=('stamp', 'camera'))
    (step,) = released(aligner)
    assert step.meta == ('stamp', 'camera')


# ---------------------------------------------------------------- late, duplicate, bounded

def test_late_audio_is_counted_and_still_serves_later_frames():
    aligner = StreamAligner(CONFIG)
    aligner.add_video(1.0, vec(1.0))
    aligner.add_video(1.1, vec(1.1))
    (first,) = aligner.ready(1.6)           # timed out without audio
    assert first.features[AUDIO] is None
    aligner.add(AUDIO, 1.05, vec(1.05))      # within the fused frame's slop: late
    assert aligner.stats['audio_late'] == 1
    aligner.add(AUDIO, 1.5, vec(1.5))
    (second,) = aligner.ready(-math.inf)
    assert tag(second.features[AUDIO]) == 1.05


def test_audio_too_old_for_any_unfused_frame_is_dropped_and_counted():
    aligner = StreamAligner(CONFIG)
    aligner.add_video(1.0, vec(1.0))
    aligner.ready(2.0)
    aligner.add(AUDIO, 0.6, vec(0.6))
    assert aligner.stats['audio_dropped_late'] == 1
    aligner.add_video(1.2, vec(1.2))
    (step,) = released(aligner)
    assert step.features[AUDIO] is None


def test_text_arriving_after_newer_frames_were_fused_is_counted_late():
    aligner = StreamAligner(CONFIG)
    aligner.add_video(1.0, vec(1.0))
    released(aligner)
    aligner.add(TEXT, 0.9, vec(0.9))
    assert aligner.stats['text_late'] == 1
    aligner.add_video(1.1, vec(1.1))
    (step,) = released(aligner)
    assert tag(step.features[TEXT]) == 0.9


def test_duplicate_video_stamp_is_dropped():
    aligner = StreamAligner(CONFIG)
    aligner.add_video(1.0, vec(1.0))
    aligner.add_video(1.0, vec(2.0))
    assert len(released(aligner)) == 1
    assert aligner.stats['video_duplicate'] == 1


def test_pending_frames_are_bounded():
    aligner = StreamAligner(AlignmentConfig(max_pending_frames=4))
    for i in range(10):
        aligner.add_video(i / 30, vec(i))
    assert aligner.pending == 4
    overflowed = aligner.ready(-math.inf)
    assert [tag(s.features[VIDEO]) for s in overflowed] == [0, 1, 2, 3, 4, 5]
    assert {s.released_by for s in overflowed} == {RELEASED_BY_OVERFLOW}
    assert aligner.stats['video_overflow'] == 6


def test_audio_and_text_buffers_are_bounded():
    aligner = StreamAligner(AlignmentConfig(max_audio=5, max_text=3))
    for i in range(20):
        aligner.add(AUDIO, i * 0.5, vec(i))
        aligner.add(TEXT, i * 0.5, vec(i))
    assert aligner.stats['audio_overflow'] == 15
    assert aligner.stats['text_overflow'] == 17
    aligner.add_video(9.5, vec(0.0))
    (step,) = released(aligner)
    assert tag(step.features[AUDIO]) == 19 and tag(step.features[TEXT]) == 19


def test_long_stream_keeps_buffers_small():
    aligner = StreamAligner(CONFIG)
    for i in range(3000):
        t = i / 30
        aligner.add_video(t, vec(t))
        if i % 15 == 0:
            aligner.add(AUDIO, t, vec(t))
        if i % 90 == 0:
            aligner.add(TEXT, t, vec(t))
        aligner.ready(t)
    assert aligner.pending <= 1 + int(0.6 * 30)
    assert len(aligner._audio.stamps) <= 3
    assert len(aligner._text.stamps) <= 2


# ---------------------------------------------------------------- resets

def test_time_going_backwards_flushes_and_resets():
    aligner = StreamAligner(CONFIG)
    aligner.add(AUDIO, 10.0, vec(10.0))
    aligner.add(TEXT, 9.9, vec(9.9))
    aligner.add_video(10.0, vec(10.0))
    aligner.add(AUDIO, 0.05, vec(0.05))    # the replay looped: new timeline audio...
    aligner.add_video(0.0, vec(0.0))       # ...and video
    old, new = released(aligner)
    assert old.stamp_s == 10.0 and not old.reset and old.released_by == RELEASED_BY_FLUSH
    assert tag(old.features[AUDIO]) == 10.0
    assert new.stamp_s == 0.0 and new.reset
    assert new.features[TEXT] is None       # the old timeline's text is forgotten
    assert aligner.stats['reset_backwards'] == 1
    aligner.add_video(0.1, vec(0.1))
    (after,) = released(aligner)
    assert not after.reset


def test_backwards_jump_forgets_the_watermark_of_the_old_timeline():
    aligner = StreamAligner(CONFIG)
    aligner.add(AUDIO, 50.0, vec(50.0))
    aligner.add_video(50.0, vec(50.0))
    released(aligner)
    aligner.add_video(1.0, vec(1.0))
    assert [s.stamp_s for s in aligner.ready(-math.inf)] == []  # waits for new audio, not 50 s
    aligner.add(AUDIO, 1.3, vec(1.3))
    (step,) = aligner.ready(-math.inf)
    assert step.reset and tag(step.features[AUDIO]) == 1.3


def test_gap_without_video_resets():
    aligner = StreamAligner(CONFIG)
    aligner.add_video(1.0, vec(1.0))
    aligner.add_video(3.9, vec(3.9))   # 2.9 s gap: below reset_after_s
    aligner.add_video(7.0, vec(7.0))   # 3.1 s gap: reset
    steps = released(aligner)
    assert [s.reset for s in steps] == [False, False, True]
    assert aligner.stats['reset_gap'] == 1


# ---------------------------------------------------------------- order independence and parity

def make_session(seconds=6.0, seed=0):
    """Video at 30 FPS (some invalid), audio every 0.5 s (some silent), sparse text; stamps in seconds."""
    rng = random.Random(seed)
    video = [(VIDEO, round(i / 30, 6), vec(i) if rng.random() > 0.1 else None)
             for i in range(int(seconds * 30))]
    audio = [(AUDIO, round(0.5 * (i + 1), 6), vec(1000 + i) if rng.random() > 0.2 else None)
             for i in range(int(seconds / 0.5))]
    text = [(TEXT, round(t, 6), vec(2000 + i) if i != 2 else None)
            for i, t in enumerate([0.4, 1.7, 2.05, 4.3])]
    return video, audio, text


def summary(steps):
    return [(s.stamp_s, tuple(tag(s.features[m]) for m in FEATURE_ORDER), s.bits, s.reset) for s in steps]


def test_outcome_does_not_depend_on_arrival_interleaving():
    """Any interleaving of the (in-order) audio and video streams, with ready() polled at random
    moments, gives the same steps, provided text arrives before audio passes its stamp + slop."""
    video, audio, text = make_session()
    reference = summary(align_events(video + audio + text, CONFIG))
    assert len(reference) == len(video)
    for seed in range(20):
        rng = random.Random(seed)
        merged, v, a = [], list(video), list(audio)
        while v or a:
            source = v if (v and (not a or rng.random() < 0.8)) else a
            merged.append(source.pop(0))
        for event in text:  # insert each text before the first audio at or past stamp + slop
            limit = next((i for i, e in enumerate(merged)
                          if e[0] == AUDIO and e[1] >= event[1] + CONFIG.audio_slop_s), len(merged))
            merged.insert(rng.randint(0, limit), event)
        aligner = StreamAligner(CONFIG)
        steps = []
        for modality, stamp, vector in merged:
            aligner.add(modality, stamp, vector)
            if rng.random() < 0.3:
                steps += aligner.ready(-math.inf)
        steps += aligner.flush()
        assert summary(steps) == reference, f'interleaving {seed} differs'


def test_streaming_with_a_live_clock_matches_offline_alignment():
    """A node-like run -- embeddings arrive with encoder delays, ready(now) polled on a clock --
    gives the same features as align_events over the finished recording (train/serve parity)."""
    video, audio, text = make_session(seed=3)
    offline = align_events(video + audio + text, CONFIG)
    # Arrival time = stamp + encoder delay (audio slower than video, both within max_wait - slop).
    delays = {VIDEO: 0.05, AUDIO: 0.25, TEXT: 0.1}
    arrivals = sorted(((e[1] + delays[e[0]], i, e) for i, e in enumerate(video + audio + text)))
    aligner = StreamAligner(CONFIG)
    streamed = []
    poll_period = 0.01
    next_poll = 0.0
    for arrival, _, (modality, stamp, vector) in arrivals:
        while next_poll < arrival:
            streamed += aligner.ready(next_poll)
            next_poll += poll_period
        aligner.add(modality, stamp, vector)
    streamed += aligner.ready(math.inf)
    assert summary(streamed) == summary(offline)
    assert {s.released_by for s in streamed} <= {RELEASED_BY_AUDIO, RELEASED_BY_TIMEOUT}


def test_align_events_matches_the_rules_on_a_small_case():
    events = [(VIDEO, 0.0, vec(0)), (AUDIO, 0.2, vec(0.2)), (TEXT, 0.0, vec(7)),
              (VIDEO, 1.0, vec(1)), (AUDIO, 0.7, None), (VIDEO, 2.0, None)]
    steps = align_events(events, CONFIG)
    assert summary(steps) == [
        (0.0, (0.2, 0.0, 7.0), 7, False),
        (1.0, (None, 1.0, 7.0), 5, False),   # nearest audio (0.7) is beyond the slop
        (2.0, (None, None, 7.0), 4, False),
    ]


def test_steps_to_arrays():
    events = [(VIDEO, 0.0, vec(1, 4)), (AUDIO, 0.0, vec(2, 2)), (VIDEO, 0.5, vec(3, 4))]
    timestamps, features, mask, resets = steps_to_arrays(align_events(events, CONFIG),
                                                         {AUDIO: 2, VIDEO: 4, TEXT: 5})
    assert timestamps.tolist() == [0.0, 0.5]
    assert features[VIDEO].shape == (2, 4) and features[TEXT].shape == (2, 5)
    assert features[AUDIO].tolist() == [[2, 2], [0, 0]]
    assert mask.tolist() == [[True, True, False], [False, True, False]]
    assert resets.tolist() == [False, False]
    with pytest.raises(ValueError, match='video embedding at t=0.000 s has 4 values, expected 3'):
        steps_to_arrays(align_events(events, CONFIG), {AUDIO: 2, VIDEO: 3, TEXT: 5})


# ---------------------------------------------------------------- errors and input checks

def test_bad_config_and_input_fail_clearly():
    with pytest.raises(ValueError, match='max_wait_s .* must be >= audio_slop_s'):
        StreamAligner(AlignmentConfig(audio_slop_s=0.5, max_wait_s=0.2))
    with pytest.raises(ValueError, match='reset_after_s'):
        StreamAligner(AlignmentConfig(reset_after_s=0.1))
    with pytest.raises(ValueError, match='audio_slop_s must be a finite number'):
        StreamAligner(AlignmentConfig(audio_slop_s=-1.0))
    with pytest.raises(ValueError, match='max_pending_frames must be >= 1'):
        StreamAligner(AlignmentConfig(max_pending_frames=0))
    with pytest.raises(ValueError, match="audio_policy must be one of .*'sideways'"):
        StreamAligner(AlignmentConfig(audio_policy='sideways'))
    with pytest.raises(ValueError, match='audio_max_age_s must be a finite number'):
        StreamAligner(AlignmentConfig(audio_max_age_s=math.inf))
    aligner = StreamAligner()
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        aligner.add('smell', 0.0, None)
    with pytest.raises(ValueError, match='stamp must be finite'):
        aligner.add_video(math.nan, None)


def test_embedding_mismatch_names_both_sides():
    expected = {'modality': VIDEO, 'encoder': 'hsemotion_enet_b0', 'dim': 1280}
    assert embedding_mismatch(expected, VIDEO, 'hsemotion_enet_b0@enet_b0_8_best_afew', 1280) is None
    assert embedding_mismatch(expected, VIDEO, 'hsemotion_enet_b0@untrained', None) is None
    message = embedding_mismatch(expected, VIDEO, 'other_face@v1', 512)
    assert "'other_face@v1' (dim 512)" in message
    assert "'hsemotion_enet_b0' with dim 1280" in message
    assert "encoder 'other_face' instead of 'hsemotion_enet_b0'" in message
    assert 'dim 512 instead of 1280' in message
    assert 'dim 1280 instead' not in embedding_mismatch(expected, VIDEO, 'x@y', None)
    assert split_encoder_identity('minilm@sha256=ab') == ('minilm', 'sha256=ab')
    assert split_encoder_identity('bare') == ('bare', '')
