"""Offline features from a rosbag: the nodes' code path, run over a recording.

:func:`extract_embeddings` turns a bag's raw topics into per-modality embeddings exactly as the
encoder nodes do — ``core.image`` conversion, ``core.audio`` decoding/windowing/silence gate,
``core.utterance`` text preparation and the same encoder plugins, fed through the one extraction
pipeline (:class:`~.pipeline.EmbeddingCollector`) every source uses — stamping them the way the
nodes stamp theirs (image stamp; audio window end; the speech message's log time, which is the
simulated clock time at which a replayed text message arrives). :func:`prepare_bag` aligns them
with the fusion node's policy (``core.alignment``), attaches labels (a ground-truth
``ValenceArousal`` topic or a per-frame CSV) and writes one session into a
:class:`~affective_trm_ros.offline.io.feature_store.FeatureStore`. Features prepared here equal the
embeddings the nodes publish while the bag is replayed (tested).

A session already in the store with the same preparation fingerprint (bag, topics, encoders,
windowing, alignment, labels) is skipped, so interrupted preparation restarts where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from affective_trm_ros import topics
from affective_trm_ros.core.alignment import AlignmentConfig
from affective_trm_ros.core.audio import AudioDecodeError, AudioFormat, AudioStreamProcessor
from affective_trm_ros.core.encoders.base import Encoder
from affective_trm_ros.core.image import ImageDecodeError, compressed_to_rgb, image_to_rgb
from affective_trm_ros.core.modalities import AUDIO, TEXT, VIDEO
from affective_trm_ros.core.stamps import ns_to_seconds
from affective_trm_ros.offline.extraction.pipeline import (
    DEFAULT_BATCH_SIZE,
    EmbeddingCollector,
    VideoPath,
    align_embeddings,
    check_label_coverage,
    encoder_spec,
)
from affective_trm_ros.offline.extraction.settings import AudioOptions, NodeSettings, node_parameters
from affective_trm_ros.offline.io.bags import (
    AUDIO_DATA,
    AUDIO_DATA_STAMPED,
    COMPRESSED_IMAGE,
    IMAGE,
    STRING,
    VALENCE_AROUSAL,
    BagError,
    BagReader,
    time_to_ns,
)
from affective_trm_ros.offline.io.feature_store import FeatureStore

__all__ = ['AudioOptions', 'BagTopics', 'NodeSettings', 'encoder_spec', 'extract_embeddings',
           'labels_from_csv', 'labels_from_topic', 'node_parameters', 'ns_to_s', 'prepare_bag',
           'prepare_bag_sessions']

PREPARATION_VERSION = 1  # bump when the same inputs would give different features
# A ground-truth message labels the video frame whose stamp is within this of its own.
LABEL_STAMP_TOLERANCE_S = 0.010
_SESSION_ID_UNSAFE = re.compile(r'[^A-Za-z0-9._-]+')
ns_to_s = ns_to_seconds  # the name the demo and replay use
DEFAULT_AUDIO = AudioOptions()


@dataclass(frozen=True)
class BagTopics:
    """Topic names in the bag (with or without the leading '/')."""

    image: str = topics.IMAGE
    compressed_image: str = topics.IMAGE_COMPRESSED  # used when `image` is not recorded
    audio: str = topics.AUDIO_STREAM
    audio_info: str = topics.AUDIO_INFO
    speech: str = topics.SPEECH
    ground_truth: str = topics.GROUND_TRUTH


@dataclass
class BagEmbeddings:
    """Per-modality embeddings of one bag, in stamp order: lists of (stamp_s, vector | None);
    ``video_streams``: the video embeddings per stream (person)."""

    embeddings: dict = field(default_factory=dict)
    identities: dict = field(default_factory=dict)   # modality -> '<plugin>@<weights>'
    video_stamps_ns: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)       # decode errors, silent windows, ...
    collector: Optional[EmbeddingCollector] = None

    @property
    def video_streams(self) -> dict:
        return self.collector.video_streams if self.collector else {}

    def streams(self) -> list:
        return self.collector.streams() if self.collector else []

    def events(self, stream_id: Optional[str] = None) -> list:
        """(modality, stamp_s, vector|None) events of one stream (default: the only one) for alignment."""
        return self.collector.events(stream_id)


# ---------------------------------------------------------------- extraction

def _bag_inputs(bag: BagReader, encoders: Mapping[str, Encoder], topics: BagTopics, counts: dict) -> dict:
    """recorded topic -> what it feeds ('video', 'audio_info', 'audio', 'text')."""
    image_topic = bag.find_topic(topics.image) or bag.find_topic(topics.compressed_image)
    if image_topic is None:  # the frames clock the fused steps, with or without a video encoder
        bag.require([topics.image])
    wanted = {image_topic: VIDEO}
    if AUDIO in encoders:
        wanted[bag.require([topics.audio])[0]] = AUDIO
        info_topic = bag.find_topic(topics.audio_info)
        if info_topic:
            wanted[info_topic] = 'audio_info'
    if TEXT in encoders:
        speech_topic = bag.find_topic(topics.speech)
        if speech_topic is None:
            counts['speech_topic_missing'] = 1  # no speech recorded: text stays masked
        else:
            wanted[speech_topic] = TEXT
    return wanted


class _BagFeeder:
    """Decodes a bag's messages the way the nodes decode them and feeds the extraction pipeline."""

    def __init__(self, collector: EmbeddingCollector, encoders: Mapping[str, Encoder], audio: AudioOptions,
                 video_stamps_ns: list) -> None:
        self.collector, self.counts, self.video_stamps_ns = collector, collector.counts, video_stamps_ns
        self.audio_format = AudioFormat(audio.sample_rate, audio.channels, audio.sample_format)
        self.processor = None
        if AUDIO in encoders:
            self.processor = AudioStreamProcessor(sample_rate_out=int(encoders[AUDIO].sample_rate or 16000),
                                                  window_s=audio.window_s, hop_s=audio.hop_s)

    def feed(self, kind: str, message: Any, decoded: Any) -> None:
        getattr(self, f'_{kind}')(message, decoded)

    def _video(self, message: Any, decoded: Any) -> None:
        stamp_ns = time_to_ns(decoded.header.stamp)
        self.video_stamps_ns.append(stamp_ns)
        frame = None  # without a video encoder the frames only clock the steps
        if VIDEO in self.collector.encoders:
            frame = _frame_or_none(message.msgtype, decoded, self.counts)
        self.collector.add_frame(ns_to_seconds(stamp_ns), frame)

    def _audio_info(self, message: Any, decoded: Any) -> None:
        self.audio_format = AudioFormat(int(decoded.sample_rate), int(decoded.channels),
                                        str(decoded.sample_format), str(decoded.coding_format))

    def _audio(self, message: Any, decoded: Any) -> None:
        try:
            if message.msgtype == AUDIO_DATA_STAMPED:
                windows = self.processor.process(decoded.audio.data, self.audio_format,
                                                 ns_to_seconds(time_to_ns(decoded.header.stamp)))
            elif message.msgtype == AUDIO_DATA:
                windows = self.processor.process_headerless(decoded.data, self.audio_format,
                                                            ns_to_seconds(message.log_time_ns))
            else:
                raise BagError(f"topic '{message.topic}' has type {message.msgtype}; "
                               f'expected {AUDIO_DATA_STAMPED} or {AUDIO_DATA}')
        except AudioDecodeError:
            self.counts['audio_decode_errors'] = self.counts.get('audio_decode_errors', 0) + 1
            return
        self.collector.add_audio_windows(windows)

    def _text(self, message: Any, decoded: Any) -> None:
        if message.msgtype != STRING:
            raise BagError(f"topic '{message.topic}' has type {message.msgtype}; expected {STRING}")
        self.collector.add_text(ns_to_seconds(message.log_time_ns), decoded.data)


