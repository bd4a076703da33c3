"""The report's data functions on stores made by a real smoke study, and on edge cases."""
import math

import mlflow
import optuna
import pytest

from dashboards import data as D
from dashboards.report import build_report
from study.spec import load_spec


@pytest.fixture(scope="module")
def study_data(smoke_study):
    spec_file, folder = smoke_study
    spec = load_spec(spec_file)
    return spec, folder, D.load_study_data(spec, mlflow_url="http://127.0.0.1:5000")


def optuna_trials(folder, family):
    return optuna.load_study(study_name=f"smoke/{family}",
                             storage=f"sqlite:///{folder}/optuna.db").trials


def child_runs(folder):
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["smoke"], filter_string="tags.role = 'trial'")
    return {(r["tags.family"], int(r["tags.optuna_trial"])): r for _, r in runs.iterrows()}


def test_overview_counts_and_best_so_far_match_the_stores(study_data):
    spec, folder, data = study_data
    runs = child_runs(folder)
    ov = D.overview(data)
    for family in ("gmwae", "gmvae"):
        trials = optuna_trials(folder, family)
        stopped = sum(runs[(family, t.number)]["tags.stopped_early"] == "true" for t in trials)
        assert ov[family]["trials"] == len(trials) == spec.trials
        assert ov[family]["stopped_early"] == stopped
        assert ov[family]["completed"] == len(trials) - stopped
        assert ov[family]["failed"] == 0 and ov[family]["running"] == 0
        assert ov[family]["best"] == max(t.user_attrs["best_value"] for t in trials)
        values = [v for _, v in ov[family]["best_so_far"]]
        assert values == sorted(values) and values[-1] == ov[family]["best"]
        assert ov[family]["wall_seconds"] > 0


def test_family_comparison_leaves_out_asha_stopped_trials(study_data):
    _, folder, data = study_data
    runs = child_runs(folder)
    comp = D.family_comparison(data)
    for family in ("gmwae", "gmvae"):
        full = [r for (f, _), r in runs.items() if f == family and r["tags.stopped_early"] == "false"]
        assert sorted(comp[family]["val/cluster_acc"]) == sorted(r["metrics.val/cluster_acc"] for r in full)
        assert len(comp[family]["val/mmd"]) == len(full)


def test_collapse_has_the_best_trials_step_history_and_label_by_k(study_data):
    _, folder, data = study_data
    col = D.collapse(data)
    for family in ("gmwae", "gmvae"):
        best = max(optuna_trials(folder, family), key=lambda t: (t.user_attrs["best_value"], -t.number))
        assert col[family]["trial"] == best.number
        steps = col[family]["history"]["step"]
        assert steps[0] == 1 and steps == sorted(steps) and len(set(steps)) == len(steps)
        active = col[family]["history"]["active_components"]
        assert len(active) == len(steps) and max(active) <= best.params["K"]
        matrix = col[family]["label_by_k"]
        assert len(matrix[0]) == best.params["K"]
        assert all(math.isclose(sum(row), 1.0, rel_tol=1e-4) for row in matrix)


def test_search_insight_has_lambda_only_for_gmwae_and_a_real_pareto_front(study_data):
    _, _, data = study_data
    ins = D.search_insight(data)
    assert "lambda_mmd" in ins["gmwae"]["params"] and "lambda_mmd" not in ins["gmvae"]["params"]
    for family in ("gmwae", "gmvae"):
        rows = ins[family]["rows"]
        assert len(rows) == 3
        front = [rows[i] for i in ins[family]["pareto"]]
        # the best accuracy is on the front (a tied row with a larger MMD may not be)
        assert max(f["acc"] for f in front) == max(r["acc"] for r in rows)
        for r in rows:  # every point off the front is beaten on both axes by one on it
            if r not in front:
                assert any(f["acc"] >= r["acc"] and f["mmd"] <= r["mmd"] for f in front)
        assert isinstance(ins[family]["importances"], dict)
        assert set(ins[family]["importances"]) == set(ins[family]["params"])


def test_learning_curves_mark_stopped_trials_and_links_point_at_runs(study_data):
    spec, folder, data = study_data
    runs = child_runs(folder)
    for family, curves in D.learning_curves(data).items():
        for c in curves:
            run = runs[(family, c["number"])]
            assert c["iterations"] == list(range(1, int(run["tags.iterations"]) + 1))
            assert c["stopped_early"] == (run["tags.stopped_early"] == "true")
            if c["stopped_early"]:
                assert len(c["iterations"]) < spec.max_iterations
    links = D.trial_links(data)
    assert len(links) == 2 * spec.trials
    for row in links:
        assert row["mlflow_url"].startswith("http://127.0.0.1:5000/#/experiments/")
        assert row["mlflow_url"].endswith(runs[(row["family"], row["number"])]["run_id"])
    assert data.confirm is not None and set(data.confirm["families"]) == {"gmwae", "gmvae"}


def test_pareto_front_on_known_points():
    points = [(0.5, 0.3), (0.6, 0.4), (0.4, 0.1), (0.45, 0.35), (0.6, 0.5)]
    assert D.pareto_front(points) == [2, 0, 1]
    assert D.pareto_front([]) == []


def failed_only() -> D.StudyData:
    return D.StudyData("broken", ("gmwae", "gmvae"), 3, [
        D.TrialRow("gmwae", 0, "FAIL", {"K": 10}, failure_reason="NonFiniteLossError: loss is nan"),
        D.TrialRow("gmvae", 0, "FAIL", {"K": 10}, failure_reason="out of memory")])


def test_a_study_with_only_failed_trials_still_renders_with_sentences():
    page = build_report(failed_only())
    assert "No trial has finished yet, so there is no best-so-far curve." in page
    assert "No trial ran its full budget" in page
    assert "No finished trial has a step history" in page
    assert "NonFiniteLossError: loss is nan" in page
    assert D.overview(failed_only())["gmwae"]["failed"] == 1


def test_one_family_one_trial_renders_without_comparisons():
    data = D.StudyData("single", ("gmvae",), 2, [D.TrialRow(
        "gmvae", 0, "COMPLETE", {"K": 8, "latent_dim": 4}, best_value=0.5, iterations=2,
        final={"val/cluster_acc": 0.5, "val/mmd": 0.2, "val/active_components": 5.0,
               "val/assignment_entropy": 0.9}, curve=[(1, 0.4), (2, 0.5)])],
        importances={"gmvae": "Parameter importances need at least 2 finished trials; this "
                              "family has 1."})
    page = build_report(data)
    assert "need at least 2 finished trials" in page
    assert "1 finished trial(s) with searched parameters" in page
    assert "leads:" not in page  # one family: no winner sentence
