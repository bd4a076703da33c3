"""The Optuna side of a study: the storage is the source of truth, so a study can resume.

A Tune run keeps its own snapshot of the searcher, and after a hard kill of the driver
that snapshot is older than the database (Tuner.restore then fails). So resume never
restores Tune's state; it reads each family's Optuna study instead:

- COMPLETE, PRUNED and FAIL trials are finished: kept as they are, counted once;
- RUNNING trials were cut off by the kill: each is retried as a new Tune trial that is
  bound to the *same* Optuna trial (same number, same params) and starts from the last
  checkpoint the ledger recorded for it;
- the rest of the budget is asked from the sampler as usual.

Every Tune trial's config carries `_optuna_trial` (its Optuna number); the ledger callback
records on that Optuna trial where its latest and best checkpoints are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import optuna
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from .trial_states import FINISHED_STATES

__all__ = ["StudySearch", "TrialLedger", "FamilyPlan", "plan_family", "OPTUNA_TRIAL", "ITERATION",
           "RESUME_FROM", "ORIGIN", "private_keys_removed", "stale_runs_closed"]

OPTUNA_TRIAL = "_optuna_trial"
ITERATION = "iteration"
"""The trial's own iteration count, reported by the trainable: it goes on across retries
and resumes, unlike Tune's training_iteration (ASHA's rungs and Optuna's steps use it)."""
RESUME_FROM = "_resume_from"
ORIGIN = "_origin"
"""Where a trial's values came from: "paper point", "points[i]" (the spec's), or "sampled";
an Optuna user attribute and an MLflow tag of the trial (`origin`)."""


def private_keys_removed(config: dict[str, Any]) -> dict[str, Any]:
    """The searched values only (the platform's own `_` keys dropped)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


@dataclass(frozen=True)
class FamilyPlan:
    """What one family's run has to do: retry the cut-off trials, then ask for `new` more."""

    study_name: str
    requested: int
    finished: int = 0
    retry: tuple[int, ...] = ()
    """Optuna numbers of trials left RUNNING by a killed driver."""
    exists: bool = False

    @property
    def new(self) -> int:
        return max(0, self.requested - self.finished - len(self.retry))

    @property
    def samples(self) -> int:
        return len(self.retry) + self.new


