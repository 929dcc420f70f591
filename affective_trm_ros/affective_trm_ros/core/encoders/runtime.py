"""A faster CPU runtime for the face networks: the same network, run by ONNX Runtime.

A robot's CPU pays most of the video path in the face network (EfficientNet-B0 at 224x224). When
the encoder loads, the PyTorch module is exported to ONNX in memory (no file, a few seconds) and run
by ONNX Runtime's CPU provider with as many intra-op threads as torch uses (one in the nodes).
Measured on this project's shared 2-core machine, one thread: EfficientNet-B0 on one face took
21 ms CPU with ONNX Runtime against 62 ms in eager PyTorch. The outputs are the same network's:
they agree with PyTorch's within 1e-4 relative plus 1e-5 of the largest feature magnitude (float32
sums in another order; ``test_encoder_runtime.py`` checks it on real face crops with non-default
BatchNorm statistics).

``runtime`` option of the face encoders:

* ``auto`` (default): ONNX Runtime on CPU when ``onnxruntime`` and ``onnx`` are installed, else
  PyTorch; PyTorch on CUDA.
* ``torch``: always PyTorch (bit-for-bit what upstream's own code computes on the same device).
* ``onnxruntime``: ONNX Runtime, required (CPU only); a clear error when it is not installed.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import warnings
from typing import Optional

import numpy as np
import torch

RUNTIMES = ('auto', 'torch', 'onnxruntime')
ONNX_OPSET = 17                  # supported by every onnxruntime >= 1.14
LOGGER = logging.getLogger(__name__)


def missing_onnx_packages() -> list:
    """The packages ONNX Runtime inference needs that are not installed (export: onnx; run: onnxruntime)."""
    return [name for name in ('onnxruntime', 'onnx') if importlib.util.find_spec(name) is None]


class OnnxRuntimeModule:
    """``module(batch)`` exported to ONNX (dynamic batch size) and run by ONNX Runtime on the CPU.

    Calling it with a float32 NumPy batch returns the module's outputs as a list of NumPy arrays.
    """

    def __init__(self, module: torch.nn.Module, example: torch.Tensor, threads: int = 1) -> None:
        import onnxruntime

        buffer = io.BytesIO()
        module = module.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')   # the exporter's notes on tracing and its own deprecation
            torch.onnx.export(module, example.detach().cpu(), buffer, input_names=['input'],
                              dynamic_axes={'input': {0: 'batch'}}, opset_version=ONNX_OPSET, dynamo=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3    # errors only: the optimiser's notes are not the user's business
        self._session = onnxruntime.InferenceSession(buffer.getvalue(), options,
                                                     providers=['CPUExecutionProvider'])
        self._input = self._session.get_inputs()[0].name
        self.threads = options.intra_op_num_threads

    def __call__(self, batch: np.ndarray) -> list:
        return self._session.run(None, {self._input: np.ascontiguousarray(batch, dtype=np.float32)})


def accelerated(module: torch.nn.Module, example: torch.Tensor, device: torch.device,
                runtime: str) -> Optional[OnnxRuntimeModule]:
    """An ONNX Runtime copy of ``module`` when ``runtime`` asks for one and it applies, else None."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime '{runtime}'; expected one of {', '.join(RUNTIMES)}")
    if runtime == 'torch':
        return None
    if device.type != 'cpu':
        if runtime == 'onnxruntime':
            raise ValueError(f"runtime 'onnxruntime' runs on the CPU; the encoder is on {device} "
                             f"(use device 'cpu', or runtime 'torch' / 'auto')")
        return None
    missing = missing_onnx_packages()
    if missing:
        if runtime == 'onnxruntime':
            raise RuntimeError(f"runtime 'onnxruntime' needs the Python package(s) {', '.join(missing)} "
                               f"(pip install {' '.join(missing)}); or use runtime 'torch'")
        LOGGER.info('%s not installed: the face network runs in PyTorch (about 3x slower on a CPU)',
                    ', '.join(missing))
        return None
    return OnnxRuntimeModule(module, example, threads=torch.get_num_threads())
