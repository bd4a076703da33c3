"""A study meets its cluster: what fits now or after the autoscaler grows it, storage the
nodes can reach, trials that wait for nodes that never come, `--set` of spec keys."""
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml

from study.cluster import (CLUSTER_CONFIG_ENV, ClusterError, ClusterShape, NodeType,
                           check_storage_reachable, check_trial_fits, read_cluster_shape)
from study.runner import run_study
from study.search import StudySearch
from study.spec import SpecError, apply_sets, load_spec, spec_from_dict

ROOT = Path(__file__).parents[2]
GMWAE = str(Path(sys.executable).parent / "gmwae")
HEAD = {"ip": "10.0.0.1", "resources": {"CPU": 0.0, "GPU": 0.0}}
GPU_WORKER = NodeType("gpu_worker", {"CPU": 4.0, "GPU": 1.0}, 0, 8)


def shape(nodes=(HEAD,), types=(GPU_WORKER,), **kw):
    return ClusterShape("10.0.0.1:6379", tuple(nodes), tuple(types), 8, "test", "aws",
                        driver_ip="10.0.0.1", **kw)


def test_a_trial_that_only_a_launchable_node_type_holds_is_accepted_with_a_note():
    note = check_trial_fits(shape(), {"CPU": 1, "GPU": 0.25})
    assert "the autoscaler launches gpu_worker on demand" in note
    assert check_trial_fits(shape(nodes=(HEAD, {"ip": "10.0.0.2", "resources": {
        "CPU": 4.0, "GPU": 1.0}})), {"CPU": 1, "GPU": 0.25}) == ""
    assert shape().slots({"CPU": 1, "GPU": 0.25}) == 4 * 8  # 4 per GPU node, 8 nodes


@pytest.mark.parametrize("bundle,types,pattern", [
    ({"CPU": 8, "GPU": 1}, (GPU_WORKER,),
     r"A trial needs CPU 8, GPU 1, more than any running node or node type has \(running "
     r"nodes \[10.0.0.1: CPU 0, GPU 0\]; node types \[gpu_worker: CPU 4, GPU 1, max_workers 8\]"),
    ({"CPU": 1, "GPU": 0.5}, (NodeType("cpu_worker", {"CPU": 8.0}, 0, 4),),
     r"`resources.gpu` is 0.5 per trial, but the Ray cluster has 0 GPUs now and can grow none"),
    ({"CPU": 1, "GPU": 0.5}, (NodeType("gpu_worker", {"CPU": 4.0, "GPU": 1.0}, 0, 0),),
     r"`resources.gpu` is 0.5 per trial, but the Ray cluster has 0 GPUs"),  # max_workers 0
])
def test_a_trial_no_node_type_can_hold_is_refused_naming_the_types(bundle, types, pattern):
    with pytest.raises(ClusterError, match=pattern):
        check_trial_fits(shape(types=types), bundle)


def test_a_data_folder_on_the_drivers_own_disk_is_not_handed_to_nodes_on_other_machines(
        tmp_path):
    from study.cluster import data_dir_for_trials

    folder = str(tmp_path)
    kept, why = data_dir_for_trials(shape(), folder, "mnist")
    assert kept is None
    assert why.startswith(f"The data folder {folder} is on this machine's own disk")
    assert "(gpu_worker) do not have" in why and "download mnist once per node" in why
    # nodes that share this machine's folders (fake or loopback), or no folder: unchanged
    assert data_dir_for_trials(shape(launches_here=True), folder, "mnist") == (folder, None)
    assert data_dir_for_trials(shape(types=()), folder, "mnist") == (folder, None)
    assert data_dir_for_trials(shape(), None, "digits") == (None, None)
    # a running node on another host counts as much as a node type launched elsewhere
    worker = {"ip": "10.0.0.2", "resources": {"CPU": 4.0, "GPU": 1.0}}
    kept, why = data_dir_for_trials(shape(nodes=(HEAD, worker), types=()), folder, "mnist")
    assert kept is None and "(10.0.0.2) do not have" in why


def test_a_local_storage_folder_is_refused_when_nodes_launch_on_other_machines(tmp_path):
    with pytest.raises(ClusterError, match=r"`storage.ray` is the local folder .* launches nodes "
                                           r"on other machines \(gpu_worker, provider aws\).*s3://"):
        check_storage_reachable(shape(), str(tmp_path / "ray"))
    check_storage_reachable(shape(), "s3://bucket/ray")  # every node reaches a bucket
    check_storage_reachable(shape(launches_here=True), str(tmp_path / "ray"))  # fake nodes


