"""What the Ray cluster a study joined has now, and what its autoscaler can grow it to.

    shape = read_cluster_shape()            # after ray.init()
    print(shape.describe())                 # running nodes, node types, max workers
    check_trial_fits(shape, {"CPU": 1, "GPU": 0.25})   # ClusterError when nothing ever can

A cluster brought up with `ray up` starts with its head only: its GPU workers exist as
node types that the autoscaler launches on demand. So a trial's resources are checked
against the running nodes *and* the node types, read from (first found):

1. the cluster config the autoscaler publishes in the GCS (autoscaler v2, KubeRay);
2. the autoscaling config file named by $GMWAE_CLUSTER_CONFIG;
3. the file the cluster's own autoscaler process reads (`ray start --autoscaling-config`,
   found when the driver runs on the head, as `ray job submit` drivers do);
4. ~/ray_bootstrap_config.yaml, the file `ray up` leaves on the head (when the study
   joined a cluster, not when it started its own Ray).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ray import tune

from .spec import SpecError

__all__ = ["ClusterError", "NodeType", "ClusterShape", "read_cluster_shape", "check_trial_fits",
           "CLUSTER_CONFIG_ENV", "format_resources", "check_storage_reachable", "NodeWait",
           "size_gpu_share", "NoCudaStop", "data_dir_for_trials",
           "GPU_MEMORY_BY_INSTANCE", "instance_gpu_memory"]

CLUSTER_CONFIG_ENV = "GMWAE_CLUSTER_CONFIG"
_SHOWN = ("CPU", "GPU")


class ClusterError(SpecError):
    """The Ray cluster cannot run the study as specified (resources, storage, nodes)."""


def format_resources(resources: Optional[dict[str, float]]) -> str:
    if resources is None:
        return "resources detected at launch"
    return ", ".join(f"{k} {resources.get(k, 0):g}" for k in _SHOWN)


def _fits(bundle: dict[str, float], resources: dict[str, float]) -> bool:
    return all(resources.get(k, 0) >= v for k, v in bundle.items() if v > 0)


@dataclass(frozen=True)
class NodeType:
    """A kind of node the autoscaler may launch."""

    name: str
    resources: Optional[dict[str, float]]
    """CPU, GPU, ... of one node; None when the provider detects them at launch."""
    min_workers: int = 0
    max_workers: int = 0
    gpu_memory_gb: Optional[float] = None
    """Memory of one of its GPUs, when its instance type names a known GPU
    (GPU_MEMORY_BY_INSTANCE)."""


GPU_MEMORY_BY_INSTANCE = {"g4dn": 16, "g5": 24, "g6": 24, "g6e": 48, "p3": 16, "p4d": 40,
                          "p4de": 80, "p5": 80, "p5e": 141, "p5en": 141}
"""GiB of one GPU of an EC2 instance family (T4, A10G, L4, L40S, V100, A100, H100, H200)."""


def instance_gpu_memory(node_config: dict) -> Optional[float]:
    """GPU memory of a node_config's InstanceType ("g5.xlarge" -> 24), or None."""
    family = str((node_config or {}).get("InstanceType", "")).split(".")[0]
    memory = GPU_MEMORY_BY_INSTANCE.get(family)
    return None if memory is None else float(memory)


