"""ray_cluster_onprem.yaml on this machine: real SSH, real `ray up` / `ray down`, with
loopback addresses standing in for the lab's machines.

    python -m cluster.onprem_loopback up --dir runs/onprem     # sshd, DIR/cluster.yaml
    ray up -y runs/onprem/cluster.yaml                       # head 127.0.0.2, worker 127.0.0.3
    ray job submit --address http://127.0.0.1:PORT -- gmwae study run ... (printed by `up`)
    ray down -y runs/onprem/cluster.yaml
    python -m cluster.onprem_loopback down --dir runs/onprem   # sshd, stores, leftovers, by pid

`up` starts Debian's OpenSSH server on 127.0.0.2 and up (port 22: Ray's local provider
has no port setting) with a key of its own in DIR, and writes DIR/cluster.yaml: the
shipped on-premises file with its addresses, login and folders replaced, and nothing
else. Its setup and start commands are the shipped ones (the scripts in cluster/): `ray
up` runs them over SSH, and they install nothing into this checkout's venv when it holds
their marker (`make venv` writes it), start PostgreSQL and the MLflow server on the head,
and start each node's Ray. What differs because every "machine" is this one is settings
only, in DIR/cluster.env (cluster/settings.sh reads it; sshd points every session at it):

- folders: the project is this checkout, the venv this one, the head's state (PostgreSQL's
  data, MLflow's artifacts) a folder under /tmp, the secrets DIR/secrets;
- ports: the stores' and each node's Ray ports are fixed, a block per node from 20000,
  each node with a temp folder of its own and its own --node-ip-address;
- `ray` on the nodes' PATH is DIR/bin/ray, which passes everything to Ray except
  `ray stop`: Ray's stops every Ray process on the machine; this one stops the Ray of
  the node the SSH session reached (SSH_CONNECTION names it) and, on the head, of the
  whole cluster. So `ray down` stops this cluster, workers included, and leaves other
  Ray clusters on the machine alone.

`ray up` leaves on the head what it leaves on any head: ~/ray_bootstrap_config.yaml and
~/ray_bootstrap_key.pem, here in this machine's home; `down` restores whatever was there
before, and stops the head's PostgreSQL and MLflow server.
"""
from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .local import ClusterError, _pg_bin, node_port_base, node_ports

__all__ = ["OnPremLoopback", "HEAD_IP", "SHIPPED_CONFIG"]

PROJECT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = PROJECT / "ray_cluster_onprem.yaml"
SHIPPED_PROJECT = "~/gmwae-studies"
"""Where the shipped file puts the project on a node (its file_mounts and commands)."""
SHIPPED_SECRETS = "~/.gmwae/secrets"
HEAD_IP = "127.0.0.2"
_PATH_ENV = "GMWAE_LOOPBACK_PATH"
_SETTINGS_ENV = "GMWAE_CLUSTER_ENV"
_BASHRC_MARK = "# gmwae onprem loopback (cluster/onprem_loopback.py)"
_BOOTSTRAP = ("ray_bootstrap_config.yaml", "ray_bootstrap_key.pem")
# The head's own ports, after its node services in its block (cluster.local.node_port_base):
# fixed, as every node's are here, because `ray up` starts the nodes long after `up` wrote
# their commands, and a free port found at `up` could be taken by then (the worker's start
# then fails for good: Ray's local provider does not retry it).
_HEAD_PORTS = {"gcs": 6, "dashboard": 7, "ray-client-server": 8}
# The head's stores, in the block after the last worker's (workers are 127.0.0.3-10).
_STORE_PORTS = {"postgres": node_port_base(9), "mlflow": node_port_base(9) + 1}


def venv_marker(venv: Path, project: Path = PROJECT) -> Path:
    """The file cluster/node_setup.sh finds in a venv that already holds the project's
    dependencies (the hash of the project's folder and pyproject.toml; `make venv` writes
    it too)."""
    digest = hashlib.sha256(f"{project}\n".encode() + (project / "pyproject.toml").read_bytes())
    return venv / f".deps-{digest.hexdigest()[:12]}"


def _worker_ips(workers: int) -> list[str]:
    return [f"127.0.0.{3 + i}" for i in range(workers)]


