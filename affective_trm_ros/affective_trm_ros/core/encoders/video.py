"""Video encoders: HSEmotion EfficientNet-B0 face features behind a face detector.

``hsemotion_enet_b0`` (``enet_b0_8_best_afew``) and ``hsemotion_enet_b0_va`` (``enet_b0_8_va_mtl``)
take a full RGB frame, find the largest face, crop it (optional margin), resize it to 224x224
(bilinear, as HSEmotion's own preprocessing), normalise with ImageNet statistics and return the
1280-d pooled features before the classifier. No face -> ``valid=False`` and a zero row.

The network is upstream's: HSEmotion's files are whole pickled timm ``tf_efficientnet_b0_ns``
models, i.e. ``tf_efficientnet_b0`` (TensorFlow "same" padding through ``Conv2dSame``, BatchNorm
eps 1e-3). Its state dict has the same keys and shapes as timm's ``efficientnet_b0``, so only the
architecture name tells them apart, and the features differ when it is wrong.

The ``hsemotion`` package's own loader, ``torch.load(path)`` of the whole pickled model, no longer
works: current PyTorch loads weights only by default (since 2.6) and refuses the pickled classes,
and current timm moved the modules the pickles name. :func:`load_hsemotion_state_dict` therefore
reads the files itself without running code from them: a restricted unpickler rebuilds tensors
(what ``weights_only`` loading allows) and turns every other class or function the file names into
an inert placeholder, whatever timm version wrote it; only the tensors are kept. They are then
mapped onto ``timm.create_model('tf_efficientnet_b0')`` and every one must match by name and shape,
otherwise loading fails with a list of what differs.
"""

from __future__ import annotations

import collections
import logging
import pickle
import types
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from affective_trm_ros.core.encoders import weights as weight_registry
from affective_trm_ros.core.encoders.base import Encoder, EncodeResult, WeightsFormatError
from affective_trm_ros.core.encoders.face import (
    DEFAULT_MIN_CONFIDENCE,
    DEFAULT_MIN_FACE_SIZE,
    DETECTORS,
    FaceBox,
    check_frame,
    check_rgb,
    crop_face,
    make_detector,
)
from affective_trm_ros.core.encoders.runtime import accelerated

LOGGER = logging.getLogger(__name__)

BACKBONE = 'tf_efficientnet_b0'      # timm name of HSEmotion's network (tf_efficientnet_b0_ns weights)
IMAGE_SIZE = 224                     # HSEmotion's B0 models were trained on 224x224 crops
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_DIM = 1280                   # EfficientNet-B0 pooled features (input of the classifier)
# HSEmotion's 8 AffectNet classes in its output order (hsemotion's idx_to_class, lower case).
EMOTIONS = ('anger', 'contempt', 'disgust', 'fear', 'happiness', 'neutral', 'sadness', 'surprise')
UNTRAINED_SEED = 0                   # random init is seeded so untrained features are reproducible
# Keys under which checkpoints commonly wrap their state dict.
_STATE_DICT_KEYS = ('state_dict', 'model_state_dict', 'model')


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)


# --- reading the published pickles without running them -----------------------------------------

