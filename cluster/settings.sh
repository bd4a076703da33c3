# The settings every script in cluster/ reads: folders and ports, each with its default
# here, overridden by the environment or by the file $GMWAE_CLUSTER_ENV (default
# ~/.gmwae/cluster.env), sourced first when it exists. Sourced, not run.
: "${GMWAE_CLUSTER_ENV:=$HOME/.gmwae/cluster.env}"
if [ -f "$GMWAE_CLUSTER_ENV" ]; then . "$GMWAE_CLUSTER_ENV"; fi
# The project's working tree on the node (file_mounts copies it there).
: "${GMWAE_PROJECT:=$HOME/gmwae-studies}"
# The virtual environment the node runs Ray and the trials from.
: "${GMWAE_VENV:=$HOME/venv}"
# The Python that builds it.
: "${GMWAE_PYTHON:=python3.11}"
# Extras of the project to install (aws: boto3 for the autoscaler and S3).
: "${GMWAE_EXTRAS:=}"
# The secrets folder file_mounts copies (pg_password; artifact_bucket on AWS).
: "${GMWAE_SECRETS:=$HOME/.gmwae/secrets}"
# The head's state: PostgreSQL's data, the MLflow server's log and pid, local artifacts.
: "${GMWAE_STATE:=/var/lib/gmwae}"
# Where the MLflow server keeps artifacts (a folder, or s3://BUCKET/PREFIX).
: "${GMWAE_ARTIFACTS:=$GMWAE_STATE/mlflow-artifacts}"
# PostgreSQL and the MLflow server, both on 127.0.0.1 of the head.
: "${GMWAE_PG_PORT:=5432}"
: "${GMWAE_MLFLOW_PORT:=5000}"
# The head's GCS and dashboard (job server) ports.
: "${GMWAE_RAY_PORT:=6379}"
: "${GMWAE_DASHBOARD_PORT:=8265}"
# More `ray start` flags of this node: addresses, ports, folders (none on a real cluster).
: "${GMWAE_RAY_START_ARGS:=}"
# The shell start-up file that puts the venv on the PATH of Ray's login shells.
: "${GMWAE_BASHRC:=$HOME/.bashrc}"
# `ray` for `ray stop`: the venv's, unless the PATH already has one first.
export PATH="$PATH:$GMWAE_VENV/bin"

# A secret's content, or exit 2 saying where the file belongs.
secret() {
    if [ ! -s "$GMWAE_SECRETS/$1" ]; then
        echo "No $GMWAE_SECRETS/$1: create ~/.gmwae/secrets/$1 on your machine first" \
             "(docs/cluster.md); ray up's file_mounts copies the folder to the nodes." >&2
        exit 2
    fi
    cat "$GMWAE_SECRETS/$1"
}