def test_set_changes_nested_spec_keys_and_rejects_unknown_ones(tmp_path):
    spec = load_spec(ROOT / "studies/smoke.yaml", sets=[
        "storage.ray=s3://bucket/ray", "resources.gpu=0.25", "trials=5", "fixed.recon_weight=0.1",
        "scheduler.type=none", "families=[gmwae]"])
    assert spec.storage.ray == "s3://bucket/ray" and spec.storage.optuna.startswith("sqlite")
    assert spec.resources.gpu == 0.25 and spec.resources.cpu == 1 and spec.trials == 5
    assert spec.fixed["recon_weight"] == 0.1 and spec.fixed["decoder_width"] == 8
    assert spec.scheduler.type == "none" and spec.families == ("gmwae",)
    for item, pattern in [("storage.rey=x", r"'rey' is not a key of `storage`. Keys: optuna"),
                          ("trails=3", r"'trails' is not a study spec key"),
                          ("trials", r"`--set` takes KEY=VALUE, but got 'trials'"),
                          ("trials.x=1", r"'trials' has no sub-keys"),
                          ("resources.gpu=-1", r"`resources.gpu` must be >= 0"),
                          ("trials=many", r"`trials` must be a int, but got 'many'")]:
        with pytest.raises(SpecError, match=pattern):
            load_spec(ROOT / "studies/smoke.yaml", sets=[item])


def test_set_on_the_command_line_exits_2_naming_the_key(tmp_path):
    done = subprocess.run([GMWAE, "study", "run", str(ROOT / "studies/smoke.yaml"), "--set",
                           "storage.rey=s3://x"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 2 and "'rey' is not a key of `storage`" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_an_unreachable_cluster_address_exits_2_at_once(tmp_path):
    done = subprocess.run([GMWAE, "study", "run", str(ROOT / "studies/smoke.yaml"), "--address",
                           "127.0.0.1:9", "--set", f"storage.ray={tmp_path}/ray"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert "Cannot reach the Ray cluster at '127.0.0.1:9'" in done.stderr
    assert not (tmp_path / "ray").exists()
    # Refused before MLflow was written: no empty experiment is left in the store.
    mlflow_db = tmp_path / "runs" / "smoke" / "mlflow.db"
    if mlflow_db.exists():
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}")
        assert client.get_experiment_by_name("smoke") is None


def test_intermediate_values_use_the_trials_own_iteration():
    """A trial retried after a lost node continues at iteration 3 while Tune restarts its
    training_iteration at 1: Optuna must record step 3."""
    search = StudySearch(space=lambda trial: {"x": trial.suggest_float("x", 0, 1)},
                         metric="val/cluster_acc", mode="max",
                         storage=optuna.storages.InMemoryStorage(), study_name="s")
    config = search.suggest("t1")
    assert config["_optuna_trial"] == 0
    search.on_trial_result("t1", {"val/cluster_acc": 0.5, "iteration": 3, "training_iteration": 1})
    assert search._ot_study.trials[0].intermediate_values == {3: 0.5}
    # the last result reaches only on_trial_complete: it is an intermediate value too
    search.on_trial_complete("t1", {"val/cluster_acc": 0.6, "iteration": 4, "training_iteration": 2})
    trial = search._ot_study.trials[0]
    assert trial.intermediate_values == {3: 0.5, 4: 0.6} and trial.state.name == "COMPLETE"


def test_a_trial_asha_stopped_is_pruned_in_optuna_with_its_last_value():
    """ASHA's stops become Optuna's PRUNED (value: the last one reported); a trial that ran
    its whole budget is COMPLETE, one that raised is FAIL, and Optuna's best is a COMPLETE one."""
    search = StudySearch(space=lambda trial: {"x": trial.suggest_float("x", 0, 1)},
                         metric="val/cluster_acc", mode="max", pruned_below=4,
                         storage=optuna.storages.InMemoryStorage(), study_name="s")
    for tid in ("stopped", "full", "broken"):
        search.suggest(tid)
    search.on_trial_result("stopped", {"val/cluster_acc": 0.7, "iteration": 1})
    search.on_trial_complete("stopped", {"val/cluster_acc": 0.8, "iteration": 2})
    search.on_trial_complete("full", {"val/cluster_acc": 0.5, "iteration": 4})
    search.on_trial_complete("broken", None, error=True)
    stopped, full, broken = search._ot_study.trials
    assert stopped.state.name == "PRUNED" and stopped.value == 0.8
    assert stopped.intermediate_values == {1: 0.7, 2: 0.8}
    assert stopped.user_attrs["stopped_by"] == "ASHA" and "stopped_by" not in full.user_attrs
    assert full.state.name == "COMPLETE" and full.value == 0.5
    assert broken.state.name == "FAIL"
    assert search._ot_study.best_trial.number == full.number


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def local_spec(tmp_path, name, **extra):
    return spec_from_dict({"name": name, "dataset": "synthetic", "space": "smoke", "trials": 2,
                           "max_iterations": 1, "steps_per_iteration": 5,
                           "fixed": {"decoder_width": 8, "batch_size": 32, "pretrain_steps": 2,
                                     "eval_size": 100},
                           "storage": {"optuna": f"sqlite:///{tmp_path}/o.db",
                                       "mlflow": f"sqlite:///{tmp_path}/m.db",
                                       "ray": str(tmp_path / "ray")}, **extra})


def cluster_config(tmp_path, provider, gpus=1):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "max_workers": 2, "provider": {"type": provider},
        "head_node_type": "head", "available_node_types": {
            "head": {"resources": {"CPU": 0}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 1, "GPU": gpus}, "min_workers": 0,
                           "max_workers": 2}}}))
    return path


