"""Lay out an ament prefix for the editable affective_trm_ros the way `colcon build --symlink-install` does.

    python tools/ament_prefix.py PREFIX [--python PYTHON]

What `ros2 launch` and `ros2 run` need from a prefix, as colcon's ament_python build makes it:

- ``share/ament_index/resource_index/packages/affective_trm_ros``: the package is in the index;
- ``share/affective_trm_ros/{package.xml, launch/*.launch.py, config/*.yaml}``: real folders
  holding one symbolic link per file into the source tree (ros2launch walks the share folder with
  ``os.walk``, which does not descend into linked folders), so edits take effect at once and a new
  file needs a re-run, as with colcon;
- ``lib/affective_trm_ros/<console script>``: one executable per console script of the installed
  distribution, where launch_ros' ``ExecutableInPackage`` and ``ros2 run`` look.

The prefix is rebuilt from scratch on every run. Used by tools/bootstrap.sh and by the packaging test.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import metadata
from pathlib import Path

PACKAGE = 'affective_trm_ros'
ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / PACKAGE
#: share/<package> sub-folder -> file pattern, as setup.py's data_files lists them.
SHARED_FILES = {'launch': '*.launch.py', 'config': '*.yaml'}

SCRIPT = '''#!{python}
# Console script '{name}' of {package} (made by tools/ament_prefix.py).
import sys

from {module} import {function}

if __name__ == '__main__':
    sys.exit({function}())
'''


def console_scripts(distribution: str = PACKAGE) -> dict:
    """name -> 'module:function' of the installed distribution's console scripts."""
    try:
        entry_points = metadata.distribution(distribution).entry_points
    except metadata.PackageNotFoundError as error:
        raise SystemExit(f'ament_prefix: {distribution} is not installed in {sys.executable}; '
                         f'pip install -e {SOURCE} first') from error
    return {entry.name: entry.value for entry in entry_points if entry.group == 'console_scripts'}


def make_prefix(prefix: Path, python: str = sys.executable, source: Path = SOURCE, scripts=None) -> Path:
    """(Re)create ``prefix`` for the package whose sources are in ``source``; returns the prefix."""
    prefix = Path(prefix)
    scripts = console_scripts() if scripts is None else scripts
    if prefix.exists():
        shutil.rmtree(prefix)
    index = prefix / 'share' / 'ament_index' / 'resource_index' / 'packages'
    index.mkdir(parents=True)
    (index / PACKAGE).symlink_to(source / 'resource' / PACKAGE)
    share = prefix / 'share' / PACKAGE
    share.mkdir()
    (share / 'package.xml').symlink_to(source / 'package.xml')
    for folder, pattern in SHARED_FILES.items():
        (share / folder).mkdir()
        for path in sorted((source / folder).glob(pattern)):
            (share / folder / path.name).symlink_to(path)
    lib = prefix / 'lib' / PACKAGE
    lib.mkdir(parents=True)
    for name, target in sorted(scripts.items()):
        module, function = (part.strip() for part in target.split(':'))
        script = lib / name
        script.write_text(SCRIPT.format(python=python, name=name, package=PACKAGE, module=module,
                                        function=function))
        script.chmod(0o755)
    return prefix


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('prefix', type=Path)
    parser.add_argument('--python', default=sys.executable, help='interpreter of the executables')
    args = parser.parse_args(argv)
    make_prefix(args.prefix, python=args.python)
    return 0


if __name__ == '__main__':
    sys.exit(main())
