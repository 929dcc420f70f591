"""rosbag2 reading and writing (MCAP and sqlite3) without a ROS distro, through ``rosbags``.

The type store knows the ROS 2 Jazzy standard messages plus ``affective_msgs`` and
``audio_common_msgs``, so the bags written here carry complete message definitions (``ros2 bag
info``/``play``, Foxglove and ``rosbags`` read them) and bags recorded on a robot decode here.
Types a bag defines that this store does not know are registered from the bag's own definitions.

Two views of the same recording:

* :meth:`BagReader.raw_messages` yields serialized CDR bytes in log-time order — what replay
  publishes unchanged;
* :meth:`BagReader.messages` yields the decoded message objects — what offline feature
  extraction converts with the same core functions the nodes use.

No rclpy here: this module belongs to the offline ring.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rosbags.interfaces import (
    Connection,
    MessageDefinitionFormat,
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)
from rosbags.rosbag2 import CompressionFormat, CompressionMode, Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

# rosbag2 metadata version written: 9 is what Jazzy and Kilted write (Humble reads MCAP files
# through their embedded schemas).
BAG_VERSION = 9
STORAGE_PLUGINS = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}

# Interface definitions of the packages the standard store lacks (same fields and constants as
# affective_msgs/msg/*.msg and the audio_common_msgs interface; a test keeps them in sync).
EXTRA_MSG_DEFINITIONS = {
    'affective_msgs/msg/ModalityEmbedding': """
string MODALITY_VIDEO = "video"
string MODALITY_AUDIO = "audio"
string MODALITY_TEXT = "text"
std_msgs/Header header
string stream_id
string modality
string encoder
bool valid false
sensor_msgs/RegionOfInterest roi
string[] expression_classes
float32[] expression_probabilities
float32[] data
""",
    'affective_msgs/msg/ValenceArousal': """
uint8 MODALITY_VIDEO = 1
uint8 MODALITY_AUDIO = 2
uint8 MODALITY_TEXT = 4
std_msgs/Header header
string stream_id
sensor_msgs/RegionOfInterest roi
float32 valence
float32 arousal
float32 confidence
uint8 modalities 0
""",
    'affective_msgs/msg/TrackedStreams': """
std_msgs/Header header
string[] stream_ids
""",
    'audio_common_msgs/msg/AudioData': """
uint8[] data
""",
    'audio_common_msgs/msg/AudioDataStamped': """
std_msgs/Header header
audio_common_msgs/AudioData audio
""",
    'audio_common_msgs/msg/AudioInfo': """
uint8 channels
uint32 sample_rate
string sample_format
uint32 bitrate
string coding_format
""",
}

# Message type names used across the suite.
IMAGE = 'sensor_msgs/msg/Image'
COMPRESSED_IMAGE = 'sensor_msgs/msg/CompressedImage'
AUDIO_DATA = 'audio_common_msgs/msg/AudioData'
AUDIO_DATA_STAMPED = 'audio_common_msgs/msg/AudioDataStamped'
AUDIO_INFO = 'audio_common_msgs/msg/AudioInfo'
STRING = 'std_msgs/msg/String'
VALENCE_AROUSAL = 'affective_msgs/msg/ValenceArousal'
MODALITY_EMBEDDING = 'affective_msgs/msg/ModalityEmbedding'

_ZERO = QosTime(0, 0)
# What a recorder would store for a volatile reliable topic and for a latched (transient local) one;
# `ros2 bag play` re-offers the recorded QoS, so latched topics stay latched on replay.
_DEFAULT_QOS = Qos(QosHistory.KEEP_LAST, 10, QosReliability.RELIABLE, QosDurability.VOLATILE,
                   _ZERO, _ZERO, QosLiveliness.AUTOMATIC, _ZERO, False)
_LATCHED_QOS = _DEFAULT_QOS._replace(depth=1, durability=QosDurability.TRANSIENT_LOCAL)


class BagError(RuntimeError):
    """A bag cannot be opened, is missing a topic, or holds a type that cannot be decoded."""


@functools.lru_cache(maxsize=1)
def affective_typestore() -> Typestore:
    """ROS 2 Jazzy standard types plus affective_msgs and audio_common_msgs (cached, shared)."""
    store = get_typestore(Stores.ROS2_JAZZY)
    types = {}
    for name, text in EXTRA_MSG_DEFINITIONS.items():
        types.update(get_types_from_msg(text, name))
    store.register(types)
    return store


def ns_to_time(stamp_ns: int, store: Optional[Typestore] = None) -> Any:
    """Nanoseconds -> builtin_interfaces/msg/Time of the type store."""
    time_type = (store or affective_typestore()).types['builtin_interfaces/msg/Time']
    return time_type(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000))


def time_to_ns(stamp: Any) -> int:
    """builtin_interfaces/msg/Time (rosbags or rclpy object) -> nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def new_message(msgtype: str, store: Optional[Typestore] = None, **fields: Any) -> Any:
    """A message of ``msgtype`` with ``fields`` set and every other field at its ROS default (zeros,
    empty strings and sequences, nested messages likewise), as ``msgtype()`` gives in rclpy."""
    store = store or affective_typestore()
    _, definitions = store.fielddefs[msgtype]
    values = {name: fields.pop(name) if name in fields else _default(store, kind, spec)
              for name, (kind, spec) in definitions}
    if fields:
        raise TypeError(f'{msgtype} has no field(s) {sorted(fields)}')
    return store.types[msgtype](**values)


