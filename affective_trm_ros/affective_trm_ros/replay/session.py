"""One replay evaluation: play a rosbag through the real nodes in this process and write the report.

The encoder nodes and the fusion node are built in this process (the same nodes and parameter
files as ``affective-trm run``) with ``use_sim_time``; the replay driver node
(:mod:`affective_trm_ros.replay.driver`) publishes the bag on simulated time and records every
estimate; :mod:`affective_trm_ros.replay.report` turns the record into the report.
:func:`replay_bag` is the entry point (``affective-trm replay`` and the main job call it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from affective_trm_ros.core.modalities import AUDIO, FEATURE_ORDER, TEXT, VIDEO
from affective_trm_ros.offline.extraction.bag import (
    BagTopics,
    ground_truth,
    labels_from_csv,
    labels_from_topic,
)
from affective_trm_ros.offline.io.bags import (
    AUDIO_DATA,
    AUDIO_DATA_STAMPED,
    AUDIO_INFO,
    COMPRESSED_IMAGE,
    IMAGE,
    STRING,
    BagError,
    BagReader,
)

# Node input topics (relative, as the nodes subscribe by default).
NODE_TOPICS = {'image': 'image_raw', 'compressed_image': 'image_raw/compressed', 'audio': 'audio',
               'audio_info': 'audio_info', 'speech': 'speech'}
TOPIC_ROLES = ('image', 'compressed_image', 'audio', 'audio_info', 'speech', 'ground_truth')
EXPECTED_TYPES = {'image': (IMAGE,), 'compressed_image': (COMPRESSED_IMAGE,),
                  'audio': (AUDIO_DATA_STAMPED, AUDIO_DATA), 'audio_info': (AUDIO_INFO,), 'speech': (STRING,)}


@dataclass
class ReplayOptions:
    """How to replay (defaults: as fast as possible on CPU, nodes configured from config/)."""

    realtime: bool = False
    rate: float = 1.0
    device: str = 'cpu'
    allow_untrained: bool = False
    config: Optional[Path] = None              # system parameter file (default config/affective_trm.yaml)
    parameters: dict = field(default_factory=dict)   # node -> {parameter: value}, over everything
    topics: BagTopics = field(default_factory=BagTopics)
    labels_csv: Optional[Path] = None
    timeout_s: float = 120.0
    record_embeddings: bool = False
    progress: bool = True
    title: str = ''


@dataclass
class ReplayOutcome:
    record: object          # replay.driver.ReplayRecord
    table: object           # replay.report.FrameTable
    report: dict
    files: dict


def bag_inputs(bag: BagReader, topics: BagTopics, modalities) -> dict:
    """role -> (bag topic, message type) for the raw inputs the running nodes need."""
    roles = {}
    if VIDEO in modalities:
        image = bag.find_topic(topics.image)
        if image is not None:
            roles['image'] = image
        else:
            compressed = bag.find_topic(topics.compressed_image)
            if compressed is None:
                bag.require([topics.image])
            roles['compressed_image'] = compressed
    if AUDIO in modalities:
        for role in ('audio', 'audio_info'):
            found = bag.find_topic(getattr(topics, role))
            if found is not None:
                roles[role] = found
    if TEXT in modalities and bag.find_topic(topics.speech) is not None:
        roles['speech'] = bag.find_topic(topics.speech)
    inputs = {}
    for role, topic in roles.items():
        msgtype = bag.topics[topic].msgtype
        if msgtype not in EXPECTED_TYPES[role]:
            raise BagError(f"bag topic '{topic}' has type {msgtype}; the {role} input takes "
                           f"{' or '.join(EXPECTED_TYPES[role])}")
        inputs[role] = (topic, msgtype)
    return inputs


def node_parameters(spec: list, options: ReplayOptions, inputs: dict) -> dict:
    """Parameters of the nodes for a replay of a checkpoint with encoder ``spec``."""
    parameters: dict = {}
    for entry in spec:
        node = f"{entry['modality']}_encoder"
        parameters[node] = {'plugin': entry['encoder'], 'allow_untrained': bool(options.allow_untrained)}
    if 'video_encoder' in parameters and not options.realtime:
        parameters['video_encoder']['max_rate'] = 0.0  # back-pressure paces the frames, not a rate cap
    if 'audio_encoder' in parameters and 'audio' in inputs:
        parameters['audio_encoder']['input_type'] = ('stamped' if inputs['audio'][1] == AUDIO_DATA_STAMPED
                                                     else 'unstamped')
    for node, values in options.parameters.items():
        parameters.setdefault(node, {}).update(values)
    return parameters


#: How to get a checkpoint, for the "not found" message.
GET_A_CHECKPOINT = ('train one with `affective-trm demo` (sample sessions -> features -> training; it '
                    'prints the checkpoint path) or `affective-trm prepare` then `affective-trm train`')


@dataclass
class ReplayPlan:
    """What a replay will run, decided from the checkpoint and the bag before any node starts."""

    spec: list              # the checkpoint's encoder spec, reduced to the modalities with input
    inputs: dict            # role -> (bag topic, message type)
    modalities: list
    parameters: dict        # node -> {parameter: value}
    frame_count: int


def plan_replay(bag_path: Path, checkpoint: Path, options: ReplayOptions) -> ReplayPlan:
    """Check the checkpoint, the bag and the options; decide the nodes and their parameters."""
    from affective_trm_ros.core.checkpoint import load_checkpoint

    if not checkpoint.is_file():
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}; {GET_A_CHECKPOINT}')
    fusion = options.parameters.get('fusion', {})
    if fusion.get('sync_policy', 'video_clocked') == 'approximate':
        raise ValueError("replay evaluates every video frame, and sync_policy 'approximate' publishes only "
                         'the frames it pairs with an audio window (the others never get an estimate); '
                         "replay with the default 'video_clocked' policy, or run the approximate policy "
                         'live with `ros2 launch affective_trm_ros replay.launch.py bag:=... record:=...`')
    spec = load_checkpoint(checkpoint, device='cpu').encoder_spec
    with BagReader(bag_path) as bag:
        wanted = [e['modality'] for e in spec]
        inputs = bag_inputs(bag, options.topics, wanted)
        frame_count = bag.topics[inputs.get('image', inputs.get('compressed_image'))[0]].count
    # Run only the encoders that get input; the fusion masks the others.
    modalities = [m for m in FEATURE_ORDER if m in wanted and (
        m == VIDEO or (m == AUDIO and 'audio' in inputs) or (m == TEXT and 'speech' in inputs))]
    spec = [e for e in spec if e['modality'] in modalities]
    return ReplayPlan(spec, inputs, modalities, node_parameters(spec, options, inputs), frame_count)


def audio_windowing(audio_node) -> dict:
    """The audio node's windowing and stream-format parameters (the driver counts its windows)."""
    params = {name: audio_node.get_parameter(name).value for name in
              ('window_s', 'hop_s', 'stamp_tolerance_s', 'max_lag_s', 'sample_rate', 'channels',
               'sample_format')}
    params['sample_rate_out'] = int(getattr(audio_node.encoder, 'sample_rate', None) or 16000)
    return params


