"""The node set of the suite and how it is configured -- shared by the launch files and `affective-trm run`.

One table (:data:`NODES`) says, for every node, its executable, its class, its parameter file and
which input topics it takes; :func:`plan` turns the arguments into the same parameter files,
overrides and topic remappings for both ways of starting the system, so ``ros2 launch`` and the
one-process runner cannot drift apart. No rclpy and no ``launch`` import here; the launch
builders at the bottom import ``launch``/``launch_ros`` only when called.

Parameter layering, lowest first: the node's own file ``config/<node>.yaml`` (every parameter,
commented), then the system file (default ``config/affective_trm.yaml``), then the arguments
(checkpoint, device, modalities, use_sim_time). Input topics are renamed by remapping the names
of :mod:`affective_trm_ros.topics`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from affective_trm_ros import topics as names
from affective_trm_ros.core.modalities import AUDIO, FEATURE_ORDER, TEXT, VIDEO

PACKAGE = 'affective_trm_ros'
SYSTEM_CONFIG = 'affective_trm.yaml'
#: Input-topic arguments (launch arguments and `affective-trm run` options) and their defaults.
TOPIC_ARGUMENTS = {
    'image_topic': (names.IMAGE, 'camera sensor_msgs/Image topic (its /compressed topic is used too)'),
    'audio_topic': (names.AUDIO_STREAM, 'audio_common_msgs/AudioDataStamped topic'),
    'audio_info_topic': (names.AUDIO_INFO, 'audio_common_msgs/AudioInfo topic'),
    'speech_topic': (names.SPEECH, 'std_msgs/String topic of recognised speech'),
}
#: Topic argument -> the (node topic name, suffix appended to the argument's value) remappings it sets.
TOPIC_REMAPS = {
    'image_topic': ((names.IMAGE, ''), (names.IMAGE_COMPRESSED, names.COMPRESSED_SUFFIX)),
    'audio_topic': ((names.AUDIO_STREAM, ''),),
    'audio_info_topic': ((names.AUDIO_INFO, ''),),
    'speech_topic': ((names.SPEECH, ''),),
}
#: ROS log levels the launch files accept (rcutils' names, any case).
LOG_LEVELS = ('debug', 'info', 'warn', 'error', 'fatal')


@dataclass(frozen=True)
class NodeSpec:
    """One node of the suite."""

    name: str                      # node name = console script = config/<name>.yaml
    module: str                    # under affective_trm_ros.nodes
    class_name: str
    modality: Optional[str] = None  # encoders: the modality they produce
    #: the topic arguments (keys of TOPIC_ARGUMENTS) that remap this node's inputs
    topic_arguments: tuple = ()
    #: the node has a 'device' parameter
    has_device: bool = True

    @property
    def executable(self) -> str:
        return self.name

    @property
    def config_file(self) -> str:
        return f'{self.name}.yaml'

    def node_class(self) -> type:
        """The rclpy Node subclass (imports rclpy and the node's dependencies)."""
        module = importlib.import_module(f'{PACKAGE}.nodes.{self.module}')
        return getattr(module, self.class_name)


NODES = (
    NodeSpec('video_encoder', 'video_encoder_node', 'VideoEncoderNode', VIDEO, ('image_topic',)),
    NodeSpec('audio_encoder', 'audio_encoder_node', 'AudioEncoderNode', AUDIO,
             ('audio_topic', 'audio_info_topic')),
    NodeSpec('text_encoder', 'text_encoder_node', 'TextEncoderNode', TEXT, ('speech_topic',)),
    NodeSpec('fusion', 'fusion_node', 'FusionNode'),
    NodeSpec('visualizer', 'visualizer_node', 'VisualizerNode', topic_arguments=('image_topic',),
             has_device=False),
    NodeSpec('hri_expression', 'hri_expression_node', 'HriExpressionNode', has_device=False),
)
NODES_BY_NAME = {spec.name: spec for spec in NODES}
#: Short names accepted wherever node names are (`--only video,fusion`).
ALIASES = {VIDEO: 'video_encoder', AUDIO: 'audio_encoder', TEXT: 'text_encoder'}


def config_dir() -> Path:
    """The installed ``share/affective_trm_ros/config`` when the package is in the ament index, else the
    source tree's ``config/``."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        try:
            installed = Path(get_package_share_directory(PACKAGE)) / 'config'
            if installed.is_dir():
                return installed
        except PackageNotFoundError:
            pass
    except ImportError:
        pass
    return Path(__file__).resolve().parents[1] / 'config'


def parse_list(value, what: str, allowed) -> list:
    """'a,b' or ['a', 'b'] -> ['a', 'b'], every entry in ``allowed``, no repeats."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace(' ', '').split(',')
    items = [str(item).strip() for item in items if str(item).strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown:
        raise ValueError(f'unknown {what} {unknown}; expected some of {list(allowed)}')
    if len(set(items)) != len(items):
        raise ValueError(f'{what} listed twice: {items}')
    return items


def parse_modalities(value) -> list:
    """Modalities to run: 'video,audio,text' -> ['video', 'audio', 'text'] (video is required)."""
    modalities = parse_list(value, 'modalities', FEATURE_ORDER)
    if VIDEO not in modalities:
        raise ValueError(f'modalities {modalities} must include video: the fusion is clocked by video')
    return modalities


def select_nodes(modalities, visualizer: bool = False, only=None, hri_expression: bool = False) -> list:
    """The NodeSpecs to start: the encoders of ``modalities``, fusion, and the visualizer and the
    ROS4HRI expression publisher if asked.

    ``only`` (node names or the aliases video/audio/text) picks exactly those nodes instead, e.g.
    to run the fusion alone against encoders running elsewhere.
    """
    modalities = parse_modalities(modalities)
    if only:
        names = [ALIASES.get(name, name)
                 for name in parse_list(only, 'nodes', list(NODES_BY_NAME) + list(ALIASES))]
        return [spec for spec in NODES if spec.name in names]
    wanted = {'fusion'} | ({'visualizer'} if visualizer else set()) | (
        {'hri_expression'} if hri_expression else set())
    return [spec for spec in NODES if spec.modality in modalities or spec.name in wanted]


def parameter_files(spec: NodeSpec, system_config=None, directory: Optional[Path] = None) -> list:
    """The parameter files of a node, lowest precedence first (missing per-node files are skipped)."""
    directory = Path(directory) if directory is not None else config_dir()
    files = []
    own = directory / spec.config_file
    if own.is_file():
        files.append(own)
    if system_config:
        system_config = Path(system_config)
        if not system_config.is_file():
            raise FileNotFoundError(f'parameter file not found: {system_config}')
        files.append(system_config)
    return files


def parameter_overrides(spec: NodeSpec, *, modalities=None, checkpoint: str = '', device: str = '',
                        use_sim_time: Optional[bool] = None, encoders: str = '') -> dict:
    """Parameters the arguments set on one node (empty arguments leave the files' values).

    ``encoders``: an encoder set and/or per-modality plugins (core.encoders.sets), e.g. 'offline'.
    """
    from affective_trm_ros.core.encoders.sets import chosen_plugin

    overrides = {}
    plugin = chosen_plugin(encoders, spec.modality) if encoders and spec.modality else None
    if plugin:
        overrides['plugin'] = plugin
    if use_sim_time is not None:
        overrides['use_sim_time'] = bool(use_sim_time)
    if device and spec.has_device:
        overrides['device'] = check_device(device)
    if spec.name == 'fusion':
        if checkpoint:
            overrides['checkpoint'] = str(checkpoint)
        if modalities is not None:
            overrides['modalities'] = parse_modalities(modalities)
    return overrides


def topic_remappings(spec: NodeSpec, topic_values: Optional[dict] = None) -> list:
    """[(node topic, new name)] for the topic arguments given (empty values keep the default names)."""
    remappings = []
    for argument, value in (topic_values or {}).items():
        if argument not in TOPIC_ARGUMENTS:
            raise ValueError(f'unknown topic argument {argument!r}; expected one of {list(TOPIC_ARGUMENTS)}')
        value = str(value or '').strip()
        if value and argument in spec.topic_arguments:
            remappings += [(name, f'{value}{suffix}') for name, suffix in TOPIC_REMAPS[argument]]
    return remappings


def check_device(value: str) -> str:
    """A device name as the nodes take it ('auto', 'cpu', 'cuda', 'cuda:N'); ValueError otherwise.

    Only the spelling is checked here (no torch import); whether CUDA exists is the node's check.
    """
    text = str(value).strip().lower()
    if text in ('auto', 'cpu', 'cuda') or (text.startswith('cuda:') and text[5:].isdigit()):
        return text
    raise ValueError(f"device '{value}' is not a device: expected auto, cpu, cuda or cuda:N")


def check_log_level(value: str) -> str:
    """A ROS log level name (any case); ValueError naming the valid levels otherwise."""
    text = str(value).strip().lower()
    if text not in LOG_LEVELS:
        raise ValueError(f"log_level '{value}' is not a ROS log level: "
                         f"expected one of {', '.join(LOG_LEVELS)}")
    return text


def parse_bool(value) -> bool:
    """Launch-argument truth: true/false, 1/0, yes/no, on/off (any case)."""
    text = str(value).strip().lower()
    if text in ('true', '1', 'yes', 'on'):
        return True
    if text in ('false', '0', 'no', 'off', ''):
        return False
    raise ValueError(f"expected true or false, got '{value}'")


def parse_assignments(assignments) -> dict:
    """['fusion.max_wait_s=1.0', ...] -> {'fusion': {'max_wait_s': 1.0}} (values parsed as YAML)."""
    result: dict = {}
    for item in assignments:
        target, sep, text = item.partition('=')
        node, dot, name = target.strip().partition('.')
        if not sep or not dot or not name:
            raise ValueError(f"--set {item!r}: expected NODE.PARAM=VALUE, e.g. fusion.max_wait_s=1.0")
        if node not in NODES_BY_NAME:
            raise ValueError(f"--set {item!r}: unknown node '{node}'; nodes: {list(NODES_BY_NAME)}")
        result.setdefault(node, {})[name] = yaml.safe_load(text) if text.strip() else ''
    return result


@dataclass(frozen=True)
class PlannedNode:
    """One node to start: what it is, its parameter files (lowest first), overrides, remappings."""

    spec: NodeSpec
    files: list
    overrides: dict
    remappings: list

    def __iter__(self):  # (spec, files, overrides), as callers unpack it
        return iter((self.spec, self.files, self.overrides))


def plan(config=None, *, only=None, modalities='video,audio,text', visualizer: bool = False,
         hri_expression: bool = False, checkpoint: str = '', device: str = '',
         use_sim_time: Optional[bool] = None, topics: Optional[dict] = None,
         parameters: Optional[dict] = None, config_directory: Optional[Path] = None,
         encoders: str = '') -> list:
    """[PlannedNode] for the nodes to start, without starting them."""
    config = Path(config) if config else (Path(config_directory or config_dir()) / SYSTEM_CONFIG)
    modalities = parse_modalities(modalities)
    parameters = parameters or {}
    unknown = sorted(set(parameters) - set(NODES_BY_NAME))
    if unknown:
        raise ValueError(f'parameters given for unknown nodes {unknown}; nodes: {list(NODES_BY_NAME)}')
    result = []
    for spec in select_nodes(modalities, visualizer=visualizer, only=only, hri_expression=hri_expression):
        files = parameter_files(spec, config, config_directory)
        overrides = parameter_overrides(spec, modalities=modalities, checkpoint=checkpoint, device=device,
                                        use_sim_time=use_sim_time, encoders=encoders)
        overrides.update(parameters.get(spec.name, {}))
        result.append(PlannedNode(spec, files, overrides, topic_remappings(spec, topics)))
    return result


# ---------------------------------------------------------------- launch builders (ros2 launch only)

#: Launch arguments shared by every launch file: name -> (default, description).
COMMON_ARGUMENTS = {
    'namespace': ('', 'namespace of every node (e.g. robot1)'),
    'use_sim_time': ('false', 'use /clock (bag replay)'),
    'device': ('', "device of the encoders and fusion: auto, cpu, cuda, cuda:N ('' = from the config)"),
    'log_level': ('info', f"ROS log level of the nodes: {', '.join(LOG_LEVELS)}"),
}
SYSTEM_ARGUMENTS = {
    'config': ('', f"system parameter file applied over config/<node>.yaml ('' = config/{SYSTEM_CONFIG})"),
    'checkpoint': ('', "fusion checkpoint file ('' = from the config)"),
    'modalities': ('video,audio,text', 'modalities to run: encoders started and fused (video required)'),
    'encoders': ('', "encoder set (default, offline) and/or plugins, e.g. 'offline,text=embeddinggemma' "
                     "('' = from the config)"),
    'visualizer': ('false', 'also start the visualizer (affect/visualization image)'),
    'hri_expression': ('false', 'also publish ROS4HRI hri_msgs/Expression on /humans/faces/<id>/expression '
                                '(needs hri_msgs)'),
    **{name: ('', f"{help_text} ('' = {default})") for name, (default, help_text) in TOPIC_ARGUMENTS.items()},
}


def _declare(arguments: dict) -> list:
    from launch.actions import DeclareLaunchArgument
    return [DeclareLaunchArgument(name, default_value=default, description=description)
            for name, (default, description) in arguments.items()]


def _ros_node(spec: NodeSpec, values: dict, files: list, overrides: dict, remappings: list):
    """A launch_ros Node for ``spec`` with parameter ``files`` (lowest first) and ``overrides`` on top."""
    from launch_ros.actions import Node
    parameters = [str(path) for path in files] + ([overrides] if overrides else [])
    return Node(package=PACKAGE, executable=spec.executable, name=spec.name, namespace=values['namespace'],
                parameters=parameters, remappings=remappings, output='screen', emulate_tty=True,
                arguments=['--ros-args', '--log-level', check_log_level(values['log_level'])])


def _required(node, what: str) -> list:
    """[node, an event handler that ends the launch with an error when ``node`` exits on its own]."""
    from launch.actions import RegisterEventHandler
    from launch.event_handlers import OnProcessExit

    def exited(event, context):
        if context.is_shutdown:
            return None  # stopping on request (Ctrl-C, another failure): not an error of its own
        # An exception in an event handler makes `ros2 launch` shut everything down and exit 1.
        raise RuntimeError(f'{what} exited with code {event.returncode}: see its log above; '
                           f'the launch cannot run without it')

    return [node, RegisterEventHandler(OnProcessExit(target_action=node, on_exit=exited))]


def _system_nodes(context, force_sim_time: bool = False) -> list:
    """OpaqueFunction body: the nodes of affective_trm.launch.py from the evaluated arguments.

    The fusion node is required: when it exits, the launch ends with an error. An encoder that
    exits leaves the others running (the fusion masks its modality).
    """
    values = {name: context.launch_configurations.get(name, default)
              for name, (default, _) in {**COMMON_ARGUMENTS, **SYSTEM_ARGUMENTS}.items()}
    check_log_level(values['log_level'])
    system_config = values['config'] or str(config_dir() / SYSTEM_CONFIG)
    modalities = parse_modalities(values['modalities'])
    topic_values = {name: values[name] for name in TOPIC_ARGUMENTS}
    sim = True if force_sim_time else parse_bool(values['use_sim_time'])
    actions = []
    for spec in select_nodes(modalities, visualizer=parse_bool(values['visualizer']),
                             hri_expression=parse_bool(values['hri_expression'])):
        overrides = parameter_overrides(spec, modalities=modalities, checkpoint=values['checkpoint'],
                                        device=values['device'], use_sim_time=sim,
                                        encoders=values['encoders'])
        node = _ros_node(spec, values, parameter_files(spec, system_config), overrides,
                         topic_remappings(spec, topic_values))
        actions += _required(node, 'the fusion node') if spec.name == 'fusion' else [node]
    return actions


def system_launch_description():
    """affective_trm.launch.py: the encoders of the chosen modalities, fusion, optionally the visualizer."""
    from launch import LaunchDescription
    from launch.actions import OpaqueFunction
    return LaunchDescription(_declare({**COMMON_ARGUMENTS, **SYSTEM_ARGUMENTS})
                             + [OpaqueFunction(function=_system_nodes)])


def node_launch_description(name: str):
    """<node>.launch.py: one node with its own parameter file (``config`` argument) and overrides."""
    from launch import LaunchDescription
    from launch.actions import OpaqueFunction

    spec = NODES_BY_NAME[name]
    arguments = dict(COMMON_ARGUMENTS)
    arguments['config'] = (str(config_dir() / spec.config_file), 'parameter file of this node')
    if spec.name == 'fusion':
        arguments['checkpoint'] = SYSTEM_ARGUMENTS['checkpoint']
        arguments['modalities'] = ('', "modalities to fuse ('' = from the config)")
    for topic in spec.topic_arguments:
        arguments[topic] = SYSTEM_ARGUMENTS[topic]
    if spec.modality:
        arguments['encoders'] = SYSTEM_ARGUMENTS['encoders']
    if not spec.has_device:
        del arguments['device']

    def nodes(context):
        values = {n: context.launch_configurations.get(n, default) for n, (default, _) in arguments.items()}
        overrides = parameter_overrides(
            spec, modalities=values.get('modalities') or None, checkpoint=values.get('checkpoint', ''),
            device=values.get('device', ''), use_sim_time=parse_bool(values['use_sim_time']),
            encoders=values.get('encoders', ''))
        node = _ros_node(spec, values, [values['config']], overrides,
                         topic_remappings(spec, {t: values[t] for t in spec.topic_arguments}))
        return _required(node, f'the {spec.name} node')  # the launch file's only node

    return LaunchDescription(_declare(arguments) + [OpaqueFunction(function=nodes)])


REPLAY_ARGUMENTS = {
    'bag': ('', 'rosbag2 directory to play (ros2 bag play --clock); empty = start the nodes only'),
    'rate': ('1.0', 'playback rate'),
    'start_delay_s': ('5.0', 'seconds between starting the nodes and starting playback (model loading)'),
    'record': ('', 'output bag directory recording affect/valence_arousal; empty = no recording'),
}


def replay_launch_description():
    """replay.launch.py: the system on simulated time, ``ros2 bag play --clock``, optional recording."""
    from launch import LaunchDescription
    from launch.actions import ExecuteProcess, OpaqueFunction, TimerAction

    def actions(context):
        values = {n: context.launch_configurations.get(n, d) for n, (d, _) in REPLAY_ARGUMENTS.items()}
        namespace = context.launch_configurations.get('namespace', '')
        result = _system_nodes(context, force_sim_time=True)
        if values['record']:
            topic = '/' + '/'.join(p for p in (namespace.strip('/'), 'affect/valence_arousal') if p)
            record = ['ros2', 'bag', 'record', '--use-sim-time', '-o', values['record'], topic]
            result.append(ExecuteProcess(cmd=record, output='screen'))
        if values['bag']:
            play = ExecuteProcess(cmd=['ros2', 'bag', 'play', values['bag'], '--clock', '100',
                                       '--rate', values['rate']], output='screen')
            result.append(TimerAction(period=float(values['start_delay_s']), actions=[play]))
        return result

    arguments = {**COMMON_ARGUMENTS, **SYSTEM_ARGUMENTS, **REPLAY_ARGUMENTS}
    arguments['use_sim_time'] = ('true', 'always true in replay (kept for symmetry)')
    return LaunchDescription(_declare(arguments) + [OpaqueFunction(function=actions)])
