"""Both families' searches in one Tune run, so the cluster stays busy.

Run one after the other, a study leaves the cluster idling while one family's last
trials finish and only then starts the other. Here one Tuner runs every trial; each trial
belongs to one family (its config's `_family`) and everything family-specific stays
per family, so the comparison stays fair:

- FamilySearch hands out trials in turn from each family's own StudySearch (its own
  Optuna study, sampler and trial budget) until every budget is used;
- FamilyScheduler keeps one ASHA per family: a GM-VAE trial is never stopped for being
  worse than GM-WAE trials at the same rung;
- ByFamily routes each trial's callbacks (the Optuna ledger, the MLflow logger) to its
  family's.
"""
from __future__ import annotations

from typing import Any, Optional

from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

__all__ = ["FAMILY", "FamilySearch", "FamilyScheduler", "ByFamily", "family_of"]

FAMILY = "_family"
"""The config key naming a trial's family (dropped before the config reaches the core)."""


def family_of(trial) -> str:
    return trial.config[FAMILY]


class FamilySearch(Searcher):
    """Each family's searcher in turn, `budget[family]` trials each."""

    def __init__(self, searchers: dict[str, Searcher], budget: dict[str, int], metric: str,
                 mode: str):
        super().__init__(metric=metric, mode=mode)
        self.searchers = searchers
        self.remaining = dict(budget)
        self.asked = {family: 0 for family in searchers}
        self.owner: dict[str, str] = {}

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], config: dict,
                              **spec: Any) -> bool:
        return True  # each family's searcher was built with its metric and space

    def suggest(self, trial_id: str) -> Optional[dict]:
        waiting = False
        for family in sorted(self.searchers, key=lambda f: self.asked[f]):
            if self.remaining[family] <= 0:
                continue
            config = self.searchers[family].suggest(trial_id)
            if config == Searcher.FINISHED:
                self.remaining[family] = 0
                continue
            if config is None:
                waiting = True
                continue
            self.remaining[family] -= 1
            self.asked[family] += 1
            self.owner[trial_id] = family
            return {**config, FAMILY: family}
        return None if waiting else Searcher.FINISHED

    def save(self, checkpoint_path: str) -> None:
        """Nothing: a resumed study reads its Optuna storage, never Tune's snapshot."""

    def restore(self, checkpoint_path: str) -> None:
        """Nothing (see save)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.owner:
            self.searchers[self.owner[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None,
                          error: bool = False) -> None:
        if trial_id in self.owner:
            self.searchers[self.owner[trial_id]].on_trial_complete(trial_id, result, error)


class FamilyScheduler(TrialScheduler):
    """One scheduler per family (e.g. ASHA), each seeing only its family's trials."""

    def __init__(self, schedulers: dict[str, TrialScheduler]):
        super().__init__()
        self.schedulers = schedulers
        self._fifo = FIFOScheduler()  # which pending trial starts next: first come, any family

    def set_search_properties(self, metric: Optional[str], mode: Optional[str],
                              **spec: Any) -> bool:
        return all(s.set_search_properties(metric, mode, **spec) for s in self.schedulers.values())

    def on_trial_add(self, tune_controller, trial) -> None:
        self.schedulers[family_of(trial)].on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.schedulers[family_of(trial)].on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self.schedulers[family_of(trial)].on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self.schedulers[family_of(trial)].on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.schedulers[family_of(trial)].on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        return self._fifo.choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return "; ".join(f"{f}: {s.debug_string()}" for f, s in self.schedulers.items())


class ByFamily(tune.Callback):
    """Routes every per-trial callback to the callbacks of the trial's family."""

    def __init__(self, callbacks: dict[str, list[tune.Callback]]):
        self.callbacks = callbacks

    def _route(self, hook: str, trial, **kwargs: Any) -> None:
        for callback in self.callbacks.get(family_of(trial), []):
            getattr(callback, hook)(trial=trial, **kwargs)

    def setup(self, **info: Any) -> None:
        for callbacks in self.callbacks.values():
            for callback in callbacks:
                callback.setup(**info)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._route("on_trial_start", trial, iteration=iteration, trials=trials, **info)

    def on_trial_restore(self, iteration, trials, trial, **info):
        self._route("on_trial_restore", trial, iteration=iteration, trials=trials, **info)

    def on_trial_save(self, iteration, trials, trial, **info):
        self._route("on_trial_save", trial, iteration=iteration, trials=trials, **info)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._route("on_trial_result", trial, iteration=iteration, trials=trials, result=result,
                    **info)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._route("on_trial_complete", trial, iteration=iteration, trials=trials, **info)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._route("on_trial_recover", trial, iteration=iteration, trials=trials, **info)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._route("on_trial_error", trial, iteration=iteration, trials=trials, **info)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self._route("on_checkpoint", trial, iteration=iteration, trials=trials,
                    checkpoint=checkpoint, **info)

    def on_experiment_end(self, trials, **info):
        for family, callbacks in self.callbacks.items():
            mine = [t for t in trials if t.config.get(FAMILY) == family]
            for callback in callbacks:
                callback.on_experiment_end(trials=mine, **info)
