"""Studies end to end on real components: local Ray, Optuna sqlite, MLflow sqlite."""
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import optuna
import pytest

from study.runner import run_study
from study.spec import load_spec
from study.status import study_status
from study.trial_states import SCORED_STATES

ROOT = Path(__file__).parents[2]
GMWAE = str(Path(sys.executable).parent / "gmwae")


def stores(tmp_path, name):
    return {"name": name, "storage": {"optuna": f"sqlite:///{tmp_path}/optuna.db",
                                      "mlflow": f"sqlite:///{tmp_path}/mlflow.db",
                                      "ray": str(tmp_path / "ray")}}


def trials_of(tmp_path, study):
    return optuna.load_study(study_name=study, storage=f"sqlite:///{tmp_path}/optuna.db").trials


def runs_of(tmp_path, name):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(experiment_names=[name]), mlflow.MlflowClient()


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_a_diverging_trial_is_marked_failed_and_the_study_goes_on(tmp_path, ray_local):
    import cloudpickle

    import tests.study.faulty as faulty

    cloudpickle.register_pickle_by_value(faulty)  # Ray workers need not import the tests
    spec = load_spec(ROOT / "studies/smoke.yaml", {
        **stores(tmp_path, "nan-study"), "points": {"gmwae": [{"K": 12, "lambda_mmd": 50.0}],
                                                    "gmvae": [{"latent_dim": 4}]}})
    summary = run_study(spec, verbose=0, trainable=faulty.diverge_on_paper_point)

    wae = trials_of(tmp_path, "nan-study/gmwae")
    assert [t.state.name for t in wae].count("FAIL") == 1
    assert sum(t.state.name in SCORED_STATES for t in wae) == spec.trials - 1
    assert wae[0].state.name == "FAIL" and wae[0].params["K"] == 10  # the paper point, enqueued first
    # then the spec's point: the paper point's values but for the two keys it gives
    paper = spec.search_space.paper_point("gmwae")
    assert wae[1].params == {**paper, "K": 12, "lambda_mmd": 50.0}
    vae = trials_of(tmp_path, "nan-study/gmvae")
    assert vae[1].params == {**spec.search_space.paper_point("gmvae"), "latent_dim": 4}
    assert wae[2].params != wae[1].params and wae[2].params != paper  # the searcher's own
    assert [t.user_attrs["origin"] for t in wae] == ["paper point", "points[0]", "sampled"]
    assert all(t.state.name in SCORED_STATES for t in trials_of(tmp_path, "nan-study/gmvae"))
    assert summary["gmwae"]["failed"] == 1 and summary["gmvae"]["failed"] == 0

    runs, client = runs_of(tmp_path, "nan-study")
    children = runs[runs["tags.role"] == "trial"]
    failed = children[children["status"] == "FAILED"]
    assert len(failed) == 1 and failed.iloc[0]["tags.family"] == "gmwae"
    assert "not finite" in failed.iloc[0]["tags.failure_reason"]
    assert (children["status"] == "FINISHED").sum() == 2 * spec.trials - 1
    # MLflow says where each trial came from, as Optuna does (tag and description)
    origin = dict(zip(children["tags.family"] + "-" + children["tags.optuna_trial"],
                      children["tags.origin"]))
    assert origin == {f"{f}-{n}": o for f in ("gmwae", "gmvae")
                      for n, o in enumerate(["paper point", "points[0]", "sampled"])}
    point_run = children[(children["tags.family"] == "gmvae") & (children["tags.optuna_trial"] == "1")]
    assert "(points[0]): " in point_run.iloc[0]["tags.mlflow.note.content"]


