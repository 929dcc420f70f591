"""The per-stream table: shared context, batching of due frames, retirement, eviction, resets (no ROS)."""

import math

import numpy as np
import pytest

from affective_trm_ros.core.alignment import AUDIO_CAUSAL, AlignmentConfig
from affective_trm_ros.core.modalities import AUDIO, TEXT, VIDEO
from affective_trm_ros.core.streams import DEFAULT_STREAM, StreamPolicy, StreamTable

NO_AUDIO_WAIT = AlignmentConfig(wait_for_audio=False)


def vec(value: float) -> np.ndarray:
    return np.full(3, value, dtype=np.float32)


def tag(vector):
    return None if vector is None else float(vector[0])


class RecordingRunner:
    """A model runner that records every call; valence = the video tag, arousal = the audio tag."""

    def __init__(self) -> None:
        self.calls = []
        self.live = set()

    def step(self, items, resets=None):
        self.calls.append(('step', [(sid, tag(f[VIDEO])) for sid, f in items], list(resets)))
        self.live.update(sid for sid, _ in items)
        return [(tag(f[VIDEO]) or 0.0, tag(f[AUDIO]) or 0.0, 1.0) for _, f in items]

    def reset(self, stream_id=None):
        self.calls.append(('reset', stream_id))
        gone = sorted(self.live) if stream_id is None else sorted({stream_id} & self.live)
        self.live -= set(gone)
        return gone


def test_due_frames_of_all_streams_go_to_the_model_round_by_round_in_stamp_order():
    """Round r batches the r-th due frame of every stream (the recurrence allows no fewer calls),
    and each round's estimates are handed over as soon as they exist."""
    runner = RecordingRunner()
    table = StreamTable(runner, NO_AUDIO_WAIT)
    for k in range(3):
        table.add(VIDEO, 'a', k, vec(k), now_s=0.0)
    for k in range(2):
        table.add(VIDEO, 'b', k, vec(10 + k), now_s=0.0)
    handed = []
    estimates = table.run(0.0, on_estimates=lambda done: handed.append(
        [(e.stream_id, e.step.stamp_s) for e in done] + [len(runner.calls)]))
    assert [c[1] for c in runner.calls] == [[('a', 0), ('b', 10)], [('a', 1), ('b', 11)], [('a', 2)]]
    assert handed == [[('a', 0), ('b', 0), 1], [('a', 1), ('b', 1), 2], [('a', 2), 3]]
    assert [(e.stream_id, e.step.stamp_s, e.valence) for e in estimates] == [
        ('a', 0, 0), ('b', 0, 10), ('a', 1, 1), ('b', 1, 11), ('a', 2, 2)]
    assert table.run(0.0) == [] and len(runner.calls) == 3
    assert table.counts['model_calls'] == 3 and table.counts['steps'] == 5


def test_empty_stream_id_audio_and_text_are_shared_by_every_stream_also_later_ones():
    runner = RecordingRunner()
    table = StreamTable(runner, AlignmentConfig(audio_policy=AUDIO_CAUSAL))
    table.add(VIDEO, 'face_0', 1.0, vec(1), now_s=1.0)
    table.add(AUDIO, '', 1.0, vec(0.5), now_s=1.0)             # shared
    table.add(TEXT, '', 0.9, vec(7), now_s=1.0)                # shared
    table.add(AUDIO, 'face_0', 1.05, vec(0.25), now_s=1.0)     # only face_0's own
    table.add(VIDEO, 'face_0', 1.1, vec(2), now_s=1.1)
    table.add(VIDEO, 'face_1', 1.1, vec(3), now_s=1.1)         # appears after the shared context
    table.add(VIDEO, '', 1.1, vec(4), now_s=1.1)               # no id: the default stream
    estimates = {(e.stream_id, e.step.stamp_s): e.step for e in table.run(1.1)}
    assert tag(estimates[('face_0', 1.0)].features[AUDIO]) == 0.5    # shared, ended with the frame
    assert tag(estimates[('face_0', 1.1)].features[AUDIO]) == 0.25
    assert tag(estimates[('face_1', 1.1)].features[AUDIO]) == 0.5
    assert tag(estimates[('face_1', 1.1)].features[TEXT]) == 7
    assert tag(estimates[(DEFAULT_STREAM, 1.1)].features[TEXT]) == 7
    assert table.tracked() == [DEFAULT_STREAM, 'face_0', 'face_1']