def extract_embeddings(bag_path: str | Path, encoders: Mapping[str, Encoder], *,
                       topics: BagTopics = BagTopics(), audio: AudioOptions = DEFAULT_AUDIO,
                       batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                       video_path: Optional[VideoPath] = None) -> BagEmbeddings:
    """Run the encoder nodes' processing over a bag; one pass in log-time order.

    ``video_path``: the video node's face path (:meth:`NodeSettings.video_path`); None encodes
    whole frames (the ``full_frame`` path, one person).
    """
    collector = EmbeddingCollector(encoders, batch_size=batch_size,
                                   silence_threshold_dbfs=audio.silence_threshold_dbfs, video_path=video_path)
    result = BagEmbeddings(identities={m: e.identity for m, e in encoders.items()}, counts=collector.counts,
                           collector=collector)
    with BagReader(bag_path) as bag:
        wanted = _bag_inputs(bag, encoders, topics, collector.counts)
        feeder = _BagFeeder(collector, encoders, audio, result.video_stamps_ns)
        bar = _progress(bag.message_count(list(wanted)), f'features {Path(bag_path).name}', progress)
        for message, decoded in bag.messages(list(wanted)):
            bar.update(1)
            feeder.feed(wanted[message.topic], message, decoded)
        bar.close()
    result.embeddings = {m: items for m, items in collector.finish().items() if m in encoders}
    return result


