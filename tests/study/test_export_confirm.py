"""Export and confirm on a real smoke study (local Ray, Optuna sqlite, MLflow sqlite)."""
import json
import statistics
from pathlib import Path

import mlflow
import pytest
import torch

from study.spec import load_spec
from tests.conftest import gmwae


@pytest.fixture(scope="module")
def study(smoke_study):
    return smoke_study


def client_of(folder):
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    return mlflow.MlflowClient()


def test_export_top_2_reloads_exactly_and_registers_versions(study):
    spec, folder = study
    out = folder / "exported"
    done = gmwae("study", "export", spec, "--top", "2", "--out", out, cwd=folder)
    assert done.returncode == 0, done.stderr[-4000:]
    index = json.loads((out / "export.json").read_text())
    assert sorted((r["family"], r["registered_model"]) for r in index["trials"]) == [
        ("gmvae", "smoke-gmvae")] * 2 + [("gmwae", "smoke-gmwae")] * 2
    client = client_of(folder)
    for row in index["trials"]:
        trial_dir = out / row["folder"]  # relative: the export folder can be moved
        assert row["folder"] == f"{row['family']}-trial{row['optuna_trial']:03d}"
        weights = torch.load(trial_dir / "weights.pt", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in weights.values())
        saved = json.loads((trial_dir / "metrics.json").read_text())
        assert {"val/cluster_acc", "test/cluster_acc", "test/active_components"} <= set(saved)
        assert (trial_dir / "README.md").read_text().startswith("# GM-")
        assert (trial_dir / "figures" / "label_by_k.png").stat().st_size > 1000
        check = gmwae("evaluate", trial_dir, "--check", "--json", folder / "re.json", cwd=folder)
        assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
        again = json.loads((folder / "re.json").read_text())
        assert again == {k: v for k, v in saved.items() if k.startswith("test/")}
        version = client.get_model_version(row["registered_model"], row["version"])
        assert version.tags["optuna_trial"] == str(row["optuna_trial"])
        assert float(version.tags["test/cluster_acc"]) == pytest.approx(saved["test/cluster_acc"],
                                                                         rel=1e-5)
        assert version.run_id == row["run_id"]
        assert client.get_run(row["run_id"]).data.tags["exported_to"] == str(trial_dir.resolve())
    for family in ("gmwae", "gmvae"):
        versions = client.search_model_versions(f"name = 'smoke-{family}'")
        assert len(versions) == 2
    # Ranked by the study's objective (the smoke space searches K: val/ami, max) per family,
    # each at the checkpoint of its best iteration.
    assert load_spec(spec).objective.metric == "val/ami"
    wae = [r["metrics"]["val/ami"] for r in index["trials"] if r["family"] == "gmwae"]
    assert wae == sorted(wae, reverse=True)


FRESH = """
import json, sys
import mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/smoke-gmwae@champion")
out = model.predict(np.load(sys.argv[2]))
print(json.dumps({"clusters": out["cluster"].tolist(), "columns": list(out.columns)}))
"""


