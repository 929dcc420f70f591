"""Audio encoder node: microphone audio -> one embedding per hop (``affect/embedding/audio``).

Subscribes to ``audio_common_msgs/AudioDataStamped`` on ``audio`` (``input_type: stamped``; the
header stamp is the capture time of the message's first sample) or ``AudioData``
(``input_type: unstamped``; the clock starts at the first arrival and advances by sample count),
plus ``AudioInfo`` on ``audio_info`` (transient local; until one arrives the ``sample_rate``,
``channels`` and ``sample_format`` parameters describe the stream). ``core.audio`` decodes,
resamples to the encoder rate and cuts windows; the worker encodes each window and publishes it
stamped at the window's END. Silent windows are published ``valid=false``.
"""

from __future__ import annotations

import threading
from typing import Optional

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.qos_overriding_options import QoSOverridingOptions
from rclpy.time import Time

from affective_trm_ros.core import audio as audio_core
from affective_trm_ros.core.modalities import AUDIO
from affective_trm_ros.core.stamps import stamp_to_seconds
from affective_trm_ros.nodes.common import LATCHED_QOS, SENSOR_QOS, add_validator, declare, run_node
from affective_trm_ros.nodes.encoder_node_base import EncoderNode, validate_common
from affective_trm_ros.topics import AUDIO_INFO, AUDIO_STREAM

INPUT_TYPES = ('stamped', 'unstamped')
# Windows waiting for the encoder before the oldest is dropped: 10 s of audio at the default hop.
DEFAULT_MAX_PENDING_WINDOWS = 20


def audio_messages():
    """(AudioData, AudioDataStamped, AudioInfo), or a clear error when audio_common_msgs is missing."""
    try:
        from audio_common_msgs.msg import AudioData, AudioDataStamped, AudioInfo
    except ImportError as error:
        raise RuntimeError(
            'the audio encoder needs the audio_common_msgs interfaces, which are not installed: on a '
            'ROS 2 distro run `rosdep install --from-paths src -y` (or apt install '
            'ros-$ROS_DISTRO-audio-common-msgs); without a distro, run tools/bootstrap.sh') from error
    return AudioData, AudioDataStamped, AudioInfo


def validate_parameters(params: dict) -> Optional[str]:
    """Pure check of the audio encoder parameters; an error message or None."""
    error = validate_common(params)
    if error:
        return error
    if params.get('input_type') not in INPUT_TYPES:
        return f"input_type must be one of {', '.join(INPUT_TYPES)}, got '{params.get('input_type')}'"
    error = audio_core.AudioFormat(params.get('sample_rate', 0), params.get('channels', 0),
                                   params.get('sample_format', '')).validate()
    if error:
        return error
    error = audio_core.validate_window_config(audio_core.DEFAULT_SAMPLE_RATE_OUT, params.get('window_s', 0.0),
                                              params.get('hop_s', 0.0), params.get('stamp_tolerance_s', 0.0))
    if error:
        return error
    if not params.get('max_lag_s', 0.0) > 0:
        return f"max_lag_s must be > 0, got {params.get('max_lag_s')}"
    return None


def seconds_to_stamp(seconds: float):
    return Time(nanoseconds=int(round(seconds * 1e9))).to_msg()


