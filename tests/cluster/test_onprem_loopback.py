"""ray_cluster_onprem.yaml brought up for real: an OpenSSH server on loopback addresses,
`ray up` / `ray down` of Ray's local provider (head 127.0.0.2, worker 127.0.0.3), the smoke
study submitted as `python -m cluster.onprem_loopback up` prints it, a second `ray up` after
`ray down`, and everything it started stopped by its ids afterwards."""
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from cluster.local import node_port_base, ray_auth_headers
from cluster.onprem_loopback import (HEAD_IP, PROJECT, SHIPPED_CONFIG, OnPremLoopback,
                                   _pid_alive)
from tests.conftest import LOCAL_CLUSTERS, ROOT

BIN = Path(sys.executable).parent
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
       "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
WORKER = "127.0.0.3"


def run(*args, timeout=300, **kw):
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=timeout,
                          cwd=ROOT, **kw)


def loopback(*args):
    return run(sys.executable, "-m", "cluster.onprem_loopback", *args, timeout=120)


def alive_ips(dashboard: str) -> set[str]:
    request = urllib.request.Request(dashboard + "/nodes?view=summary", headers=ray_auth_headers())
    with urllib.request.urlopen(request, timeout=5) as r:
        nodes = json.loads(r.read())["data"]["summary"]
    return {n["raylet"]["nodeManagerAddress"] for n in nodes
            if n.get("raylet", {}).get("state") == "ALIVE"}


def node_logs(cluster: OnPremLoopback, lines: int = 25) -> str:
    """The last lines of the logs that say why a node did not join: the head's autoscaler
    (it starts the workers over SSH) and each node's raylet and GCS."""
    out = []
    for path in sorted(Path(cluster.state.temp_root).glob("n*/session_latest/logs/*")):
        if path.name.startswith(("monitor", "raylet", "gcs_server")) and path.is_file():
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path}\n" + "\n".join(tail))
    return "\n".join(out) or f"(no logs under {cluster.state.temp_root})"


def wait_for_nodes(cluster: OnPremLoopback, ips: set[str], timeout: float = 180) -> None:
    """Until exactly `ips` are alive (the worker joins ~15 s after `ray up` on an idle
    machine; the other test worker's load slows it). A failed start is not retried by the
    local provider, so the autoscaler's and the nodes' logs come with the failure."""
    deadline, seen = time.monotonic() + timeout, set()
    while time.monotonic() < deadline:
        try:
            seen = alive_ips(cluster.dashboard_url)
        except OSError:
            seen = set()
        if seen == ips:
            return
        time.sleep(1)
    raise AssertionError(f"alive nodes {sorted(seen)} after {timeout:.0f} s, wanted "
                         f"{sorted(ips)}\n{node_logs(cluster)}")


COMMAND_KEYS = ("setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")


def mlflow_pid(cluster: OnPremLoopback) -> int:
    return int((Path(cluster.state_dir) / "mlflow.pid").read_text())


