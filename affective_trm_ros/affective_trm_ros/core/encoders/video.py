"""Video encoders: HSEmotion EfficientNet-B0 face features behind a face detector.

``hsemotion_enet_b0`` (``enet_b0_8_best_afew``) and ``hsemotion_enet_b0_va`` (``enet_b0_8_va_mtl``)
take a full RGB frame, find the largest face, crop it (optional margin), resize it to 224x224
(bilinear, as HSEmotion's own preprocessing), normalise with ImageNet statistics and return the
1280-d pooled features before the classifier. No face -> ``valid=False`` and a zero row.

HSEmotion publishes whole pickled timm models (``torch.save(model)``) saved with old timm versions.
:func:`load_hsemotion_state_dict` reads them without needing those versions (classes that no longer
exist are replaced by placeholders, since only the tensors are kept); the tensors are then mapped onto
the current ``timm.create_model('efficientnet_b0')`` and every one of them must match by name and
shape, otherwise loading fails with a list of what differs. Unpickling executes code from the file,
so it is only done for a file the user pointed at or the registry file in the weights cache (whose
SHA-256 is checked when one is known).
"""

from __future__ import annotations

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
    check_frame,
    crop_face,
    make_detector,
)

LOGGER = logging.getLogger(__name__)

IMAGE_SIZE = 224                     # HSEmotion's B0 models were trained on 224x224 crops
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_DIM = 1280                   # EfficientNet-B0 pooled features (input of the classifier)
EMOTIONS = ('anger', 'contempt', 'disgust', 'fear', 'happiness', 'neutral', 'sadness', 'surprise')
UNTRAINED_SEED = 0                   # random init is seeded so untrained features are reproducible
# Keys under which checkpoints commonly wrap their state dict.
_STATE_DICT_KEYS = ('state_dict', 'model_state_dict', 'model')


# --- robust loading of the published pickles ----------------------------------------------------

class _MissingClass(torch.nn.Module):
    """Stands in for a class an old pickle references that no longer exists.

    As an ``nn.Module`` it keeps the unpickled ``_parameters``/``_buffers``/``_modules``, so
    ``state_dict()`` of the whole tree still works; any other use only stores it as an attribute.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            super().__setstate__(state)


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            LOGGER.debug('pickle references %s.%s, which no longer exists; using a placeholder', module, name)
            return type(name, (_MissingClass,), {'__module__': f'missing.{module}'})


_LENIENT_PICKLE = types.ModuleType('affective_trm_lenient_pickle')
_LENIENT_PICKLE.Unpickler = _LenientUnpickler
_LENIENT_PICKLE.load = pickle.load
_LENIENT_PICKLE.loads = pickle.loads


def _tensors_of(obj: Any, path: Path) -> dict:
    """The state dict inside an unpickled object: a module, a state dict or a dict wrapping one."""
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], (dict, torch.nn.Module)):
                return _tensors_of(obj[key], path)
        if obj and all(isinstance(value, torch.Tensor) for value in obj.values()):
            return obj
    raise WeightsFormatError(f'{path} holds a {type(obj).__name__}, not a model or a state dict')


def load_hsemotion_state_dict(path: Path) -> dict:
    """Read an HSEmotion file (whole pickled model, or a plain state dict) into a state dict.

    A plain state dict loads with ``weights_only=True``. A whole pickled model needs full unpickling
    (``weights_only=False``), which runs code from the file: callers pass only a file the user chose
    or the checksum-checked cache file.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        try:
            obj = torch.load(path, map_location='cpu', weights_only=False, pickle_module=_LENIENT_PICKLE)
        except Exception as err:  # noqa: BLE001 - whatever unpickling raises, the file is unusable
            raise WeightsFormatError(f'cannot unpickle {path}: {err}') from err
    except (OSError, RuntimeError, EOFError) as err:
        raise WeightsFormatError(f'cannot read {path} as a PyTorch file: {err}') from err
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
    """The current timm ``efficientnet_b0`` with ``num_outputs`` classes, loaded from ``state``.

    Every tensor must match by name and shape (``num_batches_tracked`` counters, unused in eval,
    may be absent). ``state=None`` gives a seeded random initialisation.
    """
    import timm

    if state is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(UNTRAINED_SEED)
            return timm.create_model('efficientnet_b0', pretrained=False, num_classes=num_outputs).eval()
    model = timm.create_model('efficientnet_b0', pretrained=False, num_classes=num_outputs)
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
            f'{source} does not match timm efficientnet_b0 with {num_outputs} outputs: '
            f'missing {show(missing)}, unexpected {show(unexpected)}, shape mismatches {show(mismatched)}')
    for key in target:
        state.setdefault(key, target[key])
    model.load_state_dict(state, strict=True)
    return model.eval()


