"""Study spec validation and store checks: every bad input rejected before a trial starts."""
import subprocess
import sys
from pathlib import Path

import pytest

from study.runner import run_study
from study.stores import StoreError, mask_url, open_optuna_storage
from study.spec import SpecError, load_spec, spec_from_dict

ROOT = Path(__file__).parents[2]
GMWAE = str(Path(sys.executable).parent / "gmwae")


def test_shipped_specs_are_valid():
    for path in sorted((ROOT / "studies").glob("*.yaml")):
        spec = load_spec(path)
        assert spec.name == path.stem and spec.trials >= 1


@pytest.mark.parametrize("d,pattern", [
    ({"name": "s", "trails": 3}, r"Unknown config key `trails`.*Did you mean `trials`"),
    ({"name": "s", "trials": "many"}, r"`trials` must be a int, but got 'many'"),
    ({"name": "s", "trials": -2}, r"`trials` must be at least 1.*-2"),
    ({"name": "s", "families": []}, r"`families` must name at least one family"),
    ({"name": "s", "families": ["gmwae", "vae"]}, r"`families` may only contain"),
    ({"name": "s", "space": "huge"},
     r"`space` 'huge' is neither a shipped space \(default, fixed, quickstart, smoke, wide\) nor a YAML file"),
    ({"name": "s", "dataset": "cifar10"}, r"`dataset` must be one of"),
    ({"name": "s", "scheduler": {"type": "pbt"}}, r"`scheduler.type` must be asha or none"),
    ({"name": "s", "resources": {"gpus": 1}}, r"Unknown config key `resources.gpus`"),
    ({"name": "s", "storage": {"optuna": 3}}, r"`storage.optuna` must be a str"),
    ({"name": "s", "space": "fixed", "fixed": {"K": 1}}, r"`fixed`.*`model.K` must be at least 2"),
    ({"name": "s", "space": "default", "fixed": {"lambda_mmd": 50}},
     r"`fixed.lambda_mmd` is also searched by the space \(lambda_mmd: float 1..100, log\); a value "
     r"cannot be both fixed and searched, but got 50\. Remove lambda_mmd from `fixed`"),
    ({"name": "s", "space": {"model.K": {"type": "int", "low": 8, "high": 12}}, "fixed": {"K": 10}},
     r"`fixed.K` is also searched"),
    ({"trials": 2}, r"lacks `name`"),
    ({"name": "s", "points": [{"K": 12}]}, r"`points` must map families to lists of points"),
    ({"name": "s", "points": {"gmwae": 12}}, r"`points.gmwae` must be a list of mappings"),
    ({"name": "s", "families": ["gmwae"], "points": {"gmvae": [{"K": 12}]}},
     r"`points.gmvae` must name a family the study searches \(\['gmwae'\]\).*Remove it, or "
     r"add gmvae to `families`"),
    ({"name": "s", "points": {"gmwae": [{}]}}, r"points.gmwae\[0\]: `point` must be a non-empty"),
    ({"name": "s", "space": "default", "points": {"gmwae": [{"K": 12}, {"consistency_weight": 4}]}},
     r"points.gmwae\[1\]: `consistency_weight` is not searched for gmwae \(searched: lambda_mmd, "
     r".*\), but got 4\. Give only searched keys; a value for every trial goes in `fixed:`"),
    ({"name": "s", "points": {"gmvae": [{"lambda_mmd": 5}]}},
     r"points.gmvae\[0\]: `lambda_mmd` is not searched for gmvae"),
    ({"name": "s", "space": "default", "points": {"gmwae": [{"K": 40}]}},
     r"points.gmwae\[0\]: `K` must be a value the space allows for gmwae \(K: int 8..16\), but "
     r"got 40\. Give one inside the range"),
    ({"name": "s", "space": "default", "points": {"gmwae": [{"K": 10.5}]}}, r"`K` must be a value"),
    ({"name": "s", "space": "default", "points": {"gmwae": [{"batch_size": 48}]}},
     r"`batch_size` must be a value the space allows for gmwae \(batch_size: one of \[32, 64, 128\]\)"),
    ({"name": "s", "space": "quickstart", "points": {"gmwae": [{"consistency_weight": 50}]}},
     r"`consistency_weight` must be a value the space allows for gmwae \(consistency_weight: "
     r"float 0..8\), but got 50"),
])
def test_bad_specs_name_the_key_and_the_fix(d, pattern):
    with pytest.raises(SpecError, match=pattern):
        spec_from_dict(d)