def play_through_nodes(bag_path: Path, checkpoint: Path, plan: ReplayPlan, options: ReplayOptions):
    """Build the nodes and the driver in a private context, play the bag, return the ReplayRecord."""
    import psutil
    import rclpy
    from tqdm import tqdm

    from affective_trm_ros.nodes.common import NodeThreads
    from affective_trm_ros.nodes.in_process import create_nodes
    from affective_trm_ros.replay.driver import ReplayDriver, ReplayInput

    process = psutil.Process()
    context = rclpy.Context()
    rclpy.init(context=context)
    nodes, spinning, driver = [], None, None
    try:
        nodes = create_nodes(options.config, context=context, modalities=','.join(plan.modalities),
                             checkpoint=str(checkpoint), device=options.device, use_sim_time=True,
                             parameters=plan.parameters)
        by_name = {node.get_name(): node for node in nodes}
        audio_params = audio_windowing(by_name['audio_encoder']) if 'audio_encoder' in by_name else {}
        driver_inputs = {role: (NODE_TOPICS[role], msgtype) for role, (_, msgtype) in plan.inputs.items()}
        driver = ReplayDriver(driver_inputs, context=context,
                              max_wait_s=by_name['fusion'].get_parameter('max_wait_s').value,
                              audio_params=audio_params, expect=plan.modalities,
                              record_embeddings=options.record_embeddings, timeout_s=options.timeout_s,
                              memory_probe=lambda: process.memory_info().rss / 2 ** 20,
                              node_clocks=[node.get_clock() for node in nodes])
        # One single-threaded executor per node (inference runs in the nodes' own threads): once
        # they are stopped, none of the nodes' callbacks is still running, so the nodes are
        # destroyed with nothing in flight.
        spinning = NodeThreads([*nodes, driver], context=context)
        driver.wait_for_nodes()
        role_of = {topic: role for role, (topic, _) in plan.inputs.items()}
        bar = tqdm(total=plan.frame_count, desc=f'replay {bag_path.name}', unit='frame',
                   disable=not options.progress, mininterval=1.0)
        with BagReader(bag_path) as bag:
            messages = (ReplayInput(role_of[m.topic], m.log_time_ns, m.data)
                        for m in bag.raw_messages(list(role_of)))
            record = driver.play(messages, realtime=options.realtime, rate=options.rate, progress=bar.update)
        bar.close()
    finally:
        if spinning is not None:
            spinning.stop()
        for node in nodes:
            node.destroy_node()
        if driver is not None:
            driver.destroy_node()
        context.try_shutdown()
    return record


