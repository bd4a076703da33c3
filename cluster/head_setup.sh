#!/usr/bin/env bash
# The head (head_setup_commands): PostgreSQL for Optuna and MLflow, and the MLflow tracking
# server, both listening on 127.0.0.1 only. PostgreSQL runs from its own data folder,
# $GMWAE_STATE/postgres (a volume or disk that can outlive the head), as the `postgres`
# user; the `gmwae` role's password comes from $GMWAE_SECRETS/pg_password, never from a
# command line. Run again, it keeps the data and restarts the MLflow server.
set -euo pipefail
. "$(dirname "$0")/settings.sh"

password=$(secret pg_password)
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
if [ -z "$(pg_bin)" ]; then
    # The distribution's packages, without the cluster they would create and start on 5432.
    sudo mkdir -p /etc/postgresql-common
    echo 'create_main_cluster = false' | sudo tee /etc/postgresql-common/createcluster.conf >/dev/null
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
fi
bin=$(pg_bin)
data="$GMWAE_STATE/postgres"
sockets="$GMWAE_STATE/run"
as_postgres() { (cd / && sudo -u postgres "$@"); }  # from a folder `postgres` may enter

sudo install -d -o "$(id -u)" -g "$(id -g)" -m 755 "$GMWAE_STATE"
sudo install -d -o postgres -g postgres -m 755 "$sockets"
if ! sudo test -f "$data/PG_VERSION"; then
    sudo install -d -o postgres -g postgres -m 700 "$data"
    as_postgres "$bin/initdb" -D "$data" -U postgres -E UTF8 --no-locale --auth-local=peer \
        --auth-host=scram-sha-256 >/dev/null
fi
if ! as_postgres "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    as_postgres "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start \
        -o "-p $GMWAE_PG_PORT -k $sockets -c listen_addresses=127.0.0.1" >/dev/null
fi
psql() { as_postgres "$bin/psql" -h "$sockets" -p "$GMWAE_PG_PORT" -U postgres -d postgres \
    -v ON_ERROR_STOP=1 -q "$@"; }
# The role and its password through stdin (no command line shows it), then the databases.
psql -v pw="$password" >/dev/null <<'SQL'
SELECT format('CREATE ROLE gmwae LOGIN PASSWORD %L', :'pw')
    WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'gmwae') \gexec
SELECT format('ALTER ROLE gmwae PASSWORD %L', :'pw') \gexec
SQL
for db in optuna mlflow; do
    if [ -z "$(psql -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
        psql -c "CREATE DATABASE $db OWNER gmwae"
    fi
done

# The MLflow server: an earlier one (its process group, from the pid file) is stopped
# first; a match on command lines would also match the shell Ray runs this script in.
pidfile="$GMWAE_STATE/mlflow.pid"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill -- "-$(cat "$pidfile")" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.2; done
fi
case "$GMWAE_ARTIFACTS" in *://*) ;; *) mkdir -p "$GMWAE_ARTIFACTS" ;; esac
log="$GMWAE_STATE/mlflow-server.log"
set -m  # the server gets a process group of its own: stopped whole, and not by the session's end
nohup "$GMWAE_VENV/bin/mlflow" server \
    --backend-store-uri "postgresql://gmwae:$password@127.0.0.1:$GMWAE_PG_PORT/mlflow" \
    --artifacts-destination "$GMWAE_ARTIFACTS" \
    --host 127.0.0.1 --port "$GMWAE_MLFLOW_PORT" > "$log" 2>&1 < /dev/null &
echo $! > "$pidfile"
set +m
for _ in $(seq 120); do
    if "$GMWAE_VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        "http://127.0.0.1:$GMWAE_MLFLOW_PORT/health" 2>/dev/null; then
        echo "PostgreSQL on 127.0.0.1:$GMWAE_PG_PORT ($data), MLflow on 127.0.0.1:$GMWAE_MLFLOW_PORT"
        exit 0
    fi
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "The MLflow server exited; the end of $log:" >&2; tail -n 20 "$log" >&2; exit 1
    fi
    sleep 1
done
echo "The MLflow server did not answer in 120 s; the end of $log:" >&2; tail -n 20 "$log" >&2
exit 1