def test_a_trials_linear_schedule_decays_the_rate_over_the_trials_own_length(tmp_path, ray_local):
    smoke = load_spec(ROOT / "studies/smoke.yaml")
    spec = load_spec(ROOT / "studies/smoke.yaml", {
        **stores(tmp_path, "linear"), "trials": 1, "scheduler": {"type": "none"},
        "fixed": {**smoke.fixed, "lr_schedule": "linear"}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_study(spec, verbose=0)
    # The last iteration reaches Optuna once, though Tune hands it over twice here.
    assert not [w for w in caught if "already reported" in str(w.message)]
    assert [list(t.intermediate_values) for t in trials_of(tmp_path, "linear/gmwae")] == [[1, 2]]
    runs, client = runs_of(tmp_path, "linear")
    children = runs[runs["tags.role"] == "trial"]
    assert len(children) == 2
    budget = spec.max_iterations * spec.steps_per_iteration  # 2 x 10 steps, not train.epochs
    for _, child in children.iterrows():
        rates = [m.value for m in client.get_metric_history(child["run_id"], "train/lr")]
        lr = float(child["params.train.lr"])
        # each iteration's last step: 9 and 19 of 20
        assert rates == pytest.approx([lr * (1 - 9 / budget), lr * (1 - 19 / budget)], rel=1e-6)


def test_cli_runs_the_smoke_study_into_real_stores(tmp_path):
    spec_file = tmp_path / "spec.yaml"
    text = (ROOT / "studies/smoke.yaml").read_text()
    text = text.replace("sqlite:///runs/{name}", f"sqlite:///{tmp_path}").replace(
        "ray: runs/{name}/ray", f"ray: {tmp_path}/ray")
    spec_file.write_text(text)
    spec = load_spec(spec_file)
    proc = subprocess.Popen([GMWAE, "study", "run", spec_file, "--quiet"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # `study status` reads the stores while the study runs.
    seen_while_running = None
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if (tmp_path / "optuna.db").exists() and (tmp_path / "mlflow.db").exists():
            try:
                status = study_status(spec)
            except Exception:  # the stores may still be being created
                status = None
            if status and sum(status["gmwae"]["states"].values()) > 0 and proc.poll() is None:
                seen_while_running = status
                break
        time.sleep(1)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-4000:]
    assert "best val/ami (max) per family" in stdout  # the smoke space searches K
    assert seen_while_running is not None
    assert sum(seen_while_running["gmwae"]["states"].values()) <= spec.trials

    final = subprocess.run([GMWAE, "study", "status", spec_file], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    rows = {line.split()[0]: line.split() for line in final.stdout.splitlines()[2:]
            if line.startswith(("gmwae", "gmvae"))}
    for family in ("gmwae", "gmvae"):  # requested, complete, pruned, running, failed
        pruned = sum(t.state.name == "PRUNED" for t in trials_of(tmp_path, f"smoke/{family}"))
        assert rows[family][1:6] == [str(spec.trials), str(spec.trials - pruned), str(pruned),
                                     "0", "0"]

    for family in ("gmwae", "gmvae"):
        trials = trials_of(tmp_path, f"smoke/{family}")
        assert len(trials) == spec.trials
        assert all(t.state.name in SCORED_STATES and 0 <= t.value <= 1 for t in trials)
        assert trials[0].params["K"] == 10 and trials[0].params["latent_dim"] == 10
        assert ("lambda_mmd" in trials[0].params) == (family == "gmwae")
        # The final table names each family's best trial and where its values came from.
        line = next(row for row in stdout.split("per family", 1)[1].splitlines()
                    if row.startswith(family))
        best = trials[int(line.split()[3])]
        assert best.user_attrs["origin"] in ("paper point", "sampled")
        assert f" {best.user_attrs['origin']} " in line

    # Both families ran in one Tune run (run_families: together), and Tune reused its worker
    # processes (reuse_actors): 2 x 3 trials, at most 2 at a time, ran in at most 2
    # processes (Tune's own result.json records each trial's pid and config).
    results = list((tmp_path / "ray" / "smoke").glob("*/result.json"))
    firsts = [json.loads(r.read_text().splitlines()[0]) for r in results]
    assert sorted(f["config"]["_family"] for f in firsts) == ["gmvae"] * 3 + ["gmwae"] * 3
    pids = {f["pid"] for f in firsts}
    assert len(pids) <= spec.max_concurrent < 2 * spec.trials, pids

    runs, client = runs_of(tmp_path, "smoke")
    parent = runs[runs["tags.role"] == "study"]
    children = runs[runs["tags.role"] == "trial"]
    assert len(parent) == 1 and parent.iloc[0]["status"] == "FINISHED"
    assert len(children) == 2 * spec.trials
    assert set(children["tags.mlflow.parentRunId"]) == {parent.iloc[0]["run_id"]}
    assert children["tags.git_sha"].str.len().min() >= 7
    for _, child in children.iterrows():
        iterations = int(child["tags.iterations"])
        assert 1 <= iterations <= spec.max_iterations
        for key in ("val/cluster_acc", "val/mmd", "val/active_components"):
            history = client.get_metric_history(child["run_id"], key)
            assert [m.step for m in history] == list(range(1, iterations + 1)), key
        figures = [a.path for a in client.list_artifacts(child["run_id"], "figures")]
        # ASHA's stops are Optuna's PRUNED trials, and only those
        state = trials_of(tmp_path, f"smoke/{child['tags.family']}")[int(child["tags.optuna_trial"])]
        assert (state.state.name == "PRUNED") == (child["tags.stopped_early"] == "true")
        assert (state.user_attrs.get("stopped_by") == "ASHA") == (state.state.name == "PRUNED")
        if child["tags.stopped_early"] == "false":
            assert "figures/label_by_k.png" in figures
