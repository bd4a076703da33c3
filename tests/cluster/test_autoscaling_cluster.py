"""A study on an autoscaling cluster that starts with no workers, as `ray up` leaves one:
Ray's fake multi-node provider on this machine (a head with 0 CPUs, a GPU worker type with
fake GPUs, min_workers 0), PostgreSQL Optuna storage, an MLflow server, `ray job submit`,
fractional GPUs; a worker node killed mid-study; the workers removed when idle."""
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import psutil
import pytest

from cluster.local import LocalCluster, ray_auth_headers
from tests.conftest import LOCAL_CLUSTERS, ROOT

pytestmark = [pytest.mark.slow, LOCAL_CLUSTERS]  # a whole cluster per module: minutes

RAY = str(Path(sys.executable).parent / "ray")
GMWAE = str(Path(sys.executable).parent / "gmwae")
TRIALS = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("autoscaling"), workers=2, cpus_per_worker=1,
                     autoscaling=True, gpus_per_worker=1, idle_timeout_minutes=0.25).start()
    assert c.processes()  # found by the temp folders their command lines name
    yield c
    c.stop()
    left = c.processes()  # stop() leaves none of the cluster's processes running
    assert not left, [p.cmdline() for p in left]


def workers(cluster) -> list[dict]:
    return [n for n in cluster.alive_node_list()
            if n["raylet"].get("resourcesTotal", {}).get("GPU", 0) > 0]


def kill_node(node_id: str) -> int:
    """SIGKILL a fake node's raylet and every process under it (its trial workers)."""
    killed = 0
    for proc in psutil.process_iter(["cmdline"]):
        if f"--node_id={node_id}" in (proc.info.get("cmdline") or []):
            for p in [*proc.children(recursive=True), proc]:
                try:
                    p.send_signal(signal.SIGKILL)
                    killed += 1
                except psutil.NoSuchProcess:
                    pass
    return killed


def test_a_study_scales_the_cluster_up_from_zero_survives_a_lost_worker_and_scales_down(
        cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert cluster.alive_nodes() == 1 and not workers(cluster)  # the head alone
    # A shipped spec, unedited: the cluster's stores and fractional GPUs from --set. The
    # project is installed in the venv every node runs from, so no --working-dir (the fake
    # nodes share the head's temp folder, where a joining node would clear the job's copy).
    sets = [*cluster.study_sets(), "resources.gpu=0.5", "resources.cpu=0.5", "fixed.device=cpu",
            f"trials={TRIALS}", "max_iterations=3", "steps_per_iteration=40",
            "scheduler.type=none"]
    command = [RAY, "job", "submit", "--address", cluster.dashboard_url, "--no-wait", "--",
               "gmwae", "study", "run", str(ROOT / "studies/smoke.yaml"), "--quiet",
               "--name", "autoscaled", *[a for s in sets for a in ("--set", f"'{s}'")]]
    submitted = subprocess.run(" ".join(command), shell=True, capture_output=True, text=True,
                               env=cluster.env(), timeout=120, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job = re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout + submitted.stderr).group(0)

    jobs = JobSubmissionClient(cluster.dashboard_url, headers=ray_auth_headers())
    storage = optuna.storages.RDBStorage(cluster.optuna_url(with_password=True))
    most, killed, deadline = 0, None, time.monotonic() + 600
    while time.monotonic() < deadline and not jobs.get_job_status(job).is_terminal():
        up = workers(cluster)
        most = max(most, len(up))
        if killed is None and up:
            try:
                trials = optuna.load_study(study_name="autoscaled/gmwae", storage=storage).trials
            except KeyError:
                trials = []
            if any(t.state.name == "RUNNING" and 1 <= t.user_attrs.get("latest_iteration", 0) < 3
                   for t in trials):
                killed = up[0]["raylet"]["nodeId"]  # a worker holding trials, part-way
                assert kill_node(killed) > 0
        time.sleep(0.5)
    logs = jobs.get_job_logs(job)
    assert jobs.get_job_status(job) == JobStatus.SUCCEEDED, logs[-5000:]
    assert killed is not None, logs[-3000:]
    assert most >= 1  # the autoscaler launched GPU workers for the trials
    assert "the autoscaler can add: gpu_worker (CPU 1, GPU 1, 0..2)" in logs
    assert "No running node can hold a trial (CPU 0.5, GPU 0.5) yet" in logs

    for family in ("gmwae", "gmvae"):  # every trial of both families, in PostgreSQL
        trials = optuna.load_study(study_name=f"autoscaled/{family}", storage=storage).trials
        assert [t.state.name for t in trials] == ["COMPLETE"] * TRIALS
        assert all(t.user_attrs["latest_iteration"] == 3 for t in trials)
    client = mlflow.MlflowClient(cluster.mlflow_url)
    experiment = client.get_experiment_by_name("autoscaled")
    children = [r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("role") == "trial"]
    assert len(children) == 2 * TRIALS and all(r.info.status == "FINISHED" for r in children)
    assert max(int(r.data.tags.get("retries", 0)) for r in children) >= 1  # the lost node's
    for run in children:  # nothing lost: every iteration once, the retried ones too
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/cluster_acc")]
        assert sorted(set(steps)) == [1, 2, 3], steps

    deadline = time.monotonic() + 180  # idle_timeout_minutes 0.25: the workers go
    while workers(cluster) and time.monotonic() < deadline:
        time.sleep(2)
    assert not workers(cluster) and cluster.alive_nodes() == 1


def test_a_trial_bigger_than_every_node_type_is_refused_before_any_trial(cluster, tmp_path):
    done = subprocess.run([GMWAE, "study", "run", str(ROOT / "studies/smoke.yaml"), "--address",
                           cluster.ray_address, "--name", "too-big", *[
                               a for s in [*cluster.study_sets(), "resources.cpu=4"]
                               for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=cluster.env())
    assert done.returncode == 2, done.stderr[-3000:]
    assert ("A trial needs CPU 4, GPU 0, more than any running node or node type has "
            "(running nodes [") in done.stderr
    assert "node types [ray.head.default: CPU 0, GPU 0, max_workers 0; gpu_worker: CPU 1, GPU 1, " \
           "max_workers 2] from the autoscaler's config" in done.stderr
    with pytest.raises(KeyError):
        optuna.load_study(study_name="too-big/gmwae", storage=cluster.optuna_url(True))


def test_a_gpu_study_on_workers_without_cuda_fails_at_once_saying_so(cluster, tmp_path):
    """The fake GPUs have no CUDA: without `device: cpu` the first trial stops the study,
    the command exits non-zero with a message and no traceback."""
    sets = [*cluster.study_sets(), "resources.gpu=0.5", "resources.cpu=0.5", "trials=2",
            "max_iterations=1", "steps_per_iteration=5", "families=[gmwae]"]
    done = subprocess.run([GMWAE, "study", "run", str(ROOT / "studies/smoke.yaml"), "--address",
                           cluster.ray_address, "--name", "nocuda", "--quiet",
                           *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=cluster.env())
    assert done.returncode != 0, done.stdout[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "has no CUDA device visible to torch" in done.stderr, done.stderr[-3000:]
    assert "`fixed: {device: cpu}`" in done.stderr
    trials = optuna.load_study(study_name="nocuda/gmwae",
                               storage=cluster.optuna_url(with_password=True)).trials
    assert trials and not any(t.state.name == "COMPLETE" for t in trials)
