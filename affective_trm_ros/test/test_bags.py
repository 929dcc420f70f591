"""rosbag2 reading/writing through rosbags: round trips, definitions, ROS compatibility, errors."""

from pathlib import Path

import numpy as np
import pytest
from rosbags.highlevel import AnyReader
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from affective_trm_ros.offline.io.bags import (
    AUDIO_DATA_STAMPED,
    AUDIO_INFO,
    EXTRA_MSG_DEFINITIONS,
    IMAGE,
    STRING,
    VALENCE_AROUSAL,
    BagError,
    BagReader,
    BagWriter,
    affective_typestore,
    make_header,
    new_message,
    ns_to_time,
    time_to_ns,
)

REPO = Path(__file__).resolve().parents[2]
MSG_FILES = {
    'affective_msgs/msg/ModalityEmbedding': REPO / 'affective_msgs/msg/ModalityEmbedding.msg',
    'affective_msgs/msg/ValenceArousal': REPO / 'affective_msgs/msg/ValenceArousal.msg',
    'affective_msgs/msg/TrackedStreams': REPO / 'affective_msgs/msg/TrackedStreams.msg',
    'audio_common_msgs/msg/AudioData': REPO / 'tools/test_interfaces/audio_common_msgs/msg/AudioData.msg',
    'audio_common_msgs/msg/AudioDataStamped':
        REPO / 'tools/test_interfaces/audio_common_msgs/msg/AudioDataStamped.msg',
    'audio_common_msgs/msg/AudioInfo': REPO / 'tools/test_interfaces/audio_common_msgs/msg/AudioInfo.msg',
}


def _write_sample(path, storage='mcap', compress=True):
    store = affective_typestore()
    types = store.types
    with BagWriter(path, storage=storage, compress=compress) as bag:
        bag.add_topic('/image_raw', IMAGE)
        bag.add_topic('/audio_info', AUDIO_INFO, latched=True)
        bag.add_topic('/audio', AUDIO_DATA_STAMPED)
        bag.add_topic('/affect/ground_truth', VALENCE_AROUSAL)
        bag.add_topic('/speech', STRING)
        info = types[AUDIO_INFO](channels=1, sample_rate=16000, sample_format='S16LE', bitrate=256000,
                                 coding_format='WAVE')
        bag.write('/audio_info', 1_000, info)
        for k in range(3):
            stamp = 2_000_000_000 + k * 33_333_333
            pixels = np.full(4 * 6 * 3, k, np.uint8)
            image = types[IMAGE](header=make_header(stamp, 'cam'), height=4, width=6, encoding='rgb8',
                                 is_bigendian=0, step=18, data=pixels)
            bag.write('/image_raw', stamp, image)
            bag.write('/affect/ground_truth', stamp, new_message(
                VALENCE_AROUSAL, header=make_header(stamp, 'cam'), stream_id='default', valence=0.1 * k,
                arousal=-0.1 * k, confidence=1.0))
        audio = types['audio_common_msgs/msg/AudioData'](data=np.arange(8, dtype=np.uint8))
        chunk = types[AUDIO_DATA_STAMPED](header=make_header(2_000_000_000), audio=audio)
        bag.write('/audio', 2_010_000_000, chunk)
        # written out of order on purpose: reading must come back in log-time order
        bag.write('/speech', 1_500_000_000, types[STRING](data='hello'))


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
def test_round_trip_in_log_time_order(tmp_path, storage):
    _write_sample(tmp_path / 'bag', storage=storage)
    with BagReader(tmp_path / 'bag') as bag:
        topics = bag.topics
        assert topics['/image_raw'].count == 3 and topics['/image_raw'].msgtype == IMAGE
        assert topics['/audio_info'].latched and not topics['/image_raw'].latched
        messages = list(bag.messages())
        times = [m.log_time_ns for m, _ in messages]
        assert times == sorted(times)
        assert [m.topic for m, _ in messages][:2] == ['/audio_info', '/speech']
        images = [d for m, d in messages if m.topic == '/image_raw']
        assert [int(i.data[0]) for i in images] == [0, 1, 2]
        assert images[1].header.frame_id == 'cam' and time_to_ns(images[1].header.stamp) == 2_033_333_333
        truth = [d for m, d in bag.messages(['/affect/ground_truth'])]
        assert [round(float(t.arousal), 3) for t in truth] == [0.0, -0.1, -0.2]
        assert bag.message_count() == 9
        assert bag.message_count(['/image_raw', '/speech']) == 4