class AudioEncoderNode(EncoderNode):
    """Windowed audio encoder; see the module docstring."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__('audio_encoder', AUDIO, **node_kwargs)
        p = self.params
        p['input_type'] = declare(self, 'input_type', 'stamped',
                                  "'stamped': AudioDataStamped (header stamp = capture time of the first "
                                  "sample); 'unstamped': AudioData (stamps from first arrival + sample "
                                  "count).",
                                  choices=INPUT_TYPES, read_only=True)
        p['sample_rate'] = declare(self, 'sample_rate', 16000,
                                   'Capture rate (Hz) used until an AudioInfo arrives.',
                                   min_value=1, max_value=audio_core.MAX_SAMPLE_RATE, read_only=True)
        p['channels'] = declare(self, 'channels', 1, 'Interleaved channels used until an AudioInfo arrives '
                                '(averaged to mono).', min_value=1, max_value=audio_core.MAX_CHANNELS,
                                read_only=True)
        p['sample_format'] = declare(self, 'sample_format', 'S16LE',
                                     'Sample format used until an AudioInfo arrives.',
                                     choices=audio_core.SUPPORTED_SAMPLE_FORMATS, read_only=True)
        p['window_s'] = declare(self, 'window_s', audio_core.DEFAULT_WINDOW_S,
                                'Length of the audio window each embedding describes (s).',
                                min_value=0.04, max_value=60.0, read_only=True)
        p['hop_s'] = declare(self, 'hop_s', audio_core.DEFAULT_HOP_S,
                             'One embedding every hop_s seconds of audio.',
                             min_value=0.01, max_value=60.0, read_only=True)
        p['stamp_tolerance_s'] = declare(self, 'stamp_tolerance_s', audio_core.DEFAULT_STAMP_TOLERANCE_S,
                                         'Stamp jitter accepted between consecutive messages; a larger gap '
                                         'or jump discards the buffered audio (counted).',
                                         min_value=0.001, max_value=10.0, read_only=True)
        p['max_lag_s'] = declare(self, 'max_lag_s', audio_core.DEFAULT_MAX_LAG_S,
                                 "input_type 'unstamped': a message arriving this much later than its "
                                 'sample-count time restarts the clock.', min_value=0.01, max_value=60.0,
                                 read_only=True)
        p['silence_threshold_dbfs'] = declare(self, 'silence_threshold_dbfs',
                                              audio_core.DEFAULT_SILENCE_THRESHOLD_DBFS,
                                              'Windows with an RMS level below this (dB full scale) are '
                                              'silence and published valid=false.',
                                              min_value=-200.0, max_value=0.0, read_only=True)
        p['max_pending_windows'] = declare(self, 'max_pending_windows', DEFAULT_MAX_PENDING_WINDOWS,
                                           'Windows queued for the encoder before the oldest is dropped.',
                                           min_value=1, max_value=10000, read_only=True)
        error = validate_parameters(p)
        if error:
            raise ValueError(f'invalid parameters: {error}')
        AudioData, AudioDataStamped, AudioInfo = audio_messages()
        add_validator(self, validate_parameters)
        # The built-in Dasheng encoder has its own RMS silence check: it gets the same level (load_plugin).
        self.load_plugin()
        sample_rate_out = int(getattr(self.encoder, 'sample_rate', None)
                              or audio_core.DEFAULT_SAMPLE_RATE_OUT)
        self.processor = audio_core.AudioStreamProcessor(sample_rate_out, p['window_s'], p['hop_s'],
                                                         p['stamp_tolerance_s'], p['max_lag_s'])
        self._format = audio_core.AudioFormat(p['sample_rate'], p['channels'], p['sample_format'].upper())
        self._format_source = 'parameters'
        self._lock = threading.Lock()
        self.start(capacity=p['max_pending_windows'])
        # One mutually exclusive group: AudioInfo and audio are handled in arrival order.
        group = MutuallyExclusiveCallbackGroup()
        overrides = QoSOverridingOptions.with_default_policies()
        info = self.create_subscription(AudioInfo, AUDIO_INFO, self._on_info, LATCHED_QOS,
                                        callback_group=group, qos_overriding_options=overrides)
        msg_type = AudioDataStamped if p['input_type'] == 'stamped' else AudioData
        audio = self.create_subscription(msg_type, AUDIO_STREAM, self._on_audio, SENSOR_QOS,
                                         callback_group=group, qos_overriding_options=overrides)
        self.get_logger().info(
            f"{p['input_type']} audio on '{audio.topic_name}' -> {p['window_s']} s windows every "
            f"{p['hop_s']} s at {sample_rate_out} Hz; stream format from parameters "
            f'({self._format.sample_rate} Hz, {self._format.channels} ch, {self._format.sample_format}) '
            f"until an AudioInfo arrives on '{info.topic_name}'")

    def _on_info(self, info) -> None:
        fmt = audio_core.AudioFormat.from_info(info)
        error = fmt.validate()
        if error:
            # Kept anyway: audio in an undecodable format must be refused, not misread.
            self.warn('bad_audio_info', f'AudioInfo describes a stream this node cannot decode: {error}')
        with self._lock:
            if fmt != self._format:
                self.get_logger().info(f'stream format from AudioInfo: {fmt.sample_rate} Hz, '
                                       f'{fmt.channels} ch, {fmt.sample_format}')
            self._format, self._format_source = fmt, 'audio_info'

    def _on_audio(self, msg) -> None:
        self.count('messages')
        with self._lock:
            fmt = self._format
        try:
            if self.params['input_type'] == 'stamped':
                frame_id = msg.header.frame_id
                windows = self.processor.process(msg.audio.data, fmt, stamp_to_seconds(msg.header.stamp))
            else:
                frame_id = ''
                arrival = self.get_clock().now().nanoseconds * 1e-9
                windows = self.processor.process_headerless(msg.data, fmt, arrival)
        except audio_core.AudioDecodeError as error:
            self.warn('bad_audio', f'cannot decode an audio message: {error}')
            return
        for window in windows:
            self.submit((window, frame_id))

    def process(self, item) -> None:
        window, frame_id = item
        [result] = audio_core.embed_windows(self.encoder, [window], self.params['silence_threshold_dbfs'])
        if result.reason == 'silent':
            self.count('silent_windows')
        self.publish_embedding(seconds_to_stamp(result.end_stamp_s), frame_id, result.vector)

    def extra_diagnostics(self) -> dict:
        with self._lock:
            fmt, source = self._format, self._format_source
        return {
            'audio_messages': self.counts.get('messages', 0),
            'silent_windows': self.counts.get('silent_windows', 0),
            'stream_resets': self.processor.resets,
            'stamp_discontinuities': self.processor.windower.discontinuities,
            'stream_format': f'{fmt.sample_rate} Hz, {fmt.channels} ch, {fmt.sample_format} ({source})',
        }


def main(args=None) -> int:
    return run_node(AudioEncoderNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