class _Inert:
    """Stands in for every class or function a pickle names outside the tensor-rebuilding allowlist.

    Constructing or calling it does nothing; unpickled state is only stored, so a module tree keeps
    its ``_parameters``/``_buffers``/``_modules`` dictionaries for :func:`_module_tensors` to read.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:   # (dict state, slot state)
            state = state[0]
        if isinstance(state, dict):
            self.__dict__.update(state)


def _safe_globals() -> dict:
    """What a weights-only load may construct: tensors, parameters, storages, ordered dicts, sets."""
    allowed = {
        ('collections', 'OrderedDict'): collections.OrderedDict,
        ('builtins', 'set'): set,
        ('builtins', 'frozenset'): frozenset,
        ('torch', 'Size'): torch.Size,
        ('torch', 'device'): torch.device,
    }
    for name in ('_rebuild_tensor_v2', '_rebuild_parameter', '_rebuild_parameter_with_state'):
        if hasattr(torch._utils, name):
            allowed[('torch._utils', name)] = getattr(torch._utils, name)
    for name in dir(torch):
        if name.endswith('Storage'):
            allowed[('torch', name)] = getattr(torch, name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    _allowed = None

    def find_class(self, module: str, name: str) -> Any:
        module = {'__builtin__': 'builtins'}.get(module, module)   # protocol-2 pickles use Python 2 names
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _safe_globals()
        found = self._allowed.get((module, name))
        if found is not None:
            return found
        LOGGER.debug('pickle names %s.%s; read as an inert placeholder', module, name)
        return type(name, (_Inert,), {'__module__': f'inert.{module}'})


_RESTRICTED_PICKLE = types.ModuleType('affective_trm_restricted_pickle')
_RESTRICTED_PICKLE.Unpickler = _RestrictedUnpickler
_RESTRICTED_PICKLE.load = pickle.load
_RESTRICTED_PICKLE.loads = pickle.loads


def _module_tensors(module: Any, prefix: str = '') -> dict:
    """The state dict of an unpickled module tree: parameters and persistent buffers, recursively."""
    state = getattr(module, '__dict__', {})
    out = {}
    non_persistent = state.get('_non_persistent_buffers_set')
    if not isinstance(non_persistent, (set, frozenset)):
        non_persistent = set()
    for kind in ('_parameters', '_buffers'):
        tensors = state.get(kind)
        if not isinstance(tensors, dict):
            continue
        for name, tensor in tensors.items():
            if isinstance(tensor, torch.Tensor) and not (kind == '_buffers' and name in non_persistent):
                out[prefix + name] = tensor.detach()
    children = state.get('_modules')
    if isinstance(children, dict):
        for name, child in children.items():
            if child is not None:
                out.update(_module_tensors(child, f'{prefix}{name}.'))
    return out


def _tensors_of(obj: Any, path: Path) -> dict:
    """The state dict inside an unpickled object: a module, a state dict or a dict wrapping one."""
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, _Inert):
        tensors = _module_tensors(obj)
        if tensors:
            return tensors
        raise WeightsFormatError(f'{path} holds a pickled {type(obj).__name__} with no tensors, not a model')
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], (dict, torch.nn.Module, _Inert)):
                return _tensors_of(obj[key], path)
        if obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
            return obj
    raise WeightsFormatError(f'{path} holds a {type(obj).__name__}, not a model or a state dict')


def load_hsemotion_state_dict(path: Path) -> dict:
    """Read an HSEmotion file (whole pickled model, or a plain state dict) into a state dict.

    A plain state dict loads with ``weights_only=True``. A whole pickled model is read with the
    restricted unpickler: tensors are rebuilt, every class the file names becomes an inert
    placeholder, and no code from the file runs (whatever timm version wrote it).
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        try:
            obj = torch.load(path, map_location='cpu', weights_only=False, pickle_module=_RESTRICTED_PICKLE)
        except Exception as err:  # noqa: BLE001 - whatever unpickling raises, the file is unusable
            raise WeightsFormatError(f'cannot unpickle {path}: '
                                     f'{weight_registry.describe_unreadable(path, err)}') from err
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise WeightsFormatError(f'cannot read {path} as a PyTorch file: '
                                 f'{weight_registry.describe_unreadable(path, err)}') from err
    return _tensors_of(obj, path)


def _normalise_keys(state: dict) -> dict:
    """Undo wrappers: DataParallel's 'module.' prefix and HSEmotion's Sequential(Linear) classifier."""
    out = {}
    for key, value in state.items():
        if key.startswith('module.'):
            key = key[len('module.'):]
        if key.startswith('classifier.0.'):
            key = 'classifier.' + key[len('classifier.0.'):]
        out[key] = value
    return out