def test_the_champion_loads_and_serves_the_clusters_gmwae_evaluate_computes(study, tmp_path):
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    import numpy as np

    from gmwae_core import load_splits, read_config
    from cluster.local import free_port

    spec, folder = study
    index = json.loads((folder / "exported" / "export.json").read_text())
    best = next(r for r in index["trials"] if r["family"] == "gmwae" and r.get("alias"))
    client = client_of(folder)
    champion = client.get_model_version_by_alias("smoke-gmwae", "champion")
    assert champion.version == best["version"] and champion.description.startswith("# GM-WAE")
    trial_dir = folder / "exported" / best["folder"]
    assert (trial_dir / "MLmodel").is_file() and (trial_dir / "weights.pt").is_file()

    done = gmwae("evaluate", trial_dir, "--assignments", tmp_path / "a.csv", cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = [int(line.split(",")[1]) for line in
                (tmp_path / "a.csv").read_text().splitlines()[1:]]
    cfg = read_config(trial_dir)
    images = load_splits(cfg.data).test_x.reshape(-1, 784).numpy()
    assert len(images) == len(expected)
    np.save(tmp_path / "x.npy", images)
    uri = f"sqlite:///{folder}/mlflow.db"
    # a fresh process, outside the repository, through the registry alias
    fresh = subprocess.run([sys.executable, "-c", FRESH, uri, str(tmp_path / "x.npy")],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    answer = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert answer["clusters"] == expected
    assert answer["columns"][:2] == ["cluster", "q_k_0"] and f"z_{cfg.model.latent_dim - 1}" \
        in answer["columns"]

    # the same model served by MLflow's own server
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve",
                               "-m", "models:/smoke-gmwae@champion", "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path,
                              # as from an activated venv: MLflow starts `uvicorn` by name
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri,
                                   "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", method="POST",
            data=json.dumps({"inputs": images[:64].tolist()}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            served = json.loads(r.read())["predictions"]
        assert [row["cluster"] for row in served] == expected[:64]
    finally:
        server.terminate()
        server.wait(timeout=30)

    # bad input: a clear error naming the shape or the range and the fix
    model = mlflow.pyfunc.load_model(str(trial_dir))  # the export folder, offline
    with pytest.raises(Exception, match=r"shape \(N, 784\)|784"):
        model.predict(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(Exception, match=r"pixel values in \[0, 1\].*Divide 8-bit images by 255"):
        model.predict(np.full((2, 784), 255.0, np.float32))


def test_mlflow_and_optuna_tools_see_a_training_experiment_and_a_named_objective(study):
    import optuna

    spec, folder = study
    experiment = client_of(folder).get_experiment_by_name("smoke")
    # MLflow 3's UI opens this kind in the runs view (untagged: the GenAI traces view)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    client = client_of(folder)
    run = client.search_runs([experiment.experiment_id], "tags.role = 'trial'")[0]
    history = client.get_metric_history(run.info.run_id, "history/loss")
    # real wall-clock timestamps (ms): not 0 (1970 on the time axis), in step order
    assert history and all(m.timestamp > 1_600_000_000_000 for m in history)
    ordered = [m.timestamp for m in sorted(history, key=lambda m: m.step)]
    assert ordered == sorted(ordered) and ordered[-1] > ordered[0]
    assert "history/time" not in run.data.metrics
    # every value the trial ran with: searched (bare), and the whole config (dotted)
    params = run.data.params
    assert params["model.decoder_width"] == "8" and params["train.batch_size"] == "32"
    assert params["model.K"] == params["K"] and params["family"] == run.data.tags["family"]
    # the precision that ran, beside the asked one (train.precision=auto resolves per node)
    assert params["train.precision"] == "fp32" and run.data.metrics["train/bf16_networks"] == 0.0
    assert run.data.tags["mlflow.source.git.commit"] == run.data.tags["git_sha"]
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(f"{run.data.tags['family']} trial ") and "K=" in note
    assert "iterations" in note
    # the dataset, as MLflow's own input: name, digest, split sizes
    from gmwae_core.data import describe_splits

    expected = describe_splits(load_spec(spec).run_config("gmwae", {}).data)
    inputs = run.inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("synthetic",
                                                                      expected["digest"])]
    assert json.loads(inputs[0].dataset.profile)["test"] == expected["sizes"]["test"]
    parent = client.search_runs([experiment.experiment_id], "tags.role = 'study'")[0]
    assert parent.data.params["space"] == "smoke" and parent.data.params["trials"] == "3"
    assert parent.data.params["fixed.decoder_width"] == "8"
    assert parent.data.params["storage.optuna"].startswith("sqlite:///")
    for family in ("gmwae", "gmvae"):
        loaded = optuna.load_study(study_name=f"smoke/{family}",
                                   storage=f"sqlite:///{folder}/optuna.db")
        assert loaded.metric_names == ["val/ami"]
        best = max((t for t in loaded.trials if t.state.name in ("COMPLETE", "PRUNED")),
                   key=lambda t: t.user_attrs["best_value"])
        assert parent.data.metrics[f"best/{family}/val_ami"] == pytest.approx(
            best.user_attrs["best_value"])
        assert f"best/{family}/val_cluster_acc" in parent.data.metrics
        child = client.get_run(parent.data.tags[f"best/{family}/run_id"])
        assert child.data.tags["optuna_trial"] == str(best.number)
        assert child.info.run_id in parent.data.tags["mlflow.note.content"]
        # The description quotes the study's objective (val/ami), at the best iteration.
        value = parent.data.metrics[f"best/{family}/val_ami"]
        assert f"; val/ami {value:.3f} there)" in parent.data.tags["mlflow.note.content"]


def test_optuna_dashboard_serves_both_families_with_the_objectives_name(study, tmp_path):
    import subprocess
    import sys
    import time
    import urllib.request

    from cluster.local import free_port

    spec, folder = study
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"),
                               f"sqlite:///{folder}/optuna.db", "--host", "127.0.0.1",
                               "--port", str(port)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "dashboard.log", "w"))
    try:
        deadline, studies = time.monotonic() + 60, None
        while studies is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies = json.loads(r.read())["study_summaries"]
            except OSError:
                assert server.poll() is None, (tmp_path / "dashboard.log").read_text()[-2000:]
                time.sleep(0.5)
        assert sorted(s["study_name"] for s in studies) == ["smoke/gmvae", "smoke/gmwae"]
        for summary in studies:
            url = f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}"
            with urllib.request.urlopen(url, timeout=10) as r:
                detail = json.loads(r.read())
            assert detail["objective_names"] == ["val/ami"]
            assert len(detail["trials"]) == 3
            # the dashboard shows ASHA's stops as pruned, as Optuna records them
            states = sorted(str(t["state"]).upper() for t in detail["trials"])
            import optuna
            recorded = optuna.load_study(study_name=summary["study_name"],
                                         storage=f"sqlite:///{folder}/optuna.db").trials
            assert states == sorted(t.state.name for t in recorded)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_export_refuses_bad_targets_and_writes_nothing(study):
    spec, folder = study
    busy = folder / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    refused = gmwae("study", "export", spec, "--out", busy, cwd=folder)
    assert refused.returncode == 2 and "already exists and is not an empty folder" in refused.stderr
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]

    unreachable = gmwae("study", "export", spec, "--out", folder / "x1", "--registry-uri",
                        "http://user:secret@127.0.0.1:9", cwd=folder)
    assert unreachable.returncode == 2, unreachable.stderr
    assert "Cannot reach the MLflow tracking server http://user:***@127.0.0.1:9" in unreachable.stderr
    assert "secret" not in unreachable.stderr

    missing = gmwae("study", "export", folder / "no-such.yaml", "--out", folder / "x2", cwd=folder)
    assert missing.returncode == 2 and "does not exist" in missing.stderr

    nothing = gmwae("study", "export", "never-ran", "--out", folder / "x3", cwd=folder)
    assert nothing.returncode == 2 and "No study 'never-ran'" in nothing.stderr
    assert not any((folder / n).exists() for n in ("x1", "x2", "x3"))
    assert not list(folder.glob(".x*.tmp-*"))