def _frame_or_none(msgtype: str, decoded: Any, counts: dict) -> Optional[np.ndarray]:
    try:
        if msgtype == IMAGE:
            return image_to_rgb(decoded.encoding, decoded.height, decoded.width, decoded.step,
                                decoded.is_bigendian, decoded.data)
        if msgtype == COMPRESSED_IMAGE:
            return compressed_to_rgb(decoded.format, decoded.data)
    except ImageDecodeError:
        counts['image_decode_errors'] = counts.get('image_decode_errors', 0) + 1
        return None
    raise BagError(f'image topic has type {msgtype}; expected {IMAGE} or {COMPRESSED_IMAGE}')


# ---------------------------------------------------------------- labels

def ground_truth(bag_path: str | Path, topic: str) -> Optional[dict]:
    """``{stream_id: (stamps_ns (K,), values (K, 2))}`` of a ValenceArousal topic; None if it is absent."""
    with BagReader(bag_path) as bag:
        name = bag.find_topic(topic)
        if name is None:
            return None
        if bag.topics[name].msgtype != VALENCE_AROUSAL:
            raise BagError(f"ground-truth topic '{name}' has type {bag.topics[name].msgtype}; "
                           f'expected {VALENCE_AROUSAL}')
        streams: dict = {}
        for _, decoded in bag.messages([name]):
            stamps, values = streams.setdefault(str(decoded.stream_id), ([], []))
            stamps.append(time_to_ns(decoded.header.stamp))
            values.append((float(decoded.valence), float(decoded.arousal)))
    return {stream: (np.array(stamps, np.int64), np.array(values, np.float32).reshape(-1, 2))
            for stream, (stamps, values) in streams.items()}


def labels_from_topic(bag_path: str | Path, topic: str, video_stamps_ns: Sequence[int],
                      tolerance_s: float = LABEL_STAMP_TOLERANCE_S,
                      stream_id: Optional[str] = None) -> Optional[np.ndarray]:
    """(N, 2) labels for the video frames from a ValenceArousal topic; None if the topic is absent.

    ``stream_id``: the person whose ground truth to use; None takes every message (one person),
    and then a topic holding several stream ids is an error (whose labels would it be?).
    """
    streams = ground_truth(bag_path, topic)
    if streams is None:
        return None
    if stream_id is None:
        if len(streams) > 1:
            raise BagError(f"ground-truth topic '{topic}' of '{bag_path}' holds several people "
                           f'({", ".join(sorted(streams))}): track several faces (video node parameter '
                           f'max_faces) to prepare one session per person')
        stream_id = next(iter(streams), '')
    stamps, values = streams.get(stream_id, (np.zeros(0, np.int64), np.zeros((0, 2), np.float32)))
    return _match_labels(stamps, values, np.asarray(video_stamps_ns, np.int64), tolerance_s)