def test_trials_waiting_for_nodes_that_never_come_stop_the_study_with_what_was_asked(
        tmp_path, ray_local, monkeypatch, capsys):
    # The config claims a GPU node type that no autoscaler will ever launch here.
    monkeypatch.setenv(CLUSTER_CONFIG_ENV, str(cluster_config(tmp_path, "fake_multinode")))
    spec = local_spec(tmp_path, "waits", resources={"cpu": 1, "gpu": 1}, node_wait_minutes=0.1)
    with pytest.raises(ClusterError, match=r"(?s)Every trial of waits/gmwae\+gmvae waited 0\.\d min for a node "
                                           r"that can hold it \(CPU 1, GPU 1 per trial; "
                                           r"node_wait_minutes is 0.1\), and none came\. Ray "
                                           r"cluster .*gmwae study resume waits"):
        run_study(spec, verbose=0)
    out = capsys.readouterr().out
    assert "the autoscaler can add: gpu_worker (CPU 1, GPU 1, 0..2)" in out
    assert "No running node can hold a trial (CPU 1, GPU 1) yet" in out
    # What the study recorded stays: the Optuna study and its asked trials, for `resume`.
    study = optuna.load_study(study_name="waits/gmwae", storage=f"sqlite:///{tmp_path}/o.db")
    assert study.trials and all(t.state.name == "RUNNING" for t in study.trials)


def test_the_node_types_gpu_memory_sizes_a_trials_share_when_the_spec_gives_none(
        tmp_path, ray_local, monkeypatch, capsys):
    """A node type whose instance names its GPU (g4dn: a 16 GiB T4) gives the study the
    memory to size shares from: the wide space's widest GM-WAE trial does not fit, and
    the study stops before any trial with what it needs."""
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "max_workers": 2, "provider": {"type": "aws"}, "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 0}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 4, "GPU": 1}, "min_workers": 0,
                           "max_workers": 2, "node_config": {"InstanceType": "g4dn.xlarge"}}}}))
    monkeypatch.setenv(CLUSTER_CONFIG_ENV, str(path))
    spec = local_spec(tmp_path, "t4", space="wide", preset="paper",
                      resources={"cpu": 1, "gpu": 0.25}, fixed={"pretrain_steps": 2})
    with pytest.raises(ClusterError, match=r"needs about 22\.5 GiB .*more than one GPU of "
                                           r"resources.gpu_memory_gb = 16 GiB"):
        run_study(spec, verbose=0)
    assert "GPU memory of the cluster's GPU node types: 16 GiB" in capsys.readouterr().out
    with pytest.raises(KeyError):  # refused before any Optuna study was made
        optuna.load_study(study_name="t4/gmwae", storage=f"sqlite:///{tmp_path}/o.db")


