"""What a family's Optuna trial states mean to the platform (read by the runner, resume,
status, export and the dashboards; light to import: no Ray, no Optuna)."""
from __future__ import annotations

__all__ = ["FINISHED_STATES", "SCORED_STATES", "scored_trials", "best_value"]

FINISHED_STATES = ("COMPLETE", "PRUNED", "FAIL")
SCORED_STATES = ("COMPLETE", "PRUNED")
"""Trials with a validation score and a checkpoint: COMPLETE ran their whole budget, PRUNED
were stopped early by ASHA (their value is the one at the iteration they were stopped)."""


def scored_trials(study) -> list:
    """A family's trials that have a score, whether they ran to the end or ASHA stopped them."""
    return [t for t in study.get_trials(deepcopy=False)
            if t.state.name in SCORED_STATES and t.value is not None]


def best_value(trial) -> float:
    """A trial's best value of the study's metric over its iterations (the ledger's
    `best_value`; Optuna's own value is the last one reported)."""
    return trial.user_attrs.get("best_value", trial.value)
