"""HSEmotion video encoders: loading the published pickle format, face detection, batching."""

import logging
import sys
import types

import numpy as np
import pytest
import skimage.data
import timm
import torch

from affective_trm_ros.core.encoders import weights as registry
from affective_trm_ros.core.encoders.base import WeightsFormatError, WeightsNotFoundError, load_encoder
from affective_trm_ros.core.encoders.face import FaceBox, HaarDetector, crop_face
from affective_trm_ros.core.encoders.video import FEATURE_DIM, load_hsemotion_state_dict

torch.set_num_threads(1)


def hsemotion_like_model(num_classes: int, sequential_head: bool = False, seed: int = 1):
    """A randomly initialised timm EfficientNet-B0 as HSEmotion trains it (optionally Sequential head)."""
    torch.manual_seed(seed)
    model = timm.create_model('efficientnet_b0', pretrained=False, num_classes=num_classes)
    if sequential_head:
        model.classifier = torch.nn.Sequential(torch.nn.Linear(1280, num_classes))
    # Non-trivial BatchNorm statistics, so a dropped buffer would change the outputs.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope='module')
def pickles(tmp_path_factory):
    """Whole pickled models, written with torch.save(model) like the published HSEmotion files."""
    root = tmp_path_factory.mktemp('hsemotion')
    models = {'afew': hsemotion_like_model(8, sequential_head=True), 'va': hsemotion_like_model(10, seed=2)}
    paths = {}
    for name, model in models.items():
        paths[name] = root / f'{name}.pt'
        torch.save(model, paths[name])
    return paths, models


@pytest.fixture(scope='module')
def astronaut():
    return skimage.data.astronaut()  # 512x512 RGB photograph with one clear frontal face


@pytest.fixture(scope='module')
def afew_encoder(pickles):
    return load_encoder('hsemotion_enet_b0', device='cpu', weights=str(pickles[0]['afew']))