def test_raw_bytes_are_what_rclpy_publishes(tmp_path):
    """Replay publishes the recorded CDR bytes unchanged: rclpy must decode them to the same values."""
    serialization = pytest.importorskip('rclpy.serialization')
    from audio_common_msgs.msg import AudioDataStamped, AudioInfo
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from affective_msgs.msg import ValenceArousal

    _write_sample(tmp_path / 'bag')
    rclpy_types = {IMAGE: Image, AUDIO_INFO: AudioInfo, AUDIO_DATA_STAMPED: AudioDataStamped,
                   VALENCE_AROUSAL: ValenceArousal, STRING: String}
    with BagReader(tmp_path / 'bag') as bag:
        for message, decoded in bag.messages():
            ros = serialization.deserialize_message(message.data, rclpy_types[message.msgtype])
            if message.msgtype == IMAGE:
                assert bytes(ros.data) == bytes(decoded.data) and ros.width == decoded.width
            elif message.msgtype == VALENCE_AROUSAL:
                assert ros.valence == pytest.approx(float(decoded.valence))
                assert ros.header.stamp.nanosec == decoded.header.stamp.nanosec
            elif message.msgtype == AUDIO_INFO:
                assert (ros.sample_rate, ros.sample_format) == (16000, 'S16LE')
            elif message.msgtype == STRING:
                assert ros.data == 'hello'
            # and back: what rclpy serialises (padding bytes may differ) decodes to the same message
            again = bag.store.deserialize_cdr(serialization.serialize_message(ros), message.msgtype)
            assert repr(again) == repr(decoded)


def test_new_message_fills_unset_fields_with_ros_defaults():
    message = new_message(VALENCE_AROUSAL, header=make_header(7), stream_id='face_1', valence=0.5)
    assert (message.stream_id, message.valence, message.arousal) == ('face_1', 0.5, 0.0)
    assert message.modalities == 0
    assert (message.roi.width, message.roi.do_rectify, message.header.stamp.nanosec) == (0, False, 7)
    embedding = new_message('affective_msgs/msg/ModalityEmbedding', modality='video')
    assert embedding.data.dtype == np.float32 and embedding.data.size == 0
    assert embedding.expression_classes == []
    with pytest.raises(TypeError, match=r"has no field\(s\) \['colour'\]"):
        new_message(VALENCE_AROUSAL, colour='red')


def test_bags_carry_definitions_that_standard_readers_use(tmp_path):
    """A reader that knows nothing about affective_msgs decodes the bag from its own definitions."""
    _write_sample(tmp_path / 'bag')
    with AnyReader([tmp_path / 'bag'], default_typestore=get_typestore(Stores.EMPTY)) as reader:
        connection = next(c for c in reader.connections if c.topic == '/affect/ground_truth')
        assert 'float32 valence' in connection.msgdef.data
        values = [reader.deserialize(raw, c.msgtype).valence
                  for c, _, raw in reader.messages(connections=[connection])]
        assert values == pytest.approx([0.0, 0.1, 0.2])


def test_embedded_definitions_match_the_interface_files():
    """The type store's affective_msgs/audio_common_msgs definitions equal the repository's .msg files."""
    store = affective_typestore()
    for name, path in MSG_FILES.items():
        from_file = get_types_from_msg(path.read_text(), name)[name]
        assert store.fielddefs[name] == from_file, f'{name} differs from {path}'
    assert set(EXTRA_MSG_DEFINITIONS) == set(MSG_FILES)


def test_unknown_types_are_read_from_the_bag(tmp_path):
    custom = get_typestore(Stores.ROS2_JAZZY)
    custom.register(get_types_from_msg('float64 level\nstring label', 'my_msgs/msg/Gauge'))
    with BagWriter(tmp_path / 'bag', store=custom) as bag:
        bag.add_topic('/gauge', 'my_msgs/msg/Gauge')
        bag.write('/gauge', 5, custom.types['my_msgs/msg/Gauge'](level=2.5, label='x'))
    with BagReader(tmp_path / 'bag') as bag:
        (_, gauge), = list(bag.messages())
        assert gauge.level == 2.5 and gauge.label == 'x'


