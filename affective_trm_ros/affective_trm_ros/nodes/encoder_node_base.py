"""What the three encoder nodes share: common parameters, plugin loading, a bounded worker, publishing.

An encoder node subscribes to raw sensor data, hands each input to a :class:`BoundedWorker` (its
own thread, so ingest never waits for inference and queues never grow without bound), runs the
encoder plugin there and publishes one ``affective_msgs/ModalityEmbedding`` per processed input,
also when the input held nothing to encode (``valid=false``, empty ``data``).
"""

from __future__ import annotations

import array
import collections
import json
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus
from rclpy.node import Node

from affective_msgs.msg import ModalityEmbedding
from affective_trm_ros.core.encoders.loading import plugin_options as plugin_kwargs  # noqa: F401 (re-exported)
from affective_trm_ros.core.modalities import DEFAULT_ENCODERS
from affective_trm_ros.core.runtime_stats import BoundedWorker, LatencyWindow, RateMeter
from affective_trm_ros.nodes.common import RELIABLE_QOS, Diagnostics, ParameterView, ThrottledWarning, declare
from affective_trm_ros.topics import EMBEDDINGS


def validate_common(params: dict) -> Optional[str]:
    """Checks shared by all encoder nodes; returns an error message or None."""
    if not str(params.get('plugin', '')).strip():
        return 'plugin must name an encoder plugin'
    if not str(params.get('stream_id', '')).strip():
        return "stream_id must not be empty (use 'default' for a single person)"
    try:
        options = json.loads(params.get('encoder_options', '{}') or '{}')
    except json.JSONDecodeError as error:
        return f'encoder_options is not valid JSON: {error}'
    if not isinstance(options, dict):
        return 'encoder_options must be a JSON object, e.g. {"detector": "haar"}'
    return None


def to_float32_array(vector: np.ndarray) -> array.array:
    """A float32 vector as the array.array rclpy takes for a float32[] field without a per-element check."""
    return array.array('f', np.ascontiguousarray(vector, dtype=np.float32).tobytes())


