"""What the report shows, as plain data: read once from the stores, then pure functions.

    data = load_study_data(spec)            # Optuna + MLflow -> StudyData (the only I/O)
    overview(data)                           # every other function: StudyData -> dicts/lists

The drawing (dashboards.report) only turns these values into Plotly figures, so each
number on the page can be tested here without a browser.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from study.objective import DEFAULT_METRIC, Objective
from study.trial_states import SCORED_STATES, best_value, scored_trials

__all__ = ["TrialRow", "StudyData", "load_study_data", "overview", "family_comparison",
           "collapse", "search_insight", "learning_curves", "trial_links", "pareto_front",
           "COMPARED_METRICS"]

ACC = "val/cluster_acc"
COMPARED_METRICS = ("val/cluster_acc", "val/ami", "val/active_components",
                    "val/assignment_entropy", "val/mmd")


@dataclass
class TrialRow:
    family: str
    number: int
    state: str
    """Optuna state: COMPLETE, PRUNED (stopped early by ASHA), FAIL, RUNNING, WAITING."""
    params: dict[str, Any]
    best_value: Optional[float] = None
    """Best value of the study's metric over the trial's iterations."""
    iterations: int = 0
    stopped_early: bool = False
    """ASHA stopped it before max_iterations (its values are not final)."""
    final: dict[str, float] = field(default_factory=dict)
    """Validation metrics at its last iteration (from MLflow)."""
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(iteration, the study's metric) per iteration."""
    run_id: Optional[str] = None
    exported_to: Optional[str] = None
    failure_reason: Optional[str] = None
    started: Optional[datetime] = None
    completed: Optional[datetime] = None


@dataclass
class StudyData:
    name: str
    families: tuple[str, ...]
    max_iterations: int
    trials: list[TrialRow]
    histories: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Per family, the best trial's step history: step, active_components, assignment_entropy."""
    label_by_k: dict[str, list[list[float]]] = field(default_factory=dict)
    """Per family, the best trial's label-by-k matrix (labels x K)."""
    importances: dict[str, Any] = field(default_factory=dict)
    """Per family: {param: importance}, or a sentence saying why there are none."""
    confirm: Optional[dict] = None
    mlflow_url: Optional[str] = None
    """Base URL of an MLflow UI for links (None: no links)."""
    experiment_id: Optional[str] = None
    metric: str = DEFAULT_METRIC
    """The study's objective (its spec's metric and mode): best values, curves and ranks."""
    mode: str = "max"

    @property
    def objective(self) -> Objective:
        return Objective(self.metric, self.mode)

    def of(self, family: str) -> list[TrialRow]:
        return [t for t in self.trials if t.family == family]


def best_trial(data: StudyData, family: str) -> Optional[TrialRow]:
    done = [t for t in data.of(family) if t.state in SCORED_STATES and t.best_value is not None]
    return data.objective.best(done, lambda t: t.best_value, lambda t: t.number)


