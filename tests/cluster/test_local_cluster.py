"""A study on a real multi-node Ray cluster on this machine: PostgreSQL Optuna storage, an
MLflow tracking server, a Ray head and two workers (`ray start`), a worker lost mid-study
and the MLflow server restarted mid-study."""
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from cluster.local import PASSWORD_ENV, LocalCluster, ray_auth_headers
from tests.conftest import LOCAL_CLUSTERS, ROOT

pytestmark = [pytest.mark.slow, LOCAL_CLUSTERS]  # a whole cluster per module: minutes

RAY = str(Path(sys.executable).parent / "ray")
TRIALS = 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), workers=2, cpus_per_worker=1).start()
    assert c.processes()  # found by the temp folders their command lines name
    yield c
    c.stop()
    left = c.processes()  # stop() leaves none of the cluster's processes running
    assert not left, [p.cmdline() for p in left]


def cluster_spec(cluster, folder: Path, name: str, **changes) -> Path:
    text = (ROOT / "studies/smoke.yaml").read_text().replace("name: smoke", f"name: {name}")
    text = text.replace("optuna: sqlite:///runs/{name}/optuna.db", f"optuna: '{cluster.optuna_url()}'")
    text = text.replace("mlflow: sqlite:///runs/{name}/mlflow.db", f"mlflow: {cluster.mlflow_url}")
    text = text.replace("ray: runs/{name}/ray", f"ray: {cluster.storage_path}")
    for key, value in changes.items():
        text = "\n".join(f"{key}: {value}" if line.startswith(f"{key}:") else line
                         for line in text.splitlines())
    assert cluster.password not in text  # the spec names the variable, never the secret
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def ray_job(cluster, *args, timeout=120):
    command, *rest = args  # --address before the rest: after `--` it would reach the entrypoint
    return subprocess.run([RAY, "job", command, "--address", cluster.dashboard_url, *rest],
                          capture_output=True, text=True, env=cluster.env(), timeout=timeout,
                          cwd=ROOT)


def trials_in_postgres(cluster, study, storage=None):
    try:
        return optuna.load_study(study_name=study,
                                 storage=storage or cluster.optuna_url(with_password=True)).trials
    except KeyError:
        return []


def test_a_study_survives_a_lost_worker_and_an_mlflow_restart(cluster, tmp_path):
    spec = cluster_spec(cluster, tmp_path, "cluster-smoke", scheduler="{type: none}",
                        max_iterations=3, steps_per_iteration=60, trials=TRIALS)
    submitted = ray_job(cluster, "submit", "--no-wait", "--working-dir", ".", "--",
                        "gmwae", "study", "run", str(spec), "--quiet")
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job = re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout + submitted.stderr).group(0)

    # Wait until both workers (1 CPU each) hold a trial and one trial is part-way (it has a
    # checkpoint), then kill worker 0 outright. The families' trials run side by side, so
    # the two running trials are often one of each: count both studies.
    storage = optuna.storages.RDBStorage(cluster.optuna_url(with_password=True))
    deadline, running = time.monotonic() + 300, []
    while time.monotonic() < deadline and not running:
        running = [t for family in ("gmwae", "gmvae")
                   for t in trials_in_postgres(cluster, f"cluster-smoke/{family}", storage)
                   if t.state.name == "RUNNING"]
        if len(running) < 2 or not any(1 <= t.user_attrs.get("latest_iteration", 0) < 3
                                       for t in running):
            running = []
        time.sleep(0.2)
    assert running, ray_job(cluster, "logs", job).stdout[-5000:]
    cluster.kill_worker(0)
    # ... and restart the tracking server while the study goes on.
    cluster.stop_mlflow()
    time.sleep(3)
    cluster.start_mlflow()

    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(cluster.dashboard_url, headers=ray_auth_headers())
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not jobs.get_job_status(job).is_terminal():
        time.sleep(2)
    logs = jobs.get_job_logs(job)
    assert jobs.get_job_status(job) == JobStatus.SUCCEEDED, logs[-5000:]
    deadline = time.monotonic() + 90  # the GCS marks a node dead after its health checks
    while cluster.alive_nodes() != 2 and time.monotonic() < deadline:
        time.sleep(2)
    assert cluster.alive_nodes() == 2  # the head and worker 1: worker 0 really died

    for family in ("gmwae", "gmvae"):
        trials = trials_in_postgres(cluster, f"cluster-smoke/{family}")
        assert [t.state.name for t in trials] == ["COMPLETE"] * TRIALS

    client = mlflow.MlflowClient(cluster.mlflow_url)
    experiment = client.get_experiment_by_name("cluster-smoke")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "study"]
    children = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 * TRIALS
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    # The trial that ran on the lost node was retried (from its checkpoint) elsewhere.
    assert max(int(r.data.tags.get("retries", 0)) for r in children) >= 1
    for run in children:
        assert run.info.status == "FINISHED"
        steps = sorted({m.step for m in client.get_metric_history(run.info.run_id,
                                                                    "val/cluster_acc")})
        assert steps == [1, 2, 3], (run.data.tags["family"], run.data.tags["optuna_trial"], steps)
        local = client.download_artifacts(run.info.run_id, "figures/label_by_k.png",
                                           str(tmp_path / run.info.run_id))
        assert Path(local).stat().st_size > 1000  # served by the tracking server
    assert cluster.password not in logs


def test_bad_cluster_stores_are_rejected_before_any_trial(cluster, tmp_path):
    env = cluster.env()
    wrong = cluster_spec(cluster, tmp_path, "wrong-password")
    done = subprocess.run([str(Path(sys.executable).parent / "gmwae"), "study", "run", str(wrong)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**env, PASSWORD_ENV: "not-the-password"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Cannot open the Optuna storage postgresql://gmwae:***@127.0.0.1" in done.stderr
    assert "not-the-password" not in done.stderr + done.stdout

    closed = cluster_spec(cluster, tmp_path, "closed-port")
    closed.write_text(closed.read_text().replace(f":{cluster.state.pg_port}/", ":9/"))
    done = subprocess.run([str(Path(sys.executable).parent / "gmwae"), "study", "run", str(closed)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 2 and "Cannot open the Optuna storage" in done.stderr
    assert cluster.password not in done.stderr

    unset = {k: v for k, v in env.items() if k != PASSWORD_ENV}
    done = subprocess.run([str(Path(sys.executable).parent / "gmwae"), "study", "run", str(wrong)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=unset)
    assert done.returncode == 2
    assert f"uses ${{{PASSWORD_ENV}}}, but the environment variable" in done.stderr

    no_server = cluster_spec(cluster, tmp_path, "no-mlflow")
    no_server.write_text(no_server.read_text().replace(cluster.mlflow_url, "http://127.0.0.1:9"))
    done = subprocess.run([str(Path(sys.executable).parent / "gmwae"), "study", "run",
                           str(no_server)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert done.returncode == 2 and "Cannot reach the MLflow tracking server" in done.stderr
    for name in ("wrong-password", "closed-port", "no-mlflow"):  # no trial started anywhere
        assert not trials_in_postgres(cluster, f"{name}/gmwae")