# affective_msgs/ValenceArousal as released before the face box (roi) was added.
VALENCE_AROUSAL_WITHOUT_ROI = """uint8 MODALITY_VIDEO = 1
uint8 MODALITY_AUDIO = 2
uint8 MODALITY_TEXT = 4
std_msgs/Header header
string stream_id
float32 valence
float32 arousal
float32 confidence
uint8 modalities 0
"""


def test_a_bag_recorded_with_an_older_message_version_decodes_as_recorded(tmp_path):
    older = get_typestore(Stores.ROS2_JAZZY)
    older.register(get_types_from_msg(VALENCE_AROUSAL_WITHOUT_ROI, VALENCE_AROUSAL))
    with BagWriter(tmp_path / 'bag', store=older) as bag:
        bag.add_topic('/affect/ground_truth', VALENCE_AROUSAL)
        bag.write('/affect/ground_truth', 7, older.types[VALENCE_AROUSAL](
            header=make_header(7, 'cam'), stream_id='default', valence=0.25, arousal=-0.5,
            confidence=1.0, modalities=3))
    with BagReader(tmp_path / 'bag') as bag:
        (_, truth), = list(bag.messages())
    assert (truth.valence, truth.arousal, truth.modalities) == (0.25, -0.5, 3)
    assert not hasattr(truth, 'roi')
    # our own definition is unchanged for bags written with it
    assert 'roi' in dict(affective_typestore().fielddefs[VALENCE_AROUSAL][1])


def test_topic_lookup_and_errors(tmp_path):
    _write_sample(tmp_path / 'bag')
    with BagReader(tmp_path / 'bag') as bag:
        assert bag.find_topic('image_raw') == '/image_raw'
        assert bag.find_topic('/speech') == '/speech'
        assert bag.find_topic('camera/image_raw') is None
        assert bag.require(['image_raw', 'audio']) == ['/image_raw', '/audio']
        expected = r"no topic 'camera/image_raw'.*/image_raw \(sensor_msgs/msg/Image\)"
        with pytest.raises(BagError, match=expected):
            bag.require(['camera/image_raw'])
    with pytest.raises(BagError, match='not a rosbag2 directory'):
        BagReader(tmp_path / 'nothing')
    with pytest.raises(BagError, match='already exists'):
        BagWriter(tmp_path / 'bag')
    with pytest.raises(ValueError, match='unknown bag storage'):
        BagWriter(tmp_path / 'other', storage='rosbag1')
    with BagWriter(tmp_path / 'bag2') as bag:
        with pytest.raises(BagError, match='unknown message type'):
            bag.add_topic('/x', 'nope_msgs/msg/Nope')
        with pytest.raises(BagError, match='was not added'):
            bag.write('/y', 0, None)


def test_time_helpers():
    stamp = ns_to_time(1_735_689_600_123_456_789)
    assert (stamp.sec, stamp.nanosec) == (1_735_689_600, 123_456_789)
    assert time_to_ns(stamp) == 1_735_689_600_123_456_789


# ---------------------------------------------------------------- several people in one bag

PEOPLE_FPS = 10
PEOPLE_VALENCE = {'face_0': 0.5, 'face_1': -0.5}   # left and right face (the tracker numbers left to right)


def _write_two_people(path, frames=12):
    """Two faces side by side (the right one darker), a 440 Hz tone, one utterance, ground truth per face."""
    import cv2
    from skimage.data import astronaut

    face = cv2.resize(astronaut()[0:260, 130:370], (160, 160))
    image = np.full((200, 360, 3), 90, np.uint8)
    image[20:180, 10:170] = face
    image[20:180, 190:350] = (face[:, ::-1] * 0.7).astype(np.uint8)
    types = affective_typestore().types
    start = 3_000_000_000
    with BagWriter(path) as bag:
        bag.add_topic('/image_raw', IMAGE)
        bag.add_topic('/audio', AUDIO_DATA_STAMPED)
        bag.add_topic('/speech', STRING)
        bag.add_topic('/affect/ground_truth', VALENCE_AROUSAL)
        samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000 * 2) / 16000) * 32767).astype('<i2')
        for k in range(4):     # 0.5 s chunks, S16LE mono 16 kHz (the audio node's defaults)
            chunk = samples[k * 8000:(k + 1) * 8000].view(np.uint8)
            stamp = start + k * 500_000_000
            bag.write('/audio', stamp + 500_000_000, types[AUDIO_DATA_STAMPED](
                header=make_header(stamp), audio=types['audio_common_msgs/msg/AudioData'](data=chunk)))
        bag.write('/speech', start + 200_000_000, types[STRING](data='two people here'))
        for i in range(frames):
            stamp = start + i * 1_000_000_000 // PEOPLE_FPS
            bag.write('/image_raw', stamp, types[IMAGE](
                header=make_header(stamp, 'cam'), height=200, width=360, encoding='rgb8', is_bigendian=0,
                step=360 * 3, data=image.reshape(-1)))
            for stream, valence in PEOPLE_VALENCE.items():
                bag.write('/affect/ground_truth', stamp, new_message(
                    VALENCE_AROUSAL, header=make_header(stamp, 'cam'), stream_id=stream, valence=valence,
                    arousal=0.1, confidence=1.0))
    return path


