"""A real multi-node cluster on this machine: PostgreSQL, an MLflow server, a Ray head and
Ray workers, each its own processes, all in one folder and all torn down together.

    python -m cluster.local up --dir runs/local-cluster      # prints the stores, env
    python -m cluster.local down --dir runs/local-cluster
    python -m cluster.local up --autoscaling --dir runs/autoscaling   # 0..2 GPU workers

It is the cluster form of every store (a `postgresql://` Optuna storage, an `http://`
MLflow tracking server with proxied artifacts, a Ray cluster of `ray start` nodes and a
shared Ray storage folder) with the same layout as ray_cluster.yaml's head: PostgreSQL
and MLflow bound to 127.0.0.1, the head running no trials (0 CPUs), the trials on the
workers. Tests use it as a fixture (tests/cluster); users use it to try a cluster study
before paying for one. The PostgreSQL password is generated into DIR/pg_password and
handed to studies through the environment variable GMWAE_PG_PASSWORD, never written in a
spec.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import psutil

__all__ = ["LocalCluster", "ClusterError", "free_port", "node_port_base", "node_ports",
           "ray_auth_headers"]

PG_USER = "gmwae"
PASSWORD_ENV = "GMWAE_PG_PASSWORD"


class ClusterError(RuntimeError):
    """A part of the local cluster could not be started."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_NODE_SERVICES = ("node-manager", "object-manager", "metrics-export", "runtime-env-agent",
                  "dashboard-agent-grpc", "dashboard-agent-listen")


def node_port_base(index: int) -> int:
    """The first port of node `index`'s block (0 for the head): 1,000 ports from
    20,000 + 1,000 x index, below the kernel's ephemeral range (32768-60999), so no
    outgoing connection on this host takes one. Its first ten are for the node's services
    where they must be fixed ahead (`node_ports(fixed=True)`, the on-prem loopback's
    head ports), the other 990 for its Ray workers."""
    return 20000 + 1000 * index


def node_ports(index: int, fixed: bool = False) -> list[str]:
    """`ray start` flags for every port a node binds, distinct per node: several raylets
    share this host. `fixed`: the services' ports are the first of the node's block, for a
    node started long after its command is written (a free port found then may be taken by
    the time it starts); else free ports found now, for a node started at once."""
    low = node_port_base(index)
    ports = [low + j for j in range(len(_NODE_SERVICES))] if fixed else \
        [free_port() for _ in _NODE_SERVICES]
    return [f"--{name}-port={port}" for name, port in zip(_NODE_SERVICES, ports)] + [
        f"--min-worker-port={low + 10}", f"--max-worker-port={low + 999}"]


def _pg_bin(name: str) -> str:
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).is_file():
            return str(folder / name)
    found = shutil.which(name)
    if found:
        return found
    raise ClusterError(f"PostgreSQL's {name} is not installed. Install it with "
                       f"`apt-get install postgresql` (or `make sysdeps`).")


