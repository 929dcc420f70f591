"""Offline features from a rosbag: the nodes' code path, run over a recording.

:func:`extract_embeddings` turns a bag's raw topics into per-modality embeddings exactly as the
encoder nodes do — ``core.image`` conversion, ``core.audio`` decoding/windowing/silence gate,
``core.utterance`` text preparation and the same encoder plugins — stamping them the way the
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
import inspect
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from affective_trm_ros.core.alignment import AlignmentConfig, align_events, steps_to_arrays
from affective_trm_ros.core.audio import (
    DEFAULT_HOP_S,
    DEFAULT_SILENCE_THRESHOLD_DBFS,
    DEFAULT_WINDOW_S,
    AudioDecodeError,
    AudioFormat,
    AudioStreamProcessor,
    embed_windows,
)
from affective_trm_ros.core.encoders.base import Encoder, load_encoder
from affective_trm_ros.core.image import ImageDecodeError, compressed_to_rgb, image_to_rgb
from affective_trm_ros.core.modalities import AUDIO, FEATURE_ORDER, TEXT, VIDEO
from affective_trm_ros.core.utterance import prepare_utterance
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

PREPARATION_VERSION = 1  # bump when the same inputs would give different features
# Frames are encoded in batches of this size offline (the node encodes one at a time; plugins give
# the same numbers either way).
DEFAULT_BATCH_SIZE = 16
# A ground-truth message labels the video frame whose stamp is within this of its own.
LABEL_STAMP_TOLERANCE_S = 0.010
_SESSION_ID_UNSAFE = re.compile(r'[^A-Za-z0-9._-]+')


@dataclass(frozen=True)
class BagTopics:
    """Topic names in the bag (with or without the leading '/')."""

    image: str = 'image_raw'
    compressed_image: str = 'image_raw/compressed'  # used when `image` is not recorded
    audio: str = 'audio'
    audio_info: str = 'audio_info'
    speech: str = 'speech'
    ground_truth: str = 'affect/ground_truth'


@dataclass(frozen=True)
class AudioOptions:
    """The audio node's windowing parameters (and the stream format when the bag has no audio_info)."""

    window_s: float = DEFAULT_WINDOW_S
    hop_s: float = DEFAULT_HOP_S
    silence_threshold_dbfs: float = DEFAULT_SILENCE_THRESHOLD_DBFS
    sample_rate: int = 16000
    channels: int = 1
    sample_format: str = 'S16LE'


@dataclass
class BagEmbeddings:
    """Per-modality embeddings of one bag, in stamp order: lists of (stamp_s, vector | None)."""

    embeddings: dict = field(default_factory=dict)
    identities: dict = field(default_factory=dict)   # modality -> '<plugin>@<weights>'
    video_stamps_ns: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)       # decode errors, silent windows, ...

    def events(self) -> list:
        """(modality, stamp_s, vector|None) events for core.alignment.align_events."""
        return [(modality, stamp, vector) for modality, items in self.embeddings.items()
                for stamp, vector in items]


