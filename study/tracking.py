"""MLflow tracking, at the edge: one experiment per study, a parent run, one child per trial.

The callback runs on the Tune driver, so only one process writes to the tracking store
(sqlite stays safe with concurrent trials). It logs each trial's params and tags when it
starts, its metrics at every iteration (step = iteration), and when it ends, from its
latest checkpoint, the figures (when it ran to the end), the step-level history as
`history/...` metrics (step = training step), the label-by-k matrix, and its status:
FINISHED, or FAILED with the reason as a tag.
"""
from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray import tune

from .search import OPTUNA_TRIAL, ORIGIN

__all__ = ["StudyTracker", "TrialLogger", "git_sha", "VAL_ACC", "VAL_MMD", "VAL_ACTIVE",
           "compare_views", "runs_view_url", "TRIALS_VIEW"]

VAL_ACC = "val/cluster_acc"
# MLflow 3's experiment kind (model training, not GenAI). MLflow 3.17's UI decides its view
# by a global GenAI / Model training switch instead (default GenAI), so the links this
# platform prints carry workflowType=machine_learning (runs_view_url).
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
VAL_MMD = "val/mmd"
VAL_ACTIVE = "val/active_components"
TRACKED_PREFIXES = ("train/", "val/", "test/")
COMPARED_COLUMNS = (VAL_ACC, "val/ami", VAL_ACTIVE, VAL_MMD)
"""The metrics the saved runs views show as columns, after the family."""

SHARED_VIEW = "mlflow.sharedViewState."
"""MLflow's UI opens a saved runs view (filter, sort, columns, charts' filter) from the
experiment tag SHARED_VIEW + KEY when its URL carries viewStateShareKey=KEY."""
TRIALS_VIEW = "trials"


def compare_views(families: tuple[str, ...], params: list[str], metric: str = VAL_ACC,
                  mode: str = "max") -> dict[str, dict[str, Any]]:
    """The runs views a study saves in its experiment: every trial (`trials`) and each
    family's (`trials-gmwae`, ...), best `metric` first, with the family, the trial's origin
    (paper point, points[i], sampled), the metric, the compared metrics and the searched
    `params` as columns, and the charts limited to val/."""
    metrics = [metric, *(m for m in COMPARED_COLUMNS if m != metric)]
    base = {"orderByKey": f"metrics.`{metric}`", "orderByAsc": mode == "min",
            "selectedColumns": ["tags.`family`", "tags.`origin`", *(f"metrics.`{m}`" for m in metrics),
                                *(f"params.`{p}`" for p in params)],
            "chartsSearchFilter": "val/", "hideEmptyCharts": True}
    views = {TRIALS_VIEW: {**base, "searchFilter": "tags.role = 'trial'"}}
    for family in families:
        views[f"{TRIALS_VIEW}-{family}"] = {
            **base, "searchFilter": f"tags.role = 'trial' and tags.family = '{family}'"}
    return views


def runs_view_url(ui: str, experiment_id: str, view: str = TRIALS_VIEW,
                  charts: bool = False) -> str:
    """A link that opens the experiment's runs in MLflow's UI with a saved view: the table,
    or with `charts` every shown run's val/ curves side by side."""
    url = (f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
           f"&viewStateShareKey={view}")
    return url + ("&compareRunsMode=CHART" if charts else "")


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


NOTE = "mlflow.note.content"
"""A run's description in MLflow's UI."""


def source_tags(sha: str) -> dict[str, str]:
    """MLflow's own source tags: the UI's Source column shows the code and its commit."""
    return {"mlflow.source.type": "LOCAL", "mlflow.source.name": "gmwae-studies",
            "mlflow.source.git.commit": sha}


