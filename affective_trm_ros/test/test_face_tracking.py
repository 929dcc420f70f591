"""core.face_tracking: stable face ids through occlusions, retirement, crossings, the max_faces cap."""

import pytest

from affective_trm_ros.core.face_tracking import FaceTracker, iou

FPS = 30.0


def box_at(cx, cy, side=80.0):
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def ids_of(update):
    return [track.track_id for track in update.visible]


def test_iou_of_known_boxes():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0


def test_one_face_keeps_its_id_while_it_moves():
    tracker = FaceTracker(max_faces=1, timeout_s=1.0)
    ids = [ids_of(tracker.update([box_at(100 + 6 * i, 200)], i / FPS)) for i in range(30)]
    assert ids == [[0]] * 30


def test_id_survives_a_short_occlusion_and_detector_misses():
    tracker = FaceTracker(max_faces=2, timeout_s=0.5)
    for i in range(10):
        tracker.update([box_at(100 + 4 * i, 200)], i / FPS)
    for i in range(10, 19):   # 0.3 s hidden: the track is kept, not visible
        update = tracker.update([], i / FPS)
        assert update.visible == [] and [tr.track_id for tr in update.lost] == [0] and not update.retired
    update = tracker.update([box_at(100 + 4 * 19, 200)], 19 / FPS)   # back where it was heading
    assert ids_of(update) == [0] and not update.started


def test_a_face_that_moved_while_hidden_is_reacquired_by_distance():
    tracker = FaceTracker(max_faces=1, timeout_s=1.0)
    tracker.update([box_at(100, 200)], 0.0)
    tracker.update([], 0.2)
    update = tracker.update([box_at(150, 210)], 0.4)   # no overlap with the last box, 0.6 faces away
    assert ids_of(update) == [0]


def test_lost_track_is_retired_after_the_timeout_and_a_return_gets_a_new_id():
    tracker = FaceTracker(max_faces=1, timeout_s=0.5)
    tracker.update([box_at(100, 200)], 0.0)
    assert not tracker.update([], 0.5).retired          # exactly the timeout: still kept
    update = tracker.update([], 0.51)
    assert update.retired == [0] and tracker.tracks == []
    update = tracker.update([box_at(100, 200)], 0.6)
    assert ids_of(update) == [1] and update.started == [1]


def test_two_faces_crossing_keep_their_ids():
    # Face A walks right along y=150, face B walks left along y=260: their boxes never overlap,
    # but their x ranges cross in the middle of the sequence.
    tracker = FaceTracker(max_faces=4, timeout_s=1.0)
    for i in range(60):
        a, b = box_at(60 + 8 * i, 150), box_at(540 - 8 * i, 260)
        update = tracker.update([b, a] if i % 2 else [a, b], i / FPS)   # detection order varies
        boxes = {tr.track_id: tr.box for tr in update.visible}
        assert boxes == {0: a, 1: b}, f'frame {i}'


def test_a_face_passing_behind_another_keeps_its_id():
    # Same row, walking towards each other; while they overlap only the front face (A) is
    # detected, then they separate on the other sides.
    tracker = FaceTracker(max_faces=2, timeout_s=1.0)
    for i in range(26):
        a, b = box_at(100 + 10 * i, 200, 60), box_at(400 - 10 * i, 200, 60)
        hidden = abs(a[0] - b[0]) < 70
        update = tracker.update([a] if hidden else [b, a], i / FPS)
        boxes = {tr.track_id: tr.box for tr in update.visible}
        assert boxes == ({0: a} if hidden else {0: a, 1: b}), f'frame {i}'
    assert tracker.track(0).box[0] > tracker.track(1).box[0]   # they did cross


def test_new_faces_get_ids_left_to_right_and_max_faces_caps_visible_faces():
    tracker = FaceTracker(max_faces=2, timeout_s=1.0)
    small_left, big_middle, big_right = box_at(50, 100, 40), box_at(300, 100, 90), box_at(500, 100, 100)
    update = tracker.update([big_right, small_left, big_middle], 0.0)
    assert {tr.track_id: tr.box for tr in update.visible} == {0: big_middle, 1: big_right}
    assert update.started == [0, 1]


def test_a_new_face_takes_the_slot_of_the_longest_lost_track():
    tracker = FaceTracker(max_faces=1, timeout_s=5.0)
    tracker.update([box_at(100, 100)], 0.0)
    update = tracker.update([box_at(500, 400)], 0.1)   # far away: another person
    assert update.retired == [0] and ids_of(update) == [1]


def test_follow_updates_boxes_and_unknown_ids_raise():
    tracker = FaceTracker(max_faces=2, timeout_s=1.0)
    tracker.update([box_at(100, 100), box_at(300, 100)], 0.0)
    update = tracker.follow({0: box_at(104, 100)}, 0.03)
    assert ids_of(update) == [0] and [tr.track_id for tr in update.lost] == [1]
    assert tracker.track(0).box == box_at(104, 100)
    with pytest.raises(KeyError, match='7'):
        tracker.follow({7: box_at(0, 0)}, 0.06)


def test_time_going_backwards_retires_everything():
    tracker = FaceTracker(max_faces=1, timeout_s=1.0)
    tracker.update([box_at(100, 100)], 10.0)
    update = tracker.update([box_at(100, 100)], 2.0)
    assert update.retired == [0] and ids_of(update) == [1]


@pytest.mark.parametrize('kwargs', [{'max_faces': 0}, {'timeout_s': -1.0}, {'iou_threshold': 0.0},
                                    {'reacquire_distance': float('nan')}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        FaceTracker(**kwargs)


@pytest.mark.parametrize('bad', [(0, 0, 10), (10, 0, 0, 10), (0, 0, float('nan'), 10)])
def test_bad_boxes_are_refused(bad):
    with pytest.raises(ValueError, match='box'):
        FaceTracker().update([bad], 0.0)
