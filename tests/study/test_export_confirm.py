"""Export and confirm on a real smoke study (local Ray, Optuna sqlite, MLflow sqlite)."""
import json
import statistics
from pathlib import Path

import mlflow
import pytest
import torch

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
    # Ranked by best validation accuracy within each family.
    wae = [r["metrics"]["val/cluster_acc"] for r in index["trials"] if r["family"] == "gmwae"]
    assert wae == sorted(wae, reverse=True)


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
    assert gmwae("study", "confirm", spec, "--seeds", "1", cwd=folder).returncode == 2