def flat_params(d: dict, mask: Callable[[str], str] = str) -> dict[str, str]:
    """A config or spec dict as MLflow params, one level of nesting dotted (model.K,
    storage.optuna, ...), lists comma-joined, every value through `mask`."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": mask(str(v)) for k, v in value.items()})
        else:
            out[key] = mask(",".join(map(str, value)) if isinstance(value, (list, tuple))
                            else str(value))
    return out


def flat_config(cfg) -> dict[str, str]:
    """A RunConfig as MLflow params: model.K, train.lr, data.dataset, family, ..."""
    return flat_params(cfg.to_dict())


def log_dataset(client: MlflowClient, run_id: str, info: dict) -> None:
    """The run's dataset (gmwae_core.data.describe_splits) as MLflow's own dataset input:
    the UI's Dataset column and the run's Datasets section."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=info["name"], digest=info["digest"], source_type="local",
                      source=json.dumps({"uri": info["source"]}),
                      schema=json.dumps({"images": "float32 (N, 1, 28, 28) in [0, 1]",
                                         "labels": "int64 (N,)"}),
                      profile=json.dumps({**info["sizes"], "split_seed": info["split_seed"]}))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[
        InputTag("mlflow.data.context", "train/val/test")])])


class StudyTracker:
    """The study's experiment and parent run in one tracking store."""

    def __init__(self, tracking_uri: str, study: str):
        self.client = MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(study)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            study, tags={EXPERIMENT_KIND: MODEL_TRAINING})
        if exp is not None and EXPERIMENT_KIND not in exp.tags:  # made before the tag existed
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        self.study = study
        parents = self.client.search_runs([self.experiment_id], "tags.role = 'study'",
                                          max_results=1)
        if parents:
            self.parent_run_id = parents[0].info.run_id
        else:
            self.parent_run_id = self.client.create_run(
                self.experiment_id, run_name=study,
                tags={"role": "study", "study": study, "git_sha": git_sha(),
                      **source_tags(git_sha())}).info.run_id

    def log_views(self, families: tuple[str, ...], params: list[str], metric: str = VAL_ACC,
                  mode: str = "max") -> None:
        """Save the compare_views in the experiment (replaced on resume)."""
        for key, state in compare_views(families, params, metric, mode).items():
            self.client.set_experiment_tag(self.experiment_id, SHARED_VIEW + key,
                                           json.dumps(state))

    def log_spec(self, spec_dict: dict, mask: Callable[[str], str] = str) -> None:
        """The spec as the parent run's artifact and params (`trials`, `fixed.batch_size`,
        `storage.optuna` with any password masked, ...). A resumed study's params stay as
        first logged (MLflow params are immutable); spec.json is the latest."""
        self.client.log_dict(self.parent_run_id, spec_dict, "spec.json")
        flat = flat_params(spec_dict, mask)
        logged = self.client.get_run(self.parent_run_id).data.params
        items = [Param(k, v[:6000]) for k, v in sorted(flat.items()) if k not in logged]
        for i in range(0, len(items), 90):
            self.client.log_batch(self.parent_run_id, params=items[i: i + 90])

    def log_family_best(self, family: str, number: int, best_iteration: Optional[int],
                        metric: str = VAL_ACC) -> None:
        """On the parent run, a finished family's best trial: its validation metrics at its
        best iteration as `best/{family}/val_cluster_acc`, ..., and its child run (tags and a
        link in the parent's description, which quotes the study's objective `metric`)."""
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.role = 'trial' and tags.family = '{family}' and "
                                  f"tags.optuna_trial = '{number}'", max_results=1)
        if not runs:
            return
        run = runs[0]
        metrics, best = [], {}
        for key in sorted(k for k in run.data.metrics if k.startswith("val/")):
            points = self.client.get_metric_history(run.info.run_id, key)
            at = [m for m in points if m.step == best_iteration] or points[-1:]
            if at:
                name = f"best/{family}/{key.replace('/', '_')}"
                metrics.append(Metric(name, at[0].value, int(1000 * time.time()), 0))
                best[key] = at[0].value
        if metrics:
            self.client.log_batch(self.parent_run_id, metrics=metrics)
        link = f"#/experiments/{self.experiment_id}/runs/{run.info.run_id}"
        self.client.set_tag(self.parent_run_id, f"best/{family}/run_id", run.info.run_id)
        self.client.set_tag(self.parent_run_id, f"best/{family}/optuna_trial", str(number))
        parent = self.client.get_run(self.parent_run_id)
        note = parent.data.tags.get(NOTE, f"Study {self.study}: its trials are this run's "
                                          f"children.")
        lines = [line for line in note.splitlines() if not line.startswith(f"- best {family}:")]
        value = best.get(metric)
        lines.append(f"- best {family}: [{run.info.run_name}]({link}) (Optuna trial {number}, "
                     f"best at iteration {best_iteration}"
                     + (f"; {metric} {value:.3f} there" if value is not None else "")
                     + ")")
        self.client.set_tag(self.parent_run_id, NOTE, "\n".join(lines))