def test_missing_and_malformed_spec_files(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_cli_rejects_a_bad_spec_with_status_2_and_no_traceback(tmp_path):
    (tmp_path / "s.yaml").write_text("name: s\ntrials: -1\n")
    proc = subprocess.run([GMWAE, "study", "run", tmp_path / "s.yaml"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "`trials` must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_store_urls_are_masked_in_messages():
    assert mask_url("postgresql://gm:s3cret@db:5432/optuna") == "postgresql://gm:***@db:5432/optuna"
    assert mask_url("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_unreachable_postgres_is_rejected_with_the_password_masked():
    with pytest.raises(StoreError) as info:
        open_optuna_storage("postgresql://gm:s3cret@127.0.0.1:9/optuna")
    assert "gm:***@127.0.0.1:9" in str(info.value) and "s3cret" not in str(info.value)


def test_unreachable_mlflow_server_is_rejected_before_any_trial(tmp_path):
    spec = spec_from_dict({"name": "s", "dataset": "synthetic", "storage": {
        "optuna": f"sqlite:///{tmp_path}/o.db", "mlflow": "http://user:pw@127.0.0.1:9",
        "ray": str(tmp_path / "ray")}})
    with pytest.raises(StoreError, match=r"Cannot reach the MLflow tracking server http://user:\*\*\*@"):
        run_study(spec, verbose=0)
    assert not (tmp_path / "ray").exists()


def test_gpu_request_on_a_cluster_without_gpus_fails_fast_with_its_resources(tmp_path):
    import ray

    spec = spec_from_dict({"name": "g", "dataset": "synthetic", "resources": {"cpu": 1, "gpu": 0.5},
                           "storage": {"optuna": f"sqlite:///{tmp_path}/o.db",
                                       "mlflow": f"sqlite:///{tmp_path}/m.db",
                                       "ray": str(tmp_path / "ray")}})
    try:
        with pytest.raises(SpecError, match=r"`resources.gpu` is 0.5 per trial, but the Ray cluster "
                                            r"has 0 GPUs now and can grow none \(running nodes "
                                            r"\[[\d.]+: CPU \d+, GPU 0\]; no autoscaler node types"):
            run_study(spec, verbose=0)
    finally:
        ray.shutdown()
    assert not (tmp_path / "ray").exists()


def test_a_missing_data_folder_is_rejected_before_any_trial(tmp_path):
    from gmwae_core import DataError

    spec = spec_from_dict({"name": "d", "dataset": "mnist", "data_dir": str(tmp_path / "none"),
                           "storage": {"optuna": f"sqlite:///{tmp_path}/o.db",
                                       "mlflow": f"sqlite:///{tmp_path}/m.db",
                                       "ray": str(tmp_path / "ray")}})
    with pytest.raises(DataError, match="does not exist"):
        run_study(spec, verbose=0)
    assert not (tmp_path / "o.db").exists() and not (tmp_path / "ray").exists()


def test_a_relative_data_folder_reaches_trials_as_an_absolute_path(tmp_path, monkeypatch):
    from study.stores import resolve_study_data

    monkeypatch.chdir(ROOT)
    spec = spec_from_dict({"name": "d", "dataset": "mnist", "data_dir": "../shared/data/mnist"})
    resolved = resolve_study_data(spec)
    assert Path(resolved.data_dir).is_absolute()
    assert Path(resolved.data_dir) == (ROOT / "../shared/data/mnist").resolve()


def test_status_of_an_unknown_study_is_a_clear_error(tmp_path):
    proc = subprocess.run([GMWAE, "study", "status", "no-such-study"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "No study 'no-such-study'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_scheduler_none_is_a_value_not_a_null():
    assert spec_from_dict({"name": "s", "scheduler": {"type": "none"}}).scheduler.type == "none"
    assert spec_from_dict({"name": "s", "scheduler": "none"}).scheduler.type == "none"


def test_points_run_after_the_paper_point_completed_with_its_values():
    spec = spec_from_dict({"name": "s", "space": "quickstart", "trials": 3, "points": {
        "gmwae": [{"consistency_weight": 4, "train.balance_weight": 1}, {"model.K": 12.0}],
        "gmvae": {"consistency_weight": 50, "balance_weight": 50}}})
    paper = spec.search_space.paper_point("gmwae")
    assert spec.start_points("gmwae") == [
        paper, {**paper, "consistency_weight": 4.0, "balance_weight": 1.0}, {**paper, "K": 12}]
    assert isinstance(spec.start_points("gmwae")[2]["K"], int)  # Optuna's int parameter
    assert spec.start_origins("gmwae") == ("paper point", "points[0]", "points[1]")
    gmvae = spec.start_points("gmvae")
    assert len(gmvae) == 2 and gmvae[1]["consistency_weight"] == 50.0 and "lambda_mmd" not in gmvae[1]
    # fewer trials than points: the first ones run, the rest are left out, not an error
    short = spec_from_dict({**spec.to_dict(), "trials": 2})
    assert short.start_points("gmwae") == spec.start_points("gmwae")[:2]
    assert short.start_origins("gmwae") == ("paper point", "points[0]")
    # a space with no paper point: the points alone, their other keys sampled
    narrow = spec_from_dict({"name": "s", "space": {"K": {"type": "int", "low": 12, "high": 20},
                                                    "lr": {"type": "float", "low": 1e-4, "high": 1e-2}},
                             "points": {"gmwae": [{"K": 14}]}})
    assert narrow.start_points("gmwae") == [{"K": 14}]
    assert narrow.start_origins("gmwae") == ("points[0]",)


def test_a_study_recorded_before_points_existed_still_resumes():
    from study.resume import spec_for_resume

    spec = load_spec(ROOT / "studies/smoke.yaml")
    recorded = {k: v for k, v in spec.to_dict().items() if k != "points"}
    assert spec_for_resume(spec, recorded).points == {}
    pointed = spec_from_dict({**spec.to_dict(), "points": {"gmwae": [{"K": 12}]}})
    with pytest.raises(SpecError, match=r"spec changed in points: recorded \{\}, now"):
        spec_for_resume(pointed, recorded)


def test_images_without_labels_default_to_the_label_free_objective():
    from study.objective import LABEL_FREE_METRIC

    spec = spec_from_dict({"name": "s", "dataset": "images", "data_dir": "images",
                           "space": "quickstart"})
    assert spec.metric == LABEL_FREE_METRIC and not spec.objective.reads_labels
    with pytest.raises(SpecError, match=r"`metric` must read the images alone.*val/ami"):
        spec_from_dict({"name": "s", "dataset": "images", "data_dir": "images",
                        "metric": "val/ami"})


@pytest.mark.parametrize("metric,mode", [("val/augment_ari", "max"), ("val/augment_mi", "max"),
                                         ("val/silhouette", "max"), ("val/mmd", "min"),
                                         ("val/recon_mse", "min")])
def test_study_validate_accepts_each_label_free_metric_with_its_direction(metric, mode):
    done = subprocess.run([GMWAE, "study", "validate", str(ROOT / "studies/quickstart.yaml"),
                           "--set", f"metric={metric}"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"objective: {mode} {metric} (label-free" in done.stdout