def reference_features(model: torch.nn.Module, encoder, face: np.ndarray) -> np.ndarray:
    """What the original model computes for a crop (HSEmotion's recipe: the model with an Identity head)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (encoder.preprocess(face).unsqueeze(0) - mean) / std
    head = model.classifier
    model.classifier = torch.nn.Identity()
    try:
        with torch.no_grad():
            return model(x).numpy()[0]
    finally:
        model.classifier = head


def test_whole_pickled_model_loads_and_reproduces_its_features(pickles, afew_encoder, astronaut):
    _, models = pickles
    features, valid = afew_encoder.encode(astronaut)
    assert valid and features.shape == (FEATURE_DIM,) and features.dtype == np.float32
    box = afew_encoder.detector.detect(astronaut)
    expected = reference_features(models['afew'], afew_encoder, crop_face(astronaut, box))
    np.testing.assert_allclose(features, expected, atol=1e-5, rtol=1e-4)
    assert afew_encoder.identity == 'hsemotion_enet_b0@afew'


def test_emotion_logits_match_the_original_classifier(pickles, afew_encoder, astronaut):
    _, models = pickles
    result = afew_encoder.encode_batch([astronaut])
    with torch.no_grad():
        logits = models['afew'].classifier(torch.from_numpy(result.embeddings)).numpy()
    np.testing.assert_allclose(result.extras['emotion_logits'], logits, atol=1e-5)


def test_va_model_exposes_valence_arousal(pickles, astronaut):
    paths, models = pickles
    encoder = load_encoder('hsemotion_enet_b0_va', device='cpu', weights=str(paths['va']), detector='haar')
    result = encoder.encode_batch([astronaut, np.zeros((480, 640, 3), np.uint8)])
    with torch.no_grad():
        outputs = models['va'].classifier(torch.from_numpy(result.embeddings[:1])).numpy()
    np.testing.assert_allclose(result.extras['valence_arousal'][0], np.clip(outputs[0, 8:10], -1, 1),
                               atol=1e-5)
    np.testing.assert_allclose(result.extras['emotion_logits'][0], outputs[0, :8], atol=1e-5)
    assert result.valid.tolist() == [True, False]
    assert result.extras['valence_arousal'].shape == (2, 2)


@pytest.mark.parametrize('detector', ['mtcnn', 'haar'])
def test_detectors_find_the_astronaut_face_and_no_face_in_a_blank_frame(pickles, astronaut, detector):
    encoder = load_encoder('hsemotion_enet_b0', device='cpu', weights=str(pickles[0]['afew']),
                           detector=detector)
    result = encoder.encode_batch([astronaut, np.full((480, 640, 3), 127, np.uint8)])
    assert result.valid.tolist() == [True, False]
    assert not result.embeddings[1].any()
    x1, y1, x2, y2 = result.extras['face_box'][0]
    # The face is around x 180-270, y 60-170 in skimage's astronaut photograph.
    assert 150 < (x1 + x2) / 2 < 260 and 90 < (y1 + y2) / 2 < 150 and 60 < x2 - x1 < 140
    assert np.isnan(result.extras['face_box'][1]).all()


def test_batch_equals_single_calls(afew_encoder, astronaut):
    flipped = np.ascontiguousarray(astronaut[:, ::-1])
    frames = [astronaut, np.zeros((240, 320, 3), np.uint8), flipped]
    batch = afew_encoder.encode_batch(frames)
    for index, frame in enumerate(frames):
        single, valid = afew_encoder.encode(frame)
        assert valid == batch.valid[index]
        np.testing.assert_allclose(batch.embeddings[index], single, atol=1e-5, rtol=1e-4)


def test_face_margin_changes_the_crop(pickles, astronaut):
    tight = load_encoder('hsemotion_enet_b0', device='cpu', weights=str(pickles[0]['afew']), detector='haar')
    wide = load_encoder('hsemotion_enet_b0', device='cpu', weights=str(pickles[0]['afew']), detector='haar',
                        face_margin=0.3)
    assert not np.allclose(tight.encode(astronaut)[0], wide.encode(astronaut)[0])


def test_crop_face_margin_is_clipped_to_the_frame():
    frame = np.zeros((100, 200, 3), np.uint8)
    assert crop_face(frame, FaceBox(10, 20, 50, 60), margin=0.25).shape == (60, 60, 3)
    assert crop_face(frame, FaceBox(0, 0, 40, 40), margin=0.5).shape == (60, 60, 3)
    with pytest.raises(ValueError):
        crop_face(frame, FaceBox(0, 0, 40, 40), margin=-0.1)


def test_plain_state_dict_file_also_loads(tmp_path, pickles, astronaut, afew_encoder):
    _, models = pickles
    path = tmp_path / 'state.pt'
    torch.save(models['afew'].state_dict(), path)  # classifier.0.* keys, weights_only-loadable
    encoder = load_encoder('hsemotion_enet_b0', device='cpu', weights=str(path))
    np.testing.assert_allclose(encoder.encode(astronaut)[0], afew_encoder.encode(astronaut)[0], atol=1e-6)


def test_pickle_referencing_classes_that_no_longer_exist(tmp_path):
    """Old HSEmotion pickles name timm classes by module paths later timm versions removed
    (e.g. timm.models.efficientnet_blocks); every timm class here is saved under a vanished module."""
    legacy = types.ModuleType('timm_legacy_layout')
    sys.modules['timm_legacy_layout'] = legacy
    try:
        model = hsemotion_like_model(8, sequential_head=True, seed=3)
        for module in model.modules():
            cls = type(module)
            if cls.__module__.startswith('timm'):
                if not hasattr(legacy, cls.__name__):
                    setattr(legacy, cls.__name__, type(cls.__name__, (cls,), {'__module__': legacy.__name__}))
                module.__class__ = getattr(legacy, cls.__name__)
        path = tmp_path / 'legacy.pt'
        torch.save(model, path)
    finally:
        del sys.modules['timm_legacy_layout']
    assert b'timm_legacy_layout' in path.read_bytes()
    state = load_hsemotion_state_dict(path)
    assert set(state) == set(model.state_dict())
    for key, tensor in model.state_dict().items():
        assert torch.equal(state[key], tensor), key


@pytest.mark.parametrize('make', [
    lambda: timm.create_model('efficientnet_b0', num_classes=7),          # wrong head size
    lambda: timm.create_model('efficientnet_b2', num_classes=8),          # wrong backbone
    lambda: {'not': 'a model'},
])
def test_mismatching_files_are_refused_with_the_differences(tmp_path, make):
    path = tmp_path / 'bad.pt'
    torch.save(make(), path)
    with pytest.raises(WeightsFormatError, match='bad.pt'):
        load_encoder('hsemotion_enet_b0', device='cpu', weights=str(path), detector='haar')


@pytest.mark.parametrize('content', [b'', b'not a pickle at all', b'\x80\x04garbage'])
def test_unreadable_files_raise_weights_format_error(tmp_path, content):
    path = tmp_path / 'junk.pt'
    path.write_bytes(content)
    with pytest.raises(WeightsFormatError, match='junk.pt'):
        load_encoder('hsemotion_enet_b0', device='cpu', weights=str(path), detector='haar')


def test_mismatch_message_lists_what_differs(tmp_path):
    path = tmp_path / 'seven.pt'
    torch.save(timm.create_model('efficientnet_b0', num_classes=7), path)
    with pytest.raises(WeightsFormatError) as err:
        load_encoder('hsemotion_enet_b0', device='cpu', weights=str(path), detector='haar')
    assert 'shape mismatches 2 (classifier.weight (7, 1280) vs (8, 1280)' in str(err.value)


def test_missing_weights_error_names_file_location_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as err:
        load_encoder('hsemotion_enet_b0_va', device='cpu', detector='haar')
    message = str(err.value)
    assert str(tmp_path / 'hsemotion' / 'enet_b0_8_va_mtl.pt') in message
    assert 'affective-trm weights fetch enet_b0_8_va_mtl' in message


def test_untrained_is_explicit_labelled_and_reproducible(tmp_path, monkeypatch, caplog, astronaut):
    monkeypatch.setenv(registry.ENV_VAR, str(tmp_path))
    with caplog.at_level(logging.WARNING):
        first = load_encoder('hsemotion_enet_b0', device='cpu', allow_untrained=True, detector='haar')
    assert first.identity == 'hsemotion_enet_b0@untrained' and first.untrained
    assert 'UNTRAINED' in caplog.text
    second = load_encoder('hsemotion_enet_b0', device='cpu', allow_untrained=True, detector='haar')
    np.testing.assert_array_equal(first.encode(astronaut)[0], second.encode(astronaut)[0])


def test_untrained_does_not_hide_a_wrong_explicit_path(tmp_path):
    with pytest.raises(WeightsNotFoundError, match='does not exist'):
        load_encoder('hsemotion_enet_b0', device='cpu', allow_untrained=True, weights=str(tmp_path / 'x.pt'))


def test_corrupted_cache_file_is_refused_before_unpickling(tmp_path, monkeypatch, pickles):
    monkeypatch.setenv(registry.ENV_VAR, str(tmp_path))
    cached = tmp_path / 'hsemotion' / 'enet_b0_8_best_afew.pt'
    cached.parent.mkdir()
    cached.write_bytes(pickles[0]['afew'].read_bytes())
    registry.record_checksum('enet_b0_8_best_afew', '0' * 64)
    with pytest.raises(ValueError, match='corrupted or replaced'):
        load_encoder('hsemotion_enet_b0', device='cpu', detector='haar')
    registry.record_checksum('enet_b0_8_best_afew', registry.sha256_path(cached))
    encoder = load_encoder('hsemotion_enet_b0', device='cpu', detector='haar')
    assert encoder.identity == 'hsemotion_enet_b0@enet_b0_8_best_afew'


@pytest.mark.parametrize('bad', [
    np.zeros((480, 640), np.uint8), np.zeros((480, 640, 3), np.float32), np.zeros((0, 640, 3), np.uint8),
    'frame',
])
def test_bad_frames_raise_value_error(afew_encoder, bad):
    with pytest.raises(ValueError):
        afew_encoder.encode(bad)


def test_unknown_detector_and_negative_margin_are_refused(pickles):
    with pytest.raises(ValueError, match='unknown face detector'):
        load_encoder('hsemotion_enet_b0', device='cpu', weights=str(pickles[0]['afew']), detector='yolo')
    with pytest.raises(ValueError, match='face_margin'):
        load_encoder('hsemotion_enet_b0', device='cpu', weights=str(pickles[0]['afew']), face_margin=-1)


def test_haar_cascade_ships_with_the_installed_opencv():
    assert HaarDetector().detect(np.zeros((100, 100, 3), np.uint8)) is None


def test_frames_smaller_than_a_face_mean_no_face():
    import torch

    from affective_trm_ros.core.encoders.face import make_detector
    for name in ('mtcnn', 'haar'):
        detector = make_detector(name, torch.device('cpu'), min_face_size=40)
        assert detector.detect(np.zeros((24, 32, 3), np.uint8)) is None, name