def _default(store: Typestore, kind: Any, spec: Any) -> Any:
    import numpy as np
    from rosbags.interfaces import Nodetype

    if kind == Nodetype.NAME:
        return new_message(spec, store)
    if kind == Nodetype.BASE:
        name = spec[0]
        return '' if name == 'string' else False if name == 'bool' else 0.0 if name.startswith('float') else 0
    (element_kind, element), size = spec
    numeric = element_kind == Nodetype.BASE and element[0] not in ('string', 'bool')
    if kind == Nodetype.ARRAY:
        if numeric:
            return np.zeros(size, np.dtype(element[0]))
        return [_default(store, element_kind, element) for _ in range(size)]
    return np.zeros(0, np.dtype(element[0])) if numeric else []


def make_header(stamp_ns: int, frame_id: str = '', store: Optional[Typestore] = None) -> Any:
    """std_msgs/msg/Header with the given stamp."""
    store = store or affective_typestore()
    return store.types['std_msgs/msg/Header'](stamp=ns_to_time(stamp_ns, store), frame_id=frame_id)


@dataclass(frozen=True)
class BagMessage:
    """One recorded message: topic, type, log time (receive time at recording) and CDR bytes."""

    topic: str
    msgtype: str
    log_time_ns: int
    data: bytes


@dataclass(frozen=True)
class TopicInfo:
    msgtype: str
    count: int
    latched: bool  # recorded with transient-local durability


