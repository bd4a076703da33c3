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
from pathlib import Path
from typing import Optional

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray import tune

__all__ = ["StudyTracker", "TrialLogger", "git_sha", "VAL_ACC", "VAL_MMD", "VAL_ACTIVE"]

VAL_ACC = "val/cluster_acc"
VAL_MMD = "val/mmd"
VAL_ACTIVE = "val/active_components"
TRACKED_PREFIXES = ("train/", "val/", "test/")


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class StudyTracker:
    """The study's experiment and parent run in one tracking store."""

    def __init__(self, tracking_uri: str, study: str):
        self.client = MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(study)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(study)
        self.study = study
        parents = self.client.search_runs([self.experiment_id], "tags.role = 'study'",
                                          max_results=1)
        if parents:
            self.parent_run_id = parents[0].info.run_id
        else:
            self.parent_run_id = self.client.create_run(
                self.experiment_id, run_name=study,
                tags={"role": "study", "study": study, "git_sha": git_sha()}).info.run_id

    def log_spec(self, spec_dict: dict) -> None:
        self.client.log_dict(self.parent_run_id, spec_dict, "spec.json")


class TrialLogger(tune.Callback):
    """Mirrors one family's Tune trials into nested MLflow runs."""

    def __init__(self, tracker: StudyTracker, family: str, max_iterations: int,
                 role: str = "trial"):
        """role: "trial" (a search trial) or "confirm" (a re-training with a new seed)."""
        self.tracker, self.family, self.max_iterations = tracker, family, max_iterations
        self.role = role
        self.run_ids: dict[str, str] = {}
        self.iterations: dict[str, int] = {}
        self.sha = git_sha()

    @property
    def client(self) -> MlflowClient:
        return self.tracker.client

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.run_ids:
            return
        number = trial.config.get("_optuna_trial")
        run_id = self._existing_run(number)
        if run_id is not None:  # a trial cut off by a killed driver, retried: same run
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "tune_trial_id", trial.trial_id)
            self.run_ids[trial.trial_id] = run_id
            return
        tags = {"mlflow.parentRunId": self.tracker.parent_run_id, "role": self.role,
                "family": self.family, "study": self.tracker.study,
                "trial_id": trial.trial_id, "tune_trial_id": trial.trial_id, "git_sha": self.sha}
        if number is not None:
            tags["optuna_trial"] = str(number)
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
        self.client.log_batch(run.info.run_id, params=[
            Param(k, str(v)) for k, v in sorted(trial.config.items()) if not k.startswith("_")])

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
            metrics = [Metric(f"history/{k}", float(v), 0, int(row["step"])) for row in rows
                       for k, v in row.items() if k != "step" and math.isfinite(float(v))]
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