def _wait(check, what: str, timeout: float, log: Optional[Path] = None,
          procs: tuple = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    tail = ""
    if log and log.is_file():
        tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
    dead = any(p.poll() is not None for p in procs)
    raise ClusterError(f"{what} {'exited' if dead else f'did not come up within {timeout:.0f} s'}."
                       f"{tail}")


def ray_auth_headers() -> dict[str, str]:
    """Ray >= 2.59 protects its dashboard with the token `ray start` writes; send it."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _get(url: str, timeout: float = 5):
    request = urllib.request.Request(url, headers=ray_auth_headers())
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return r.status, r.read()


def _http_ok(url: str) -> bool:
    return _get(url, 2)[0] == 200


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. An exited member that nobody has
    reaped yet (a zombie: the group's leader, when this process started it) still takes
    a signal, but it is not running: it does not count."""
    try:
        os.waitpid(pgid, os.WNOHANG)  # reap the leader if it is our exited child
    except ChildProcessError:
        pass
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


@dataclass
class ClusterState:
    root: str
    pg_port: int = 0
    mlflow_port: int = 0
    ray_port: int = 0
    dashboard_port: int = 0
    pids: dict = field(default_factory=dict)
    """Process-group leaders: mlflow, ray-head, ray-worker-0, ..."""
    workers: int = 0
    temp_dirs: list = field(default_factory=list)
    pg_dir: str = ""
    autoscaling: dict = field(default_factory=dict)
    """Set for an autoscaling cluster: the worker type's resources, max_workers, idle
    timeout (Ray's fake multi-node provider launches and removes the workers)."""


def autoscaling_config(gcs_address: str, max_workers: int, cpus: float, gpus: float,
                       idle_timeout_minutes: float) -> dict:
    """Ray's fake multi-node provider in ray_cluster.yaml's shape: a head with 0 CPUs and one
    worker type {CPU, GPU} from 0 to `max_workers` nodes, launched on this machine (with
    fake GPUs) as demand comes and removed when idle. Every key the launcher expects is
    present, as `ray up` would fill it in."""
    return {
        "cluster_name": "gmwae-local-autoscaling",
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        # Ray's own fake-cluster settings: the fake nodes are started by the provider itself,
        # so there is nothing for a node updater (SSH set-up) to do; with updaters on, the
        # autoscaler sees each new node's set-up "fail" and terminates it.
        # The autoscaler tells nodes apart by IP; all of them share this machine's, so it
        # keys them by node id (the head's is the provider's fixed FAKE_HEAD_NODE_ID).
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "use_node_id_as_ip": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0, "GPU": 0}, "node_config": {},
                                 "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": cpus, "GPU": gpus}, "node_config": {},
                           "min_workers": 0, "max_workers": max_workers},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


STOP_GRACE_S = 5.0
"""Seconds stop() gives the groups after SIGTERM. The MLflow server exits within one; Ray's
`ray start --block` and its GCS can take more than 15 s to shut down gracefully,
and none of their state outlives the cluster (its temp folders are removed, PostgreSQL is
stopped on its own), so they get SIGKILL after this."""