def labels_from_csv(csv_path: str | Path, video_stamps_ns: Sequence[int],
                    tolerance_s: float = LABEL_STAMP_TOLERANCE_S) -> np.ndarray:
    """(N, 2) labels for the bag's video frames from a CSV with a header row and the columns
    ``valence`` and ``arousal`` plus one of:

    * ``stamp``: seconds on the image stamps' clock (ROS time), matched within ``tolerance_s``;
    * ``frame``: the 0-based index of the video frame in the bag;
    * ``time``: seconds since the first video frame (the convention of ``prepare video``);
    * none of them: one row per video frame, in order.

    Frames without a row are unlabelled (NaN); so are values outside [-1, 1].
    """
    from affective_trm_ros.offline.extraction.video_csv import labels_for_frames, read_label_csv

    path = Path(csv_path)
    video = np.asarray(video_stamps_ns, np.int64)
    with open(path, newline='') as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower() for name in (reader.fieldnames or ())}
        rows = [{k.strip().lower(): v for k, v in row.items() if k} for row in reader]
    if not {'valence', 'arousal'} <= columns:
        raise ValueError(f"{path}: expected columns 'valence', 'arousal' and optionally 'stamp', 'frame' or "
                         f"'time'; found {sorted(columns)}")
    if 'stamp' not in columns and 'frame' not in columns:
        times, values = read_label_csv(path)
        frame_times = (video - video[0]) / 1e9 if video.size else np.zeros(0)
        fps = 1.0 / float(np.median(np.diff(frame_times))) if video.size > 1 else 30.0
        return labels_for_frames(frame_times, times, values, fps)
    values = np.array([(float(r['valence']), float(r['arousal'])) for r in rows], np.float32).reshape(-1, 2)
    values[(values < -1.0) | (values > 1.0)] = np.nan
    if 'frame' in columns:
        labels = np.full((len(video), 2), np.nan, np.float32)
        for row, value in zip(rows, values):
            index = int(row['frame'])
            if not 0 <= index < len(video):
                raise ValueError(f"{path}: frame {index} is outside the bag's {len(video)} video frames")
            labels[index] = value
        return labels
    stamps = np.array([round(float(r['stamp']) * 1e9) for r in rows], np.int64)
    return _match_labels(stamps, values, video, tolerance_s)


def _match_labels(stamps_ns: np.ndarray, values: np.ndarray, video_ns: np.ndarray,
                  tolerance_s: float) -> np.ndarray:
    labels = np.full((len(video_ns), 2), np.nan, np.float32)
    if stamps_ns.size == 0 or video_ns.size == 0:
        return labels
    order = np.argsort(stamps_ns, kind='stable')
    stamps_ns, values = stamps_ns[order], values[order]
    right = np.clip(np.searchsorted(stamps_ns, video_ns), 0, len(stamps_ns) - 1)
    left = np.clip(right - 1, 0, len(stamps_ns) - 1)
    nearest = np.where(np.abs(stamps_ns[left] - video_ns) <= np.abs(stamps_ns[right] - video_ns), left, right)
    close = np.abs(stamps_ns[nearest] - video_ns) <= tolerance_s * 1e9
    labels[close] = values[nearest[close]]
    return np.clip(labels, -1.0, 1.0)


# ---------------------------------------------------------------- into the feature store

@dataclass
class PreparedBag:
    session_id: str
    frames: int
    labelled_frames: int
    skipped: bool              # already in the store with the same fingerprint
    counts: dict = field(default_factory=dict)
    stream_id: Optional[str] = None  # the person, when the bag held several


def session_id_for(bag_path: str | Path) -> str:
    """A feature-store session id from a bag directory name."""
    name = _SESSION_ID_UNSAFE.sub('_', Path(bag_path).resolve().name).strip('._-')
    return name or 'session'


def bag_files(bag_path: str | Path) -> list:
    """(name, size, mtime) of a bag's files: changes whenever the bag is rewritten."""
    return sorted((p.name, p.stat().st_size, int(p.stat().st_mtime))
                  for p in Path(bag_path).iterdir() if p.is_file())