def ns_to_s(stamp_ns: int) -> float:
    """Stamp in seconds as the nodes compute it from a builtin_interfaces/Time (sec + nanosec)."""
    return int(stamp_ns // 1_000_000_000) + int(stamp_ns % 1_000_000_000) * 1e-9


def load_encoders(plugins: Mapping[str, str], *, device: str = 'cpu', allow_untrained: bool = False,
                  options: Optional[Mapping[str, dict]] = None) -> dict:
    """modality -> plugin id  ==>  modality -> loaded Encoder (FEATURE_ORDER)."""
    options = options or {}
    encoders = {}
    for modality in FEATURE_ORDER:
        if modality in plugins:
            encoder = load_encoder(plugins[modality], device=device, allow_untrained=allow_untrained,
                                   **dict(options.get(modality, {})))
            if encoder.modality != modality:
                raise ValueError(f"encoder '{plugins[modality]}' encodes {encoder.modality}, not {modality}")
            encoders[modality] = encoder
    unknown = set(plugins) - set(FEATURE_ORDER)
    if unknown:
        raise ValueError(f'unknown modalities {sorted(unknown)}; expected some of {FEATURE_ORDER}')
    return encoders


def encoder_spec(encoders: Mapping[str, Encoder]) -> list:
    """The feature store / checkpoint encoder spec of loaded encoders (plus their identities)."""
    return [{'modality': m, 'encoder': encoders[m].plugin_id, 'dim': int(encoders[m].dim),
             'identity': encoders[m].identity} for m in FEATURE_ORDER if m in encoders]


# ---------------------------------------------------------------- the nodes' settings, offline

# Node parameters each encoder node offers to its plugin (when the plugin's constructor takes them).
VIDEO_NODE_OPTIONS = ('detector', 'face_margin', 'min_face_size', 'min_face_confidence')


def node_parameters(node: str, system_config=None, overrides: Optional[Mapping[str, Any]] = None,
                    config_directory=None) -> dict:
    """The parameters ``node`` runs with: its config/<node>.yaml, the system file, then ``overrides``.

    Parameter files are read the way ``--params-file`` applies them: the ``ros__parameters`` of
    every section whose key matches the node ('/**', '/**/<node>', '<node>', '/<node>').
    """
    import yaml

    from affective_trm_ros.system import NODES_BY_NAME, SYSTEM_CONFIG, config_dir, parameter_files

    directory = Path(config_directory) if config_directory else config_dir()
    system_config = Path(system_config) if system_config else directory / SYSTEM_CONFIG
    values: dict = {}
    for path in parameter_files(NODES_BY_NAME[node], system_config if system_config.is_file() else None,
                                directory):
        document = yaml.safe_load(Path(path).read_text()) or {}
        for key, section in document.items():
            if key in ('/**', f'/**/{node}', node, f'/{node}') and isinstance(section, dict):
                values.update(section.get('ros__parameters') or {})
    values.update(overrides or {})
    return values


@dataclass
class NodeSettings:
    """What offline extraction needs to match the nodes: plugins, their options, windowing, alignment."""

    plugins: dict            # modality -> plugin id
    options: dict            # modality -> plugin constructor options (as the node passes them)
    allow_untrained: dict    # modality -> bool
    audio: AudioOptions
    alignment: AlignmentConfig
    weights: dict = field(default_factory=dict)  # modality -> explicit weight path (None = the cache)

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Mapping[str, Any]],
                        modalities=FEATURE_ORDER) -> NodeSettings:
        """From effective node parameters: {'video_encoder': {...}, 'audio_encoder': {...}, ...}."""
        from affective_trm_ros.core.encoders.base import encoder_class

        plugins, options, untrained, weights = {}, {}, {}, {}
        for modality in modalities:
            params = dict(parameters.get(f'{modality}_encoder', {}))
            if not params:
                continue
            plugins[modality] = str(params['plugin'])
            offered = {}
            if modality == VIDEO:
                offered = {name: params[name] for name in VIDEO_NODE_OPTIONS if name in params}
            elif modality == AUDIO and 'silence_threshold_dbfs' in params:
                offered = {'silence_threshold': 10.0 ** (float(params['silence_threshold_dbfs']) / 20.0)}
            accepted = inspect.signature(encoder_class(plugins[modality]).__init__).parameters
            takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
            offered = {k: v for k, v in offered.items() if takes_any or k in accepted}
            options[modality] = {**offered, **json.loads(params.get('encoder_options', '{}') or '{}')}
            untrained[modality] = bool(params.get('allow_untrained', False))
            weights[modality] = str(params.get('weights', '') or '') or None
        audio_params = dict(parameters.get('audio_encoder', {}))
        defaults = AudioOptions()
        audio = AudioOptions(**{f: type(getattr(defaults, f))(audio_params[f]) for f in
                                ('window_s', 'hop_s', 'silence_threshold_dbfs', 'sample_rate', 'channels',
                                 'sample_format') if f in audio_params})
        alignment = AlignmentConfig.from_parameters(dict(parameters.get('fusion', {})),
                                                    wait_for_audio=AUDIO in plugins)
        return cls(plugins, options, untrained, audio, alignment, weights)

    def load_encoders(self, device: str = 'cpu') -> dict:
        """The encoders, constructed exactly as the nodes construct theirs."""
        encoders = {}
        for modality in FEATURE_ORDER:
            if modality in self.plugins:
                options = dict(self.options[modality])
                if self.weights.get(modality):
                    options['weights'] = self.weights[modality]
                encoders.update(load_encoders({modality: self.plugins[modality]}, device=device,
                                              allow_untrained=self.allow_untrained[modality],
                                              options={modality: options}))
        return encoders


# ---------------------------------------------------------------- extraction

class _Batcher:
    """Collects inputs with their stamps and encodes them batch by batch."""

    def __init__(self, encode, batch_size: int, sink: list) -> None:
        self._encode = encode
        self._batch_size = batch_size
        self._stamps: list = []
        self._inputs: list = []
        self._sink = sink

    def add(self, stamp_s: float, item: Any) -> None:
        self._stamps.append(stamp_s)
        self._inputs.append(item)
        if len(self._inputs) >= self._batch_size:
            self.flush()

    def flush(self) -> None:
        if self._inputs:
            vectors = self._encode(self._inputs)
            self._sink.extend(zip(self._stamps, vectors))
            self._stamps, self._inputs = [], []