@dataclass(frozen=True)
class ClusterShape:
    address: str
    nodes: tuple[dict[str, Any], ...]
    """Alive nodes: {"ip": ..., "resources": {...}} (their totals)."""
    node_types: tuple[NodeType, ...] = ()
    max_workers: Optional[int] = None
    """The cluster's limit on worker nodes (all types together), when known."""
    source: str = ""
    """Where the node types were read from ("" when the cluster has no autoscaler config)."""
    provider: Optional[str] = None
    head_type: Optional[str] = None
    launches_here: bool = False
    """The provider starts its nodes on this machine (fake_multinode, or a `local` provider
    whose hosts are all loopback addresses): they share this machine's folders."""
    driver_ip: str = ""

    def gpu_memory_gb(self) -> Optional[float]:
        """The smallest GPU memory among the node types that can run trials, when every
        such type's instance names a known GPU; None otherwise."""
        types = [t for t in self.launchable if (t.resources or {}).get("GPU", 1) > 0]
        memories = [t.gpu_memory_gb for t in types]
        return min(memories) if memories and None not in memories else None

    @property
    def launchable(self) -> tuple[NodeType, ...]:
        if self.max_workers == 0:
            return ()
        return tuple(t for t in self.node_types if t.max_workers > 0 and t.name != self.head_type)

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for node in self.nodes:
            for k, v in node["resources"].items():
                out[k] = out.get(k, 0) + v
        return out

    def slots(self, bundle: dict[str, float]) -> int:
        """Trials the cluster holds at once at its full size (running nodes, plus every
        launchable node type at its max); 0 when unknown."""
        def per_node(resources: Optional[dict[str, float]]) -> int:
            if not resources:
                return 0
            counts = [int(resources.get(k, 0) // v + 1e-9) for k, v in bundle.items() if v > 0]
            return min(counts) if counts else 0
        running = sum(per_node(n["resources"]) for n in self.nodes)
        grown = sum(per_node(t.resources) * max(0, t.max_workers - t.min_workers)
                    for t in self.launchable)
        return running + grown

    def describe(self, how: str = "") -> str:
        t = self.totals()
        where = f" ({how})" if how else ""
        lines = [f"Ray cluster {self.address}{where}: {len(self.nodes)} node(s) running "
                 f"({format_resources(t)})"]
        if not self.node_types:
            lines[0] += "; no autoscaler config found: the cluster stays as it is"
        else:
            cap = "" if self.max_workers is None else f", at most {self.max_workers} workers"
            kinds = "; ".join(f"{n.name} ({format_resources(n.resources)}, "
                              f"{n.min_workers}..{n.max_workers})" for n in self.launchable)
            lines.append(f"  the autoscaler can add: {kinds or 'nothing'}{cap} "
                         f"[{self.provider or 'provider ?'}; from {self.source}]")
        return "\n".join(lines)


def _yaml_node_types(config: dict, source: str) -> dict[str, Any]:
    types = []
    for name, body in (config.get("available_node_types") or {}).items():
        body = body or {}
        resources = body.get("resources")
        types.append(NodeType(str(name), {k: float(v) for k, v in resources.items()}
                              if resources else None,
                              int(body.get("min_workers", 0)), int(body.get("max_workers", 0)),
                              instance_gpu_memory(body.get("node_config") or {})))
    provider = config.get("provider") or {}
    hosts = [provider.get("head_ip"), *(provider.get("worker_ips") or [])]
    here = provider.get("type") == "fake_multinode" or (
        provider.get("type") == "local" and all(str(h).startswith("127.") for h in hosts if h))
    return {"node_types": tuple(types), "max_workers": config.get("max_workers"),
            "source": source, "provider": provider.get("type"),
            "head_type": config.get("head_node_type"), "launches_here": here}


def _from_file(path: Path, source: str) -> dict[str, Any]:
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ClusterError(f"Cannot read the cluster config {path} ({source}): {e}. Point "
                           f"${CLUSTER_CONFIG_ENV} at the YAML the cluster was started with, "
                           f"or unset it.") from None
    if not isinstance(config, dict) or "available_node_types" not in config:
        raise ClusterError(f"The cluster config {path} ({source}) has no `available_node_types`. "
                           f"Point ${CLUSTER_CONFIG_ENV} at the YAML the cluster was started "
                           f"with (ray up / ray start --autoscaling-config), or unset it.")
    return _yaml_node_types(config, f"{source} {path}")


def _from_gcs() -> Optional[dict[str, Any]]:
    try:
        import ray._private.state as state

        config = state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS, or no autoscaler v2: try the others
        return None
    if config is None or not config.node_group_configs:
        return None
    types = tuple(NodeType(g.name, {k: float(v) for k, v in g.resources.items()},
                           int(g.min_count), int(g.max_count) if g.max_count >= 0 else 10**6)
                  for g in config.node_group_configs)
    return {"node_types": types, "max_workers": None, "source": "the GCS (autoscaler v2)",
            "provider": None, "head_type": None}


def _monitor_config(gcs_port: Optional[int]) -> Optional[Path]:
    """The --autoscaling-config of this cluster's autoscaler, when it runs on this machine."""
    try:
        import psutil
    except ImportError:
        return None
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmd = proc.info.get("cmdline") or []
        if not any(part.endswith("monitor.py") for part in cmd):
            continue
        gcs = next((a.split("=", 1)[1] for a in cmd if a.startswith("--gcs-address=")), "")
        if gcs_port is not None and not gcs.endswith(f":{gcs_port}"):
            continue
        path = next((a.split("=", 1)[1] for a in cmd if a.startswith("--autoscaling-config=")),
                    None)
        if path:
            full = Path(proc.info.get("cwd") or "/") / Path(path).expanduser()
            if full.is_file():
                return full
    return None


def read_cluster_shape(joined: bool = True) -> ClusterShape:
    """The joined cluster's running nodes and node types (call after ray.init). With
    `joined=False` (a Ray the study started itself) a ~/ray_bootstrap_config.yaml on this
    machine belongs to some other cluster (a `ray up` head, a loopback on-prem cluster)
    and is not read."""
    import ray

    context = ray.get_runtime_context()
    address = getattr(context, "gcs_address", None) or "local"
    nodes = tuple({"ip": n.get("NodeManagerAddress"),
                   "resources": {k: float(v) for k, v in n.get("Resources", {}).items()
                                 if not k.startswith(("node:", "memory", "object_store"))}}
                  for n in ray.nodes() if n.get("Alive"))
    found: Optional[dict[str, Any]] = _from_gcs()
    if found is None and os.environ.get(CLUSTER_CONFIG_ENV):
        found = _from_file(Path(os.environ[CLUSTER_CONFIG_ENV]).expanduser(),
                           f"${CLUSTER_CONFIG_ENV} =")
    if found is None:
        port = int(address.rsplit(":", 1)[1]) if ":" in address else None
        path = _monitor_config(port)
        if path is not None:
            found = _from_file(path, "the autoscaler's config")
    if found is None and joined:
        bootstrap = Path("~/ray_bootstrap_config.yaml").expanduser()
        if bootstrap.is_file():
            found = _from_file(bootstrap, "ray up's")
    return ClusterShape(address, nodes, **(found or {}),
                        driver_ip=ray.util.get_node_ip_address())


def check_trial_fits(shape: ClusterShape, bundle: dict[str, float]) -> str:
    """'' when a running node holds a trial; a note when only launchable node types do.

    Raises ClusterError when no running node and no node type can ever hold one trial.
    """
    if any(_fits(bundle, n["resources"]) for n in shape.nodes):
        return ""
    able = [t for t in shape.launchable if t.resources is None or _fits(bundle, t.resources)]
    if able:
        return (f"No running node can hold a trial ({format_resources(bundle)}) yet: the "
                f"autoscaler launches {' or '.join(t.name for t in able)} on demand.")
    running = "; ".join(f"{n['ip']}: {format_resources(n['resources'])}" for n in shape.nodes)
    if shape.node_types:
        kinds = "; ".join(f"{t.name}: {format_resources(t.resources)}, max_workers "
                          f"{t.max_workers}" for t in shape.node_types)
        types = f"node types [{kinds}] from {shape.source}"
    else:
        types = (f"no autoscaler node types: set ${CLUSTER_CONFIG_ENV} to the YAML the cluster "
                 f"was started with if it autoscales")
    gpu = bundle.get("GPU", 0)
    has_gpu = any(n["resources"].get("GPU", 0) > 0 for n in shape.nodes) or any(
        (t.resources or {}).get("GPU", 0) > 0 for t in shape.launchable)
    if gpu > 0 and not has_gpu:
        raise ClusterError(f"`resources.gpu` is {gpu:g} per trial, but the Ray cluster has 0 GPUs "
                           f"now and can grow none (running nodes [{running}]; {types}). Set "
                           f"resources.gpu: 0 (--set resources.gpu=0), or add a GPU node type.")
    raise ClusterError(f"A trial needs {format_resources(bundle)}, more than any running node "
                       f"or node type has (running nodes [{running}]; {types}). Lower "
                       f"resources.cpu / resources.gpu (e.g. --set resources.cpu=1), or give "
                       f"the cluster a node type that big.")


# File systems every node of a cluster can mount at the same path.
_SHARED_FS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "glusterfs", "ceph", "beegfs", "gpfs",
              "fuse.s3fs", "fuse.gcsfuse", "fuse.sshfs", "fuse.juicefs", "efs", "virtiofs", "9p")


def _filesystem(path: Path) -> str:
    try:
        import psutil

        best, fstype = "", ""
        for part in psutil.disk_partitions(all=True):
            mount = part.mountpoint.rstrip("/") + "/"
            if (str(path).rstrip("/") + "/").startswith(mount) and len(mount) > len(best):
                best, fstype = mount, part.fstype
        return fstype
    except Exception:  # noqa: BLE001 - unknown: treated as a local disk
        return ""


def _probe_nodes(shape: ClusterShape, folder: Path, ips: list[str]) -> list[str]:
    """The node IPs (of `ips`) on which a task does not see a marker file written here."""
    import secrets

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".gmwae-probe-{secrets.token_hex(4)}"
    token = secrets.token_hex(8)
    marker.write_text(token)

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        try:
            return Path(path).read_text() == token
        except OSError:
            return False

    try:
        blind = []
        for node in ray.nodes():
            if node.get("Alive") and node.get("NodeManagerAddress") in ips:
                strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                if not ray.get(sees.options(scheduling_strategy=strategy).remote(str(marker)),
                               timeout=60):
                    blind.append(node["NodeManagerAddress"])
        return blind
    finally:
        marker.unlink(missing_ok=True)


def _elsewhere(shape: ClusterShape) -> tuple[list[str], list[str]]:
    """The running nodes on other hosts than the driver's, and the node types the
    autoscaler launches on other machines."""
    other_hosts = sorted({n["ip"] for n in shape.nodes if n["ip"] != shape.driver_ip
                          and not str(n["ip"]).startswith("127.")})
    return other_hosts, [t.name for t in shape.launchable if not shape.launches_here]


def data_dir_for_trials(shape: ClusterShape, data_dir: Optional[str],
                        dataset: str) -> tuple[Optional[str], Optional[str]]:
    """The data folder to hand the trials, and a line saying why when it is not the
    driver's: a folder on the driver's own disk does not exist on nodes on other machines,
    whose trials then read their node's $GMWAE_DATA_DIR or download the dataset once per
    node (gmwae_core.data stages it under a lock). A shared mount (NFS, EFS) is handed on."""
    if not data_dir:
        return data_dir, None
    other_hosts, remote_types = _elsewhere(shape)
    if not other_hosts and not remote_types:
        return data_dir, None
    fs = _filesystem(Path(data_dir))
    if fs.startswith(_SHARED_FS):
        return data_dir, None
    where = ", ".join(other_hosts + remote_types)
    return None, (f"The data folder {data_dir} is on this machine's own disk (file system "
                  f"{fs or 'unknown'}), which the nodes on other machines ({where}) do not "
                  f"have: their trials read their node's $GMWAE_DATA_DIR, else download "
                  f"{dataset} once per node. Put the folder on a shared mount to hand it on.")


def check_storage_reachable(shape: ClusterShape, storage: str) -> None:
    """Raise ClusterError when trials on other machines could not write `storage` (a local
    folder on a cluster whose nodes run elsewhere), before any trial starts."""
    if "://" in storage:
        return  # s3://, gs://, ...: every node reaches it with its own credentials
    folder = Path(storage)
    other_hosts, remote_types = _elsewhere(shape)
    if not other_hosts and not remote_types:
        return
    fs = _filesystem(folder.parent if not folder.exists() else folder)
    fix = ("Use storage every node reaches: --set storage.ray=s3://BUCKET/ray (or gs://...), "
           "or a folder on a shared mount (NFS, EFS) mounted at the same path on every node.")
    if not fs.startswith(_SHARED_FS) and remote_types:
        raise ClusterError(f"`storage.ray` is the local folder {storage} (file system "
                           f"{fs or 'unknown'}), but the cluster's autoscaler launches nodes on "
                           f"other machines ({', '.join(remote_types)}, provider "
                           f"{shape.provider or '?'}): their trials could not write checkpoints "
                           f"there. {fix}")
    blind = _probe_nodes(shape, folder, other_hosts) if other_hosts else []
    if blind:
        raise ClusterError(f"`storage.ray` is the folder {storage}, which the nodes "
                           f"{', '.join(blind)} cannot see (a file written there from this "
                           f"driver is missing on them). {fix}")


class NodeWait(tune.Callback):
    """Says when every trial waits for nodes, and stops the study after `minutes` of it.

    While no trial runs and some are PENDING, a line every `every` seconds says what a trial
    asks for and what the cluster has; past `minutes`, the study stops with a ClusterError
    (kept in `error`) instead of waiting for nodes that never come. Finished trials stay
    recorded; `gmwae study resume` goes on once the cluster can hold a trial.
    """

    def __init__(self, minutes: float, bundle: dict[str, float], study: str,
                 shape: Callable[[], ClusterShape] = read_cluster_shape, every: float = 60.0):
        self.limit, self.bundle, self.study = minutes * 60.0, bundle, study
        self.shape, self.every = shape, every
        self.since: Optional[float] = None
        self.said = 0.0
        self.error: Optional[ClusterError] = None

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        statuses = [t.status for t in trials]
        if "RUNNING" in statuses or "PENDING" not in statuses:
            self.since = None
            return
        now = time.monotonic()
        if self.since is None:
            self.since = self.said = now
            return
        waited = now - self.since
        if waited > self.limit:
            shape = self.shape()
            self.error = ClusterError(
                f"Every trial of {self.study} waited {waited / 60:.1f} min for a node that can "
                f"hold it ({format_resources(self.bundle)} per trial; node_wait_minutes is "
                f"{self.limit / 60:g}), and none came. {shape.describe()}. Check the "
                f"autoscaler (`ray status`, its monitor log) and the node types' limits, or "
                f"lower resources; then `gmwae study resume {self.study.split('/')[0]}`.")
            raise self.error
        if now - self.said >= self.every:
            self.said = now
            pending = statuses.count("PENDING")
            print(f"waiting {waited:.0f} s for nodes: {pending} trial(s) pending, each asking "
                  f"{format_resources(self.bundle)}; {self.shape().describe()}",
                  file=sys.stderr, flush=True)


class NoCudaStop(tune.Callback):
    """Stops the study at the first trial that asked for a GPU and found no CUDA device
    (study.trainable.require_cuda), before Tune retries it or starts the next: every trial
    on that node would fail the same way. The trial's message is kept in `error`."""

    LOGGER = "ray.tune.execution.tune_controller"
    """Tune's controller logs each failed trial with its traceback; this one's is dropped
    (`filter`, installed by the runner around the run): the study's error says it all."""

    def __init__(self):
        self.error: Optional[ClusterError] = None

    def filter(self, record) -> bool:
        """logging.Filter: False for Tune's report of a trial that found no CUDA device."""
        from .trainable import NO_CUDA

        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and NO_CUDA in str(exc))

    def _check(self, trial) -> None:
        from .trainable import NO_CUDA

        error = trial.get_error()
        text = str(error) if error is not None else ""
        if NO_CUDA not in text:
            return
        message = next((line.split(f"{NO_CUDA}: ", 1)[1] for line in text.splitlines()
                        if f"{NO_CUDA}: " in line), text.strip().splitlines()[-1])
        self.error = ClusterError(f"{message} Finished trials stay recorded; fix the node's "
                                  f"torch or the spec, then `gmwae study resume`.")
        raise self.error

    def on_trial_recover(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._check(trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._check(trial)


def _sized(params: dict[str, Any]) -> str:
    """The searched values a step's memory grows with."""
    return ", ".join(f"{k}={params[k]:g}" for k in ("K", "batch_size", "num_samples",
                                                    "decoder_width") if k in params)


def size_gpu_share(spec) -> tuple[Any, list[str]]:
    """GPU memory per trial, estimated from the configurations the study can try (its paper
    point and the widest corner of its space, per family): lines that say so, and the spec
    with `resources.gpu` raised to the share the widest trial needs when
    `resources.gpu_memory_gb` is known. ClusterError when no single GPU holds it."""
    import dataclasses

    from gmwae_core.memory import GIB, gpu_share, step_memory
    res = spec.resources
    if res.gpu <= 0:
        return spec, []
    lines, need, widest, space = [], 0.0, None, spec.search_space
    for family in spec.families:
        corner = space.widest(family)
        small = step_memory(spec.run_config(family, space.paper_point(family) or {}))
        big_cfg = spec.run_config(family, corner)
        big = step_memory(big_cfg)
        lines.append(f"GPU memory per trial (estimate, gmwae_core/memory.py): {family} "
                     f"{small.gpu_bytes / GIB:.1f} GiB at the paper point, "
                     f"{big.gpu_bytes / GIB:.1f} GiB at the space's widest "
                     f"({_sized(corner) or 'nothing searched'})")
        if res.gpu_memory_gb is not None:
            share = gpu_share(big_cfg, res.gpu_memory_gb)
            if share > need:
                need, widest = share, (family, big, corner)
    if res.gpu_memory_gb is None:
        lines.append("  (set resources.gpu_memory_gb to the GPUs' memory to size each trial's "
                     "share from it)")
        return spec, lines
    family, big, corner = widest
    if need > 1.0:
        raise ClusterError(
            f"The widest {family} trial of space {spec.space!r} ({_sized(corner)}) needs about {big.describe()}, more than one GPU of "
            f"resources.gpu_memory_gb = {res.gpu_memory_gb:g} GiB. Search a space with "
            f"smaller K, batch_size or decoder_width, lower the samples per code (--set "
            f"fixed.num_samples=1), or use GPUs with more memory.")
    if need > res.gpu:
        lines.append(f"  resources.gpu raised from {res.gpu:g} to {need:g}: the widest {family} "
                     f"trial needs {big.gpu_bytes / GIB:.1f} GiB of a "
                     f"{res.gpu_memory_gb:g} GiB GPU ({int(1 / need + 1e-9)} per GPU)")
        spec = dataclasses.replace(spec, resources=dataclasses.replace(res, gpu=need))
    return spec, lines