def test_a_local_storage_folder_on_a_cluster_of_other_machines_stops_before_any_trial(
        tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv(CLUSTER_CONFIG_ENV, str(cluster_config(tmp_path, "aws")))
    spec = local_spec(tmp_path, "far", resources={"cpu": 1, "gpu": 0.5})
    with pytest.raises(ClusterError, match=r"`storage.ray` is the local folder .*provider aws"):
        run_study(spec, verbose=0)
    assert not (tmp_path / "ray").exists()


def test_a_ray_up_bootstrap_file_is_read_only_for_a_joined_cluster(tmp_path, ray_local,
                                                                   monkeypatch):
    # A head `ray up` made of this machine (or the loopback on-prem form) leaves
    # ~/ray_bootstrap_config.yaml; a study that starts its own Ray must not take that
    # cluster's AWS node types for its own (it would refuse its local storage).
    monkeypatch.setenv("HOME", str(tmp_path))
    cluster_config(tmp_path, "aws").rename(tmp_path / "ray_bootstrap_config.yaml")
    joined = read_cluster_shape(joined=True)
    assert [t.name for t in joined.launchable] == ["gpu_worker"] and joined.provider == "aws"
    assert "ray up's" in joined.source
    own = read_cluster_shape(joined=False)
    assert own.node_types == () and own.provider is None
    check_storage_reachable(own, str(tmp_path / "ray"))  # nothing to refuse


def test_the_widest_trials_gpu_memory_sizes_the_share_or_refuses_the_study(tmp_path):
    from study.cluster import size_gpu_share

    def with_sets(spec, *sets):
        return spec_from_dict(apply_sets(spec.to_dict(), list(sets)))

    spec = load_spec(ROOT / "studies/paper.yaml")  # space wide, gpu 0.25
    same, lines = size_gpu_share(spec)  # GPU memory unknown: the estimate, said
    assert same is spec and "gmwae 5.6 GiB at the paper point, 22.5 GiB at the space's " \
        "widest (K=30, batch_size=128, decoder_width=128)" in lines[0]
    assert "set resources.gpu_memory_gb" in lines[-1]
    big = with_sets(spec, "resources.gpu_memory_gb=48")
    sized, lines = size_gpu_share(big)
    assert sized.resources.gpu == 0.5 and "raised from 0.25 to 0.5" in lines[-1]
    roomy, _ = size_gpu_share(with_sets(spec, "resources.gpu_memory_gb=141"))
    assert roomy.resources.gpu == 0.25  # the spec's share holds the widest trial: kept
    with pytest.raises(ClusterError, match=r"The widest gmwae trial of space 'wide' \(K=30, "
                                           r"batch_size=128, decoder_width=128\) needs about "
                                           r"22\.5 GiB .*more than one GPU of "
                                           r"resources.gpu_memory_gb = 16 GiB"):
        size_gpu_share(with_sets(spec, "resources.gpu_memory_gb=16"))
    cpu, lines = size_gpu_share(with_sets(spec, "resources.gpu=0"))
    assert lines == []
    with pytest.raises(SpecError, match="resources.gpu_memory_gb` must be positive"):
        with_sets(spec, "resources.gpu_memory_gb=0")


def test_a_study_whose_widest_trial_fits_no_gpu_exits_2_before_any_store(tmp_path):
    done = subprocess.run([GMWAE, "study", "run", str(ROOT / "studies/paper.yaml"),
                           "--set", "resources.gpu_memory_gb=16",
                           "--set", f"storage.optuna=sqlite:///{tmp_path}/o.db",
                           "--set", f"storage.mlflow=sqlite:///{tmp_path}/m.db",
                           "--set", f"storage.ray={tmp_path}/ray"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "more than one GPU of resources.gpu_memory_gb = 16 GiB" in done.stderr
    assert "Traceback" not in done.stderr and list(tmp_path.iterdir()) == []


def test_families_together_take_turns_and_keep_their_own_budgets():
    from ray.tune.search import Searcher

    from study.together import FAMILY, FamilySearch

    class Counting(Searcher):
        def __init__(self, name):
            super().__init__(metric="m", mode="max")
            self.name, self.seen = name, []

        def suggest(self, trial_id):
            return {"x": len(self.seen)}

        def on_trial_complete(self, trial_id, result=None, error=False):
            self.seen.append(trial_id)

    wae, vae = Counting("gmwae"), Counting("gmvae")
    search = FamilySearch({"gmwae": wae, "gmvae": vae}, {"gmwae": 3, "gmvae": 1}, "m", "max")
    families = [search.suggest(f"t{i}") for i in range(5)]
    assert [c[FAMILY] for c in families[:4]] == ["gmwae", "gmvae", "gmwae", "gmwae"]
    assert families[4] == Searcher.FINISHED  # both budgets used
    search.on_trial_complete("t1", {"m": 1.0})
    assert vae.seen == ["t1"] and wae.seen == []  # each result reaches its family's searcher