def plan_family(storage, study_name: str, requested: int) -> FamilyPlan:
    """Count an Optuna study's trials by state (no study yet: everything is new)."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return FamilyPlan(study_name, requested)
    trials = study.get_trials(deepcopy=False)
    finished = sum(t.state.name in FINISHED_STATES for t in trials)
    retry = tuple(t.number for t in trials if t.state.name == "RUNNING")
    return FamilyPlan(study_name, requested, finished, retry, exists=bool(trials))


class StudySearch(OptunaSearch):
    """OptunaSearch that tags each config with its Optuna number and can re-attach
    Tune trials to Optuna trials a killed driver left RUNNING."""

    def __init__(self, *args, retry: tuple[int, ...] = (), pruned_below: Optional[int] = None,
                 origins: tuple[str, ...] = (), **kwargs):
        """`pruned_below`: with ASHA, the iteration budget. A trial that ends without error
        before it was stopped by the scheduler: it becomes a PRUNED Optuna trial.
        `origins`: what each of `points_to_evaluate` is ("paper point", "points[0]"), in
        order; a new study's enqueued trials are its first, numbered in that order."""
        super().__init__(*args, **kwargs)
        self._origins = tuple(origins)
        self._retry = list(retry)
        self._pruned_below = pruned_below
        self._reported: dict[str, int] = {}  # trial id -> the last iteration told to Optuna

    def suggest(self, trial_id: str) -> Optional[dict]:
        extra: dict[str, Any] = {}
        if trial_id not in self._ot_trials and self._retry:
            frozen = self._ot_study.trials[self._retry.pop(0)]  # trials are ordered by number
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, frozen._trial_id)
            extra[RESUME_FROM] = frozen.user_attrs.get("latest_checkpoint")
        config = super().suggest(trial_id)
        if not isinstance(config, dict):
            return config
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr("tune_trial_id", trial_id)
        origin = self._origin(ot_trial)
        return {**config, OPTUNA_TRIAL: ot_trial.number, ORIGIN: origin, **extra}

    def _origin(self, ot_trial) -> str:
        """The trial's origin, recorded on it once (a retried trial keeps its own)."""
        storage = self._ot_study._storage
        origin = storage.get_trial(ot_trial._trial_id).user_attrs.get("origin")
        if origin is None:
            enqueued = "fixed_params" in storage.get_trial_system_attrs(ot_trial._trial_id)
            origin = ("sampled" if not enqueued else self._origins[ot_trial.number]
                      if ot_trial.number < len(self._origins) else "enqueued")
            ot_trial.set_user_attr("origin", origin)
        return origin

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Intermediate values at the trial's own iteration: a trial retried after a lost
        node or a killed driver continues at iteration N while Tune counts from 1 again."""
        if ITERATION in result:
            result = {**result, "training_iteration": result[ITERATION]}
        super().on_trial_result(trial_id, result)
        if ITERATION in result and trial_id not in self._completed_trials:
            self._reported[trial_id] = int(result[ITERATION])

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None,
                          error: bool = False) -> None:
        """Tune may hand a trial's last result only to on_trial_complete (a trial ASHA
        stops): record it as an intermediate value too, unless on_trial_result already did
        (Optuna would warn and ignore it), so Optuna's curves end where the trial ended.

        A trial that ASHA stopped before its budget is told to Optuna as PRUNED (Ray's
        OptunaSearch would tell it COMPLETE): Optuna then takes its last intermediate value
        as its value, and its tools (optuna-dashboard, plots, `best_trial`) show it apart."""
        ot_trial = self._ot_trials.get(trial_id)
        value = (result or {}).get(self.metric)
        if (ot_trial is not None and trial_id not in self._completed_trials
                and isinstance(value, (int, float)) and math.isfinite(value)
                and ITERATION in result):
            if self._reported.pop(trial_id, None) != int(result[ITERATION]):
                ot_trial.report(float(value), int(result[ITERATION]))
            if (not error and self._pruned_below is not None
                    and int(result[ITERATION]) < self._pruned_below):
                ot_trial.set_user_attr("stopped_by", "ASHA")
                result = {k: v for k, v in result.items() if k != self.metric}
        super().on_trial_complete(trial_id, result, error)


class TrialLedger(tune.Callback):
    """Records on each Optuna trial where its latest and best checkpoints are (best by the
    study's objective: `best_value` is the trial's best value of the objective's metric).

    Runs on the driver (one writer). Checkpoints are kept by Tune with `num_to_keep`
    ranked by the same metric, and the latest is always kept, so both paths stay valid.
    """

    def __init__(self, storage, study_name: str, objective,
                 also: tuple[str, ...] = ("val/active_components",)):
        self.study = optuna.load_study(study_name=study_name, storage=storage)
        self.objective, self.also = objective, also
        self.best: dict[int, float] = {}

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        number = trial.config.get(OPTUNA_TRIAL)
        result = trial.last_result or {}
        if number is None:
            return
        frozen = self.study.trials[number]
        location = checkpoint.path  # a URI when the Ray storage is remote (s3://, gs://)
        kind = getattr(checkpoint.filesystem, "type_name", "local")
        if kind != "local":
            location = f"{kind}://{location}"
        attrs = {"latest_checkpoint": location,
                 "latest_iteration": int(result.get(ITERATION, 0))}
        value = result.get(self.objective.metric)
        best = self.best.get(number, frozen.user_attrs.get("best_value"))
        if self.objective.better(value, best):
            self.best[number] = value
            attrs.update(best_checkpoint=location, best_value=float(value),
                         best_iteration=attrs["latest_iteration"])
            attrs.update({"best_" + k.split("/")[-1].replace("_components", ""): result[k]
                          for k in self.also if k in result})
        for key, val in attrs.items():
            self.study._storage.set_trial_user_attr(frozen._trial_id, key, val)


def stale_runs_closed(storage, study_name: str, client, experiment_id: str, family: str) -> int:
    """MLflow child runs left RUNNING whose Optuna trial has finished: set their status."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
    closed = 0
    for run in client.search_runs([experiment_id], f"tags.role = 'trial' and tags.family = "
                                                   f"'{family}' and attributes.status = 'RUNNING'"):
        number = run.data.tags.get("optuna_trial")
        state = states.get(int(number)) if number is not None else None
        if state in FINISHED_STATES:
            client.set_terminated(run.info.run_id, "FAILED" if state == "FAIL" else "FINISHED")
            closed += 1
    return closed

