"""core.face_pipeline: the tracked video path (downscaled detection, following, ids, one batch) and
the full-frame path, on real photographs with the real MTCNN detector."""

import numpy as np
import pytest
import torch

from affective_trm_ros.benchmarks.face_frames import face_canvas, moving_faces
from affective_trm_ros.core.encoders.base import EncodeResult, load_encoder
from affective_trm_ros.core.encoders.face import FaceBox, crop_face, make_detector
from affective_trm_ros.core.face_pipeline import FullFrameFaces, TrackedFaces, make_tracked_faces
from affective_trm_ros.core.face_tracking import iou

pytest.importorskip('facenet_pytorch')

FPS = 30.0


class CropEncoder:
    """Encodes a crop as [mean R, G, B, height, width]; records the batch of every call."""

    identity = 'crops@test'

    def __init__(self):
        self.calls = []

    def encode_faces(self, crops):
        self.calls.append([crop.shape for crop in crops])
        rows = np.array([[*crop.reshape(-1, 3).mean(axis=0), *crop.shape[:2]] for crop in crops], np.float32)
        return EncodeResult(rows, np.ones(len(crops), bool),
                            {'expression_classes': ['calm', 'busy'],
                             'expression_probabilities': np.tile([0.25, 0.75], (len(crops), 1))})


def tracked(encoder=None, **options):
    return make_tracked_faces(encoder or CropEncoder(), 'mtcnn', torch.device('cpu'), min_face_size=40,
                              min_face_confidence=0.9, **{'max_faces': 4, **options})


def as_tuple(box):
    return (box.x1, box.y1, box.x2, box.y2)


@pytest.fixture(scope='module')
def full_resolution_mtcnn():
    return make_detector('mtcnn', torch.device('cpu'), min_face_size=40)


def test_two_faces_get_ids_left_to_right_and_one_batched_call():
    encoder = CropEncoder()
    faces = tracked(encoder)
    frame = face_canvas(heads=[(213, 240), (427, 240)])
    result = faces.process(frame, 0.0)
    assert result.detected and [f.track_id for f in result.faces] == [0, 1]
    left, right = (f.box for f in result.faces)
    assert left.x2 < 320 < right.x1
    assert len(encoder.calls) == 1 and len(encoder.calls[0]) == 2
    assert result.expression_classes == ('calm', 'busy')
    for face in result.faces:
        assert face.visible and face.valid
        np.testing.assert_array_equal(face.expression_probabilities, [0.25, 0.75])
        assert face.embedding[3:5].tolist() == list(crop_face(frame, face.box).shape[:2])


def test_detection_on_the_half_size_frame_finds_the_full_resolution_boxes(full_resolution_mtcnn):
    frame = face_canvas(heads=[(213, 240), (427, 240)])
    reference = sorted(full_resolution_mtcnn.detect_all(frame), key=lambda b: b.x1)
    found = sorted(tracked(detection_scale=0.5).detect(frame), key=lambda b: b.x1)
    assert len(reference) == len(found) == 2
    for a, b in zip(reference, found):
        assert iou(as_tuple(a), as_tuple(b)) > 0.8


def test_faces_are_followed_between_detections(full_resolution_mtcnn):
    frames = moving_faces(12, faces=2, step_px=4.0)
    faces = tracked(detection_interval=6)
    results = [faces.process(frame, k / FPS) for k, frame in enumerate(frames)]
    assert [r.detected for r in results] == [True] + [False] * 5 + [True] + [False] * 5
    for k, (frame, result) in enumerate(zip(frames, results)):
        assert [f.track_id for f in result.faces] == [0, 1] and all(f.valid for f in result.faces), k
        truth = sorted(full_resolution_mtcnn.detect_all(frame), key=lambda b: b.x1)
        for face, box in zip(result.faces, truth):
            assert iou(as_tuple(face.box), as_tuple(box)) > 0.7, f'frame {k}, face {face.track_id}'


def test_a_vanished_face_triggers_detection_at_once_and_is_retired_after_the_timeout():
    both, left_only = face_canvas(heads=[(213, 240), (427, 240)]), face_canvas(heads=[(213, 240)])
    faces = tracked(detection_interval=100, track_timeout_s=0.2)
    results = [faces.process(frame, k / FPS) for k, frame in enumerate([both] * 2 + [left_only] * 10)]
    assert [r.detected for r in results] == [True, False, True] + [False] * 9
    lost = results[2].faces[1]
    assert lost.track_id == 1 and not lost.visible and not lost.valid and lost.embedding is None
    # Last seen at frame 1; frame 8 is the first more than 0.2 s later.
    assert [[f.track_id for f in r.faces] for r in results] == [[0, 1]] * 8 + [[0]] * 4
    assert [r.retired for r in results] == [[]] * 8 + [[1]] + [[]] * 3
    assert all(r.faces[0].valid for r in results)


def test_a_blank_frame_gives_no_faces_and_no_encoder_call():
    encoder = CropEncoder()
    result = tracked(encoder).process(np.full((240, 320, 3), 90, np.uint8), 0.0)
    assert result.faces == [] and result.detected and encoder.calls == []


def test_hsemotion_encode_faces_equals_encode_on_the_frame_whose_face_is_the_crop(tmp_path, monkeypatch):
    monkeypatch.setenv('AFFECTIVE_TRM_WEIGHTS', str(tmp_path))
    encoder = load_encoder('hsemotion_enet_b0', device='cpu', allow_untrained=True, detector='mtcnn')
    frame = face_canvas(heads=[(320, 240)])
    box = encoder.detector.detect(frame)
    whole, valid = encoder.encode(frame)
    from_crop = encoder.encode_faces([crop_face(frame, box)])
    assert valid and from_crop.valid.tolist() == [True]
    np.testing.assert_allclose(from_crop.embeddings[0], whole, rtol=1e-5, atol=1e-5)
    assert encoder.encode_faces([]).embeddings.shape == (0, encoder.dim)


def test_full_frame_path_reports_the_encoders_own_face_box():
    class WholeFrameEncoder:
        identity = 'whole@test'

        def encode_batch(self, frames):
            found = frames[0].max() > 0
            box = [[10, 20, 110, 140]] if found else [[np.nan] * 4]
            return EncodeResult(np.ones((1, 3), np.float32), np.array([found]),
                                {'face_box': np.array(box, np.float32)})

    path = FullFrameFaces(WholeFrameEncoder())
    face = path.process(np.full((200, 200, 3), 50, np.uint8), 0.0).faces[0]
    assert face.valid and face.box == FaceBox(10, 20, 110, 140)
    face = path.process(np.zeros((200, 200, 3), np.uint8), 0.0).faces[0]
    assert not face.valid and face.box is None and face.embedding is None


def test_tracked_path_needs_an_encoder_of_face_crops_and_sane_settings():
    class WholeFrameOnly:
        identity = 'whole@test'

    with pytest.raises(TypeError, match='full_frame'):
        TrackedFaces(WholeFrameOnly(), detector=None)
    for bad in ({'detection_interval': 0}, {'detection_scale': 0.0}, {'detection_scale': 1.5},
                {'face_margin': -0.1}):
        with pytest.raises(ValueError):
            TrackedFaces(CropEncoder(), detector=None, **bad)