class LocalCluster:
    """PostgreSQL + MLflow server + Ray head (0 CPUs) + Ray workers on this machine: either
    `workers` workers started at once and kept, or (`autoscaling=True`) none at first and
    up to `workers` GPU workers that Ray's autoscaler launches on demand and removes when
    idle, as on a `ray up` cluster."""

    def __init__(self, root: str | Path, workers: int = 2, cpus_per_worker: float = 1,
                 autoscaling: bool = False, gpus_per_worker: float = 1,
                 idle_timeout_minutes: float = 0.5):
        self.root = Path(root).resolve()
        self.cpus_per_worker = cpus_per_worker
        self.state = ClusterState(str(self.root), workers=workers)
        if autoscaling:
            self.state.autoscaling = {"max_workers": workers, "cpus": cpus_per_worker,
                                      "gpus": gpus_per_worker,
                                      "idle_timeout_minutes": idle_timeout_minutes}
        self._as_postgres = os.geteuid() == 0  # initdb refuses to run as root

    # ------------------------------------------------------------------ addresses
    @property
    def password(self) -> str:
        return (self.root / "pg_password").read_text().strip()

    def optuna_url(self, with_password: bool = False) -> str:
        secret = self.password if with_password else "${%s}" % PASSWORD_ENV
        return f"postgresql://{PG_USER}:{secret}@127.0.0.1:{self.state.pg_port}/optuna"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.state.mlflow_port}"

    @property
    def ray_address(self) -> str:
        return f"127.0.0.1:{self.state.ray_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.state.dashboard_port}"

    @property
    def storage_path(self) -> Path:
        return self.root / "ray-storage"

    def env(self) -> dict[str, str]:
        """Environment for processes that use the cluster's stores (drivers, jobs)."""
        # Ray >= 2.59 starts heads with token authentication; every node and driver must
        # then run in token mode too (the token is ~/.ray/auth_token on this machine).
        return {**os.environ, PASSWORD_ENV: self.password, "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "token"}

    # ------------------------------------------------------------------ start / stop
    def start(self) -> "LocalCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        self.storage_path.mkdir(exist_ok=True)
        try:
            self._start_postgres()
            self.start_mlflow()
            self._start_ray()
        except BaseException:
            self.stop()
            raise
        self._save()
        return self

    def _run_pg(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        if self._as_postgres:
            cmd = ("runuser", "-u", "postgres", "--", *cmd)
        return subprocess.run(cmd, capture_output=True, text=True, **kw)

    def _start_postgres(self) -> None:
        (self.root / "pg_password").write_text(secrets.token_urlsafe(18))
        os.chmod(self.root / "pg_password", 0o600)
        self.state.pg_port = free_port()
        # The server's own folder (data, socket, log): under /tmp, owned by the `postgres`
        # user when we are root (initdb refuses root; pytest's folders are 0700).
        import tempfile

        pg_dir = Path(tempfile.mkdtemp(prefix="gmwae-pg-", dir="/tmp"))
        self.state.temp_dirs.append(str(pg_dir))
        self.state.pg_dir = str(pg_dir)
        data, sockets, log = pg_dir / "data", pg_dir / "sockets", pg_dir / "postgres.log"
        pwfile = pg_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        sockets.mkdir()
        log.touch()
        if self._as_postgres:
            for path in (pg_dir, pwfile, sockets, log):
                shutil.chown(path, "postgres", "postgres")
        done = self._run_pg(_pg_bin("initdb"), "-D", str(data), "-U", PG_USER,
                            f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8")
        pwfile.unlink()
        if done.returncode:
            raise ClusterError(f"initdb failed: {done.stderr[-2000:]}")
        done = self._run_pg(_pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                            "-o", f"-p {self.state.pg_port} -c listen_addresses=127.0.0.1 "
                                  f"-k {sockets}", "start")
        if done.returncode:
            raise ClusterError(f"PostgreSQL did not start: {done.stderr[-2000:]}"
                               f"{log.read_text()[-2000:]}")
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.state.pg_port, user=PG_USER,
                             password=self.password, dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE optuna")
            conn.execute("CREATE DATABASE mlflow")

    def start_mlflow(self) -> None:
        """Start (or restart, on the same port) the MLflow tracking server."""
        if not self.state.mlflow_port:
            self.state.mlflow_port = free_port()
        backend = (f"postgresql://{PG_USER}:{self.password}@127.0.0.1:{self.state.pg_port}/mlflow")
        log = open(self.root / "logs" / "mlflow.log", "a")
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend,
             "--artifacts-destination", str(self.root / "mlflow-artifacts"),
             "--host", "127.0.0.1", "--port", str(self.state.mlflow_port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        self.state.pids["mlflow"] = proc.pid
        _wait(lambda: _http_ok(self.mlflow_url + "/health"), "The MLflow server", 120,
              self.root / "logs" / "mlflow.log")
        self._save()

    def stop_mlflow(self) -> None:
        self._kill("mlflow")

    def _ray_cmd(self, *args: str) -> list[str]:
        return [str(Path(sys.executable).parent / "ray"), "start", "--block", *args]

    def _temp_dir(self, key: str) -> str:
        """Each node its own Ray temp folder: nodes sharing one would delete each other's
        runtime-env files (a job's working_dir) from under running drivers. Short, under
        /tmp, because Ray's unix sockets live there (path limit ~107 bytes)."""
        import tempfile

        folder = tempfile.mkdtemp(prefix=f"gmwae-{key.replace('ray-', '')}-", dir="/tmp")
        self.state.temp_dirs.append(folder)
        return folder

    def _start_node(self, key: str, args: list[str],
                    extra_env: Optional[dict] = None) -> subprocess.Popen:
        log = open(self.root / "logs" / f"{key}.log", "a")
        env = {**self.env(), "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
               **(extra_env or {})}
        args = [*args, f"--temp-dir={self._temp_dir(key)}"]
        proc = subprocess.Popen(self._ray_cmd(*args), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, cwd=self.root)
        self.state.pids[key] = proc.pid
        return proc

    @property
    def autoscaler_config_path(self) -> Path:
        return self.root / "autoscaler.yaml"

    def _start_ray(self) -> None:
        import yaml

        self.state.ray_port = free_port()
        self.state.dashboard_port = free_port()
        extra, env = [], {}
        if self.state.autoscaling:
            a = self.state.autoscaling
            self.autoscaler_config_path.write_text(yaml.safe_dump(autoscaling_config(
                f"127.0.0.1:{self.state.ray_port}", a["max_workers"], a["cpus"], a["gpus"],
                a["idle_timeout_minutes"]), sort_keys=False))
            extra = [f"--autoscaling-config={self.autoscaler_config_path}"]
            # the fake provider refuses to run without it; the autoscaler looks every second
            from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

            env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                   "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
                   "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID}
        head = self._start_node("ray-head", [
            "--head", f"--port={self.state.ray_port}", "--node-ip-address=127.0.0.1",
            "--num-cpus=0", "--num-gpus=0", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.state.dashboard_port}",
            f"--ray-client-server-port={free_port()}", "--disable-usage-stats",
            *node_ports(0), *extra], env)
        _wait(lambda: _http_ok(self.dashboard_url + "/api/version"), "The Ray head", 120,
              self.root / "logs" / "ray-head.log", (head,))
        if self.state.autoscaling:  # the workers come when a study asks for them
            _wait(lambda: self.alive_nodes() == 1, "The Ray head's raylet", 120,
                  self.root / "logs" / "ray-head.log", (head,))
            return
        for i in range(self.state.workers):  # one at a time: they share this host's session
            worker = self._start_node(f"ray-worker-{i}", [
                f"--address={self.ray_address}", "--node-ip-address=127.0.0.1",
                f"--num-cpus={self.cpus_per_worker}", "--num-gpus=0", "--disable-usage-stats",
                *node_ports(i + 1)])
            _wait(lambda: self.alive_nodes() == i + 2, f"Ray worker {i}", 120,
                  self.root / "logs" / f"ray-worker-{i}.log", (worker,))

    def alive_nodes(self) -> int:
        return len(self.alive_node_list())

    def alive_node_list(self) -> list[dict]:
        """The dashboard's summary of each alive node (raylet: nodeId, resourcesTotal, ...)."""
        nodes = json.loads(_get(self.dashboard_url + "/nodes?view=summary")[1])["data"]["summary"]
        return [n for n in nodes if n.get("raylet", {}).get("state") == "ALIVE"]

    def kill_worker(self, i: int) -> None:
        """SIGKILL every process of worker node i (its raylet, its trial workers)."""
        self._kill(f"ray-worker-{i}")

    def _kill(self, key: str, sig: int = signal.SIGKILL) -> None:
        pid = self.state.pids.get(key)
        if pid is None:
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            self.state.pids.pop(key, None)
            self._save()

    def processes(self) -> list[psutil.Process]:
        """The running processes (zombies aside) whose command line names one of this
        cluster's temp folders: PostgreSQL, and its Ray nodes' raylets, GCS and workers."""
        folders = tuple(self.state.temp_dirs)
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            try:
                if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                    continue
                cmdline = " ".join(proc.info["cmdline"] or ())
            except psutil.Error:
                continue
            if folders and any(folder in cmdline for folder in folders):
                found.append(proc)
        return found

    def stop(self) -> None:
        """Tear everything down (also what a failed start left): SIGTERM to every group,
        up to STOP_GRACE_S to exit, then SIGKILL to whatever is left, PostgreSQL stopped,
        and SIGKILL to any other process that names the cluster's temp folders."""
        for key in list(self.state.pids):
            self._kill(key, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(_group_alive(p) for p in self.state.pids.values()):
            time.sleep(0.5)
        for key in list(self.state.pids):
            self._kill(key)
        data = Path(self.state.pg_dir or "/nonexistent") / "data"
        if (data / "postmaster.pid").exists():
            self._run_pg(_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        # Processes of the cluster outside those groups (a node that a Ray process started
        # in a session of its own) still name the cluster's temp folders: SIGKILL them too.
        deadline = time.monotonic() + STOP_GRACE_S
        while (left := self.processes()) and time.monotonic() < deadline:
            for proc in left:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            time.sleep(0.2)
        for folder in self.state.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)

    def _save(self) -> None:
        (self.root / "cluster.json").write_text(json.dumps(asdict(self.state), indent=2))

    @classmethod
    def load(cls, root: str | Path) -> "LocalCluster":
        root = Path(root).resolve()
        path = root / "cluster.json"
        if not path.is_file():
            raise ClusterError(f"No local cluster in {root} (no cluster.json). Start one with "
                               f"`python -m cluster.local up --dir {root}`.")
        cluster = cls(root)
        cluster.state = ClusterState(**json.loads(path.read_text()))
        return cluster

    def study_sets(self) -> list[str]:
        """`--set` arguments that point a shipped spec at this cluster's stores."""
        return [f"storage.optuna={self.optuna_url()}", f"storage.mlflow={self.mlflow_url}",
                f"storage.ray={self.storage_path}"]

    def describe(self) -> str:
        a = self.state.autoscaling
        ray_line = (f"head: 0 CPUs; 0..{a['max_workers']} autoscaled workers x {{CPU "
                    f"{a['cpus']:g}, GPU {a['gpus']:g} (fake)}}, removed after "
                    f"{a['idle_timeout_minutes']:g} min idle" if a else
                    f"head: 0 CPUs; {self.state.workers} workers x {self.cpus_per_worker} CPU")
        sets = " ".join(f"--set '{s}'" for s in self.study_sets())
        return "\n".join([
            f"local cluster in {self.root}",
            f"  Ray:      {self.ray_address} ({ray_line}); jobs: {self.dashboard_url}",
            f"  Optuna:   {self.optuna_url()}   (password in {self.root / 'pg_password'})",
            f"  MLflow:   {self.mlflow_url}",
            f"  storage:  {self.storage_path}",
            "Run a shipped spec on it (the stores set on the command line):",
            f"  export {PASSWORD_ENV}=$(cat {self.root / 'pg_password'}) RAY_AUTH_MODE=token",
            f"  ray job submit --address {self.dashboard_url} --working-dir . -- "
            f"gmwae study run studies/smoke.yaml {sets}"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--dir", default="runs/local-cluster", help="folder for data, logs, state")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--autoscaling", action="store_true",
                   help="no workers at first: Ray's autoscaler launches up to --workers GPU "
                        "workers (fake GPUs) on demand and removes them when idle")
    p.add_argument("--gpus-per-worker", type=float, default=1, help="with --autoscaling")
    p.add_argument("--idle-minutes", type=float, default=0.5,
                   help="with --autoscaling: idle time before a worker is removed")
    args = p.parse_args(argv)
    try:
        if args.action == "up":
            if (Path(args.dir) / "cluster.json").exists():
                print(f"error: {args.dir} already holds a cluster; `down` it first or use "
                      f"another --dir", file=sys.stderr)
                return 2
            print(LocalCluster(args.dir, args.workers, args.cpus_per_worker, args.autoscaling,
                               args.gpus_per_worker, args.idle_minutes).start().describe())
        else:
            cluster = LocalCluster.load(args.dir)
            cluster.stop()
            shutil.rmtree(cluster.root, ignore_errors=True)
            print(f"stopped and removed {cluster.root}")
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
