#!/usr/bin/env bash
# A worker's Ray (worker_start_ray_commands): joins the head at $RAY_HEAD_IP, which Ray sets;
# Ray detects the node's CPUs and GPUs.
set -euo pipefail
. "$(dirname "$0")/settings.sh"

ray stop
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token
ulimit -n 65536 2>/dev/null || true
# shellcheck disable=SC2086  # GMWAE_RAY_START_ARGS is a list of flags
exec "$GMWAE_VENV/bin/ray" start --address="$RAY_HEAD_IP:$GMWAE_RAY_PORT" $GMWAE_RAY_START_ARGS
