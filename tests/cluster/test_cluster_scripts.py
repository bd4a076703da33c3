"""The head's setup script (cluster/head_setup.sh) run as Ray runs a setup command
(`bash --login -c -i '...'`), on this machine with its folders and ports set through a
settings file: PostgreSQL and the MLflow server come up on 127.0.0.1, a second run keeps
the data and replaces the server, and a missing password stops it saying what to do."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest

from cluster.local import _pg_bin, free_port
from cluster.onprem_loopback import _pid_alive

ROOT = Path(__file__).parents[2]
SETUP = ROOT / "cluster" / "head_setup.sh"


def run_as_ray_does(command: str, settings: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GMWAE_CLUSTER_ENV": str(settings)}
    return subprocess.run(["bash", "--login", "-c", "-i", command], capture_output=True,
                          text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture
def head(tmp_path_factory):
    """A head's folders (state under /tmp: the `postgres` user must reach it) and ports."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="ghs-", dir="/tmp"))
    base.chmod(0o755)
    (base / "secrets").mkdir(mode=0o700)
    pg, server = free_port(), free_port()
    settings = base / "cluster.env"
    settings.write_text(f"GMWAE_VENV={sys.prefix}\nGMWAE_SECRETS={base / 'secrets'}\n"
                        f"GMWAE_STATE={base / 'state'}\nGMWAE_PG_PORT={pg}\n"
                        f"GMWAE_MLFLOW_PORT={server}\n")
    yield base, settings, pg, server
    pidfile = base / "state" / "mlflow.pid"
    if pidfile.is_file():
        try:
            os.killpg(int(pidfile.read_text()), signal.SIGTERM)
        except ProcessLookupError:
            pass
    data = base / "state" / "postgres"
    if (data / "postmaster.pid").exists():
        subprocess.run(["runuser", "-u", "postgres", "--", _pg_bin("pg_ctl"), "-D", str(data),
                        "-m", "immediate", "stop"], capture_output=True)
    subprocess.run(["rm", "-rf", str(base)])


def test_head_setup_starts_the_stores_and_a_second_run_keeps_the_data_and_replaces_the_server(
        head):
    base, settings, pg, server = head
    (base / "secrets" / "pg_password").write_text("a'quote and space\n")
    first = run_as_ray_does(f"bash {SETUP}", settings)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"PostgreSQL on 127.0.0.1:{pg}" in first.stdout
    storage = f"postgresql://gmwae:a%27quote%20and%20space@127.0.0.1:{pg}/optuna"
    optuna.create_study(study_name="kept", storage=storage).enqueue_trial({"x": 1})
    client = mlflow.MlflowClient(f"http://127.0.0.1:{server}")
    client.create_experiment("kept")
    pid = int((base / "state" / "mlflow.pid").read_text())

    second = run_as_ray_does(f"bash {SETUP}", settings)
    assert second.returncode == 0, second.stderr[-3000:]
    new_pid = int((base / "state" / "mlflow.pid").read_text())
    assert new_pid != pid and not _pid_alive(pid) and _pid_alive(new_pid)
    assert len(optuna.load_study(study_name="kept", storage=storage).trials) == 1
    assert client.get_experiment_by_name("kept") is not None
    # listening on 127.0.0.1 only
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    for port in (pg, server):
        addresses = {line.split()[3].rsplit(":", 1)[0] for line in listening.splitlines()
                     if line.split()[3].endswith(f":{port}")}
        assert addresses == {"127.0.0.1"}, (port, addresses)


def test_head_setup_without_the_password_file_stops_and_says_where_it_belongs(head):
    base, settings, _, _ = head
    done = run_as_ray_does(f"bash {SETUP}", settings)
    assert done.returncode == 2
    assert f"No {base / 'secrets' / 'pg_password'}" in done.stderr
    assert "docs/cluster.md" in done.stderr
    assert not (base / "state").exists()  # nothing started, nothing written

