"""Launch files, parameter files and `affective-trm run`: static checks, the layering, and a real run.

Static checks need no `launch`: every executable is a console script, every parameter a YAML file
sets is declared by its node (the nodes of this area are instantiated with their files; the
encoder nodes' declarations are read from their source), and the fusion file mirrors the
alignment defaults. Where `launch_ros` is importable, every launch description is built too.
"""

import ast
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
import yaml
from rclpy.executors import SingleThreadedExecutor

from affective_msgs.msg import ModalityEmbedding, ValenceArousal
from affective_trm_ros import system
from affective_trm_ros.cli import main as cli_main
from affective_trm_ros.core.alignment import AlignmentConfig
from affective_trm_ros.nodes.common import RELIABLE_QOS
from affective_trm_ros.nodes.in_process import NodeStartError, create_nodes
from affective_trm_ros.system import parse_assignments, plan

PACKAGE_DIR = Path(__file__).resolve().parents[1]
LAUNCH_DIR = PACKAGE_DIR / 'launch'
CONFIG_DIR = PACKAGE_DIR / 'config'
NODES_DIR = PACKAGE_DIR / 'affective_trm_ros' / 'nodes'
#: Parameters every rclpy node has without declaring them.
BUILTIN_PARAMETERS = {'use_sim_time', 'start_type_description_service'}


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    from test_fusion_node import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp('launch') / 'tiny.pt')