@dataclass
class LoopbackState:
    root: str
    cluster_name: str = ""
    workers: int = 1
    sshd_pid: int = 0
    temp_root: str = ""
    """Short folder under /tmp with one Ray temp folder per node (Ray's sockets live there)."""
    state_root: str = ""
    """The head's GMWAE_STATE (PostgreSQL's data, MLflow's artifacts): under /tmp, where the
    `postgres` user reaches it, and apart from temp_root, whose paths mark Ray's processes."""
    gcs_port: int = 0
    dashboard_port: int = 0
    pg_port: int = 0
    mlflow_port: int = 0
    saved_bootstrap: dict = field(default_factory=dict)
    """~/ray_bootstrap_* files that existed before `up` (name: content), put back by `down`."""


class OnPremLoopback:
    def __init__(self, root: str | Path, workers: int = 1):
        self.root = Path(root).resolve()
        if not 1 <= workers <= 8:
            raise ClusterError(f"--workers must be 1..8 (127.0.0.3 to 127.0.0.10), got {workers}.")
        name = "gmwae-onprem-" + hashlib.sha1(str(self.root).encode()).hexdigest()[:6]
        self.state = LoopbackState(str(self.root), name, workers)

    # ------------------------------------------------------------------ paths
    @property
    def key(self) -> Path:
        return self.root / "ssh" / "id_ed25519"

    @property
    def config_path(self) -> Path:
        return self.root / "cluster.yaml"

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def settings_path(self) -> Path:
        return self.root / "cluster.env"

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    @property
    def state_dir(self) -> str:
        return self.state.state_root

    @property
    def pg_password(self) -> str:
        return (self.secrets_dir / "pg_password").read_text().strip()

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.state.dashboard_port}"

    @property
    def ips(self) -> list[str]:
        return [HEAD_IP, *_worker_ips(self.state.workers)]

    def node_temp_dir(self, ip: str) -> str:
        return f"{self.state.temp_root}/n{ip.rsplit('.', 1)[1]}"

    def stores(self) -> dict[str, str]:
        """The head's stores, as the shipped head setup starts them: PostgreSQL (the password
        from the drivers' environment, as studies/paper-cluster.yaml names it) and the MLflow
        server; checkpoints in DIR/stores/NAME/ray."""
        return {"optuna": "postgresql://gmwae:${GMWAE_PG_PASSWORD}@127.0.0.1:"
                          f"{self.state.pg_port}/optuna",
                "mlflow": f"http://127.0.0.1:{self.state.mlflow_port}",
                "ray": f"{self.root / 'stores'}/{{name}}/ray"}

    def optuna_url(self) -> str:
        return f"postgresql://gmwae:{self.pg_password}@127.0.0.1:{self.state.pg_port}/optuna"

    def study_sets(self) -> list[str]:
        """`--set` arguments that put a study's stores in DIR/stores (absolute: the job's
        driver runs in the head's folder, not yours)."""
        return [f"storage.{k}={v}" for k, v in self.stores().items()]

    # ------------------------------------------------------------------ up
    def start(self) -> "OnPremLoopback":
        if os.geteuid() != 0:
            raise ClusterError("The loopback on-prem cluster starts an SSH server on port 22, "
                               "which needs root. Run it as root (or in a container).")
        for tool in ("/usr/sbin/sshd", "rsync", "ssh-keygen"):
            if not shutil.which(tool):
                raise ClusterError(f"{tool} is not installed; `ray up` of the local provider "
                                   f"needs an SSH server and rsync. Install them with "
                                   f"`apt-get install openssh-server rsync` (or `make sysdeps`).")
        self.state.gcs_port = node_port_base(0) + _HEAD_PORTS["gcs"]
        self.state.dashboard_port = node_port_base(0) + _HEAD_PORTS["dashboard"]
        self.state.pg_port, self.state.mlflow_port = _STORE_PORTS["postgres"], _STORE_PORTS["mlflow"]
        marker = venv_marker(Path(sys.prefix))
        if not marker.is_file():
            raise ClusterError(
                f"This venv ({sys.prefix}) has no {marker.name}: the shipped setup "
                f"(cluster/node_setup.sh) would rebuild it while it runs. Run `make venv`, "
                f"which installs the project and writes the marker, then `up` again.")
        _pg_bin("initdb")  # PostgreSQL's programs, which the head's setup would apt-get
        self._check_ports_free()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        self.state.temp_root = tempfile.mkdtemp(prefix="gop-", dir="/tmp")
        self.state.state_root = tempfile.mkdtemp(prefix="gos-", dir="/tmp")
        os.chmod(self.state.state_root, 0o755)  # the `postgres` user reaches its data folder
        try:
            self._keys()
            self._secrets()
            self._start_sshd()
            self._write_ray_wrapper()
            self._save_bootstrap()
            self._auth_token()
            self._bashrc(add=True)
            self.settings_path.write_text(self._settings())
            self.config_path.write_text(self._cluster_yaml())
            self._save()
        except BaseException:
            self.stop()
            raise
        return self

    def node_port_flags(self, ip: str) -> list[str]:
        """The `ray start` port flags of the node at `ip`: its block's fixed ports (the
        head's GCS and dashboard ports are in its command besides)."""
        flags = node_ports(self.ips.index(ip), fixed=True)
        if ip == HEAD_IP:
            flags.append(f"--ray-client-server-port="
                         f"{node_port_base(0) + _HEAD_PORTS['ray-client-server']}")
        return flags

    def _check_ports_free(self) -> None:
        """Every fixed port of every node free now, or a ClusterError naming it (checked
        before anything starts: a node whose port is taken would never join)."""
        ports = [(HEAD_IP, "gcs", self.state.gcs_port),
                 (HEAD_IP, "dashboard", self.state.dashboard_port),
                 (HEAD_IP, "postgres", self.state.pg_port),
                 (HEAD_IP, "mlflow", self.state.mlflow_port)]
        for ip in self.ips:
            for flag in self.node_port_flags(ip):
                name, value = flag[2:].split("=")
                if not name.endswith("worker-port"):  # a range Ray's workers take from
                    ports.append((ip, name.removesuffix("-port"), int(value)))
        for ip, name, port in ports:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("0.0.0.0", port))
                except OSError:
                    raise ClusterError(
                        f"Port {port} ({name}, node {ip}) is in use on this machine; the "
                        f"loopback cluster's nodes use fixed ports from {node_port_base(0)} "
                        f"(a block of 1,000 per node). See what holds it with "
                        f"`ss -ltnp 'sport = :{port}'`, stop it (or `down` an earlier "
                        f"loopback cluster) and run `up` again.") from None

    def _secrets(self) -> None:
        """DIR/secrets stands for your ~/.gmwae/secrets: the PostgreSQL password."""
        self.secrets_dir.mkdir(mode=0o700, exist_ok=True)
        path = self.secrets_dir / "pg_password"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(18) + "\n")
            path.chmod(0o600)

    def _keys(self) -> None:
        ssh = self.root / "ssh"
        ssh.mkdir(mode=0o700, exist_ok=True)
        for path, comment in ((self.key, "ray up"), (ssh / "host_ed25519", "loopback sshd")):
            if not path.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                                "-f", str(path)], check=True, capture_output=True)
        (ssh / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())

    def _start_sshd(self) -> None:
        ssh = self.root / "ssh"
        listen = "\n".join(f"ListenAddress {ip}:22" for ip in self.ips)
        (ssh / "sshd_config").write_text(
            f"{listen}\nHostKey {ssh / 'host_ed25519'}\nPidFile {ssh / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {ssh / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            f"StrictModes no\nMaxStartups 100\nMaxSessions\t100\n"
            f"SetEnv {_PATH_ENV}={self.bin_dir}:{Path(sys.executable).parent} "
            f"{_SETTINGS_ENV}={self.settings_path}\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        log = self.root / "logs" / "sshd.log"
        # -D: stays in the foreground, so its pid is ours to stop; -e: log to the file
        proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(ssh / "sshd_config")],
                                stdout=open(log, "a"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.state.sshd_pid = proc.pid
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-1500:]
                raise ClusterError(f"sshd exited: {tail.strip()}. If port 22 is taken on these "
                                   f"addresses (a system sshd listening on all of them), stop it "
                                   f"or make it listen on 127.0.0.1 only: Ray's local provider "
                                   f"connects on port 22.")
            if all(_listening(ip, 22) for ip in self.ips):
                return
            time.sleep(0.2)
        raise ClusterError(f"sshd did not listen on {', '.join(self.ips)}:22 within 20 s "
                           f"(log: {log}).")

    def _write_ray_wrapper(self) -> None:
        self.bin_dir.mkdir(exist_ok=True)
        wrapper = self.bin_dir / "ray"
        venv_bin = Path(sys.executable).parent
        wrapper.write_text(
            "#!/bin/sh\n"
            "# `ray` on the loopback nodes. `ray stop` stops the Ray of the node this SSH\n"
            "# session reached only (every node is this machine); the rest is Ray's.\n"
            f'if [ "$1" = stop ]; then exec {sys.executable} -m cluster.onprem_loopback '
            f'stop-node --dir {self.root}; fi\n'
            f'exec {venv_bin / "ray"} "$@"\n')
        wrapper.chmod(0o755)

    def _auth_token(self) -> None:
        """Ray >= 2.59 authenticates every node and client with ~/.ray/auth_token (the shipped
        file copies yours to the nodes; here every node is this machine and reads it)."""
        if not (Path.home() / ".ray" / "auth_token").is_file():
            subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token",
                            "--generate"], check=True, capture_output=True)

    def _bashrc(self, add: bool) -> None:
        """The nodes' login shells find DIR/bin/ray, then this venv (gmwae, python: what the
        shipped file's ~/venv/bin line gives): a line in ~/.bashrc that only sessions of this
        sshd act on (it sets the variable; other shells skip the line)."""
        path = Path.home() / ".bashrc"
        lines = path.read_text().splitlines() if path.exists() else []
        lines = [line for line in lines if _BASHRC_MARK not in line]
        if add:
            lines.append(f'[ -n "${_PATH_ENV}" ] && export PATH="${_PATH_ENV}:$PATH"  {_BASHRC_MARK}')
        if lines or path.exists():
            path.write_text("\n".join(lines) + ("\n" if lines else ""))

    def _save_bootstrap(self) -> None:
        for name in _BOOTSTRAP:
            path = Path.home() / name
            if path.is_file():
                self.state.saved_bootstrap[name] = path.read_text()

    def _settings(self) -> str:
        """DIR/cluster.env, which cluster/settings.sh sources on every node: the folders
        and ports of this one-machine cluster, and each node's own `ray start` flags (its
        address, temp folder and ports), picked by the address its SSH session reached."""
        cases = "\n".join(
            f"    {ip}) GMWAE_RAY_START_ARGS='--node-ip-address={ip} "
            f"--temp-dir={self.node_temp_dir(ip)} {' '.join(self.node_port_flags(ip))}' ;;"
            for ip in self.ips)
        return "\n".join([
            f"# Written by `python -m cluster.onprem_loopback up`: the settings of the cluster in",
            f"# {self.root} (cluster/settings.sh reads them on every node).",
            f"GMWAE_PROJECT={PROJECT}",
            f"GMWAE_VENV={sys.prefix}",
            f"GMWAE_SECRETS={self.secrets_dir}",
            f"GMWAE_STATE={self.state_dir}",
            f"GMWAE_BASHRC={self.root / 'bashrc'}",
            f"GMWAE_PG_PORT={self.state.pg_port}",
            f"GMWAE_MLFLOW_PORT={self.state.mlflow_port}",
            f"GMWAE_RAY_PORT={self.state.gcs_port}",
            f"GMWAE_DASHBOARD_PORT={self.state.dashboard_port}",
            'case "$(echo "$SSH_CONNECTION" | cut -d" " -f3)" in', cases, "esac", ""])

    def _cluster_yaml(self) -> str:
        """The shipped file with its addresses, login and folders replaced (`substituted`
        says which); every command is the shipped one with the project's folder replaced."""
        import yaml

        config = yaml.safe_load(SHIPPED_CONFIG.read_text())
        config.update(substituted(config, self))
        header = (f"# Written by `python -m cluster.onprem_loopback up --dir {self.root}` from\n"
                  f"# {SHIPPED_CONFIG.name}: the same cluster with loopback addresses. Use:\n"
                  f"#   ray up -y {self.config_path}\n#   ray down -y {self.config_path}\n")
        return header + yaml.safe_dump(config, sort_keys=False, width=1000)

    # ------------------------------------------------------------------ down
    def node_processes(self, ip: Optional[str] = None) -> list:
        """This cluster's Ray processes (one node's, with `ip`): those started with the
        node's temp folder, and everything under them (trial workers, job drivers); for the
        whole cluster also those that name its GCS address and no folder (the head's Ray
        client server, whose parent `ray start` has exited)."""
        import psutil

        marks = [f"{self.node_temp_dir(ip)}/"] if ip else [f"{self.state.temp_root}/"]
        if ip is None and self.state.gcs_port:
            marks.append(f"={HEAD_IP}:{self.state.gcs_port} ")
        found = {}
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info.get("cmdline") or []) + " "
            if any(m in cmd or cmd.endswith(m.rstrip("/") + " ") for m in marks):
                try:
                    for p in [proc, *proc.children(recursive=True)]:
                        found[p.pid] = p
                except psutil.NoSuchProcess:
                    pass
        return list(found.values())

    def stop_node(self, ip: Optional[str]) -> int:
        """SIGTERM the node's Ray processes, SIGKILL what is left after 10 s; their count."""
        import psutil

        procs = self.node_processes(ip)
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        return len(procs)

    def stop(self) -> dict:
        """Everything `up` started or changed, undone: Ray processes left on the nodes
        (`ray down` stops the head's only; Ray's workers would exit a minute later),
        sshd, the ~/.bashrc line, the ~/ray_bootstrap_* files put back, Ray's state file
        for the cluster. Returns what was found still running."""
        left = {"ray_processes": self.stop_node(None) if self.state.temp_root else 0,
                "sshd": False}
        if self.state.sshd_pid:
            left["sshd"] = _stop_group(self.state.sshd_pid, 10)
        left["stores"] = self._stop_stores()
        self._bashrc(add=False)
        for name in _BOOTSTRAP:
            path = Path.home() / name
            if name in self.state.saved_bootstrap:
                path.write_text(self.state.saved_bootstrap[name])
            else:
                path.unlink(missing_ok=True)
        for suffix in ("state", "lock"):
            Path(f"/tmp/ray/cluster-{self.state.cluster_name}.{suffix}").unlink(missing_ok=True)
        for folder in (self.state.temp_root, self.state.state_root):
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        return left

    def _stop_stores(self) -> list[str]:
        """The MLflow server (its process group, from the pid file the head's setup wrote)
        and PostgreSQL (pg_ctl, as `postgres`), when the head's setup started them."""
        stopped = []
        if not self.state.state_root:
            return stopped
        pidfile = Path(self.state_dir) / "mlflow.pid"
        if pidfile.is_file() and _stop_group(int(pidfile.read_text()), 15):
            stopped.append("mlflow")  # the server and its workers: one process group
        data = Path(self.state_dir) / "postgres"
        if (data / "postmaster.pid").exists():
            done = subprocess.run(["runuser", "-u", "postgres", "--", _pg_bin("pg_ctl"), "-D",
                                   str(data), "-m", "fast", "-w", "stop"],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                stopped.append("postgres")
        return stopped

    # ------------------------------------------------------------------ state
    def _save(self) -> None:
        (self.root / "onprem.json").write_text(json.dumps(asdict(self.state), indent=2))

    @classmethod
    def load(cls, root: str | Path) -> "OnPremLoopback":
        root = Path(root).resolve()
        path = root / "onprem.json"
        if not path.is_file():
            raise ClusterError(f"No loopback on-prem cluster in {root} (no onprem.json). Start "
                               f"one with `python -m cluster.onprem_loopback up --dir {root}`.")
        self = cls(root)
        self.state = LoopbackState(**json.loads(path.read_text()))
        return self

    def describe(self) -> str:
        sets = " ".join(f"--set '{s}'" for s in self.study_sets())
        return "\n".join([
            f"sshd on {', '.join(self.ips)}:22 (pid {self.state.sshd_pid}); cluster file "
            f"{self.config_path}; settings {self.settings_path}",
            f"  head {HEAD_IP} (0 CPUs; PostgreSQL on 127.0.0.1:{self.state.pg_port}, MLflow on "
            f"127.0.0.1:{self.state.mlflow_port} once `ray up` ran its setup), workers "
            f"{', '.join(_worker_ips(self.state.workers))}; jobs: {self.dashboard_url}",
            "Bring it up, run a shipped spec on it, take it down:",
            f"  ray up -y {self.config_path}",
            f"  ray job submit --address {self.dashboard_url} -- gmwae study run "
            f"{PROJECT / 'studies/smoke.yaml'} {sets}",
            f"  ray down -y {self.config_path}",
            f"  python -m cluster.onprem_loopback down --dir {self.root}"])


def substituted(shipped: dict, cluster: "OnPremLoopback") -> dict:
    """The keys of the shipped on-premises file that the loopback form replaces, with their
    values: addresses and login (provider, auth, the worker count that follows from the
    addresses, the cluster's name), and folders (file_mounts' node paths; the project's
    folder in the commands). Everything else, the commands included, stays as shipped."""
    def node_path(path: str) -> str:
        for shipped_path, here in ((SHIPPED_PROJECT, str(PROJECT)),
                                   (SHIPPED_SECRETS, str(cluster.secrets_dir))):
            if path == shipped_path or path.startswith(shipped_path + "/"):
                return here + path[len(shipped_path):]
        return path

    def local_path(node: str, local: str) -> str:
        return {SHIPPED_PROJECT: str(PROJECT), SHIPPED_SECRETS: str(cluster.secrets_dir)}.get(
            node, local)

    workers = _worker_ips(cluster.state.workers)
    changed = {
        "cluster_name": cluster.state.cluster_name,
        "provider": {"type": "local", "head_ip": HEAD_IP, "worker_ips": workers},
        "auth": {"ssh_user": getpass.getuser(), "ssh_private_key": str(cluster.key)},
        "min_workers": len(workers), "max_workers": len(workers),
        "file_mounts": {node_path(node): local_path(node, local)
                        for node, local in shipped["file_mounts"].items()},
    }
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        changed[key] = [c.replace(SHIPPED_PROJECT + "/", f"{PROJECT}/") for c in shipped[key]]
    return changed


def _listening(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((ip, port)) == 0


def _stop_group(pid: int, timeout: float) -> bool:
    """SIGTERM the process group led by `pid`, SIGKILL what is left of it after `timeout`
    seconds; whether the group was running."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.onprem_loopback",
                                description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["up", "down", "stop-node"],
                   help="stop-node: what `ray stop` runs on a loopback node (DIR/bin/ray)")
    p.add_argument("--dir", default="runs/onprem", help="folder for keys, logs, cluster.yaml")
    p.add_argument("--workers", type=int, default=1, help="worker machines, from 127.0.0.3")
    args = p.parse_args(argv)
    try:
        if args.action == "up":
            if (Path(args.dir) / "onprem.json").exists():
                print(f"error: {args.dir} already holds a loopback cluster; `down` it first or "
                      f"use another --dir", file=sys.stderr)
                return 2
            print(OnPremLoopback(args.dir, args.workers).start().describe())
        elif args.action == "stop-node":
            cluster = OnPremLoopback.load(args.dir)
            fields = os.environ.get("SSH_CONNECTION", "").split()
            ip = fields[2] if len(fields) == 4 else None
            if ip not in cluster.ips:
                print(f"error: `ray stop` on the loopback cluster runs on one of its nodes "
                      f"({', '.join(cluster.ips)}) over SSH; SSH_CONNECTION is "
                      f"{os.environ.get('SSH_CONNECTION')!r}", file=sys.stderr)
                return 2
            # the head's stop is the cluster's: `ray down` stops the head only (the local
            # provider leaves workers to notice), and a worker's leftover processes carry
            # --gcs-address=HEAD:PORT, which a later `ray start --head` on this machine
            # takes for a GCS still running there ("already running") and refuses to start
            which = None if ip == HEAD_IP else ip
            print(f"Stopped {cluster.stop_node(which)} Ray processes of "
                  f"{'the cluster (head and workers)' if which is None else f'node {ip}'}.")
        else:
            cluster = OnPremLoopback.load(args.dir)
            left = cluster.stop()
            shutil.rmtree(cluster.root, ignore_errors=True)
            stores = " and ".join(left["stores"]) or "no store"
            print(f"stopped sshd, {stores} and {left['ray_processes']} Ray processes left "
                  f"running; removed {cluster.root}")
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