class BagReader:
    """Read a rosbag2 directory (or a single .mcap/.db3 file's parent) in log-time order.

    Use as a context manager::

        with BagReader('session_000') as bag:
            for message, decoded in bag.messages(['image_raw']):
                ...
    """

    def __init__(self, path: str | Path, store: Optional[Typestore] = None) -> None:
        path = Path(path)
        if path.is_file() and path.suffix in ('.mcap', '.db3'):
            path = path.parent
        if not (path / 'metadata.yaml').is_file():
            raise BagError(f"'{path}' is not a rosbag2 directory (no metadata.yaml in it)")
        self.path = path
        self._base_store = store or affective_typestore()
        self.store = self._base_store
        self._reader = Reader(path)
        self._connections: dict[str, list[Connection]] = {}
        self._topic_stores: dict[str, Typestore] = {}

    def __enter__(self) -> BagReader:
        self.open()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def open(self) -> None:
        try:
            self._reader.open()
        except Exception as error:  # rosbags raises several reader errors; say which bag failed
            raise BagError(f"cannot open bag '{self.path}': {error}") from error
        self._connections = {}
        for connection in self._reader.connections:
            self._connections.setdefault(connection.topic, []).append(connection)
        self.store = self._store_with_bag_types(self._reader.connections)
        self._topic_stores = self._stores_for_changed_types(self._reader.connections)

    def close(self) -> None:
        self._reader.close()

    def _store_with_bag_types(self, connections: Iterable[Connection]) -> Typestore:
        """Our store, extended with any type the bag defines that the store does not know."""
        unknown = {}
        for connection in connections:
            if connection.msgtype in self._base_store.fielddefs:
                continue
            if connection.msgdef.format != MessageDefinitionFormat.MSG or not connection.msgdef.data:
                continue  # decoding that topic fails with a clear error if it is ever asked for
            unknown.update(get_types_from_msg(connection.msgdef.data, connection.msgtype))
        if not unknown:
            return self._base_store
        store = get_typestore(Stores.EMPTY)
        store.register(dict(self._base_store.fielddefs))
        store.register({k: v for k, v in unknown.items() if k not in self._base_store.fielddefs})
        return store

    def _stores_for_changed_types(self, connections: Iterable[Connection]) -> dict[str, Typestore]:
        """Topic -> a store with the bag's own definitions, for topics whose recorded definition of a
        type differs from ours (a bag recorded with another version of a message decodes as recorded)."""
        stores = {}
        for connection in connections:
            if connection.msgdef.format != MessageDefinitionFormat.MSG or not connection.msgdef.data:
                continue
            recorded = get_types_from_msg(connection.msgdef.data, connection.msgtype)
            if all(self.store.fielddefs.get(name, fields) == fields for name, fields in recorded.items()):
                continue
            store = get_typestore(Stores.EMPTY)
            store.register({k: v for k, v in self.store.fielddefs.items() if k not in recorded})
            store.register(recorded)
            stores[connection.topic] = store
        return stores

    # ------------------------------------------------------------ metadata

    @property
    def topics(self) -> dict[str, TopicInfo]:
        """Topic -> type, message count and whether it was recorded latched."""
        infos = {}
        for topic, connections in self._connections.items():
            infos[topic] = TopicInfo(
                msgtype=connections[0].msgtype,
                count=sum(c.msgcount for c in connections),
                latched=any(q.durability == QosDurability.TRANSIENT_LOCAL
                            for c in connections for q in getattr(c.ext, 'offered_qos_profiles', ())))
        return infos

    @property
    def start_ns(self) -> int:
        return self._reader.start_time

    @property
    def end_ns(self) -> int:
        return self._reader.end_time

    @property
    def duration_s(self) -> float:
        return max(0, self._reader.end_time - self._reader.start_time) / 1e9

    def message_count(self, topics: Optional[Iterable[str]] = None) -> int:
        infos = self.topics
        return sum(infos[t].count for t in (infos if topics is None else topics) if t in infos)

    def find_topic(self, name: str) -> Optional[str]:
        """The recorded topic called ``name``, with or without a leading '/'; None when absent.

        Recorders store absolute names ('/image_raw'); the suite's topic names are relative.
        """
        for candidate in (name, '/' + name.lstrip('/'), name.lstrip('/')):
            if candidate in self._connections:
                return candidate
        return None

    def require(self, topics: Iterable[str]) -> list[str]:
        """The recorded names of ``topics`` (see find_topic); BagError names missing ones and what exists."""
        topics = list(topics)
        found = [self.find_topic(t) for t in topics]
        missing = [t for t, f in zip(topics, found) if f is None]
        if missing:
            present = ', '.join(f'{t} ({i.msgtype})' for t, i in sorted(self.topics.items()))
            raise BagError(f"bag '{self.path}' has no topic {', '.join(map(repr, missing))}; "
                           f"it holds: {present or 'nothing'}")
        return found

    # ------------------------------------------------------------ messages

    def _selected(self, topics: Optional[Iterable[str]]) -> list[Connection]:
        if topics is None:
            return [c for cs in self._connections.values() for c in cs]
        return [c for t in topics for c in self._connections.get(t, [])]

    def raw_messages(self, topics: Optional[Iterable[str]] = None, start_ns: Optional[int] = None,
                     stop_ns: Optional[int] = None) -> Iterator[BagMessage]:
        """Serialized messages of ``topics`` (None = all) in log-time order (stable for ties)."""
        connections = self._selected(topics)
        if not connections:
            return
        for connection, log_time, data in self._reader.messages(connections, start=start_ns,
                                                                stop=stop_ns):
            yield BagMessage(connection.topic, connection.msgtype, int(log_time), bytes(data))

    def deserialize(self, message: BagMessage) -> Any:
        try:
            store = self._topic_stores.get(message.topic, self.store)
            return store.deserialize_cdr(message.data, message.msgtype)
        except KeyError as error:
            raise BagError(f"cannot decode topic '{message.topic}': type {message.msgtype} is "
                           f"unknown and the bag carries no definition for it") from error

    def messages(self, topics: Optional[Iterable[str]] = None, start_ns: Optional[int] = None,
                 stop_ns: Optional[int] = None) -> Iterator[tuple[BagMessage, Any]]:
        """(raw message, decoded object) pairs in log-time order."""
        for message in self.raw_messages(topics, start_ns, stop_ns):
            yield message, self.deserialize(message)


