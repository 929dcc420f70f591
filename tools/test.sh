#!/usr/bin/env bash
# Build or update the environment, then run the whole test suite (static checks included).
#   tools/test.sh                 # everything
#   tools/test.sh -k fusion       # extra arguments go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/tools/bootstrap.sh"
# shellcheck disable=SC1091
source "$ROOT/tools/env.sh"
# One private DDS domain per test run, so parallel runs on one machine never cross-talk.
export AFFECTIVE_TEST_DOMAIN_ID="${AFFECTIVE_TEST_DOMAIN_ID:-$(( (RANDOM % 100) + 1 ))}"
export ROS_DOMAIN_ID="$AFFECTIVE_TEST_DOMAIN_ID" ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
cd "$ROOT/affective_trm_ros"
echo "[test] ruff"
ruff check .
echo "[test] pytest (ROS_DOMAIN_ID=$ROS_DOMAIN_ID)"
exec python -m pytest -p no:cacheprovider "$@" test