@LOCAL_CLUSTERS
@pytest.mark.slow  # sshd, two `ray up`s with the shipped setup, and a study: minutes
def test_ray_up_runs_the_shipped_commands_which_start_the_stores_and_a_study_runs_on_the_worker(
        tmp_path):
    home = Path.home()
    bashrc_before = (home / ".bashrc").read_text() if (home / ".bashrc").exists() else None
    folder = tmp_path / "onprem"
    up = loopback("up", "--dir", str(folder))
    assert up.returncode == 0, up.stderr
    cluster = OnPremLoopback.load(folder)
    try:
        config = cluster.config_path
        # What `up` wrote is the shipped file with addresses, login and folders replaced;
        # its commands are the shipped ones (the scripts in cluster/), the project's folder
        # on the node aside.
        written = yaml.safe_load(config.read_text())
        shipped = yaml.safe_load(SHIPPED_CONFIG.read_text())
        assert written["provider"] == {"type": "local", "head_ip": HEAD_IP,
                                       "worker_ips": [WORKER]}
        for key in COMMAND_KEYS:
            assert [c.replace(f"{PROJECT}/", "~/gmwae-studies/") for c in written[key]] \
                == shipped[key], key
        assert "cluster/head_setup.sh" in " ".join(written["head_setup_commands"])
        changed = {k for k in shipped if written[k] != shipped[k]}
        assert changed <= {"cluster_name", "provider", "auth", "min_workers", "max_workers",
                           "file_mounts", *COMMAND_KEYS}
        assert list(written["file_mounts"].values()) == [str(PROJECT), str(cluster.secrets_dir),
                                                         "~/.ray/auth_token"]
        # the settings hold folders, ports and each node's address, temp folder and ports
        settings = cluster.settings_path.read_text()
        assert set(re.findall(r"^(\w+)=", settings, re.M)) == {
            "GMWAE_PROJECT", "GMWAE_VENV", "GMWAE_SECRETS", "GMWAE_STATE", "GMWAE_BASHRC",
            "GMWAE_PG_PORT", "GMWAE_MLFLOW_PORT", "GMWAE_RAY_PORT", "GMWAE_DASHBOARD_PORT"}
        flags = re.findall(r"GMWAE_RAY_START_ARGS='([^']*)'", settings)
        assert len(flags) == 2 and all(
            re.fullmatch(r"--node-ip-address=[\d.]+|--temp-dir=\S+|--[a-z-]+-port=\d+", f)
            for line in flags for f in line.split())
        assert f"--node-manager-port={node_port_base(1)}" in flags[1]

        pids = []
        for attempt in ("first", "second"):  # a second `ray up` after `ray down` failed before
            done = run(str(BIN / "ray"), "up", "-y", str(config), timeout=600)
            assert done.returncode == 0, f"{attempt} ray up:\n{done.stdout[-6000:]}"
            wait_for_nodes(cluster, {HEAD_IP, WORKER})
            # the shipped head setup started the stores: PostgreSQL and the MLflow server
            pids.append(mlflow_pid(cluster))
            assert _pid_alive(pids[-1])
            client = mlflow.MlflowClient(f"http://127.0.0.1:{cluster.state.mlflow_port}")
            if attempt == "first":
                submit = next(line.strip() for line in up.stdout.splitlines()
                              if line.strip().startswith("ray job submit"))
                # as printed, with 2 trials per family (the shipped smoke spec has 3)
                job = run(*shlex.split(submit), "--set", "trials=2", timeout=600)
                assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
                assert re.search(rf"Ray cluster {HEAD_IP}:\d+ \(joined\): 2 node\(s\) running",
                                 job.stdout)
                # every trial ran on the worker (the head has no CPU for trials)
                results = list((folder / "stores" / "smoke" / "ray").rglob("result.json"))
                assert len(results) == 4
                ips = {json.loads(line)["node_ip"] for path in results
                       for line in path.read_text().splitlines()}
                assert ips == {WORKER}
            # in the head's PostgreSQL and MLflow server, and still there after `ray down` +
            # `ray up` (the head's setup keeps PostgreSQL's data and restarts the server)
            for family in ("gmwae", "gmvae"):
                trials = optuna.load_study(study_name=f"smoke/{family}",
                                           storage=cluster.optuna_url()).trials
                assert len(trials) == 2
                assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
            experiment = client.get_experiment_by_name("smoke")
            trial_runs = [r for r in client.search_runs([experiment.experiment_id])
                          if r.data.tags.get("role") == "trial"]
            assert len(trial_runs) == 4
            done = run(str(BIN / "ray"), "down", "-y", str(config))
            assert done.returncode == 0, done.stdout[-4000:]
            assert "Ray processes of the cluster (head and workers)" in done.stdout + done.stderr
            assert cluster.node_processes() == []  # head and worker stopped by `ray down`
        assert pids[0] != pids[1] and not _pid_alive(pids[0])  # one MLflow server at a time
    finally:
        down = loopback("down", "--dir", str(folder))
    assert down.returncode == 0, down.stderr
    assert "stopped sshd, mlflow and postgres" in down.stdout
    assert not _pid_alive(cluster.state.sshd_pid) and not _pid_alive(pids[-1])
    assert cluster.node_processes() == []
    after = (home / ".bashrc").read_text() if (home / ".bashrc").exists() else None
    assert after == bashrc_before
    assert not (home / "ray_bootstrap_config.yaml").exists() or \
        "ray_bootstrap_config.yaml" in cluster.state.saved_bootstrap
    assert not Path(cluster.state.temp_root).exists() and not folder.exists()
    assert not Path(cluster.state.state_root).exists()