# --- encoders -----------------------------------------------------------------------------------

class HSEmotionEncoder(Encoder):
    """HSEmotion ``enet_b0_8_best_afew``: 1280-d face features (video, full RGB frame in).

    Options: ``detector`` ('mtcnn' | 'haar'), ``face_margin`` (fraction of the face box added on
    each side before cropping; 0 = the detector's box, as HSEmotion's demos), ``min_face_size`` (px),
    ``min_face_confidence`` (MTCNN only).

    ``extras``: ``face_box`` (N, 4) x1, y1, x2, y2 in pixels (NaN without a face) and
    ``emotion_logits`` (N, 8) in :data:`EMOTIONS` order (zeros without a face).
    """

    modality = 'video'
    input_kind = 'rgb_image'
    dim = FEATURE_DIM
    weights_name = 'enet_b0_8_best_afew'
    num_outputs = 8

    def __init__(self, device: str = 'auto', weights: Optional[str] = None, allow_untrained: bool = False,
                 detector: str = 'mtcnn', face_margin: float = 0.0,
                 min_face_size: int = DEFAULT_MIN_FACE_SIZE,
                 min_face_confidence: float = DEFAULT_MIN_CONFIDENCE) -> None:
        super().__init__(device=device, weights=weights, allow_untrained=allow_untrained, detector=detector,
                         face_margin=face_margin, min_face_size=min_face_size,
                         min_face_confidence=min_face_confidence)
        if detector not in DETECTORS:
            raise ValueError(f"unknown face detector '{detector}'; expected one of {DETECTORS}")
        if face_margin < 0:
            raise ValueError(f'face_margin must be >= 0, got {face_margin}')
        self.face_margin = float(face_margin)
        self.detector = make_detector(detector, self.device, min_face_size=min_face_size,
                                      min_confidence=min_face_confidence)
        self.model = self._load_model().to(self.device)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def _load_model(self) -> torch.nn.Module:
        path = self._weights_or_untrained(self.weights_name)
        if path is None:
            return build_efficientnet_b0(None, self.num_outputs, 'random init')
        weight_registry.check_integrity(self.weights_name, path)
        model = build_efficientnet_b0(load_hsemotion_state_dict(path), self.num_outputs, str(path))
        self.weights_identity = Path(path).stem
        return model

    def preprocess(self, face: np.ndarray) -> torch.Tensor:
        """A face crop -> (3, 224, 224) float tensor, resized and normalised as HSEmotion does."""
        resized = Image.fromarray(face).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)

    def _encode_batch(self, inputs: list) -> EncodeResult:
        boxes = [self.detector.detect(check_frame(frame)) for frame in inputs]
        valid = np.array([box is not None for box in boxes], dtype=bool)
        embeddings = np.zeros((len(inputs), self.dim), np.float32)
        logits = np.zeros((len(inputs), self.num_outputs), np.float32)
        face_box = np.full((len(inputs), 4), np.nan, np.float32)
        if valid.any():
            crops = [self.preprocess(crop_face(frame, box, self.face_margin))
                     for frame, box in zip(inputs, boxes) if box is not None]
            with torch.inference_mode():
                batch = (torch.stack(crops).to(self.device) - self._mean) / self._std
                features = self.model.forward_head(self.model.forward_features(batch), pre_logits=True)
                outputs = self.model.get_classifier()(features)
            embeddings[valid] = features.float().cpu().numpy()
            logits[valid] = outputs.float().cpu().numpy()
            face_box[valid] = [[box.x1, box.y1, box.x2, box.y2] for box in boxes if box is not None]
        return EncodeResult(embeddings, valid, self._extras(logits, face_box))

    def _extras(self, logits: np.ndarray, face_box: np.ndarray) -> dict:
        return {'face_box': face_box, 'emotion_logits': logits[:, :len(EMOTIONS)]}


class HSEmotionVAEncoder(HSEmotionEncoder):
    """HSEmotion ``enet_b0_8_va_mtl``: 1280-d face features plus its own valence/arousal estimate.

    The model's last two outputs are valence and arousal (AffectNet scale); they are exposed, clipped
    to [-1, 1], as ``extras['valence_arousal']`` (N, 2) (zeros without a face), so this encoder can
    serve as a face-only baseline next to the fusion model.
    """

    weights_name = 'enet_b0_8_va_mtl'
    num_outputs = 10

    def _extras(self, logits: np.ndarray, face_box: np.ndarray) -> dict:
        extras = super()._extras(logits, face_box)
        extras['valence_arousal'] = np.clip(logits[:, -2:], -1.0, 1.0)
        return extras
