"""affective_msgs: every type imports, has its documented defaults and survives serialization."""

import numpy as np
from rclpy.serialization import deserialize_message, serialize_message

from affective_msgs.msg import ModalityEmbedding, ValenceArousal
from affective_msgs.srv import ResetState
from affective_trm_ros.core.modalities import FEATURE_ORDER, MODALITY_BITS


def test_valence_arousal_defaults_and_constants():
    msg = ValenceArousal()
    assert (msg.valence, msg.arousal, msg.confidence, msg.modalities) == (0.0, 0.0, 0.0, 0)
    assert msg.stream_id == ''
    # The bit constants in the message and in the core library must agree.
    assert ValenceArousal.MODALITY_VIDEO == MODALITY_BITS['video'] == 1
    assert ValenceArousal.MODALITY_AUDIO == MODALITY_BITS['audio'] == 2
    assert ValenceArousal.MODALITY_TEXT == MODALITY_BITS['text'] == 4


def test_modality_embedding_defaults_and_constants():
    msg = ModalityEmbedding()
    assert msg.valid is False
    assert len(msg.data) == 0
    assert {ModalityEmbedding.MODALITY_VIDEO, ModalityEmbedding.MODALITY_AUDIO,
            ModalityEmbedding.MODALITY_TEXT} == set(FEATURE_ORDER)


def test_reset_state_service_defaults():
    request, response = ResetState.Request(), ResetState.Response()
    assert request.stream_id == ''
    assert response.success is False and response.message == ''


def test_valence_arousal_round_trip():
    msg = ValenceArousal(stream_id='alice', valence=-0.25, arousal=0.75, confidence=0.5,
                         modalities=ValenceArousal.MODALITY_VIDEO | ValenceArousal.MODALITY_TEXT)
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1_700_000_000, 123_456_789
    msg.header.frame_id = 'camera_optical'
    back = deserialize_message(serialize_message(msg), ValenceArousal)
    assert back == msg


def test_modality_embedding_round_trip_keeps_every_float():
    data = np.random.default_rng(0).standard_normal(2816).astype(np.float32)
    msg = ModalityEmbedding(stream_id='default', modality='audio', encoder='dasheng_base@untrained',
                            valid=True, data=data.tolist())
    msg.header.stamp.sec, msg.header.stamp.nanosec = 42, 999_999_999
    back = deserialize_message(serialize_message(msg), ModalityEmbedding)
    assert back.header == msg.header and back.encoder == msg.encoder and back.valid
    np.testing.assert_array_equal(np.asarray(back.data, dtype=np.float32), data)


def test_reset_state_round_trip():
    request = ResetState.Request(stream_id='bob')
    assert deserialize_message(serialize_message(request), ResetState.Request) == request
    response = ResetState.Response(success=True, message='reset 1 stream')
    assert deserialize_message(serialize_message(response), ResetState.Response) == response