@LOCAL_CLUSTERS  # holds a port of the cluster above
def test_up_refuses_a_taken_node_port_before_it_starts_anything(tmp_path):
    """The nodes' ports are fixed when `up` writes their commands (a worker started later
    by the autoscaler, on a port found free at `up`, failed for good when something had
    taken it meanwhile): `up` checks them first and names the one in use."""
    folder = tmp_path / "onprem"
    port = node_port_base(1)  # the worker's raylet
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen()
        up = loopback("up", "--dir", str(folder))
    assert up.returncode == 2
    assert f"Port {port} (node-manager, node {WORKER}) is in use" in up.stderr
    assert f"ss -ltnp 'sport = :{port}'" in up.stderr
    assert not folder.exists()  # no keys, no sshd, no cluster.yaml


def test_the_shipped_onprem_file_passes_rays_checks_and_starts_the_v1_autoscaler():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(SHIPPED_CONFIG.read_text()))
    validate_config(config)
    assert config["provider"]["type"] == "local"
    node_type = config["available_node_types"]["local.cluster.node"]
    assert node_type["min_workers"] == len(config["provider"]["worker_ips"])
    head = " ".join(config["head_start_ray_commands"])
    # v2 counts the head as one of the single node type's min_workers (no worker starts)
    assert "RAY_enable_autoscaler_v2=0" in head and "cluster/start_head.sh" in head
    scripts = PROJECT / "cluster"
    assert "--num-cpus=0" in (scripts / "start_head.sh").read_text()
    for name in ("start_head.sh", "start_worker.sh"):
        assert "RAY_AUTH_MODE=token" in (scripts / name).read_text()
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_stop_node_outside_an_ssh_session_and_a_missing_cluster_exit_2(tmp_path):
    done = loopback("down", "--dir", str(tmp_path / "none"))
    assert done.returncode == 2 and "No loopback on-prem cluster in" in done.stderr
    assert "python -m cluster.onprem_loopback up --dir" in done.stderr
    folder = tmp_path / "c"
    folder.mkdir()
    cluster = OnPremLoopback(folder)
    cluster._save()
    env = {k: v for k, v in ENV.items() if k != "SSH_CONNECTION"}
    done = subprocess.run([sys.executable, "-m", "cluster.onprem_loopback", "stop-node", "--dir",
                           str(folder)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 2 and "runs on one of its nodes" in done.stderr
    bad = loopback("up", "--dir", str(tmp_path / "w"), "--workers", "0")
    assert bad.returncode == 2 and "--workers must be 1..8" in bad.stderr


def test_up_refuses_a_venv_without_the_setup_marker_before_it_starts_anything(tmp_path,
                                                                              monkeypatch):
    """The shipped setup builds the venv unless it holds cluster/node_setup.sh's marker;
    on the loopback nodes that venv is the one running, so `up` stops first."""
    from cluster.local import ClusterError

    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    folder = tmp_path / "onprem"
    with pytest.raises(ClusterError, match=r"This venv \(.*/venv\) has no \.deps-[0-9a-f]{12}: "
                                           r"the shipped setup .* Run `make venv`"):
        OnPremLoopback(folder).start()
    assert not folder.exists()