# ----------------------------------------------------------------------------- reading
def load_study_data(spec, mlflow_url: Optional[str] = None, with_history: bool = True) -> StudyData:
    """Read a study's Optuna trials and MLflow runs (artifacts of the best trials only)."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import optuna
    from mlflow.tracking import MlflowClient

    from study.resume import recorded_spec
    from study.stores import open_optuna_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_optuna_storage(spec.store("optuna"))
    recorded = recorded_spec(storage, spec) or spec.to_dict()
    families = tuple(recorded.get("families", spec.families))
    client = MlflowClient(spec.store("mlflow"))
    experiment = client.get_experiment_by_name(spec.name)
    runs = {}
    if experiment is not None:
        for run in client.search_runs([experiment.experiment_id], "tags.role = 'trial'",
                                      max_results=50000):
            runs[(run.data.tags.get("family"), run.data.tags.get("optuna_trial"))] = run
    tracking = spec.store("mlflow")
    if mlflow_url is None and tracking.startswith(("http://", "https://")):
        mlflow_url = tracking
    # a study recorded before `metric` and `mode` existed optimised val/cluster_acc, max
    objective = Objective(recorded.get("metric") or DEFAULT_METRIC, recorded.get("mode"))
    data = StudyData(spec.name, families, int(recorded.get("max_iterations", spec.max_iterations)),
                     [], mlflow_url=mlflow_url,
                     experiment_id=experiment.experiment_id if experiment else None,
                     metric=objective.metric, mode=objective.mode)
    studies = {}
    for family in families:
        try:
            study = optuna.load_study(study_name=f"{spec.name}/{family}", storage=storage)
        except KeyError:
            continue
        studies[family] = study
        for t in study.get_trials(deepcopy=False):
            run = runs.get((family, str(t.number)))
            row = TrialRow(family, t.number, t.state.name,
                           dict(t.params),
                           best_value=best_value(t),
                           iterations=int(t.user_attrs.get("latest_iteration", 0)),
                           stopped_early=t.state.name == "PRUNED",
                           started=t.datetime_start, completed=t.datetime_complete)
            if run is not None:
                tags = run.data.tags
                row.run_id = run.info.run_id
                row.iterations = int(tags.get("iterations", row.iterations) or 0)
                row.stopped_early = row.stopped_early or tags.get("stopped_early") == "true"
                row.exported_to = tags.get("exported_to")
                row.failure_reason = tags.get("failure_reason")
                row.final = {k: v for k, v in run.data.metrics.items() if k.startswith("val/")}
                if with_history:
                    row.curve = [(m.step, m.value) for m in
                                 client.get_metric_history(run.info.run_id, data.metric)]
            data.trials.append(row)
    for family, study in studies.items():
        data.importances[family] = _importances(study)
        best = best_trial(data, family)
        if best is None or best.run_id is None or not with_history:
            continue
        history = {"step": []}
        for key in ("active_components", "assignment_entropy"):
            points = client.get_metric_history(best.run_id, f"history/{key}")
            history[key] = [m.value for m in sorted(points, key=lambda m: m.step)]
            history["step"] = [m.step for m in sorted(points, key=lambda m: m.step)]
        if history["step"]:
            data.histories[family] = history
        try:
            path = client.download_artifacts(best.run_id, "label_by_k.json")
            data.label_by_k[family] = json.loads(Path(path).read_text())
        except Exception:  # noqa: BLE001 - a trial from before label_by_k was logged
            pass
    data.confirm = _latest_confirm(client, spec.name, experiment)
    return data


def _importances(study) -> Any:
    """Optuna's parameter importances for each scored trial's best value of the metric.

    Optuna reads only COMPLETE trials; a study under ASHA has most of its trials PRUNED,
    so the scored trials are copied, as COMPLETE with their best value, into an in-memory
    study first."""
    import optuna

    done = scored_trials(study)
    if len(done) < 2:
        return (f"Parameter importances need at least 2 finished trials; this family has "
                f"{len(done)}.")
    copy = optuna.create_study(direction=study.direction)
    copy.add_trials([optuna.trial.create_trial(
        params=t.params, distributions=t.distributions, state=optuna.trial.TrialState.COMPLETE,
        value=best_value(t)) for t in done])
    try:
        return dict(optuna.importance.get_param_importances(copy))
    except (RuntimeError, ValueError) as e:
        return f"Optuna could not compute parameter importances: {e}"


def _latest_confirm(client, name: str, experiment) -> Optional[dict]:
    if experiment is None:
        return None
    parents = client.search_runs([experiment.experiment_id], "tags.role = 'study'", max_results=1)
    if not parents:
        return None
    try:
        path = client.download_artifacts(parents[0].info.run_id, "confirm/confirm.json")
    except Exception:  # noqa: BLE001 - no confirm run yet
        return None
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------- pure
def overview(data: StudyData) -> dict[str, dict[str, Any]]:
    """Per family: trial counts by outcome, best-so-far accuracy by trial number, wall time."""
    out = {}
    for family in data.families:
        trials = sorted(data.of(family), key=lambda t: t.number)
        best, curve = None, []
        for t in trials:
            if t.state in SCORED_STATES and data.objective.better(t.best_value, best):
                best = t.best_value
            if best is not None:
                curve.append((t.number, best))
        starts = [t.started for t in trials if t.started]
        ends = [t.completed for t in trials if t.completed]
        out[family] = {
            "trials": len(trials),
            "completed": sum(t.state in SCORED_STATES and not t.stopped_early for t in trials),
            "stopped_early": sum(t.state in SCORED_STATES and t.stopped_early for t in trials),
            "failed": sum(t.state == "FAIL" for t in trials),
            "running": sum(t.state in ("RUNNING", "WAITING") for t in trials),
            "best_so_far": curve,
            "best": curve[-1][1] if curve else None,
            "wall_seconds": (max(ends) - min(starts)).total_seconds() if starts and ends else None,
        }
    return out


def family_comparison(data: StudyData) -> dict[str, dict[str, list[float]]]:
    """Per family and metric, the values of the trials that ran their full budget (ASHA-stopped
    trials were judged on fewer iterations and are left out)."""
    out = {}
    for family in data.families:
        full = [t for t in data.of(family) if t.state in SCORED_STATES and not t.stopped_early]
        out[family] = {k: [t.final[k] for t in full if k in t.final and math.isfinite(t.final[k])]
                       for k in COMPARED_METRICS}
    return out


def collapse(data: StudyData) -> dict[str, dict[str, Any]]:
    """Per family, for its best trial: active components and assignment entropy over the
    training steps (paper Fig. 1) and the label-by-k matrix (Fig. 5a)."""
    out = {}
    for family in data.families:
        best = best_trial(data, family)
        if best is None:
            continue
        out[family] = {"trial": best.number, "history": data.histories.get(family),
                       "label_by_k": data.label_by_k.get(family)}
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (higher accuracy, lower MMD),
    ordered by accuracy."""
    front = []
    for i, (acc, mmd) in enumerate(points):
        if not any((a >= acc and m <= mmd) and (a > acc or m < mmd) for a, m in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def search_insight(data: StudyData) -> dict[str, dict[str, Any]]:
    """Per family: importances, the finished trials' params with accuracy, MMD and active
    components (for parallel coordinates and scatter plots), the K-by-d mean of active
    components, and the accuracy/MMD Pareto front. On images without labels the study's
    label-free objective takes accuracy's place (`score`, `score_label`; rows keep the
    key "acc")."""
    out = {}
    for family in data.families:
        scored = [t for t in data.of(family) if t.state in SCORED_STATES]
        # accuracy where the data has labels; else the study's own label-free objective
        score = ACC if any(ACC in t.final for t in scored) else data.objective.metric
        sign = 1.0 if score == ACC or data.objective.mode == "max" else -1.0
        done = [t for t in scored if score in t.final]
        params = sorted({p for t in done for p in t.params})
        rows = [{**t.params, "number": t.number, "acc": t.final[score],
                 "mmd": t.final.get("val/mmd", float("nan")),
                 "active": t.final.get("val/active_components", float("nan")),
                 "stopped_early": t.stopped_early} for t in done]
        cells: dict[tuple[int, int], list[float]] = defaultdict(list)
        for r in rows:
            if "K" in r and "latent_dim" in r and math.isfinite(r["active"]):
                cells[(r["K"], r["latent_dim"])].append(r["active"])
        Ks = sorted({k for k, _ in cells})
        ds = sorted({d for _, d in cells})
        heat = [[(sum(cells[(k, d)]) / len(cells[(k, d)])) if cells.get((k, d)) else None
                 for k in Ks] for d in ds]
        finite = [i for i, r in enumerate(rows) if math.isfinite(r["mmd"])]
        front = [finite[i] for i in pareto_front([(sign * rows[i]["acc"], rows[i]["mmd"])
                                                  for i in finite])]
        out[family] = {"importances": data.importances.get(family), "params": params,
                       "rows": rows, "heatmap": {"K": Ks, "d": ds, "active": heat},
                       "pareto": front, "score": score,
                       "score_label": "val acc" if score == ACC else score.replace("/", " ")}
    return out


def learning_curves(data: StudyData) -> dict[str, list[dict[str, Any]]]:
    """Per family, each trial's val accuracy per iteration, marked when ASHA stopped it."""
    return {family: [{"number": t.number, "iterations": [i for i, _ in t.curve],
                      "acc": [v for _, v in t.curve], "stopped_early": t.stopped_early,
                      "state": t.state} for t in sorted(data.of(family), key=lambda t: t.number)
                     if t.curve]
            for family in data.families}


def trial_links(data: StudyData) -> list[dict[str, Any]]:
    """One row per trial: outcome, best accuracy, its MLflow run link, its export folder."""
    rows = []
    for t in sorted(data.trials, key=lambda t: (t.family, t.number)):
        url = None
        if data.mlflow_url and t.run_id and data.experiment_id:
            url = f"{data.mlflow_url.rstrip('/')}/#/experiments/{data.experiment_id}/runs/{t.run_id}"
        outcome = {"COMPLETE": "stopped early" if t.stopped_early else "completed",
                   "PRUNED": "stopped early", "FAIL": "failed"}.get(t.state, t.state.lower())
        rows.append({"family": t.family, "number": t.number, "outcome": outcome,
                     "best_value": t.best_value, "iterations": t.iterations,
                     "params": t.params, "run_id": t.run_id, "mlflow_url": url,
                     "exported_to": t.exported_to, "failure_reason": t.failure_reason})
    return rows