class TrialLogger(tune.Callback):
    """Mirrors one family's Tune trials into nested MLflow runs."""

    def __init__(self, tracker: StudyTracker, family: str, max_iterations: int,
                 role: str = "trial", run_config: Optional[Callable[[dict], Any]] = None,
                 dataset: Optional[dict] = None):
        """role: "trial" (a search trial) or "confirm" (a re-training with a new seed).
        run_config: a trial's params -> the RunConfig it runs with (every value of it is
        logged as a param, `model.K`, `train.lr`, ..., beside the searched ones).
        dataset: describe_splits of the study's data, logged as every run's dataset."""
        self.tracker, self.family, self.max_iterations = tracker, family, max_iterations
        self.role = role
        self.run_config = run_config
        self.dataset = dataset
        self.notes: dict[str, str] = {}
        self.run_ids: dict[str, str] = {}
        self.iterations: dict[str, int] = {}
        self.sha = git_sha()

    @property
    def client(self) -> MlflowClient:
        return self.tracker.client

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.run_ids:
            return
        number = trial.config.get(OPTUNA_TRIAL)
        run_id = self._existing_run(number)
        if run_id is not None:  # a trial cut off by a killed driver, retried: same run
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "tune_trial_id", trial.trial_id)
            self.run_ids[trial.trial_id] = run_id
            return
        searched = {k: v for k, v in sorted(trial.config.items()) if not k.startswith("_")}
        origin = trial.config.get(ORIGIN)
        note = (f"{self.family} {self.role} {number if number is not None else trial.trial_id} "
                f"of study {self.tracker.study}" + (f" ({origin})" if origin else "") + ": " + ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in searched.items()))
        self.notes[trial.trial_id] = note
        tags = {"mlflow.parentRunId": self.tracker.parent_run_id, "role": self.role,
                "family": self.family, "study": self.tracker.study,
                "trial_id": trial.trial_id, "tune_trial_id": trial.trial_id, "git_sha": self.sha,
                NOTE: note, **source_tags(self.sha)}
        if number is not None:
            tags["optuna_trial"] = str(number)
        if origin is not None:
            tags["origin"] = origin
        if self.role != "trial":
            tags["seed"] = str(trial.config.get("seed"))
            tags["confirms_trial"] = str(trial.config.get("_confirms"))
            tags["confirm_batch"] = str(trial.config.get("_confirm_batch"))
        label = trial.trial_id if number is None else number
        if self.role != "trial":
            label = f"{self.role}-{label}-seed{trial.config.get('seed')}"
        run = self.client.create_run(self.tracker.experiment_id,
                                     run_name=f"{self.family}-{label}", tags=tags)
        self.run_ids[trial.trial_id] = run.info.run_id
        params = {k: str(v) for k, v in searched.items()}
        if self.run_config is not None:  # every value it runs with, preset and fixed ones too
            params.update(flat_config(self.run_config(searched)))
        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 90):  # log_batch takes at most 100 params
            self.client.log_batch(run.info.run_id, params=items[i: i + 90])
        if self.dataset is not None:
            log_dataset(self.client, run.info.run_id, self.dataset)

    def _existing_run(self, number) -> Optional[str]:
        if number is None:
            return None
        runs = self.client.search_runs(
            [self.tracker.experiment_id],
            f"tags.role = '{self.role}' and tags.family = '{self.family}' and "
            f"tags.optuna_trial = '{number}'", max_results=1)
        return runs[0].info.run_id if runs else None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            return
        step = int(result.get("iteration", result.get("training_iteration", 0)))
        self.iterations[trial.trial_id] = step
        ts = int(1000 * result.get("timestamp", 0))
        metrics = [Metric(k, float(v), ts, step) for k, v in result.items()
                   if k.startswith(TRACKED_PREFIXES) and isinstance(v, (int, float))
                   and math.isfinite(float(v))]
        self.write_metrics(run_id, metrics, result)

    def write_metrics(self, run_id: str, metrics: list, result: dict) -> None:
        """One result's metrics into its run, before the driver goes on (`result`: what
        Tune reported; benchmarks/driver.py times this write against the report)."""
        self.client.log_batch(run_id, metrics=metrics)

    def _finish(self, trial, status: str, reason: Optional[str] = None) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            return
        done = self.iterations.get(trial.trial_id, 0)
        self.client.set_tag(run_id, "iterations", str(done))
        self.client.set_tag(run_id, "stopped_early", str(status == "FINISHED" and
                                                         done < self.max_iterations).lower())
        if reason:
            self.client.set_tag(run_id, "failure_reason", reason[-4000:])
        outcome = (f"failed: {reason.strip().splitlines()[-1][:300]}" if reason else
                   f"{status.lower()} after {done} of {self.max_iterations} iterations"
                   + (" (stopped early by ASHA)" if status == "FINISHED" and
                      done < self.max_iterations else ""))
        self.client.set_tag(run_id, NOTE, f"{self.notes.get(trial.trial_id, '')}. {outcome}.")
        if trial.checkpoint is not None:
            with trial.checkpoint.as_directory() as folder:
                figures = Path(folder) / "figures"
                if figures.is_dir():
                    self.client.log_artifacts(run_id, str(figures), "figures")
                self._log_history(run_id, Path(folder))
        self.client.set_terminated(run_id, status)

    def _log_history(self, run_id: str, folder: Path) -> None:
        """The step-level history as `history/...` metrics (step = training step) and the
        label-by-k matrix as an artifact, from the trial's latest checkpoint."""
        history = folder / "history.json"
        if history.is_file():
            rows = json.loads(history.read_text())
            now = int(1000 * time.time())  # rows of checkpoints older than the "time" column
            metrics = [Metric(f"history/{k}", float(v),
                              int(1000 * row["time"]) if math.isfinite(row.get("time", math.nan))
                              else now, int(row["step"]))
                       for row in rows for k, v in row.items()
                       if k not in ("step", "time") and math.isfinite(float(v))]
            for i in range(0, len(metrics), 900):  # log_batch takes at most 1000 metrics
                self.client.log_batch(run_id, metrics=metrics[i: i + 900])
        if (folder / "label_by_k.json").is_file():
            self.client.log_artifact(run_id, str(folder / "label_by_k.json"))

    def on_trial_recover(self, iteration, trials, trial, **info):
        """Tune retries the trial (its node died, or it raised) from its last checkpoint."""
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is not None:
            self.client.set_tag(run_id, "retries", str(trial.num_failures))
            self.client.set_tag(run_id, "last_retry_reason", _failure_reason(trial)[-4000:])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "FAILED", _failure_reason(trial))


def _failure_reason(trial) -> str:
    """The trial's error: the last line of its traceback (the exception), else what Tune has."""
    path = trial.error_file  # written on the driver before this callback runs
    if path and Path(path).is_file():
        lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
        if lines:
            return lines[-1]
    error = trial.get_pickled_error() or trial.get_error()
    return str(error) if error else "unknown error (see the trial's error.txt in Ray's storage)"