def _encode_rows(encoder: Encoder):
    """encode_batch -> list of vectors (None for invalid rows)."""
    def encode(inputs: list) -> list:
        result = encoder.encode_batch(inputs)
        return [np.asarray(result.embeddings[i], np.float32) if result.valid[i] else None
                for i in range(len(inputs))]
    return encode


def _encode_frames(encoder: Encoder):
    """Video: frames that failed to decode (None) become invalid embeddings, like in the node."""
    encode_rows = _encode_rows(encoder)

    def encode(frames: list) -> list:
        decodable = [i for i, frame in enumerate(frames) if frame is not None]
        vectors: list = [None] * len(frames)
        for i, vector in zip(decodable, encode_rows([frames[i] for i in decodable]) if decodable else []):
            vectors[i] = vector
        return vectors
    return encode


def extract_embeddings(bag_path: str | Path, encoders: Mapping[str, Encoder], *,
                       topics: BagTopics = BagTopics(), audio: AudioOptions = AudioOptions(),
                       batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False) -> BagEmbeddings:
    """Run the encoder nodes' processing over a bag; one pass in log-time order."""
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    result = BagEmbeddings(identities={m: e.identity for m, e in encoders.items()})
    counts = result.counts
    with BagReader(bag_path) as bag:
        wanted = {}
        if VIDEO in encoders:
            image_topic = bag.find_topic(topics.image) or bag.find_topic(topics.compressed_image)
            if image_topic is None:
                bag.require([topics.image])
            wanted[image_topic] = VIDEO
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
        sinks = {m: result.embeddings.setdefault(m, []) for m in encoders}
        batchers = {}
        if VIDEO in encoders:
            batchers[VIDEO] = _Batcher(_encode_frames(encoders[VIDEO]), batch_size, sinks[VIDEO])
        if TEXT in encoders:
            batchers[TEXT] = _Batcher(_encode_rows(encoders[TEXT]), batch_size, sinks[TEXT])
        audio_fmt = AudioFormat(audio.sample_rate, audio.channels, audio.sample_format)
        processor = None
        pending_windows: list = []
        if AUDIO in encoders:
            processor = AudioStreamProcessor(sample_rate_out=int(encoders[AUDIO].sample_rate or 16000),
                                             window_s=audio.window_s, hop_s=audio.hop_s)

        def flush_audio() -> None:
            if pending_windows:
                for item in embed_windows(encoders[AUDIO], pending_windows, audio.silence_threshold_dbfs):
                    sinks[AUDIO].append((item.end_stamp_s, item.vector))
                    counts[f'audio_{item.reason}'] = counts.get(f'audio_{item.reason}', 0) + 1
                pending_windows.clear()

        bar = _progress(bag.message_count(list(wanted)), f'features {Path(bag_path).name}', progress)
        for message, decoded in bag.messages(list(wanted)):
            kind = wanted[message.topic]
            bar.update(1)
            if kind == VIDEO:
                stamp_ns = time_to_ns(decoded.header.stamp)
                result.video_stamps_ns.append(stamp_ns)
                batchers[VIDEO].add(ns_to_s(stamp_ns), _frame_or_none(message.msgtype, decoded, counts))
            elif kind == 'audio_info':
                audio_fmt = AudioFormat(int(decoded.sample_rate), int(decoded.channels),
                                        str(decoded.sample_format), str(decoded.coding_format))
            elif kind == AUDIO:
                try:
                    if message.msgtype == AUDIO_DATA_STAMPED:
                        windows = processor.process(decoded.audio.data, audio_fmt,
                                                    ns_to_s(time_to_ns(decoded.header.stamp)))
                    elif message.msgtype == AUDIO_DATA:
                        windows = processor.process_headerless(decoded.data, audio_fmt,
                                                               ns_to_s(message.log_time_ns))
                    else:
                        raise BagError(f"topic '{message.topic}' has type {message.msgtype}; "
                                       f'expected {AUDIO_DATA_STAMPED} or {AUDIO_DATA}')
                except AudioDecodeError:
                    counts['audio_decode_errors'] = counts.get('audio_decode_errors', 0) + 1
                    continue
                pending_windows.extend(windows)
                if len(pending_windows) >= batch_size:
                    flush_audio()
            elif kind == TEXT:
                if message.msgtype != STRING:
                    raise BagError(f"topic '{message.topic}' has type {message.msgtype}; expected {STRING}")
                text, truncated = prepare_utterance(decoded.data)
                counts['text_truncated'] = counts.get('text_truncated', 0) + int(truncated)
                batchers[TEXT].add(ns_to_s(message.log_time_ns), text)
        for batcher in batchers.values():
            batcher.flush()
        flush_audio()
        bar.close()
    for modality, items in result.embeddings.items():
        items.sort(key=lambda item: item[0])
        counts[f'{modality}_embeddings'] = len(items)
        counts[f'{modality}_valid'] = sum(vector is not None for _, vector in items)
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