class BagWriter:
    """Write a rosbag2 directory with full message definitions.

    ``storage`` is 'mcap' (default; chunks zstd-compressed when ``compress``) or 'sqlite3'.
    The directory must not exist unless ``overwrite`` (then it is replaced)::

        with BagWriter('out_bag') as bag:
            bag.add_topic('affect/valence_arousal', VALENCE_AROUSAL)
            bag.write('affect/valence_arousal', stamp_ns, message)
    """

    def __init__(self, path: str | Path, storage: str = 'mcap', compress: bool = True,
                 overwrite: bool = False, store: Optional[Typestore] = None) -> None:
        if storage not in STORAGE_PLUGINS:
            raise ValueError(f"unknown bag storage '{storage}'; expected one of {sorted(STORAGE_PLUGINS)}")
        self.path = Path(path)
        if self.path.exists():
            if not overwrite:
                raise BagError(f"'{self.path}' already exists; choose another path or overwrite it")
            shutil.rmtree(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.store = store or affective_typestore()
        self._writer = Writer(self.path, version=BAG_VERSION, storage_plugin=STORAGE_PLUGINS[storage])
        if compress:
            # MCAP: zstd-compressed chunks (read by every MCAP reader); sqlite3: per message.
            mode = CompressionMode.STORAGE if storage == 'mcap' else CompressionMode.MESSAGE
            self._writer.set_compression(mode, CompressionFormat.ZSTD)
        self._connections: dict[str, Connection] = {}
        self._open = False

    def __enter__(self) -> BagWriter:
        self.open()
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self.close()

    def open(self) -> None:
        self._writer.open()
        self._open = True

    def close(self) -> None:
        if self._open:
            self._writer.close()
            self._open = False

    def set_custom_data(self, key: str, value: str) -> None:
        """Store a key/value string in metadata.yaml (``custom_data``), e.g. how the bag was made."""
        self._writer.set_custom_data(key, value)

    def add_topic(self, topic: str, msgtype: str, latched: bool = False) -> None:
        """Declare a topic; ``latched`` records transient-local QoS (e.g. audio_info)."""
        if topic in self._connections:
            raise BagError(f"topic '{topic}' added twice")
        if msgtype not in self.store.fielddefs:
            raise BagError(f"unknown message type '{msgtype}'")
        self._connections[topic] = self._writer.add_connection(
            topic, msgtype, typestore=self.store,
            offered_qos_profiles=[_LATCHED_QOS if latched else _DEFAULT_QOS])

    def write(self, topic: str, log_time_ns: int, message: Any) -> None:
        """Serialize and write one message object of the topic's type."""
        connection = self._connection(topic)
        self._writer.write(connection, int(log_time_ns),
                           self.store.serialize_cdr(message, connection.msgtype))

    def _connection(self, topic: str) -> Connection:
        try:
            return self._connections[topic]
        except KeyError:
            raise BagError(f"topic '{topic}' was not added to '{self.path}'") from None