def test_shared_audio_text_shares_every_embedding_whatever_its_id():
    table = StreamTable(RecordingRunner(), AlignmentConfig(audio_policy=AUDIO_CAUSAL),
                        StreamPolicy(shared_audio_text=True))
    table.add(AUDIO, 'default', 1.0, vec(0.5), now_s=1.0)
    for face in ('face_0', 'face_1'):
        table.add(VIDEO, face, 1.0, vec(1), now_s=1.0)
    assert [tag(e.step.features[AUDIO]) for e in table.run(1.0)] == [0.5, 0.5]
    assert table.stream_ids() == ['face_0', 'face_1']   # no audio-only 'default' stream


def test_idle_streams_retire_and_their_model_state_is_freed():
    runner = RecordingRunner()
    table = StreamTable(runner, NO_AUDIO_WAIT, StreamPolicy(forget_after_s=2.0))
    table.add(VIDEO, 'a', 0.0, vec(1), now_s=10.0)
    table.run(10.0)
    table.add(VIDEO, 'b', 0.0, vec(1), now_s=11.0)
    table.run(11.0)
    version = table.version
    assert table.next_wake() == pytest.approx(12.0)       # a's retirement is the next deadline
    table.run(11.9)
    assert table.tracked() == ['a', 'b']
    table.run(12.0)
    assert table.tracked() == ['b'] and table.version != version
    assert ('reset', 'a') in runner.calls and runner.live == {'b'}
    assert table.counts['streams_retired'] == 1


def test_beyond_max_streams_the_least_recently_active_is_evicted():
    runner = RecordingRunner()
    table = StreamTable(runner, AlignmentConfig(), StreamPolicy(max_streams=2))
    table.add(VIDEO, 'a', 0.0, vec(1), now_s=0.0)      # waits for audio: pending
    table.add(VIDEO, 'b', 0.0, vec(1), now_s=1.0)
    table.add(VIDEO, 'c', 0.0, vec(1), now_s=2.0)
    assert table.stream_ids() == ['b', 'c']
    assert table.counts['streams_evicted'] == 1 and table.counts['frames_dropped_evicted'] == 1
    assert table.next_wake() == -math.inf                  # a's state is to be freed now
    table.run(2.0)
    assert runner.calls[0] == ('reset', 'a')


def test_reset_requests_apply_before_the_next_step_and_unknown_ids_are_refused():
    runner = RecordingRunner()
    table = StreamTable(runner, NO_AUDIO_WAIT)
    table.add(VIDEO, 'a', 0.0, vec(1), now_s=0.0)
    table.run(0.0)
    assert table.request_reset('nobody') == []
    assert table.request_reset('a') == ['a']
    table.add(VIDEO, 'a', 0.1, vec(2), now_s=0.1)
    table.run(0.1)
    assert runner.calls[1:] == [('reset', 'a'), ('step', [('a', 2)], [False])]
    assert table.request_reset(None) == ['a']


def test_automatic_resets_travel_with_their_step():
    runner = RecordingRunner()
    table = StreamTable(runner, AlignmentConfig(wait_for_audio=False, reset_after_s=1.0))
    table.add(VIDEO, 'a', 0.0, vec(1), now_s=0.0)
    table.add(VIDEO, 'a', 5.0, vec(2), now_s=0.0)      # a gap: the model state restarts here
    table.run(0.0)
    assert runner.calls == [('step', [('a', 1)], [False]), ('step', [('a', 2)], [True])]


def test_next_wake_follows_the_arrival_deadline_of_waiting_frames():
    table = StreamTable(RecordingRunner(), AlignmentConfig(max_wait_s=0.6))
    assert table.next_wake() is None
    table.add(VIDEO, 'a', 1000.0, vec(1), now_s=5.0)    # stamp far ahead of the consumer clock
    assert table.next_wake() == pytest.approx(5.6)
    assert table.run(5.5) == []
    (estimate,) = table.run(5.6)
    assert estimate.step.features[AUDIO] is None


def test_a_clock_jumping_back_releases_waiting_frames_within_max_wait():
    table = StreamTable(RecordingRunner(), AlignmentConfig(max_wait_s=0.6))
    table.add(VIDEO, 'a', 100.0, vec(1), now_s=100.0)
    table.add(AUDIO, 'a', 0.0, vec(0), now_s=1.0)         # the simulated clock looped
    assert table.next_wake() == pytest.approx(1.6)
    assert len(table.run(1.6)) == 1
