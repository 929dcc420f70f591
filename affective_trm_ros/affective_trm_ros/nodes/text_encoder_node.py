"""Text encoder node: recognised speech -> one embedding per utterance (``affect/embedding/text``).

Subscribes to ``std_msgs/String`` on ``speech`` (rename it by remapping). Each utterance is
stamped with its arrival time on the node clock (sim time under ``use_sim_time``), cut to
``max_text_chars`` if longer (a counted warning), encoded by the worker and published with
transient-local QoS, so a fusion node that starts later still receives the current text context.
Empty or whitespace-only text is published ``valid=false``.
"""

from __future__ import annotations

from typing import Optional

from rclpy.qos_overriding_options import QoSOverridingOptions
from std_msgs.msg import String

from affective_trm_ros.core.modalities import TEXT
from affective_trm_ros.core.utterance import DEFAULT_MAX_TEXT_CHARS, prepare_utterance
from affective_trm_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS, add_validator, declare, run_node
from affective_trm_ros.nodes.encoder_node_base import EncoderNode, validate_common
from affective_trm_ros.topics import SPEECH

# Utterances waiting for the encoder before the oldest is dropped; speech is sparse, so this only
# fills when something floods the topic.
DEFAULT_MAX_PENDING = 32


def validate_parameters(params: dict) -> Optional[str]:
    """Pure check of the text encoder parameters; an error message or None."""
    error = validate_common(params)
    if error:
        return error
    if not params.get('max_text_chars', 0) >= 1:
        return f"max_text_chars must be >= 1, got {params.get('max_text_chars')}"
    return None


class TextEncoderNode(EncoderNode):
    """Per-utterance text encoder; see the module docstring."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__('text_encoder', TEXT, **node_kwargs)
        p = self.params
        declare(self, 'max_text_chars', DEFAULT_MAX_TEXT_CHARS,
                'Longer utterances are cut to this many characters (with a warning).',
                min_value=1, max_value=1_000_000)
        declare(self, 'max_pending', DEFAULT_MAX_PENDING,
                'Utterances queued for the encoder before the oldest is dropped.',
                min_value=1, max_value=10000, read_only=True)
        error = validate_parameters(p)
        if error:
            raise ValueError(f'invalid parameters: {error}')
        add_validator(self, validate_parameters)
        self.load_plugin({})
        self.start(capacity=p['max_pending'])
        # Reliable input: utterances are rare and each one matters (unlike camera frames).
        subscription = self.create_subscription(
            String, SPEECH, self._on_speech, RELIABLE_QOS,
            qos_overriding_options=QoSOverridingOptions.with_default_policies())
        self.get_logger().info(f"encoding utterances from '{subscription.topic_name}'")

    def output_qos(self):
        # Transient local, depth 1: a late subscriber still gets the latest utterance's embedding.
        return LATCHED_QOS

    def _on_speech(self, msg: String) -> None:
        arrival = self.get_clock().now().to_msg()
        text, truncated = prepare_utterance(msg.data, self.params['max_text_chars'])
        if truncated:
            self.warn('giant_text', f'utterance of {len(msg.data)} characters cut to '
                                    f"{self.params['max_text_chars']} (max_text_chars)")
        self.submit((arrival, text))

    def process(self, item) -> None:
        arrival, text = item
        vector, valid = self.encoder.encode(text)
        self.publish_embedding(arrival, '', vector if valid else None)


def main(args=None) -> int:
    return run_node(TextEncoderNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