def ground_truth_by_stream(bag_path: Path, options: ReplayOptions, frames: list) -> tuple:
    """({stream id: (N, 2) labels}, where they came from); the CSV labels count as one person."""
    if options.labels_csv is not None:
        return {'': labels_from_csv(options.labels_csv, frames)}, str(options.labels_csv)
    topic = options.topics.ground_truth
    streams = ground_truth(bag_path, topic) or {}
    return {stream: labels_from_topic(bag_path, topic, frames, stream_id=stream) for stream in streams}, topic


def replay_bag(bag_path, checkpoint, out_dir, options: Optional[ReplayOptions] = None) -> ReplayOutcome:
    """Replay ``bag_path`` through the nodes with ``checkpoint``; write the report into ``out_dir``.

    With several people (estimate streams), the report's metrics pool everyone's labelled frames
    and ``report['people']`` holds each person's metrics and coverage; the per-frame table, CSV and
    plots are those of the person with the most estimates.
    """
    from affective_trm_ros.replay.report import (
        build_replay_report,
        frame_table,
        people_report,
        people_tables,
        write_replay_report,
    )

    options = options or ReplayOptions()
    bag_path, checkpoint, out_dir = Path(bag_path), Path(checkpoint), Path(out_dir)
    plan = plan_replay(bag_path, checkpoint, options)
    record = play_through_nodes(bag_path, checkpoint, plan, options)
    frames = sorted(record.frame_publish_wall)
    truth_by_stream, labels = ground_truth_by_stream(bag_path, options, frames)
    tables = people_tables(frames, record.outputs, record.frame_publish_wall, record.embedding_wall,
                           truth_by_stream)
    table = (next(iter(tables.values())) if tables else
             frame_table(frames, record.outputs, record.frame_publish_wall, record.embedding_wall, None))
    extra = {
        'bag': str(bag_path.resolve()), 'checkpoint': str(checkpoint.resolve()),
        'labels': labels if truth_by_stream else None, 'labels_looked_for': labels,
        'republished_frames': record.republished_frames, 'memory_mb': record.memory_mb,
        'node_parameters': plan.parameters, 'device': options.device, 'session': bag_path.name,
        'frame_id': record.frame_id,
    }
    report = build_replay_report(table, wall_s=record.wall_s, mode=record.mode, encoders=record.encoders,
                                 extra=extra)
    if len(tables) > 1:
        people = people_report(tables)
        report.update(people=people['people'], metrics=people['pooled_metrics'],
                      labelled_frames=sum(p['labelled_frames'] for p in people['people'].values()),
                      shown_person=next(iter(tables)))
    title = options.title or f'Replay: {bag_path.name}'
    files = write_replay_report(out_dir, table, report, title=title, session=bag_path.name)
    return ReplayOutcome(record, table, report, files)
