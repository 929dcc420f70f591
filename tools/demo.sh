#!/usr/bin/env bash
# Build or update the environment, then run the main job (see `affective-trm demo --help`).
#   tools/demo.sh                 # sample sessions -> features -> training -> replay -> report
#   tools/demo.sh --live          # the same nodes on a robot's camera and microphone topics
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/tools/bootstrap.sh"
# shellcheck disable=SC1091
source "$ROOT/tools/env.sh"
exec affective-trm demo "$@"