class EncoderNode(Node):
    """Base class of the encoder nodes; subclasses add their inputs and call :meth:`start`."""

    def __init__(self, node_name: str, modality: str, **node_kwargs: Any) -> None:
        super().__init__(node_name, **node_kwargs)
        self.modality = modality
        # The declared ROS parameters, read through (they are the only copy of the values).
        self.params = ParameterView(self)
        declare(self, 'plugin', DEFAULT_ENCODERS[modality],
                f'Encoder plugin id (entry point in group affective_trm_ros.encoders) '
                f'for the {modality} modality.', read_only=True)
        declare(self, 'device', 'auto',
                "Inference device: 'auto' (CUDA when present, else CPU), 'cpu', 'cuda' "
                "or 'cuda:N'.", read_only=True)
        declare(self, 'weights', '',
                'Explicit weight file or directory; empty = the weights cache '
                '($AFFECTIVE_TRM_WEIGHTS or ~/.cache/affective_trm/weights).', read_only=True)
        declare(self, 'allow_untrained', False,
                'Run with random weights when none are found (smoke tests, demos); '
                "embeddings then carry '<plugin>@untrained'.", read_only=True)
        declare(self, 'encoder_options', '{}',
                'Extra plugin constructor options as a JSON object.', read_only=True)
        declare(self, 'stream_id', 'default',
                'Person/stream the embeddings describe (ModalityEmbedding.stream_id).')
        declare(self, 'frame_id', '',
                'header.frame_id of the embeddings; empty = copy it from the input '
                'message (inputs without a header then give an empty frame_id).')
        declare(self, 'diagnostics_period_s', 1.0,
                'Period of the /diagnostics status (s).',
                min_value=0.1, max_value=60.0, read_only=True)
        self.encoder = None
        self.worker: Optional[BoundedWorker] = None
        self.warn = ThrottledWarning(self)           # bad inputs, keyed by reason
        self._error_warn = ThrottledWarning(self)    # encoder failures (not the input's fault)
        self.input_rate = RateMeter()
        self.output_rate = RateMeter()
        self.processing_time = LatencyWindow()
        self.counts = collections.Counter()   # inputs, published, invalid_outputs, processing_errors
        self._counts_lock = threading.Lock()
        self._last_reported_bad = 0
        self._publisher = None

    # ------------------------------------------------------------ set-up

    def load_plugin(self, defaults: Optional[dict] = None) -> None:
        """Build the configured encoder from this node's parameters.

        One function (``core.encoders.loading.encoder_from_parameters``) builds encoders for the
        nodes, offline preparation and replay alike; the node-level settings it offers the plugin
        (detector, face margin, silence level) come from the parameters, so ``defaults`` is unused.
        """
        from affective_trm_ros.core.encoders.loading import encoder_from_parameters

        self.encoder = encoder_from_parameters(self.modality, self.params, log=self.get_logger().info)
        if self.encoder.untrained:
            self.get_logger().warning(
                f"encoder {self.encoder.identity} runs with UNTRAINED random weights (allow_untrained=true): "
                f'its embeddings carry no learned information; every message says '
                f"encoder='{self.encoder.identity}'")
        else:
            self.get_logger().info(f'encoder {self.encoder.identity} on {self.encoder.device}')

    def start(self, capacity: int, min_interval_s: Callable[[], float] = lambda: 0.0) -> None:
        """Create the output publisher, the worker and diagnostics (after load_plugin)."""
        self._publisher = self.create_publisher(ModalityEmbedding, EMBEDDINGS[self.modality],
                                                self.output_qos())
        self.worker = BoundedWorker(self._process_timed, capacity, f'{self.get_name()}_worker',
                                    self._on_worker_error, min_interval_s)
        self._diagnostics = Diagnostics(self, self._collect_diagnostics, self.params['diagnostics_period_s'],
                    hardware_id=str(self.encoder.device))

    def output_qos(self):
        """QoS of the embedding publisher (reliable by default)."""
        return RELIABLE_QOS

    def apply_common(self, changed: dict) -> None:
        """Runtime updates of the common mutable parameters (stream_id, frame_id): nothing to do,
        :meth:`publish_embedding` reads them from the parameters."""

    # ------------------------------------------------------------ work

    def process(self, item: Any) -> None:
        """Encode one queued input and publish (subclasses)."""
        raise NotImplementedError

    def _process_timed(self, item: Any) -> None:
        started = time.perf_counter()
        self.process(item)
        self.processing_time.add(time.perf_counter() - started)

    def _on_worker_error(self, error: Exception) -> None:
        if not self.context.ok():
            return
        self.count('processing_errors')
        self._error_warn('processing_error', f'{self.modality} encoder failed on an input: '
                                      f'{type(error).__name__}: {error}')

    def count(self, key: str, n: int = 1) -> None:
        with self._counts_lock:
            self.counts[key] += n

    def submit(self, item: Any) -> None:
        """Hand an input to the worker; a full queue drops (and counts) its oldest input."""
        self.count('inputs')
        self.input_rate.tick()
        self.worker.submit(item)

    def publish_embedding(self, stamp, frame_id: str, vector: Optional[np.ndarray],
                          stream_id: Optional[str] = None, **fields: Any) -> None:
        """Publish one embedding; ``vector=None`` publishes ``valid=false`` with empty data.

        ``stream_id`` overrides the parameter (one stream per tracked face); ``fields`` sets further
        message fields by name (``roi``, ``expression_classes``, ...).
        """
        msg = ModalityEmbedding()
        msg.header.stamp = stamp
        msg.header.frame_id = self.params['frame_id'] or frame_id or ''
        msg.stream_id = self.params['stream_id'] if stream_id is None else stream_id
        for name, value in fields.items():
            setattr(msg, name, value)
        msg.modality = self.modality
        msg.encoder = self.encoder.identity
        msg.valid = vector is not None
        if vector is not None:
            msg.data = to_float32_array(vector)
        else:
            self.count('invalid_outputs')
        if not self.context.ok():
            return
        self._publisher.publish(msg)
        self.count('published')
        self.output_rate.tick()

    # ------------------------------------------------------------ diagnostics

    def extra_diagnostics(self) -> dict:
        """Node-specific diagnostic values (subclasses)."""
        return {}

    def _collect_diagnostics(self) -> tuple:
        with self._counts_lock:
            counts = dict(self.counts)
        bad = dict(self.warn.counts)
        bad_total = sum(bad.values())
        values = {
            'encoder': self.encoder.identity,
            'device': str(self.encoder.device),
            'untrained': self.encoder.untrained,
            'input_rate_hz': self.input_rate.rate(),
            'output_rate_hz': self.output_rate.rate(),
            'processing_time_p50_ms': self.processing_time.percentile(50) * 1e3,
            'processing_time_p95_ms': self.processing_time.percentile(95) * 1e3,
            'inputs': counts.get('inputs', 0),
            'published': counts.get('published', 0),
            'invalid_outputs': counts.get('invalid_outputs', 0),
            'nonfinite_outputs': getattr(self.encoder, 'nonfinite_outputs', 0),
            'dropped': self.worker.dropped if self.worker else 0,
            'pending': self.worker.pending() if self.worker else 0,
            'bad_inputs': bad_total,
            'processing_errors': counts.get('processing_errors', 0),
        }
        values.update({f'bad_inputs.{key}': n for key, n in sorted(bad.items())})
        values.update(self.extra_diagnostics())
        new_bad = bad_total - self._last_reported_bad
        self._last_reported_bad = bad_total
        if new_bad:
            return DiagnosticStatus.WARN, f'{new_bad} bad input(s) since the last report', values
        if values['nonfinite_outputs']:
            return (DiagnosticStatus.WARN, f"{values['nonfinite_outputs']} encoder output(s) were not finite "
                    f'(published valid=false): check the weights', values)
        if self.encoder.untrained:
            return DiagnosticStatus.WARN, 'running with untrained encoder weights', values
        return DiagnosticStatus.OK, 'ok', values

    # ------------------------------------------------------------ shutdown

    def destroy_node(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        super().destroy_node()
