"""`affective-trm replay`: play a rosbag through the real nodes and write the evaluation report.

    affective-trm replay session_100 --checkpoint trm.pt --out replay_out
    affective-trm replay robot_bag --checkpoint trm.pt --realtime --labels-csv labels.csv

The encoder nodes and the fusion node run in this process (the same nodes and parameter files as
``affective-trm run``) with ``use_sim_time``; the replay driver node publishes the bag on
simulated time (see :mod:`affective_trm_ros.replay.driver`) and records every estimate.
:func:`replay_bag` is the reusable part (the main job calls it).
"""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from affective_trm_ros.core.modalities import AUDIO, FEATURE_ORDER, TEXT, VIDEO
from affective_trm_ros.offline.extraction.bag import BagTopics, labels_from_csv, labels_from_topic
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

# Executor threads for the nodes under test: one per node is enough (inference runs in each
# encoder's own worker thread).
DEFAULT_EXECUTOR_THREADS = 4
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
    threads: int = DEFAULT_EXECUTOR_THREADS
    title: str = ''


@dataclass
class ReplayOutcome:
    record: object          # nodes.replay_driver.ReplayRecord
    table: object           # training.replay_report.FrameTable
    report: dict
    files: dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('bag', type=Path, help='rosbag2 directory (MCAP or sqlite3)')
    parser.add_argument('--checkpoint', required=True, type=Path, help='fusion checkpoint (.pt)')
    parser.add_argument('--out', type=Path, default=None,
                        help='report directory (default: outputs/replay_<bag name>)')
    parser.add_argument('--realtime', action='store_true',
                        help='publish on the recording\'s schedule instead of as fast as the nodes allow')
    parser.add_argument('--rate', type=float, default=1.0, help='--realtime speed factor (default: 1.0)')
    parser.add_argument('--device', default='cpu', help="encoders' and fusion's device (default: cpu)")
    parser.add_argument('--allow-untrained', action='store_true',
                        help='let encoders without weight files run with random weights (explicit opt-in)')
    parser.add_argument('--config', type=Path, default=None,
                        help='system parameter file (default: config/affective_trm.yaml)')
    parser.add_argument('--set', dest='assignments', action='append', default=[], metavar='NODE.PARAM=VALUE',
                        help='set one node parameter, e.g. video_encoder.detector=haar (repeatable)')
    defaults = BagTopics()
    for name in TOPIC_ROLES:
        parser.add_argument(f"--{name.replace('_', '-')}-topic", dest=f'topic_{name}',
                            default=getattr(defaults, name), metavar='TOPIC',
                            help=f"bag topic of the {name.replace('_', ' ')}")
    parser.add_argument('--labels-csv', type=Path, default=None,
                        help='labels instead of the ground-truth topic: columns valence, arousal and '
                             'stamp (ROS time), frame (index), time (s since the first frame) or none '
                             '(one row per frame)')
    parser.add_argument('--timeout', type=float, default=120.0,
                        help='seconds to wait for any one answer of the nodes (default: 120)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> int:
    from affective_trm_ros.commands.run import parse_assignments

    try:
        options = ReplayOptions(
            realtime=args.realtime, rate=args.rate, device=args.device, allow_untrained=args.allow_untrained,
            config=args.config, parameters=parse_assignments(args.assignments),
            topics=BagTopics(**{name: getattr(args, f'topic_{name}') for name in TOPIC_ROLES}),
            labels_csv=args.labels_csv, timeout_s=args.timeout, progress=not args.quiet)
        if options.rate <= 0:
            raise ValueError('--rate must be > 0')
        out_dir = args.out or Path('outputs') / f'replay_{args.bag.resolve().name}'
        outcome = replay_bag(args.bag, args.checkpoint, out_dir, options)
    except (ValueError, BagError, FileNotFoundError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    except RuntimeError as error:  # a node failed to start or stopped answering
        print(f'error: {error}', file=sys.stderr)
        return 1
    print_summary(outcome)
    return 0


def print_summary(outcome: ReplayOutcome) -> None:
    report = outcome.report
    metrics = report['metrics']
    print(f"replay ({report['mode']}): {report['frames']} frames, coverage {report['coverage'] * 100:.2f} %, "
          f"{report['throughput_fps']:.1f} frames/s, latency p50 {report['latency_ms']['p50']:.0f} ms "
          f"p95 {report['latency_ms']['p95']:.0f} ms")
    for name in ('valence', 'arousal'):
        m = metrics[name]
        print(f"  {name:8s} CCC {m['ccc']:.3f}  RMSE {m['rmse']:.3f}  Pearson {m['pearson']:.3f}  "
              f"(n={m['n']})")
    print(f"report: {outcome.files['markdown']}")


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


def replay_bag(bag_path, checkpoint, out_dir, options: Optional[ReplayOptions] = None) -> ReplayOutcome:
    """Replay ``bag_path`` through the nodes with ``checkpoint``; write the report into ``out_dir``."""
    import psutil
    import rclpy
    from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor

    from affective_trm_ros.core.checkpoint import load_checkpoint
    from affective_trm_ros.replay.driver import ReplayDriver, ReplayInput
    from affective_trm_ros.replay.report import build_replay_report, frame_table, write_replay_report
    from affective_trm_ros.commands.run import create_nodes

    options = options or ReplayOptions()
    bag_path, checkpoint, out_dir = Path(bag_path), Path(checkpoint), Path(out_dir)
    if not checkpoint.is_file():
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    spec = load_checkpoint(checkpoint, device='cpu').encoder_spec
    with BagReader(bag_path) as bag:
        wanted = [e['modality'] for e in spec]
        inputs = bag_inputs(bag, options.topics, wanted)
        frame_count = bag.topics[inputs.get('image', inputs.get('compressed_image'))[0]].count
    # Run only the encoders that get input; the fusion masks the others.
    modalities = [m for m in FEATURE_ORDER if m in wanted and (
        m == VIDEO or (m == AUDIO and 'audio' in inputs) or (m == TEXT and 'speech' in inputs))]
    spec = [e for e in spec if e['modality'] in modalities]
    parameters = node_parameters(spec, options, inputs)
    process = psutil.Process()

    context = rclpy.Context()
    rclpy.init(context=context)
    nodes, executors, threads, driver = [], [], [], None
    try:
        nodes = create_nodes(options.config, context=context, modalities=','.join(modalities),
                             checkpoint=str(checkpoint), device=options.device, use_sim_time=True,
                             parameters=parameters)
        by_name = {node.get_name(): node for node in nodes}
        fusion = by_name['fusion']
        audio_params = {}
        if 'audio_encoder' in by_name:
            audio_node = by_name['audio_encoder']
            audio_params = {name: audio_node.get_parameter(name).value for name in
                            ('window_s', 'hop_s', 'stamp_tolerance_s', 'max_lag_s', 'sample_rate', 'channels',
                             'sample_format')}
            audio_params['sample_rate_out'] = int(getattr(audio_node.encoder, 'sample_rate', None) or 16000)
        driver_inputs = {role: (NODE_TOPICS[role], msgtype) for role, (_, msgtype) in inputs.items()}
        driver = ReplayDriver(driver_inputs, context=context,
                              max_wait_s=fusion.get_parameter('max_wait_s').value, audio_params=audio_params,
                              expect=modalities,
                              record_embeddings=options.record_embeddings, timeout_s=options.timeout_s,
                              memory_probe=lambda: process.memory_info().rss / 2 ** 20)
        node_executor = MultiThreadedExecutor(num_threads=options.threads, context=context)
        for node in nodes:
            node_executor.add_node(node)
        driver_executor = SingleThreadedExecutor(context=context)
        driver_executor.add_node(driver)
        executors = [node_executor, driver_executor]
        for executor in executors:
            thread = threading.Thread(target=executor.spin, daemon=True)
            thread.start()
            threads.append(thread)
        driver.wait_for_nodes()
        role_of = {topic: role for role, (topic, _) in inputs.items()}
        from tqdm import tqdm
        bar = tqdm(total=frame_count, desc=f'replay {bag_path.name}', unit='frame',
                   disable=not options.progress, mininterval=1.0)
        with BagReader(bag_path) as bag:
            messages = (ReplayInput(role_of[m.topic], m.log_time_ns, m.data)
                        for m in bag.raw_messages(list(role_of)))
            record = driver.play(messages, realtime=options.realtime, rate=options.rate, progress=bar.update)
        bar.close()
    finally:
        for executor in executors:
            executor.shutdown()
        for thread in threads:
            thread.join(timeout=10)
        for node in nodes:
            node.destroy_node()
        if driver is not None:
            driver.destroy_node()
        context.try_shutdown()

    frames = sorted(record.frame_publish_wall)
    if options.labels_csv is not None:
        truth = labels_from_csv(options.labels_csv, frames)
    else:
        truth = labels_from_topic(bag_path, options.topics.ground_truth, frames)
    table = frame_table(frames, record.outputs, record.frame_publish_wall, record.embedding_wall, truth)
    report = build_replay_report(table, wall_s=record.wall_s, mode=record.mode, encoders=record.encoders,
                                 extra={
        'bag': str(bag_path.resolve()), 'checkpoint': str(checkpoint.resolve()),
        'labels': str(options.labels_csv) if options.labels_csv else options.topics.ground_truth,
        'republished_frames': record.republished_frames, 'memory_mb': record.memory_mb,
        'node_parameters': parameters, 'device': options.device, 'session': bag_path.name,
    })
    title = options.title or f'Replay: {bag_path.name}'
    files = write_replay_report(out_dir, table, report, title=title, session=bag_path.name)
    return ReplayOutcome(record, table, report, files)

