# Source this file (bash) to use the no-distro environment built by tools/bootstrap.sh:
#   source tools/env.sh
# It activates .venv, adds the colcon-built interface packages and the ament index entry of
# affective_trm_ros, and keeps DDS discovery on this machine.
_at_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ ! -f "$_at_root/.venv/colcon/install/local_setup.bash" ]]; then
  echo "env.sh: no environment yet; run tools/bootstrap.sh first" >&2
  return 1 2>/dev/null || exit 1
fi
# colcon's and venv's scripts read unset variables: relax `set -u` while sourcing them.
case $- in *u*) _at_nounset=1; set +u ;; *) _at_nounset=0 ;; esac
# shellcheck disable=SC1091
source "$_at_root/.venv/bin/activate"
# shellcheck disable=SC1091
source "$_at_root/.venv/colcon/install/local_setup.bash"
(( _at_nounset )) && set -u
# The venv prefix holds the ROS wheels' ament index; the second prefix registers affective_trm_ros.
export AMENT_PREFIX_PATH="$_at_root/.venv/affective_trm_ros_prefix:${AMENT_PREFIX_PATH:+$AMENT_PREFIX_PATH:}$_at_root/.venv"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
# Discovery stays on loopback: default discovery multicasts out of the network interface.
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-0}"
# One intra-op thread per process: the models are small and the nodes share the CPU with each
# other; measured on a 2-core machine, two threads made the fusion step's p99 100x worse.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Nothing downloads weights behind your back: `affective-trm weights fetch` does it explicitly.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
unset _at_root _at_nounset
