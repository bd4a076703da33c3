#!/usr/bin/env bash
# The head's Ray (head_start_ray_commands): no CPU for trials, the dashboard and job server
# on 127.0.0.1, the autoscaler reading the config `ray up` left. Study drivers (jobs)
# inherit this environment: the PostgreSQL password, the bucket and the stores' ports that
# the cluster specs' storage URLs name.
set -euo pipefail
. "$(dirname "$0")/settings.sh"

ray stop
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token GMWAE_PG_PORT GMWAE_MLFLOW_PORT
GMWAE_PG_PASSWORD=$(secret pg_password)
export GMWAE_PG_PASSWORD
if [ -f "$GMWAE_SECRETS/artifact_bucket" ]; then
    GMWAE_BUCKET=$(cat "$GMWAE_SECRETS/artifact_bucket")
    export GMWAE_BUCKET
fi
ulimit -n 65536 2>/dev/null || true
# shellcheck disable=SC2086  # GMWAE_RAY_START_ARGS is a list of flags
exec "$GMWAE_VENV/bin/ray" start --head --port="$GMWAE_RAY_PORT" --num-cpus=0 \
    --dashboard-host=127.0.0.1 --dashboard-port="$GMWAE_DASHBOARD_PORT" \
    --autoscaling-config="$HOME/ray_bootstrap_config.yaml" $GMWAE_RAY_START_ARGS