def labels_from_topic(bag_path: str | Path, topic: str, video_stamps_ns: Sequence[int],
                      tolerance_s: float = LABEL_STAMP_TOLERANCE_S) -> Optional[np.ndarray]:
    """(N, 2) labels for the video frames from a ValenceArousal topic; None if the topic is absent."""
    with BagReader(bag_path) as bag:
        name = bag.find_topic(topic)
        if name is None:
            return None
        if bag.topics[name].msgtype != VALENCE_AROUSAL:
            raise BagError(f"ground-truth topic '{name}' has type {bag.topics[name].msgtype}; "
                           f'expected {VALENCE_AROUSAL}')
        stamps, values = [], []
        for _, decoded in bag.messages([name]):
            stamps.append(time_to_ns(decoded.header.stamp))
            values.append((float(decoded.valence), float(decoded.arousal)))
    return _match_labels(np.array(stamps, np.int64), np.array(values, np.float32).reshape(-1, 2),
                         np.asarray(video_stamps_ns, np.int64), tolerance_s)


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
                aligner_config: Optional[AlignmentConfig] = None, *, session_id: Optional[str] = None,
                speaker: Optional[str] = None, labels_csv: Optional[str | Path] = None,
                topics: BagTopics = BagTopics(), audio: AudioOptions = AudioOptions(),
                batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                overwrite: bool = False) -> PreparedBag:
    """Extract, align and label one bag and write it into ``store`` as one session.

    ``encoders`` must match the store's encoder spec (same modalities, plugin ids and dims).
    Labels come from ``labels_csv`` when given, else from the ground-truth topic, else NaN.
    """
    aligner_config = aligner_config or AlignmentConfig()
    _check_against_store(store, encoders)
    session_id = session_id or session_id_for(bag_path)
    fingerprint = preparation_fingerprint(bag_path, encoders, aligner_config, topics, audio, labels_csv)
    if not overwrite and store.has(session_id):
        stored = store.load(session_id)
        if stored.meta.get('fingerprint') == fingerprint:
            return PreparedBag(session_id, len(stored), int(np.all(np.isfinite(stored.labels), axis=1).sum()),
                               skipped=True, counts=stored.meta.get('counts', {}))
    embeddings = extract_embeddings(bag_path, encoders, topics=topics, audio=audio,
                                    batch_size=batch_size, progress=progress)
    if not embeddings.video_stamps_ns:
        raise BagError(f"bag '{bag_path}' holds no video frames on '{topics.image}': the fusion is "
                       f'clocked by video, so there is nothing to prepare')
    steps = align_events(embeddings.events(), aligner_config)
    timestamps, features, mask, resets = steps_to_arrays(steps, store.dims)
    if labels_csv is not None:
        frame_labels, label_source = labels_from_csv(labels_csv, embeddings.video_stamps_ns), str(labels_csv)
    else:
        frame_labels = labels_from_topic(bag_path, topics.ground_truth, embeddings.video_stamps_ns)
        label_source = topics.ground_truth if frame_labels is not None else None
        if frame_labels is None:
            frame_labels = np.full((len(embeddings.video_stamps_ns), 2), np.nan, np.float32)
    by_stamp = {ns_to_s(ns): frame_labels[i] for i, ns in enumerate(embeddings.video_stamps_ns)}
    labels = np.array([by_stamp.get(t, (np.nan, np.nan)) for t in timestamps], np.float32).reshape(-1, 2)
    counts = dict(embeddings.counts)
    counts['resets'] = int(resets.sum())
    meta = {
        'source': 'rosbag', 'bag': str(Path(bag_path).resolve()), 'bag_files': bag_files(bag_path),
        'fingerprint': fingerprint,
        'encoders': embeddings.identities, 'labels': label_source, 'counts': counts,
        'reset_frames': [int(i) for i in np.flatnonzero(resets)],
        'alignment': asdict(aligner_config), 'audio': asdict(audio), 'topics': asdict(topics),
    }
    store.write_session(session_id, speaker=speaker or session_id, timestamps=timestamps,
                        features=features, mask=mask, labels=labels, meta=meta)
    labelled = int(np.all(np.isfinite(labels), axis=1).sum())
    return PreparedBag(session_id, len(timestamps), labelled, skipped=False, counts=counts)


def _check_against_store(store: FeatureStore, encoders: Mapping[str, Encoder]) -> None:
    have = [(e['modality'], e['encoder'], int(e['dim'])) for e in encoder_spec(encoders)]
    want = [(e['modality'], e['encoder'], int(e['dim'])) for e in store.encoder_spec]
    if have != want:
        raise ValueError(f'encoders {have} do not match the feature store {store.root}, which holds {want}')


def _progress(total: int, description: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit='msg', leave=False, disable=not enabled, mininterval=1.0)