def test_export_of_an_altered_checkpoint_fails_cleanly(study, tmp_path):
    import optuna

    spec, folder = study
    best = max((t for t in optuna.load_study(study_name="smoke/gmvae",
                                              storage=f"sqlite:///{folder}/optuna.db").trials),
               key=lambda t: t.user_attrs["best_value"])
    weights = Path(best.user_attrs["best_checkpoint"]) / "checkpoint" / "weights.pt"
    original = weights.read_bytes()
    versions_before = len(client_of(folder).search_model_versions("name = 'smoke-gmwae'"))
    try:
        weights.write_bytes(original[:-10] + b"0123456789")
        out = folder / "altered"
        failed = gmwae("study", "export", spec, "--out", out, cwd=folder)
        assert failed.returncode == 2
        assert "was altered or is corrupt" in failed.stderr and "gmvae trial" in failed.stderr
        assert not out.exists() and not list(folder.glob(".altered.tmp-*"))
        # The gmwae version registered before the gmvae failure was taken back.
        assert len(client_of(folder).search_model_versions("name = 'smoke-gmwae'")) == versions_before
    finally:
        weights.write_bytes(original)


def test_confirm_table_matches_the_child_runs(study):
    spec, folder = study  # the fixture ran `gmwae study confirm SPEC --seeds 2 --out confirm`
    out = folder / "confirm"
    table = json.loads((out / "confirm.json").read_text())
    assert "± " in (out / "confirm.md").read_text()
    client = client_of(folder)
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id],
                              f"tags.role = 'confirm' and tags.confirm_batch = "
                              f"'{table['confirm_batch']}'")
    parent = client.search_runs([experiment.experiment_id], "tags.role = 'study'")[0]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "confirm")} == {
        "confirm/confirm.json", "confirm/confirm.md"}
    for family, row in table["families"].items():
        mine = [r for r in runs if r.data.tags["family"] == family]
        assert len(mine) == 2 and {r.data.tags["seed"] for r in mine} == {"1", "2"}
        assert all(r.info.status == "FINISHED" for r in mine)
        assert all(r.data.tags["confirms_trial"] == str(row["optuna_trial"]) for r in mine)
        for key in ("test/cluster_acc", "test/nmi", "test/active_components"):
            values = [r.data.metrics[key] for r in mine]
            assert row["summary"][key]["mean"] == pytest.approx(statistics.fmean(values))
            assert row["summary"][key]["std"] == pytest.approx(statistics.stdev(values))
        # the seeds' test clusterings, compared pairwise (label-free): one ARI for 2 seeds
        assert -1.0 <= row["seed_stability"] <= 1.0
        assert f"{row['seed_stability']:.3f} |" in (out / "confirm.md").read_text()
    assert "seed stability" in (out / "confirm.md").read_text()
    assert gmwae("study", "confirm", spec, "--seeds", "1", cwd=folder).returncode == 2
