"""A study on images without labels, as a user runs it: the shipped studies/unlabelled.yaml
on a folder of PNG files (scikit-learn's digits, written without their labels), the
label-free objective steering the search, export's ranking and the registry's champion."""
import json

import mlflow
import numpy as np
import optuna
import pytest

from study.trial_states import best_value
from tests.conftest import ROOT, gmwae

SIZES = ["--set", "trials=3", "--set", "max_iterations=2", "--set", "steps_per_iteration=10",
         "--set", "space=smoke", "--set", "fixed.pretrain_steps=5",
         "--set", "fixed.decoder_width=8"]
"""The shipped spec at seconds per trial; its dataset, data_dir and metric stand."""


def write_digit_images(folder, n=600):
    """n of scikit-learn's 8x8 digits as PNG files in three subfolders, with no labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    images = load_digits().images[:n]
    for i, img in enumerate(images):
        sub = folder / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).astype(np.uint8)).save(sub / f"{i:04d}.png")


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unlabelled")
    write_digit_images(folder / "images")  # the spec's data_dir: images, relative to the run
    done = gmwae("study", "run", ROOT / "studies/unlabelled.yaml", "--quiet", *SIZES, cwd=folder)
    assert done.returncode == 0, done.stderr[-4000:]
    return folder, done.stdout


def test_the_study_optimises_the_label_free_metric_and_logs_no_label_metric(unlabelled):
    folder, stdout = unlabelled
    assert "best val/augment_mi (max) per family" in stdout
    mlflow.set_tracking_uri(f"sqlite:///{folder}/runs/unlabelled/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["unlabelled"])
    trials = runs[runs["tags.role"] == "trial"]
    assert len(trials) == 6
    for criterion in ("val/augment_ari", "val/augment_mi", "val/silhouette", "val/mmd",
                      "val/recon_mse", "val/assignment_entropy"):
        assert trials[f"metrics.{criterion}"].notna().all(), criterion
    logged = {c.removeprefix("metrics.") for c in runs.columns if c.startswith("metrics.")}
    assert not logged & {"val/cluster_acc", "val/ami", "val/nmi", "val/ari"}, logged
    storage = f"sqlite:///{folder}/runs/unlabelled/optuna.db"
    for family in ("gmwae", "gmvae"):
        study = optuna.load_study(study_name=f"unlabelled/{family}", storage=storage)
        assert study.direction == optuna.study.StudyDirection.MAXIMIZE
        assert all(0.0 <= t.value <= 1.0 for t in study.trials)


def test_export_crowns_the_trial_the_label_free_metric_ranks_first(unlabelled):
    folder, _ = unlabelled
    done = gmwae("study", "export", "unlabelled", "--out", "exported", cwd=folder)
    assert done.returncode == 0, done.stderr[-4000:]
    index = json.loads((folder / "exported" / "export.json").read_text())
    storage = f"sqlite:///{folder}/runs/unlabelled/optuna.db"
    client = mlflow.MlflowClient(f"sqlite:///{folder}/runs/unlabelled/mlflow.db")
    for row in index["trials"]:
        assert row["objective"]["metric"] == "val/augment_mi"
        study = optuna.load_study(study_name=f"unlabelled/{row['family']}", storage=storage)
        # each trial's best value over its iterations ranks it (ties: the earlier trial)
        best = max(study.trials, key=lambda t: (best_value(t), -t.number))
        assert row["optuna_trial"] == best.number
        champion = client.get_model_version_by_alias(f"unlabelled-{row['family']}", "champion")
        assert str(champion.version) == str(row["version"])
        saved = json.loads((folder / "exported" / row["folder"] / "metrics.json").read_text())
        assert "test/augment_mi" in saved and "test/cluster_acc" not in saved
        assert not (folder / "exported" / row["folder"] / "figures" / "label_by_k.png").exists()


def test_a_label_metric_on_images_without_labels_is_refused_before_anything_runs(tmp_path):
    write_digit_images(tmp_path / "images", n=120)
    done = gmwae("study", "run", ROOT / "studies/unlabelled.yaml", *SIZES,
                 "--set", "metric=val/cluster_acc", cwd=tmp_path)
    assert done.returncode == 2
    assert "`metric` must read the images alone" in done.stderr
    assert "val/augment_mi" in done.stderr and not (tmp_path / "runs").exists()
    missing = gmwae("study", "run", ROOT / "studies/unlabelled.yaml", *SIZES,
                    "--set", "data_dir=no-such-folder", cwd=tmp_path)
    assert missing.returncode == 2 and "no-such-folder" in missing.stderr
    assert "does not exist" in missing.stderr and not (tmp_path / "runs" / "unlabelled" / "optuna.db").exists()


def test_the_report_ranks_and_plots_the_trials_by_the_label_free_objective(unlabelled):
    from dashboards import data as D
    from study.spec import load_spec

    folder, _ = unlabelled
    done = gmwae("dashboard", "unlabelled", cwd=folder)
    assert done.returncode == 0, done.stderr[-4000:]
    page = (folder / "runs" / "unlabelled" / "report.html").read_text()
    assert "val augment_mi against the paper" in page
    spec = load_spec(ROOT / "studies/unlabelled.yaml")
    import os

    here = os.getcwd()
    os.chdir(folder)  # the spec's stores are relative to where the study ran
    try:
        data = D.load_study_data(spec, mlflow_url="http://127.0.0.1:5000")
    finally:
        os.chdir(here)
    for family, ins in D.search_insight(data).items():
        assert ins["score"] == "val/augment_mi" and len(ins["rows"]) == 3
        finals = {t.number: t.final["val/augment_mi"] for t in data.of(family)}
        assert all(r["acc"] == finals[r["number"]] for r in ins["rows"])