def build_efficientnet_b0(state: Optional[dict], num_outputs: int, source: str) -> torch.nn.Module:
    """timm's :data:`BACKBONE` (``tf_efficientnet_b0``) with ``num_outputs`` classes, loaded from ``state``.

    Every tensor must match by name and shape (``num_batches_tracked`` counters, unused in eval,
    may be absent). ``state=None`` gives a seeded random initialisation.
    """
    import timm

    if state is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(UNTRAINED_SEED)
            return timm.create_model(BACKBONE, pretrained=False, num_classes=num_outputs).eval()
    model = timm.create_model(BACKBONE, pretrained=False, num_classes=num_outputs)
    target = model.state_dict()
    state = _normalise_keys(state)
    missing = [k for k in target if k not in state and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state if k not in target]
    mismatched = [f'{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}'
                  for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or mismatched:
        def show(items: list) -> str:
            return f"{len(items)} ({', '.join(items[:4])}{', ...' if len(items) > 4 else ''})"
        raise WeightsFormatError(
            f'{source} does not match timm {BACKBONE} with {num_outputs} outputs: '
            f'missing {show(missing)}, unexpected {show(unexpected)}, shape mismatches {show(mismatched)}')
    for key in target:
        state.setdefault(key, target[key])
    model.load_state_dict(state, strict=True)
    return model.eval()


# --- face encoders: detection in encode_batch, crops in encode_faces ------------------------------

def check_crop(crop: Any) -> np.ndarray:
    """Validate a face crop: an (h, w, 3) uint8 RGB array with at least one pixel."""
    return check_rgb(crop, 'face crop', '(h, w, 3)')


class FaceEncoder(Encoder):
    """Shared part of the face encoders: the face detector, frames -> crops, crops -> embeddings.

    ``encode_batch(frames)`` detects the largest face of each frame, cuts it with :meth:`crop` and
    encodes the crops; ``encode_faces(crops)`` encodes crops cut by the caller (the tracked video
    pipeline, ROS4HRI's aligned faces). Subclasses implement :meth:`_encode_crops`.
    """

    modality = 'video'
    input_kind = 'rgb_image'

    def _init_detector(self, detector: str, min_face_size: int, min_face_confidence: float) -> None:
        if detector not in DETECTORS:
            raise ValueError(f"unknown face detector '{detector}'; expected one of {DETECTORS}")
        self.detector = make_detector(detector, self.device, min_face_size=min_face_size,
                                      min_confidence=min_face_confidence)

    def crop(self, frame: np.ndarray, box: FaceBox) -> np.ndarray:
        """The crop this encoder takes of a detected face."""
        return crop_face(frame, box, getattr(self, 'face_margin', 0.0))

    def _encode_crops(self, crops: list) -> tuple:
        """(features (n, dim) float32, per-row extras dict) for n >= 1 valid crops."""
        raise NotImplementedError

    def encode_faces(self, crops: list) -> EncodeResult:
        """One row per face crop ((h, w, 3) uint8 RGB); rows are valid unless the numbers are not."""
        crops = [check_crop(crop) for crop in crops]
        if not crops:
            return self.encode_batch([])
        features, extras = self._encode_crops(crops)
        return self._checked(EncodeResult(features, np.ones(len(crops), bool), extras), len(crops))

    def _checked(self, result: EncodeResult, n: int) -> EncodeResult:
        if result.embeddings.shape != (n, self.dim):
            raise RuntimeError(f'{self.identity} returned shape {result.embeddings.shape}, '
                               f'expected {(n, self.dim)}')
        return self._invalidate_nonfinite(result)

    def _encode_batch(self, inputs: list) -> EncodeResult:
        boxes = [self.detector.detect(check_frame(frame)) for frame in inputs]
        valid = np.array([box is not None for box in boxes], dtype=bool)
        embeddings = np.zeros((len(inputs), self.dim), np.float32)
        face_box = np.full((len(inputs), 4), np.nan, np.float32)
        extras: dict = {}
        if valid.any():
            crops = [self.crop(frame, box) for frame, box in zip(inputs, boxes) if box is not None]
            features, face_extras = self._encode_crops(crops)
            embeddings[valid] = features
            face_box[valid] = [[box.x1, box.y1, box.x2, box.y2] for box in boxes if box is not None]
            extras = self._spread(face_extras, valid)
        else:
            extras = self._spread(self._empty_extras(), valid)
        extras['face_box'] = face_box
        return EncodeResult(embeddings, valid, extras)

    def _empty_extras(self) -> dict:
        """The extras of zero faces (arrays with 0 rows), so every frame's extras have the same keys."""
        return {}

    @staticmethod
    def _spread(face_extras: dict, valid: np.ndarray) -> dict:
        """Per-face extras -> per-frame rows (zeros where no face); lists (class names) are kept."""
        out = {}
        for key, value in face_extras.items():
            if isinstance(value, np.ndarray) and value.ndim >= 1:
                rows = np.zeros((valid.size, *value.shape[1:]), value.dtype)
                rows[valid] = value
                out[key] = rows
            else:
                out[key] = value
        return out


# --- encoders -----------------------------------------------------------------------------------

class _FeaturesAndOutputs(torch.nn.Module):
    """A timm classifier's pooled features and its classifier outputs, from a normalised batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor) -> tuple:
        features = self.model.forward_head(self.model.forward_features(batch), pre_logits=True)
        return features, self.model.get_classifier()(features)


class HSEmotionEncoder(FaceEncoder):
    """HSEmotion ``enet_b0_8_best_afew``: 1280-d face features (video, full RGB frame in).

    Options: ``detector`` ('mtcnn' | 'haar'), ``face_margin`` (fraction of the face box added on
    each side before cropping; 0 = the detector's box, as HSEmotion's demos), ``min_face_size`` (px),
    ``min_face_confidence`` (MTCNN only), ``runtime`` ('auto' | 'torch' | 'onnxruntime': who runs
    the network on a CPU, see :mod:`affective_trm_ros.core.encoders.runtime`).

    ``extras``: ``face_box`` (N, 4) x1, y1, x2, y2 in pixels (NaN without a face; ``encode_batch``
    only), ``emotion_logits`` (N, 8) in :data:`EMOTIONS` order, ``expression_classes``
    (:data:`EMOTIONS`) and ``expression_probabilities`` (N, 8), the softmax of the logits as
    hsemotion's ``predict_emotions(logits=False)`` (zeros without a face).
    """

    dim = FEATURE_DIM
    weights_name = 'enet_b0_8_best_afew'
    num_outputs = 8

    def __init__(self, device: str = 'auto', weights: Optional[str] = None, allow_untrained: bool = False,
                 detector: str = 'mtcnn', face_margin: float = 0.0,
                 min_face_size: int = DEFAULT_MIN_FACE_SIZE,
                 min_face_confidence: float = DEFAULT_MIN_CONFIDENCE, runtime: str = 'auto') -> None:
        super().__init__(device=device, weights=weights, allow_untrained=allow_untrained, detector=detector,
                         face_margin=face_margin, min_face_size=min_face_size,
                         min_face_confidence=min_face_confidence, runtime=runtime)
        if face_margin < 0:
            raise ValueError(f'face_margin must be >= 0, got {face_margin}')
        self.face_margin = float(face_margin)
        self._init_detector(detector, min_face_size, min_face_confidence)
        self.model = self._load_model().to(self.device)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        # The network on a normalised batch; on a CPU run by ONNX Runtime where installed (runtime.py).
        self._network = _FeaturesAndOutputs(self.model)
        example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
        self._onnx = accelerated(self._network, example, self.device, runtime)
        self.runtime = 'torch' if self._onnx is None else 'onnxruntime'

    def _load_model(self) -> torch.nn.Module:
        path = self._weights_or_untrained(self.weights_name)   # a cached file's SHA-256 is checked there
        if path is None:
            return build_efficientnet_b0(None, self.num_outputs, 'random init')
        model = build_efficientnet_b0(load_hsemotion_state_dict(path), self.num_outputs, str(path))
        self.weights_identity = Path(path).stem
        return model

    def preprocess(self, face: np.ndarray) -> torch.Tensor:
        """A face crop -> (3, 224, 224) float tensor in [0, 1], resized as HSEmotion does (PIL bilinear)."""
        resized = Image.fromarray(face).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)

    def _encode_crops(self, crops: list) -> tuple:
        with torch.inference_mode():
            batch = torch.stack([self.preprocess(c) for c in crops]).to(self.device)
            batch = (batch - self._mean) / self._std
            if self._onnx is not None:
                features, outputs = self._onnx(batch.numpy())
            else:
                features, outputs = (t.float().cpu().numpy() for t in self._network(batch))
        return features, self._head_extras(outputs)

    def _head_extras(self, outputs: np.ndarray) -> dict:
        logits = outputs[:, :len(EMOTIONS)]
        return {'emotion_logits': logits, 'expression_classes': list(EMOTIONS),
                'expression_probabilities': softmax(logits)}

    def _empty_extras(self) -> dict:
        return self._head_extras(np.zeros((0, self.num_outputs), np.float32))


class HSEmotionVAEncoder(HSEmotionEncoder):
    """HSEmotion ``enet_b0_8_va_mtl``: 1280-d face features plus its own valence/arousal estimate.

    The model's last two outputs are valence and arousal (AffectNet scale); they are exposed, clipped
    to [-1, 1], as ``extras['valence_arousal']`` (N, 2) (zeros without a face), so this encoder can
    serve as a face-only baseline next to the fusion model.
    """

    weights_name = 'enet_b0_8_va_mtl'
    num_outputs = 10

    def _head_extras(self, outputs: np.ndarray) -> dict:
        extras = super()._head_extras(outputs)
        extras['valence_arousal'] = np.clip(outputs[:, -2:], -1.0, 1.0)
        return extras