def _people_settings(monkeypatch, max_faces):
    from affective_trm_ros.offline.extraction.settings import NodeSettings

    monkeypatch.syspath_prepend(str(Path(__file__).parent / 'fixtures' / 'encoder_node_plugins'))
    return NodeSettings.from_parameters({
        'video_encoder': {'plugin': 'tiny_video', 'face_pipeline': 'tracked', 'detector': 'haar',
                          'max_faces': max_faces, 'min_face_size': 40},
        'audio_encoder': {'plugin': 'tiny_audio'}, 'text_encoder': {'plugin': 'tiny_text'}, 'fusion': {}})


def test_a_bag_with_two_people_gives_one_session_per_person(tmp_path, monkeypatch):
    from affective_trm_ros.offline.extraction.bag import prepare_bag, prepare_bag_sessions
    from affective_trm_ros.offline.extraction.pipeline import encoder_spec
    from affective_trm_ros.offline.io.feature_store import FeatureStore

    bag = _write_two_people(tmp_path / 'people')
    settings = _people_settings(monkeypatch, max_faces=2)
    encoders = settings.load_encoders('cpu')
    store = FeatureStore(tmp_path / 'store', encoder_spec=encoder_spec(encoders))
    options = dict(audio=settings.audio, video_path=settings.video_path(encoders))
    results = prepare_bag_sessions(bag, store, encoders, settings.alignment, **options)
    assert [(r.session_id, r.stream_id, r.frames, r.labelled_frames) for r in results] == [
        ('people_face_0', 'face_0', 12, 12), ('people_face_1', 'face_1', 12, 12)]
    left, right = store.load('people_face_0'), store.load('people_face_1')
    # each person's own ground truth
    np.testing.assert_allclose(left.labels[:, 0], 0.5)
    np.testing.assert_allclose(right.labels[:, 0], -0.5)
    # each person's own face: the right one is darker (tiny_video: mean RGB of the crop)
    video = store.modalities.index('video')
    assert left.mask[:, video].all() and right.mask[:, video].all()
    assert left.features['video'][:, :3].mean() > right.features['video'][:, :3].mean() + 0.05
    # audio and text are shared context: the same features on both people's frames
    np.testing.assert_array_equal(left.mask, right.mask)
    np.testing.assert_array_equal(left.features['audio'], right.features['audio'])
    np.testing.assert_array_equal(left.features['text'], right.features['text'])
    assert left.mask[:, store.modalities.index('audio')].any()
    assert left.mask[:, store.modalities.index('text')].any()
    # a second run finds both sessions prepared
    again = prepare_bag_sessions(bag, store, encoders, settings.alignment, **options)
    assert [r.skipped for r in again] == [True, True]
    with pytest.raises(ValueError, match='gave 2 sessions'):
        prepare_bag(bag, store, encoders, settings.alignment, overwrite=True, **options)


def test_one_person_mode_refuses_ground_truth_for_several_people(tmp_path, monkeypatch):
    from affective_trm_ros.offline.extraction.bag import prepare_bag
    from affective_trm_ros.offline.extraction.pipeline import encoder_spec
    from affective_trm_ros.offline.io.feature_store import FeatureStore

    bag = _write_two_people(tmp_path / 'people', frames=3)
    settings = _people_settings(monkeypatch, max_faces=1)
    encoders = settings.load_encoders('cpu')
    store = FeatureStore(tmp_path / 'store', encoder_spec=encoder_spec(encoders))
    with pytest.raises(BagError, match=r'holds several people \(face_0, face_1\).*max_faces'):
        prepare_bag(bag, store, encoders, settings.alignment, audio=settings.audio,
                    video_path=settings.video_path(encoders))
