"""The study's objective (`metric`, `mode` in the spec) as one value that the search, the
ledger, status, export and the dashboards all follow."""
import json
import math

import optuna
import pytest

from study.objective import Objective
from study.spec import SpecError, load_spec, spec_from_dict
from tests.conftest import ROOT, gmwae


def test_which_objectives_read_labels():
    from gmwae_core.metrics import EVAL_METRICS, LABEL_METRICS

    assert LABEL_METRICS < set(EVAL_METRICS)
    assert Objective("val/ami").reads_labels and Objective("val/cluster_acc").reads_labels
    for free in ("val/mmd", "val/recon_mse", "val/assignment_entropy", "val/active_components"):
        assert not Objective(free).reads_labels, free


def test_the_default_metric_follows_whether_K_is_searched():
    assert spec_from_dict({"name": "s", "space": "smoke"}).objective == Objective("val/ami", "max")
    assert spec_from_dict({"name": "s", "space": "fixed"}).objective == Objective(
        "val/cluster_acc", "max")
    assert spec_from_dict({"name": "s", "metric": "val/mmd"}).objective.mode == "min"
    assert spec_from_dict({"name": "s", "metric": "val/mmd", "mode": "max"}).objective.mode == "max"


def test_hungarian_accuracy_with_K_searched_warns_why():
    spec = spec_from_dict({"name": "s", "space": "smoke", "metric": "val/cluster_acc"})
    (line,) = spec.objective.warnings(spec.searched_keys())
    assert "searches K" in line and "metric: val/ami" in line
    fixed = spec_from_dict({"name": "s", "space": "fixed", "metric": "val/cluster_acc"})
    assert fixed.objective.warnings(fixed.searched_keys()) == []


@pytest.mark.parametrize("bad, message", [
    ({"metric": "val/accuracy"}, r"`metric` must be a validation metric the trainable reports"),
    ({"metric": "test/ami"}, r"but got 'test/ami'\. Use val/ami when K is searched"),
    ({"mode": "maximize"}, r"`mode` must be min or max, but got 'maximize'\. Use max"),
])
def test_a_bad_objective_is_refused_naming_the_key_and_the_fix(bad, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict({"name": "s", **bad})


def test_a_bad_metric_exits_2_before_any_store_is_written(tmp_path):
    done = gmwae("study", "run", ROOT / "studies/smoke.yaml", "--set", "metric=val/acc",
                 "--set", f"storage.optuna=sqlite:///{tmp_path}/o.db",
                 "--set", f"storage.mlflow=sqlite:///{tmp_path}/m.db", cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert "`metric` must be a validation metric" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def mmd_study(tmp_path_factory):
    """The smoke study minimising val/mmd."""
    folder = tmp_path_factory.mktemp("mmd-study")
    text = (ROOT / "studies/smoke.yaml").read_text().replace(
        "sqlite:///runs/{name}", f"sqlite:///{folder}").replace(
        "ray: runs/{name}/ray", f"ray: {folder}/ray").replace("name: smoke", "name: mmd")
    spec_file = folder / "mmd.yaml"
    spec_file.write_text(text)
    done = gmwae("study", "run", spec_file, "--quiet", "--set", "metric=val/mmd", cwd=folder)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "best val/mmd (min) per family" in done.stdout
    return load_spec(spec_file, sets=["metric=val/mmd"]), spec_file, folder, done.stdout


@pytest.mark.slow
def test_minimising_mmd_ranks_lowest_first_everywhere(mmd_study):
    from dashboards import data as D
    from study.export import chosen_trials
    from study.status import study_status

    spec, spec_file, folder, stdout = mmd_study
    storage = f"sqlite:///{folder}/optuna.db"
    for family in ("gmwae", "gmvae"):
        study = optuna.load_study(study_name=f"mmd/{family}", storage=storage)
        assert study.direction == optuna.study.StudyDirection.MINIMIZE
        assert study.metric_names == ["val/mmd"]
        # the ledger's best value is the lowest val/mmd the trial reported
        for t in study.trials:
            assert t.user_attrs["best_value"] == pytest.approx(min(t.intermediate_values.values()))
        lowest = min(t.user_attrs["best_value"] for t in study.trials)
        assert study_status(spec)[family]["best_value"] == pytest.approx(lowest)
        ranked = [t.user_attrs["best_value"] for t in chosen_trials(spec, 3)[family]]
        assert ranked == sorted(ranked) and ranked[0] == pytest.approx(lowest)

    data = D.load_study_data(spec)
    assert data.objective == Objective("val/mmd", "min")
    ov = D.overview(data)
    for family in ("gmwae", "gmvae"):
        lowest = min(t.best_value for t in data.of(family))
        assert D.best_trial(data, family).best_value == pytest.approx(lowest)
        so_far = [v for _, v in ov[family]["best_so_far"]]
        assert so_far == sorted(so_far, reverse=True) and so_far[-1] == pytest.approx(lowest)
        for c in D.learning_curves(data)[family]:  # the curves are the objective's values
            assert all(0 <= v < 5 for v in c["acc"]) and not math.isnan(sum(c["acc"]))

    status = gmwae("study", "status", spec_file, cwd=folder, timeout=120)
    assert "best val/mmd" in status.stdout

    out = folder / "exported"
    done = gmwae("study", "export", spec_file, "--top", "2", "--out", out, cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    index = json.loads((out / "export.json").read_text())
    for family in ("gmwae", "gmvae"):
        mmd = [r["metrics"]["val/mmd"] for r in index["trials"] if r["family"] == family]
        assert mmd == sorted(mmd), (family, mmd)  # lowest first
    # The export table shows the objective the study ran with (the spec file passed here
    # does not name it: it was set with --set), with each trial's value; export.json too.
    assert "val mmd ↓" in done.stdout, done.stdout[-3000:]
    first = index["trials"][0]
    assert first["objective"] == {"metric": "val/mmd", "mode": "min",
                                  "value": first["metrics"]["val/mmd"]}
    assert f"{first['metrics']['val/mmd']:.4g}" in done.stdout