def console_scripts() -> dict:
    """name -> 'module:function' from setup.py's console_scripts (read statically)."""
    tree = ast.parse((PACKAGE_DIR / 'setup.py').read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == 'console_scripts':
                    entries = [ast.literal_eval(element) for element in value.elts]
                    return {name.strip(): target.strip() for name, target in (e.split('=') for e in entries)}
    raise AssertionError('setup.py has no console_scripts')


def yaml_sections(path: Path) -> dict:
    """node name -> ros__parameters of a ROS 2 parameter file ('/**' = the file's own node)."""
    content = yaml.safe_load(path.read_text())
    assert isinstance(content, dict) and content, f'{path.name} holds no parameter sections'
    sections = {}
    for key, value in content.items():
        assert set(value) == {'ros__parameters'}, f'{path.name}: section {key!r} needs only ros__parameters'
        if key == '/**':
            name = path.stem
        else:
            assert key.startswith('/**/'), f"{path.name}: write '/**/{key}' (any namespace)"
            name = key[len('/**/'):]
        assert name in system.NODES_BY_NAME, f'{path.name}: unknown node {name!r}'
        sections[name] = value['ros__parameters']
    return sections


def declared_in_source(spec: system.NodeSpec) -> set:
    """Parameter names a node module (and the sibling node modules it imports) declare."""
    names, queue, seen = set(), [spec.module], set()
    while queue:
        module = queue.pop()
        if module in seen:
            continue
        seen.add(module)
        tree = ast.parse((NODES_DIR / f'{module}.py').read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                queue.append(node.module)
            if (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                    and node.module.startswith('affective_trm_ros.nodes.')):
                queue.append(node.module.rsplit('.', 1)[1])
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id == 'declare' and len(node.args) >= 2:
                argument = node.args[1]
            elif isinstance(func, ast.Attribute) and func.attr == 'declare_parameter' and node.args:
                argument = node.args[0]
            else:
                continue
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                names.add(argument.value)
    return names


def instantiate(spec, files, context, **overrides):
    from rclpy.parameter import Parameter
    cli_args = ['--ros-args'] + [arg for path in files for arg in ('--params-file', str(path))]
    return spec.node_class()(context=context, cli_args=cli_args,
                             parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])


# ---------------------------------------------------------------- static checks

def test_every_launched_executable_is_a_console_script():
    scripts = console_scripts()
    for spec in system.NODES:
        assert spec.executable in scripts, f'{spec.executable} is not a console script in setup.py'
        module, function = scripts[spec.executable].split(':')
        assert module == f'affective_trm_ros.nodes.{spec.module}' and function == 'main'
        assert importlib.util.find_spec(module) is not None, f'{module} does not exist'
    launch_files = sorted(LAUNCH_DIR.glob('*.launch.py'))
    assert {p.name for p in launch_files} >= {f'{s.name}.launch.py' for s in system.NODES} | {
        'affective_trm.launch.py', 'replay.launch.py'}
    for path in launch_files:
        tree = ast.parse(path.read_text())
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert 'generate_launch_description' in functions, path.name
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            if getattr(call.func, 'id', '') == 'node_launch_description':
                assert call.args[0].value in system.NODES_BY_NAME, f'{path.name}: unknown node'
                assert path.name == f'{call.args[0].value}.launch.py'


def test_every_node_has_a_parameter_file_and_every_file_parameter_is_declared(checkpoint, rclpy_context):
    files = sorted(CONFIG_DIR.glob('*.yaml'))
    assert {f.name for f in files} >= {spec.config_file for spec in system.NODES} | {system.SYSTEM_CONFIG}
    for path in files:
        for name, parameters in yaml_sections(path).items():
            spec = system.NODES_BY_NAME[name]
            if spec.name in ('fusion', 'visualizer'):
                overrides = {'checkpoint': checkpoint} if spec.name == 'fusion' else {}
                node = instantiate(spec, [path], rclpy_context, **overrides)
                try:
                    undeclared = [p for p in parameters if not node.has_parameter(p)]
                    for key, value in parameters.items():   # and the file's values reach the node
                        if key not in overrides:
                            assert node.get_parameter(key).value == value, f'{path.name}: {name}.{key}'
                finally:
                    node.destroy_node()
            else:
                undeclared = sorted(set(parameters) - declared_in_source(spec) - BUILTIN_PARAMETERS)
            assert not undeclared, f'{path.name}: {name} does not declare {undeclared}'


def test_node_files_document_every_parameter_of_these_nodes(checkpoint, rclpy_context):
    """fusion.yaml and visualizer.yaml list every parameter the node declares (and nothing else)."""
    for name in ('fusion', 'visualizer'):
        spec = system.NODES_BY_NAME[name]
        path = CONFIG_DIR / spec.config_file
        overrides = {'checkpoint': checkpoint} if name == 'fusion' else {}
        node = instantiate(spec, [path], rclpy_context, **overrides)
        try:
            declared = set(node.get_parameters_by_prefix('')) - BUILTIN_PARAMETERS
        finally:
            node.destroy_node()
        assert set(yaml_sections(path)[name]) == declared


def test_fusion_file_matches_the_alignment_defaults():
    """Offline preparation uses AlignmentConfig(); the node uses fusion.yaml: they must agree."""
    parameters = yaml_sections(CONFIG_DIR / 'fusion.yaml')['fusion']
    assert AlignmentConfig.from_parameters(parameters) == AlignmentConfig()


# ---------------------------------------------------------------- the node set and the layering

def test_plan_selects_nodes_and_layers_parameters(tmp_path):
    default = plan(config_directory=CONFIG_DIR)
    assert [s.name for s, _, _ in default] == ['video_encoder', 'audio_encoder', 'text_encoder', 'fusion']
    for spec, files, _ in default:
        assert files == [CONFIG_DIR / spec.config_file, CONFIG_DIR / system.SYSTEM_CONFIG]
    chosen = plan(config_directory=CONFIG_DIR, modalities='video,audio', visualizer=True, checkpoint='m.pt',
                  device='cpu', use_sim_time=True, topics={'image_topic': '/cam/image', 'audio_topic': ''},
                  parameters={'fusion': {'max_wait_s': 2.0}})
    by_name = {step.spec.name: step.overrides for step in chosen}
    assert list(by_name) == ['video_encoder', 'audio_encoder', 'fusion', 'visualizer']
    assert by_name['video_encoder'] == {'use_sim_time': True, 'device': 'cpu'}
    assert by_name['audio_encoder'] == {'use_sim_time': True, 'device': 'cpu'}
    assert by_name['fusion'] == {'use_sim_time': True, 'device': 'cpu', 'checkpoint': 'm.pt',
                                 'modalities': ['video', 'audio'], 'max_wait_s': 2.0}
    assert by_name['visualizer'] == {'use_sim_time': True}
    # Topics are renamed by remapping the nodes' fixed names; an empty argument keeps the default.
    remaps = {step.spec.name: step.remappings for step in chosen}
    camera = [('image_raw', '/cam/image'), ('image_raw/compressed', '/cam/image/compressed')]
    assert remaps == {'video_encoder': camera, 'audio_encoder': [], 'fusion': [], 'visualizer': camera}
    with pytest.raises(ValueError, match="device 'gpu0' is not a device"):
        plan(config_directory=CONFIG_DIR, device='gpu0')
    assert [s.name for s, _, _ in plan(config_directory=CONFIG_DIR, only='fusion,video')] == [
        'video_encoder', 'fusion']
    with pytest.raises(ValueError, match='must include video'):
        plan(config_directory=CONFIG_DIR, modalities='audio,text')
    with pytest.raises(ValueError, match=r"unknown nodes \['radar'\]"):
        plan(config_directory=CONFIG_DIR, only='radar')
    with pytest.raises(FileNotFoundError, match='parameter file not found'):
        plan(tmp_path / 'missing.yaml', config_directory=CONFIG_DIR)
    assert parse_assignments(['fusion.modalities=[video]', 'video_encoder.allow_untrained=true']) == {
        'fusion': {'modalities': ['video']}, 'video_encoder': {'allow_untrained': True}}
    with pytest.raises(ValueError, match='NODE.PARAM=VALUE'):
        parse_assignments(['max_wait_s=1'])


def test_create_nodes_applies_files_overrides_and_namespace(checkpoint, tmp_path, rclpy_context):
    custom = tmp_path / 'system.yaml'
    custom.write_text('/**/fusion:\n  ros__parameters:\n    max_wait_s: 1.5\n    text_max_age_s: 3.0\n'
                      '/**/visualizer:\n  ros__parameters:\n    trail_length: 7\n')
    nodes = create_nodes(custom, only='fusion,visualizer', checkpoint=checkpoint, device='cpu',
                         modalities='video,text', use_sim_time=True, namespace='robot1',
                         parameters={'fusion': {'text_max_age_s': 4.0}}, context=rclpy_context,
                         config_directory=CONFIG_DIR, topics={'image_topic': '/cam/image'})
    try:
        fusion, visualizer = nodes
        assert fusion.get_fully_qualified_name() == '/robot1/fusion'
        assert fusion.get_parameter('max_wait_s').value == 1.5          # system file over fusion.yaml
        assert fusion.get_parameter('text_max_age_s').value == 4.0      # override over both
        assert fusion.get_parameter('audio_slop_s').value == 0.3        # fusion.yaml
        assert fusion.get_parameter('modalities').value == ['video', 'text']
        assert fusion.get_parameter('use_sim_time').value is True
        assert visualizer.get_parameter('trail_length').value == 7
        # The image_topic argument remaps the visualizer's camera input (an absolute name: no namespace).
        subscribed = dict(visualizer.get_subscriber_names_and_types_by_node('visualizer', '/robot1'))
        assert '/cam/image' in subscribed and '/robot1/image_raw' not in subscribed
    finally:
        for node in nodes:
            node.destroy_node()
    with pytest.raises(NodeStartError, match="fusion: .*'checkpoint' is empty") as failure:
        create_nodes(custom, only='fusion', context=rclpy_context, config_directory=CONFIG_DIR)
    assert failure.value.node == 'fusion' and isinstance(failure.value.__cause__, ValueError)


def test_run_command_dry_run(capsys):
    assert cli_main(['run', '--dry-run', '--only', 'fusion', '--checkpoint', 'x.pt']) == 0
    out = capsys.readouterr().out
    assert out.startswith('fusion: ') and 'fusion.yaml' in out and "'checkpoint': 'x.pt'" in out
    assert cli_main(['run', '--dry-run', '--modalities', 'text']) == 2
    assert cli_main(['run', '--dry-run', '--only', 'text,visualizer', '--speech-topic', '/asr/text',
                     '--image-topic', '/cam/image']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith('; remappings speech:=/asr/text'), out[0]
    assert out[1].endswith('remappings image_raw:=/cam/image, image_raw/compressed:=/cam/image/compressed')


def test_run_command_serves_the_fusion_over_dds(checkpoint, rclpy_context):
    """`affective-trm run` in its own process: embeddings in, estimates out, Ctrl-C stops it cleanly."""
    command = [sys.executable, '-m', 'affective_trm_ros.cli', 'run', '--only', 'fusion', '--checkpoint',
               checkpoint, '--device', 'cpu', '--modalities', 'video', '--namespace', 'runtest']
    process = subprocess.Popen(command, env=dict(os.environ), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    node = rclpy.create_node('run_test_client', context=rclpy_context)
    publisher = node.create_publisher(ModalityEmbedding, '/runtest/affect/embedding/video', RELIABLE_QOS)
    received = []
    node.create_subscription(ValenceArousal, '/runtest/affect/valence_arousal', received.append, RELIABLE_QOS)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(node)
    output = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60.0
        output_topic = '/runtest/affect/valence_arousal'
        while not (publisher.get_subscription_count() and node.count_publishers(output_topic)):
            assert process.poll() is None, f'run exited early: {"".join(output)}'
            assert time.monotonic() < deadline, 'the fusion node never appeared'
            executor.spin_once(timeout_sec=0.05)
        msg = ModalityEmbedding(stream_id='default', modality='video', encoder='test_video@x', valid=True,
                                data=np.ones(16, np.float32).tolist())
        msg.header.stamp.sec, msg.header.stamp.nanosec = 42, 7
        publisher.publish(msg)
        deadline = time.monotonic() + 10.0
        while not received and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.05)
        assert received and (received[0].header.stamp.sec, received[0].header.stamp.nanosec) == (42, 7)
        assert received[0].modalities == 1
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        executor.shutdown()
        node.destroy_node()
        reader.join(5)
    assert code == 0, ''.join(output)
    assert 'running /runtest/fusion' in ''.join(output)
    for noise in ('Traceback', 'exception was never retrieved', 'Exception in thread'):
        assert noise not in ''.join(output), ''.join(output)


# ---------------------------------------------------------------- parameters: one copy, validate then apply

def test_startup_failures_are_logged_under_the_node_name():
    from affective_trm_ros.nodes.common import startup_logger_name

    assert startup_logger_name(['/x/lib/affective_trm_ros/fusion'], 'fusion') == 'fusion'
    launched = ['/x/fusion', '--ros-args', '--log-level', 'info', '--ros-args', '-r', '__node:=fusion',
                '-r', '__ns:=/robot1/affect', '--params-file', '/tmp/p.yaml']
    assert startup_logger_name(launched, 'x') == 'robot1.affect.fusion'
    assert startup_logger_name(['fusion', '--ros-args', '--remap', 'fusion:__node:=left'], 'fusion') == 'left'
    assert startup_logger_name(['fusion', '-r', '__node:=not_a_ros_arg'], 'fusion') == 'fusion'


def test_parameters_are_the_only_copy_validated_whole_and_applied_after(rclpy_context):
    from rclpy.node import Node
    from rclpy.parameter import Parameter

    from affective_trm_ros.nodes.common import ParameterView, add_validator, declare

    node = Node('parameter_probe', context=rclpy_context)
    try:
        view = ParameterView(node)
        view['low'] = declare(node, 'low', 1.0, 'lower bound')
        declare(node, 'high', 2.0, 'upper bound')
        applied = []

        def validate(proposed):
            return None if proposed['low'] < proposed['high'] else f"low {proposed['low']} >= high"

        def apply(changed):  # runs after the update is stored: the view already shows it
            applied.append((changed, view['low'], view['high']))

        add_validator(node, validate, apply)
        results = node.set_parameters_atomically([Parameter('low', value=5.0), Parameter('high', value=6.0)])
        assert results.successful
        assert applied == [({'low': 5.0, 'high': 6.0}, 5.0, 6.0)]
        refused = node.set_parameters([Parameter('low', value=9.0)])[0]
        assert not refused.successful and 'low 9.0 >= high' in refused.reason
        assert view['low'] == 5.0 and len(applied) == 1          # nothing half-applied
        assert dict(view)['high'] == 6.0 and 'use_sim_time' in view
        with pytest.raises(TypeError, match='through set_parameters'):
            view['low'] = 1.0
        with pytest.raises(KeyError, match="'nope' is not a parameter"):
            view['nope']
    finally:
        node.destroy_node()
    # No node reaches into rclpy's private parameter table.
    for path in NODES_DIR.glob('*.py'):
        assert '._parameters' not in path.read_text(), path.name


# ---------------------------------------------------------------- launch descriptions (static)

def _load_launch_file(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem.replace('.', '_'), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate_launch_description()


def _launch_context(**arguments):
    from launch import LaunchContext

    context = LaunchContext()
    context.launch_configurations.update({name: default for name, (default, _) in
                                          {**system.COMMON_ARGUMENTS, **system.SYSTEM_ARGUMENTS}.items()})
    context.launch_configurations.update(arguments)
    return context


def test_launch_descriptions_build_statically():
    """Every launch file builds; the system file starts the chosen nodes with remappings, and the
    fusion node is required (an exit handler targets it)."""
    pytest.importorskip('launch_ros', reason='launch_ros is not installed (no ROS 2 distro here)')
    from launch import LaunchDescription
    from launch.actions import RegisterEventHandler
    from launch.events.process import ProcessExited
    from launch_ros.actions import Node

    for path in sorted(LAUNCH_DIR.glob('*.launch.py')):
        description = _load_launch_file(path)
        assert isinstance(description, LaunchDescription), path.name
        assert description.get_launch_arguments(), path.name
    context = _launch_context(modalities='video,text', visualizer='true', checkpoint='m.pt',
                              image_topic='/cam/image', log_level='DEBUG')
    actions = system._system_nodes(context)
    nodes = [a for a in actions if isinstance(a, Node)]
    assert [n.node_executable for n in nodes] == ['video_encoder', 'text_encoder', 'fusion', 'visualizer']
    handlers = [a for a in actions if isinstance(a, RegisterEventHandler)]
    assert len(handlers) == 1
    handler = handlers[0].event_handler

    def exited(node):
        return ProcessExited(action=node, name=node.node_executable, cmd=[], cwd=None, env=None, pid=1,
                             returncode=1)
    assert handler.matches(exited(nodes[2])) and not handler.matches(exited(nodes[0]))   # the fusion only
    with pytest.raises(RuntimeError, match='the fusion node exited with code 1'):
        handler.handle(exited(nodes[2]), context)
    context._set_is_shutdown(True)   # stopping on request: its exit is no error  # noqa: SLF001
    assert handler.handle(exited(nodes[2]), context) is None
    video = nodes[0]
    assert [(a[0][0].text, a[1][0].text) for a in video._Node__remappings] == [
        ('image_raw', '/cam/image'), ('image_raw/compressed', '/cam/image/compressed')]
    with pytest.raises(ValueError, match="log_level 'loud' is not a ROS log level: expected one of debug"):
        system._system_nodes(_launch_context(log_level='loud'))
    with pytest.raises(ValueError, match="device 'bogus' is not a device"):
        system._system_nodes(_launch_context(device='bogus'))


# ---------------------------------------------------------------- `ros2 launch` for real

def _ros2_launch_available():
    try:
        import launch_ros  # noqa: F401
        import ros2launch  # noqa: F401
        from ament_index_python.packages import get_package_prefix
        get_package_prefix('affective_trm_ros')
    except Exception as error:  # ImportError, PackageNotFoundError
        pytest.skip(f'ros2 launch is not available here ({type(error).__name__}: {error}); it needs launch, '
                    'launch_ros, ros2launch and ros2cli (a ROS 2 distro) and the package in the ament index')


def ros2_launch(*arguments, timeout=120.0):
    """Run `ros2 launch affective_trm_ros ...` to its end; (exit code, output)."""
    command = [sys.executable, '-c', 'import sys; from ros2cli.cli import main; sys.exit(main())',
               'launch', 'affective_trm_ros', *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, PYTHONUNBUFFERED='1'))
    return result.returncode, result.stdout + result.stderr


def test_ros2_launch_refuses_a_bad_log_level_and_device():
    _ros2_launch_available()
    code, output = ros2_launch('affective_trm.launch.py', 'log_level:=loud')
    levels = 'debug, info, warn, error, fatal'
    assert code != 0, output
    assert f"log_level 'loud' is not a ROS log level: expected one of {levels}" in output, output
    assert 'Traceback' not in output
    code, output = ros2_launch('fusion.launch.py', 'device:=bogus')
    assert code != 0 and "device 'bogus' is not a device" in output, output


def test_ros2_launch_ends_with_an_error_when_the_fusion_node_exits(tmp_path):
    """A fusion node that cannot start (no checkpoint) ends the launch non-zero, with the reason
    logged under the node's own name; the encoders do not keep running alone."""
    _ros2_launch_available()
    missing = tmp_path / 'missing.pt'
    started = time.monotonic()
    code, output = ros2_launch('affective_trm.launch.py', f'checkpoint:={missing}', 'modalities:=video',
                               'device:=cpu', timeout=300)
    assert code != 0, output
    assert '[fusion]: failed to start:' in output and 'checkpoint not found' in output, output
    assert 'the fusion node exited with code 1' in output, output
    assert time.monotonic() - started < 300