def preparation_fingerprint(bag_path: str | Path, encoders: Mapping[str, Encoder], aligner_config,
                            topics: BagTopics, audio: AudioOptions, labels_csv) -> str:
    """Hash of everything the prepared features depend on (bag files' names, sizes and mtimes)."""
    payload = {
        'version': PREPARATION_VERSION, 'bag': bag_files(bag_path),
        'encoders': {m: [e.identity, repr(sorted(getattr(e, 'options', {}).items()))]
                     for m, e in encoders.items()},
        'alignment': asdict(aligner_config), 'topics': asdict(topics), 'audio': asdict(audio),
        'labels_csv': _file_fingerprint(labels_csv),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_fingerprint(path) -> Optional[list]:
    if path is None:
        return None
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, int(stat.st_mtime)]


def prepare_bag(bag_path: str | Path, store: FeatureStore, encoders: Mapping[str, Encoder],
                aligner_config: Optional[AlignmentConfig] = None, **options: Any) -> PreparedBag:
    """Extract, align and label a one-person bag and write it into ``store`` as one session.

    See :func:`prepare_bag_sessions` for the options; a bag in which several faces were tracked
    is an error here.
    """
    sessions = prepare_bag_sessions(bag_path, store, encoders, aligner_config, **options)
    if len(sessions) != 1:
        raise ValueError(f"bag '{bag_path}' gave {len(sessions)} sessions (one per tracked face); "
                         f'use prepare_bag_sessions')
    return sessions[0]


def prepare_bag_sessions(bag_path: str | Path, store: FeatureStore, encoders: Mapping[str, Encoder],
                         aligner_config: Optional[AlignmentConfig] = None, *,
                         session_id: Optional[str] = None, speaker: Optional[str] = None,
                         labels_csv: Optional[str | Path] = None,
                         topics: BagTopics = BagTopics(), audio: AudioOptions = DEFAULT_AUDIO,
                         batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                         overwrite: bool = False, video_path: Optional[VideoPath] = None) -> list:
    """Extract, align and label one bag and write one session per person into ``store``.

    With one person (the video node's single-person mode) the session is ``session_id`` (default:
    the bag folder's name). When the video path tracks several faces, every face's stream becomes
    the session ``<session_id>_<stream_id>``: its own video embeddings, the shared audio and text
    aligned to them, and the ground truth whose ``ValenceArousal.stream_id`` is that stream's id.
    ``encoders`` must match the store's encoder spec. Labels come from ``labels_csv`` (one person
    only), else from the ground-truth topic, else NaN; labels that cover no frame are an error.
    Returns one :class:`PreparedBag` per session.
    """
    aligner_config = aligner_config or AlignmentConfig()
    _check_against_store(store, encoders)
    session_id = session_id or session_id_for(bag_path)
    fingerprint = preparation_fingerprint(bag_path, encoders, aligner_config, topics, audio, labels_csv)
    if not overwrite:
        stored = _stored_sessions(store, session_id, fingerprint)
        if stored:
            return stored
    embeddings = extract_embeddings(bag_path, encoders, topics=topics, audio=audio, batch_size=batch_size,
                                    progress=progress, video_path=video_path)
    if not embeddings.video_stamps_ns:
        raise BagError(f"bag '{bag_path}' holds no video frames on '{topics.image}': the fusion is "
                       f'clocked by video, so there is nothing to prepare')
    streams = embeddings.streams()
    several = len(streams) > 1
    if several and labels_csv is not None:
        raise ValueError(f'--labels {labels_csv} describes one person, but {len(streams)} faces were '
                         f"tracked in '{bag_path}'; label several people with the ground-truth topic's "
                         f'stream_id')
    results = []
    for stream in streams:
        name = f'{session_id}_{stream}' if several else session_id
        results.append(_write_stream(store, name, bag_path, embeddings, stream if several else None,
                                     aligner_config, speaker=speaker, labels_csv=labels_csv, topics=topics,
                                     audio=audio, fingerprint=fingerprint, bag_session=session_id))
    return results


def _stored_sessions(store: FeatureStore, session_id: str, fingerprint: str) -> list:
    """The sessions an earlier run prepared from this bag with the same fingerprint (else [])."""
    names = [s for s in store.session_ids() if s == session_id or s.startswith(f'{session_id}_')]
    found = []
    for name in names:
        stored = store.load(name)
        same_bag = stored.meta.get('bag_session', session_id) == session_id
        if stored.meta.get('fingerprint') == fingerprint and same_bag:
            labelled = int(np.all(np.isfinite(stored.labels), axis=1).sum())
            found.append(PreparedBag(name, len(stored), labelled, skipped=True,
                                     counts=stored.meta.get('counts', {}),
                                     stream_id=stored.meta.get('stream_id')))
    return found


def _write_stream(store: FeatureStore, name: str, bag_path, embeddings: BagEmbeddings, stream: Optional[str],
                  aligner_config: AlignmentConfig, *, speaker, labels_csv, topics: BagTopics,
                  audio: AudioOptions, fingerprint: str, bag_session: str) -> PreparedBag:
    """Align one stream (person) of an extracted bag, label it and write it as session ``name``."""
    timestamps, features, mask, resets = align_embeddings(embeddings.events(stream), aligner_config,
                                                          store.dims)
    frame_labels, label_source = _frame_labels(bag_path, embeddings.video_stamps_ns, labels_csv, topics,
                                               stream)
    by_stamp = {ns_to_seconds(ns): frame_labels[i] for i, ns in enumerate(embeddings.video_stamps_ns)}
    labels = np.array([by_stamp.get(t, (np.nan, np.nan)) for t in timestamps], np.float32).reshape(-1, 2)
    where = f"bag '{bag_path}'" + (f" (stream '{stream}')" if stream else '')
    labelled_fraction = check_label_coverage(labels, label_source, where, timestamps)
    counts = dict(embeddings.counts)
    counts['resets'] = int(resets.sum())
    meta = {
        'source': 'rosbag', 'bag': str(Path(bag_path).resolve()), 'bag_files': bag_files(bag_path),
        'fingerprint': fingerprint, 'bag_session': bag_session, 'stream_id': stream,
        'encoders': embeddings.identities, 'labels': label_source, 'labelled_fraction': labelled_fraction,
        'counts': counts, 'reset_frames': [int(i) for i in np.flatnonzero(resets)],
        'alignment': asdict(aligner_config), 'audio': asdict(audio), 'topics': asdict(topics),
    }
    store.write_session(name, speaker=speaker or name, timestamps=timestamps,
                        features=features, mask=mask, labels=labels, meta=meta)
    labelled = int(np.all(np.isfinite(labels), axis=1).sum())
    return PreparedBag(name, len(timestamps), labelled, skipped=False, counts=counts, stream_id=stream)


def _frame_labels(bag_path, video_stamps_ns: list, labels_csv, topics: BagTopics,
                  stream: Optional[str] = None) -> tuple:
    """(labels per video frame (N, 2), where they came from or None)."""
    if labels_csv is not None:
        return labels_from_csv(labels_csv, video_stamps_ns), str(labels_csv)
    unlabelled = np.full((len(video_stamps_ns), 2), np.nan, np.float32), None
    if stream is not None and stream not in (ground_truth(bag_path, topics.ground_truth) or {}):
        return unlabelled  # a tracked face nobody annotated
    frame_labels = labels_from_topic(bag_path, topics.ground_truth, video_stamps_ns, stream_id=stream)
    return unlabelled if frame_labels is None else (frame_labels, topics.ground_truth)


def _check_against_store(store: FeatureStore, encoders: Mapping[str, Encoder]) -> None:
    have = [(e['modality'], e['encoder'], int(e['dim'])) for e in encoder_spec(encoders)]
    want = [(e['modality'], e['encoder'], int(e['dim'])) for e in store.encoder_spec]
    if have != want:
        raise ValueError(f'encoders {have} do not match the feature store {store.root}, which holds {want}')


def _progress(total: int, description: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit='msg', leave=False, disable=not enabled, mininterval=1.0)
